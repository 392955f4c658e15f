"""The training spine (tiltflow.training.spine): a third world registered from this module trains through
it with no change to tiltflow/; stage-2 bookkeeping (fake updates per generator update, metrics over
micro-batches, the gradient-sync hook); the reward-BP check at config load; the optional loggers."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pytest
import torch
from torch import nn

from tiltflow.cli import main
from tiltflow.config.loader import ConfigError
from tiltflow.config.schema import RunConfig
from tiltflow.models.ema import EMA
from tiltflow.models.roles import Roles
from tiltflow.rewards.base import RewardOutput, RewardSet
from tiltflow.storage import load, save_atomic
from tiltflow.training.spine import train
from tiltflow.worlds.base import WorldSetup
from tiltflow.worlds.registry import load_run_config, register_world


# ---- a toy third world: 3-D Gaussian data, a linear velocity model, reward = first coordinate ----------
@dataclass
class ToyRunConfig(RunConfig):
    world: Literal["toy"] = "toy"
    dim: int = 3
    data_mean: list[float] = field(default_factory=lambda: [1.0, -1.0, 0.5])


class Linear(nn.Module):
    """v(x, sigma) = W x + b + sigma c: enough to move, small enough to be instant."""

    def __init__(self, dim: int, seed: int):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w = nn.Parameter(0.1 * torch.randn(dim, dim, generator=g))
        self.b = nn.Parameter(torch.zeros(dim))
        self.c = nn.Parameter(torch.zeros(dim))

    def velocity(self, x, sigma, cond):
        return x @ self.w.T + self.b + sigma[:, None] * self.c


class FirstCoordinate:
    name, differentiable = "first", True

    def __call__(self, samples, prompts):
        return RewardOutput(scores=samples[:, 0])


class ToyTask:
    guidance_scale = 1.0
    device = torch.device("cpu")

    def __init__(self, dim: int):
        self.sample_shape = (dim,)
        self.rewards = RewardSet([FirstCoordinate()])

    def sample_prompts(self, n, generator):
        return [0] * n

    def encode(self, prompts):
        return None

    def encode_uncond(self, n):
        return None

    def decode(self, x):
        return x


@dataclass
class ToyModels:
    teacher: Linear
    generator: Linear
    fake: Linear

    def roles(self) -> Roles:
        return Roles(self.teacher, self.generator, self.fake, list(self.generator.parameters()),
                     list(self.fake.parameters()))

    def trainable_state(self):
        return {"generator": self.generator.state_dict(), "fake": self.fake.state_dict()}

    def load_trainable_state(self, state):
        self.generator.load_state_dict(state["generator"])
        self.fake.load_state_dict(state["fake"])

    def enable_activation_checkpointing(self):
        raise ConfigError("parallel.activation_checkpointing", "the toy world has nothing to checkpoint")


class ToyWorld:
    name = "toy"
    config_class = ToyRunConfig
    built: list[ToyModels] = []

    def build(self, cfg: ToyRunConfig, *, progress: bool = True) -> WorldSetup:
        teacher = Linear(cfg.dim, 0).requires_grad_(False)
        models = ToyModels(teacher, Linear(cfg.dim, 0), Linear(cfg.dim, 0))
        ToyWorld.built.append(models)

        def finish(ema: EMA) -> dict[str, Any]:
            with ema.applied():
                save_atomic(models.trainable_state(), Path(cfg.run_dir) / "final.pt")
            return {"finished": 1.0}

        def evaluate(step: int) -> dict[str, float]:
            return {"eval_w_norm": float(models.generator.w.detach().norm())}

        def describe_fault(err, where):
            return RuntimeError(f"toy fault during the {where}: {err}") if "device" in str(err) else None

        return WorldSetup(ToyTask(cfg.dim), models, cfg.sampler, finish, evaluate, eval_every=2,
                          describe_fault=describe_fault)


register_world("toy", ToyWorld)

TOY = ["world=toy", "log_every=1", "checkpoint_every=1", "stage1.num_iters=3", "stage1.batch_size=8",
       "stage1.n_fake=2", "stage2.num_iters=2", "stage2.num_prompts=2", "stage2.group_size=4", "stage2.ema_every=1"]


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("stage", ["ac_dmd", "rtdmd", "dm_bp"])
def test_a_third_world_trains_through_the_spine(stage, tmp_path):
    cfg = load_run_config(None, [*TOY, f"stage={stage}", f"run_dir={tmp_path}"])
    assert isinstance(cfg, ToyRunConfig)
    before = {k: v.clone() for k, v in Linear(3, 0).state_dict().items()}
    assert train(cfg, progress=False) == {"finished": 1.0}
    models = ToyWorld.built[-1]
    steps = cfg.stage1.num_iters if stage == "ac_dmd" else cfg.stage2.num_iters
    assert [r["step"] for r in records(tmp_path)] == list(range(1, steps + 1))
    assert "eval_w_norm" in records(tmp_path)[1]  # eval_every=2
    assert load(tmp_path / "checkpoint.pt")["step"] == steps
    final = load(tmp_path / "final.pt")
    for role in ("generator", "fake"):
        assert any(not torch.equal(final[role][k], before[k]) for k in before), f"{role} did not move"
    assert all(torch.equal(models.teacher.state_dict()[k], before[k]) for k in before)  # frozen


def test_a_third_world_through_the_cli(tmp_path, capsys):
    cfg_file = tmp_path / "toy.yaml"
    cfg_file.write_text("world: toy\nstage: ac_dmd\nstage1: {num_iters: 2, batch_size: 4, n_fake: 1}\n")
    assert main(["train", "--config", str(cfg_file), f"run_dir={tmp_path / 'run'}"]) == 0
    assert (tmp_path / "run" / "final.pt").is_file()
    assert main(["train", "--config", str(cfg_file), "world=nowhere"]) == 2
    assert "unknown world 'nowhere'" in capsys.readouterr().err


def _count_fake_steps(monkeypatch, tmp_path: Path, *overrides: str) -> list[int]:
    """Fake-score optimiser steps per stage-2 iteration."""
    counts: list[int] = []
    real_step = torch.optim.AdamW.step

    def counting(self, *a, **k):
        if getattr(self, "is_fake", False):
            counts[-1] += 1
        return real_step(self, *a, **k)

    from tiltflow.algorithms import rtdmd

    real_iter = rtdmd.RTDMD.step

    def step(self, it):
        self.state.fake_opt.is_fake = True
        counts.append(0)
        return real_iter(self, it)

    monkeypatch.setattr(torch.optim.AdamW, "step", counting)
    monkeypatch.setattr(rtdmd.RTDMD, "step", step)
    train(load_run_config(None, [*TOY, "stage=rtdmd", f"run_dir={tmp_path}", *overrides]), progress=False)
    return counts


@pytest.mark.parametrize(("n_fake", "accumulation"), [(1, 4), (6, 4), (3, 1)])
def test_stage2_fake_updates_per_generator_update_is_n_fake(n_fake, accumulation, monkeypatch, tmp_path):
    # Before the spine, the fake score stepped inside every micro-batch: accumulation * n_fake updates per
    # generator update (16 with the reference accumulation 16 and n_fake 1). Now n_fake means what METHOD.md
    # 5.5 says: fake updates per generator update.
    counts = _count_fake_steps(monkeypatch, tmp_path, f"stage2.n_fake={n_fake}",
                               f"stage2.accumulation={accumulation}")
    assert counts == [n_fake, n_fake]


def test_stage2_metrics_are_averaged_over_micro_batches(monkeypatch, tmp_path):
    # Before, the logged reward was the last micro-batch's; now it is the mean over all of them.
    seen: list[float] = []
    real = FirstCoordinate.__call__

    def recording(self, samples, prompts):
        out = real(self, samples, prompts)
        if not samples.requires_grad:  # the rollout's rewards, not the BP term's
            seen.append(float(out.scores.mean()))
        return out

    monkeypatch.setattr(FirstCoordinate, "__call__", recording)
    train(load_run_config(None, [*TOY, "stage=rtdmd", f"run_dir={tmp_path}", "stage2.num_iters=1",
                                 "stage2.accumulation=3"]), progress=False)
    assert len(seen) == 3 and len(set(seen)) == 3
    (rec,) = records(tmp_path)
    # The logged value is the float32 mean of the three; averaged in float64 it agrees to float32 rounding.
    assert rec["reward_total"] == pytest.approx(sum(seen) / 3, rel=1e-6)


def test_gradient_sync_hook_runs_only_on_the_last_micro_batch():
    from tiltflow.algorithms.rtdmd import RTDMD
    from tiltflow.config.schema import SamplerConfig, Stage2Config
    from tiltflow.training.spine import build_train_state

    calls: list[bool] = []

    class Hook:
        def __init__(self, enabled):
            calls.append(enabled)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    models = ToyModels(Linear(3, 0).requires_grad_(False), Linear(3, 0), Linear(3, 0))
    roles = models.roles()
    cfg = Stage2Config(num_prompts=2, group_size=4, accumulation=3)
    algo = RTDMD(cfg, SamplerConfig(), ToyTask(3), roles, build_train_state(cfg, roles), seed=0, grad_sync=Hook)
    algo.step(0)
    assert calls == [False, False, True]


def test_reward_bp_without_a_differentiable_reward_fails_at_config_load(tmp_path):
    problem = {"dim": 1, "prompts": [{"weights": [1.0], "means": [[0.0]], "covs": [[[1.0]]]}],
               "rewards": [{"type": "halfspace", "a": [1.0]}]}
    import yaml

    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"world": "gmm", "stage": "rtdmd", "problem": problem}))
    with pytest.raises(ConfigError) as err:
        load_run_config(path)
    assert "stage2.w_bp" in str(err.value) and "problem.rewards" in str(err.value)
    assert load_run_config(path, ["stage2.w_bp=0"]).stage2.w_bp == 0.0
    assert load_run_config(path, ["stage=grpo_only"]).stage2.w_bp == 0.0  # the preset switches it off
    with pytest.raises(ConfigError, match="stage2.w_bp"):
        load_run_config(None, ["world=diffusers", "stage=rtdmd", "prompts=[a]", "model.source=x",
                               "rewards=[{name: remote}]"])


def test_tensorboard_logger_writes_events(tmp_path):
    pytest.importorskip("tensorboard")
    train(load_run_config(None, [*TOY, "stage=ac_dmd", f"run_dir={tmp_path}", "logging.tensorboard=true"]),
          progress=False)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert "gen_dm_loss" in events.Tags()["scalars"]
    assert [e.step for e in events.Scalars("gen_dm_loss")] == [1, 2, 3]


def test_progress_line_off_a_terminal(tmp_path, capsys):
    # Off a terminal there is no bar: one line per interval (here every step) with step, elapsed and left.
    train(load_run_config(None, [*TOY, "stage=ac_dmd", f"run_dir={tmp_path}", "logging.progress_every_s=1e-9"]))
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("[toy ac_dmd]")]
    assert [ln.split()[3] for ln in lines] == ["1/3", "2/3", "3/3"]
    assert all("elapsed" in ln and "left" in ln for ln in lines)


def test_a_device_fault_names_the_phase_and_step(tmp_path, monkeypatch):
    """The world restates a device fault with where it happened (the diffusers world adds the model and the
    attention backend: tests/integration/test_attention_backend.py); other errors keep their own message."""
    calls = {"n": 0}
    real = Linear.velocity

    def failing(self, x, sigma, cond):
        calls["n"] += 1
        if calls["n"] > 5:
            raise RuntimeError("device lost")
        return real(self, x, sigma, cond)

    monkeypatch.setattr(Linear, "velocity", failing)
    with pytest.raises(RuntimeError, match=r"toy fault during the (fake|generator) update at step \d+: device lost"):
        train(load_run_config(None, [*TOY, "stage=ac_dmd", f"run_dir={tmp_path}"]), progress=False)
