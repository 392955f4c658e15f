"""Every gmm stage on a tiny 2-D problem (CPU): trainable networks move, the teacher does not, the run
directory is complete, resume == straight run, runs are deterministic, a non-finite loss stops the run
with the last checkpoint intact, and the PPO ratio is 1 on-policy."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from tiltflow.config.gmm import GMMRunConfig
from tiltflow.config.loader import from_dict, read_yaml
from tiltflow.rewards.base import RewardOutput, RewardSet
from tiltflow.storage import load
from tiltflow.training.spine import train
from tiltflow.worlds.gmm import runs

STAGES = ["ac_dmd", "dmd2", "rtdmd", "rtdmd_fullchain", "rtdmd_exact", "grpo_only", "bp_only", "dm_bp"]
# Which loss terms each stage logs (the presets switch the others off).
TERMS = {
    "ac_dmd": {"gen_dm_loss"},
    "dmd2": {"gen_dm_loss"},
    "rtdmd": {"pg_loss", "bp_loss", "dm_loss"},
    "rtdmd_fullchain": {"pg_loss", "bp_loss", "dm_loss"},
    "rtdmd_exact": {"dm_loss"},  # the reward enters through the tilted DM target only
    "grpo_only": {"pg_loss"},
    "bp_only": {"bp_loss"},
    "dm_bp": {"bp_loss", "dm_loss"},
}
ALL_TERMS = set().union(*TERMS.values())


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def assert_states_equal(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys(), what
    for k in a:
        if isinstance(a[k], dict):
            assert_states_equal(a[k], b[k], f"{what}.{k}")
        elif isinstance(a[k], (list, tuple)):
            assert len(a[k]) == len(b[k]), f"{what}.{k}"
            for i, (x, y) in enumerate(zip(a[k], b[k])):
                assert_states_equal({"v": x}, {"v": y}, f"{what}.{k}[{i}]")
        elif isinstance(a[k], torch.Tensor):
            assert torch.equal(a[k], b[k]), f"{what}.{k} differs"
        else:
            assert a[k] == b[k], f"{what}.{k}: {a[k]!r} != {b[k]!r}"


@pytest.fixture
def teacher_spy(monkeypatch):
    """Captures the teacher network run_stage uses, with a copy of its weights taken before training."""
    seen: dict = {}
    real = runs.run_teacher

    def spy(cfg, gmm, progress=True):
        net = real(cfg, gmm, progress)
        seen["net"] = net
        seen["before"] = {k: v.clone() for k, v in net.state_dict().items()}
        return net

    monkeypatch.setattr(runs, "run_teacher", spy)
    return seen


@pytest.mark.parametrize("stage", STAGES)
def test_stage_trains_generator_and_fake_not_teacher(stage, make_cfg, tmp_path, teacher_spy, teacher_run):
    teacher_file = (teacher_run / "teacher.pt").read_bytes()
    run_dir = tmp_path / stage
    cfg = make_cfg(stage, run_dir)
    final_metrics = train(cfg, progress=False)

    for name in ("config.yaml", "metrics.jsonl", "checkpoint.pt", "final.pt", "final_metrics.json"):
        assert (run_dir / name).is_file(), name
    assert from_dict(GMMRunConfig, read_yaml(run_dir / "config.yaml")) == cfg  # the resolved config
    recs = records(run_dir)
    assert [r["step"] for r in recs] == [1, 2, 3]
    assert TERMS[stage] <= recs[-1].keys() and not (ALL_TERMS - TERMS[stage]) & recs[-1].keys()
    assert all(math.isfinite(v) for r in recs for v in r.values())
    assert load(run_dir / "checkpoint.pt")["step"] == 3
    assert math.isfinite(final_metrics["kl_estimate"])

    # Frozen: the teacher network (in memory and on disk) is bitwise unchanged.
    teacher = teacher_spy["net"]
    assert not any(p.requires_grad for p in teacher.parameters())
    assert_states_equal(teacher.state_dict(), teacher_spy["before"], "teacher")
    assert (teacher_run / "teacher.pt").read_bytes() == teacher_file

    # Trainable: generator and fake both start as copies of the teacher; every tensor of both moved.
    final = load(run_dir / "final.pt")
    for role in ("generator_raw", "fake"):
        for k, init in teacher_spy["before"].items():
            assert not torch.equal(final[role][k], init), f"{stage}: {role}.{k} did not change"


def test_analytic_teacher_stage_runs(make_cfg, tmp_path):
    run_dir = tmp_path / "analytic"
    train(make_cfg("rtdmd", run_dir, "teacher.kind=analytic"), progress=False)
    assert [r["step"] for r in records(run_dir)] == [1, 2, 3]
    assert {"pg_loss", "bp_loss", "dm_loss"} <= records(run_dir)[-1].keys()


@pytest.mark.parametrize("stage", ["ac_dmd", "rtdmd_fullchain"])
def test_resume_equals_straight_run(stage, make_cfg, tmp_path):
    # ema_every=1 so the EMA (stage 2 default: every 8 steps) is part of what must resume exactly.
    common = ("stage2.ema_every=1",)
    straight_dir, resumed_dir = tmp_path / "straight", tmp_path / "resumed"
    train(make_cfg(stage, straight_dir, "stage1.num_iters=4", "stage2.num_iters=4", *common),
                   progress=False)
    train(make_cfg(stage, resumed_dir, "stage1.num_iters=2", "stage2.num_iters=2", *common),
                   progress=False)
    assert load(resumed_dir / "checkpoint.pt")["step"] == 2
    train(make_cfg(stage, resumed_dir, "stage1.num_iters=4", "stage2.num_iters=4", *common),
                   progress=False)

    assert_states_equal(load(resumed_dir / "final.pt"), load(straight_dir / "final.pt"), "final")
    # Optimiser moments and EMA shadows too, not just the weights.
    assert_states_equal(load(resumed_dir / "checkpoint.pt"), load(straight_dir / "checkpoint.pt"), "checkpoint")

    def without_time(recs):
        return [{k: v for k, v in r.items() if k != "time_s"} for r in recs]

    assert without_time(records(resumed_dir)) == without_time(records(straight_dir))


@pytest.mark.parametrize("stage", ["ac_dmd", "rtdmd"])
def test_time_limit_pauses_with_a_checkpoint_and_the_same_command_resumes(stage, make_cfg, tiny_yaml, teacher_run,
                                                                          tmp_path, capsys):
    """time_limit_s: a call past its limit checkpoints after the iteration it is in and exits 3 without exporting;
    the same command again resumes, and the finished run equals one run straight through."""
    from tiltflow.cli import EXIT_PAUSED, main

    straight, paused = tmp_path / "straight", tmp_path / "paused"
    train(make_cfg(stage, straight, "stage2.ema_every=1"), progress=False)
    argv = ["train", "--config", str(tiny_yaml), f"stage={stage}", f"run_dir={paused}", f"teacher_run={teacher_run}",
            "stage2.ema_every=1", "time_limit_s=1e-9"]
    assert main(argv) == EXIT_PAUSED
    assert "paused at step 1 of 3" in capsys.readouterr().out
    assert load(paused / "checkpoint.pt")["step"] == 1 and not (paused / "final.pt").exists()
    assert main(argv) == EXIT_PAUSED  # each call makes progress: one more iteration
    assert load(paused / "checkpoint.pt")["step"] == 2
    assert main([*argv[:-1], "time_limit_s=0"]) == 0
    assert_states_equal(load(paused / "final.pt"), load(straight / "final.pt"), "final")
    # The changed setting was named when the run directory's config was replaced (and only that one).
    assert "replacing it (time_limit_s: 1e-09 -> 0.0)" in capsys.readouterr().err


@pytest.mark.parametrize("stage", ["ac_dmd", "rtdmd"])
def test_same_seed_same_weights(stage, make_cfg, tmp_path):
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        train(make_cfg(stage, tmp_path / name, f"seed={seed}"), progress=False)
    a, b, c = (load(tmp_path / name / "final.pt") for name in "abc")
    assert_states_equal(a, b, "final")
    assert not torch.equal(a["generator_raw"]["net.0.weight"], c["generator_raw"]["net.0.weight"])


class NaNReward:
    name = "linear"
    differentiable = True

    def __call__(self, samples, prompts=None):
        return RewardOutput(scores=samples.sum(dim=1) * float("nan"))


class NaNTeacher:
    def velocity(self, x, sigma, cond):
        return torch.full_like(x, float("nan"))


@pytest.mark.parametrize(
    ("stage", "target", "replacement", "term"),
    [
        ("rtdmd", "build_rewards", lambda spec: RewardSet([NaNReward()]), "policy-gradient loss"),
        ("ac_dmd", "teacher_backbone", lambda cfg, gmm, net: NaNTeacher(), "generator DM loss"),
    ],
)
def test_non_finite_loss_stops_and_keeps_checkpoint(stage, target, replacement, term, make_cfg, tmp_path,
                                                     monkeypatch):
    run_dir = tmp_path / "nan"
    train(make_cfg(stage, run_dir, "stage1.num_iters=2", "stage2.num_iters=2"), progress=False)
    before = {name: (run_dir / name).read_bytes() for name in ("checkpoint.pt", "final.pt")}

    monkeypatch.setattr(runs, target, replacement)
    # Every non-finite term of the update is named (one check per update), e.g. the NaN reward also
    # reaches the reward back-propagation term.
    with pytest.raises(FloatingPointError, match=rf"non-finite {term} = nan(, [a-z -]+ = nan)* at step 2\b"):
        train(make_cfg(stage, run_dir, "stage1.num_iters=4", "stage2.num_iters=4"), progress=False)
    for name, data in before.items():
        assert (run_dir / name).read_bytes() == data, name
    assert not [p.name for p in run_dir.iterdir() if p.name.endswith(".tmp")]
    assert load(run_dir / "checkpoint.pt")["step"] == 2


@pytest.mark.parametrize("extra", [(), ("stage2.accumulation=2", "stage2.logprob_reduction=sum")])
def test_ppo_ratio_is_one_on_policy(extra, make_cfg, tmp_path):
    run_dir = tmp_path / "ppo"
    train(make_cfg("rtdmd", run_dir, "stage2.num_iters=1", "stage2.num_trained_steps=3", *extra),
                   progress=False)
    (rec,) = records(run_dir)
    assert rec["pg_ratio_max_dev"] < 1e-5
    assert rec["pg_clip_frac"] == 0.0


def test_stage2_starts_from_init_from_run(make_cfg, tmp_path):
    """Stage 2 initialises the generator from stage 1's EMA generator and the fake from its fake."""
    train(make_cfg("ac_dmd", tmp_path / "s1"), progress=False)
    train(make_cfg("rtdmd", tmp_path / "s2", f"init_from={tmp_path / 's1'}", "stage2.num_iters=0"),
                   progress=False)
    s1, s2 = load(tmp_path / "s1" / "final.pt"), load(tmp_path / "s2" / "final.pt")
    assert_states_equal(s2["generator_raw"], s1["generator"], "generator")
    assert_states_equal(s2["fake"], s1["fake"], "fake")
