"""The gmm world for the training spine (WORLDS.md 1): the neural teacher's own stage, the role MLPs of
stages 1 and 2, evaluation against the reward-tilted target, and sampling and evaluating finished runs.

A run directory holds config.yaml (resolved), metrics.jsonl, checkpoint.pt (training state, resumed by
default), final.pt (teacher.pt for the teacher stage), final_metrics.json, samples.png and curves.png:
plain state dicts, loaded weights-only.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tiltflow.config.gmm import GMMRunConfig
from tiltflow.config.loader import ConfigError, UsageError, from_dict, read_yaml, to_yaml
from tiltflow.distributed.fsdp import ShardUnit
from tiltflow.distributed.state import full_state_dict, is_main_process
from tiltflow.models.base import Backbone
from tiltflow.models.ema import EMA
from tiltflow.models.mlp import VelocityMLP
from tiltflow.models.roles import Roles
from tiltflow.storage import load, save_atomic
from tiltflow.worlds.base import WorldSetup
from tiltflow.worlds.gmm.evaluate import (
    Reference,
    build_reference,
    evaluate,
    few_step_generate,
    generate,
    teacher_sigmas,
)
from tiltflow.worlds.gmm.mixture import ConditionalGMM
from tiltflow.worlds.gmm.teacher import make_mlp, train_teacher
from tiltflow.worlds.gmm.world import AnalyticBackbone, GMMTask, build_gmm, build_rewards

CURVE_KEYS = ("reward_mean", "mode_tv", "energy_distance", "energy_to_base")


@dataclass
class MLPModels:
    """The gmm roles: a frozen teacher (analytic or neural) and fully trained generator and fake MLPs."""

    teacher: Backbone
    generator: VelocityMLP
    fake: VelocityMLP

    def roles(self) -> Roles:
        return Roles(self.teacher, self.generator, self.fake, list(self.generator.parameters()),
                     list(self.fake.parameters()))

    def trainable_state(self) -> dict[str, Any]:
        return {"generator": self.generator.state_dict(), "fake": self.fake.state_dict()}

    def load_trainable_state(self, state: dict[str, Any]) -> None:
        self.generator.load_state_dict(state["generator"])
        self.fake.load_state_dict(state["fake"])

    def enable_activation_checkpointing(self) -> None:
        raise ConfigError("parallel.activation_checkpointing", "the gmm world's MLPs are too small to need it")

    def modules(self) -> dict[str, torch.nn.Module]:
        return {"generator": self.generator, "fake": self.fake}

    def shard_units(self, include_teacher: bool) -> list[ShardUnit]:
        """Each MLP's linear layers are its blocks."""
        nets = [self.generator, self.fake]
        if include_teacher and isinstance(self.teacher, VelocityMLP):
            nets.append(self.teacher)
        return [ShardUnit(net, [m for m in net.net if isinstance(m, torch.nn.Linear)]) for net in nets]


class GMMWorld:
    """`world: gmm`. A world built with a `reference` reuses it (the demo builds it once for all methods)."""

    name = "gmm"
    config_class = GMMRunConfig

    def __init__(self, reference: Reference | None = None):
        self.reference = reference

    def train_teacher(self, cfg: GMMRunConfig, *, progress: bool = True) -> dict[str, Any]:
        """The `teacher` stage: flow matching into cfg.run_dir (teacher.pt), with samples.png and curves.png."""
        cfg = dataclasses.replace(cfg, teacher_run=cfg.run_dir)
        gmm = build_gmm(cfg.problem)
        net = run_teacher(cfg, gmm, progress)
        reference = build_reference(cfg, gmm, net)
        samples = generate(net, gmm.num_prompts, cfg.eval.num_samples, teacher_sigmas(cfg), 0.0, 7, gmm.dim)
        return {**final_metrics(cfg, samples, reference, f"teacher ({cfg.teacher.sample_steps} Euler steps)"),
                "note": f"teacher written to {cfg.run_dir}/teacher.pt (sample it with `tiltflow sample --run "
                        f"{cfg.run_dir}`)"}

    def build(self, cfg: GMMRunConfig, *, progress: bool = True) -> WorldSetup:
        gmm = build_gmm(cfg.problem)
        teacher_net = run_teacher(cfg, gmm, progress)
        teacher = teacher_backbone(cfg, gmm, teacher_net)
        gen, fake = copy.deepcopy(teacher_net), copy.deepcopy(teacher_net)
        models = MLPModels(teacher, gen.requires_grad_(True).train(), fake.requires_grad_(True).train())
        if cfg.init_from:  # stage 2 starts from the stage-1 run's EMA generator and its fake
            models.load_trainable_state(load(Path(cfg.init_from) / "final.pt"))
        task = GMMTask(gmm.num_prompts, gmm.dim, build_rewards(cfg.problem), cfg.teacher.guidance_scale,
                       torch.device(cfg.device))
        reference = self.reference if self.reference is not None else build_reference(cfg, gmm, teacher_net)

        def evaluate_now(step: int) -> dict[str, float]:
            samples = few_step_generate(gen, cfg, gmm.num_prompts, cfg.eval.curve_samples, seed=step)
            m = evaluate(samples, reference, with_kl=False)
            return {f"eval_{k}": m[k] for k in CURVE_KEYS}

        def finish(ema: EMA) -> dict[str, Any]:
            # Under FSDP2 every rank gathers and samples (collectives); rank 0 writes.
            raw = {k: v.clone() for k, v in full_state_dict(gen).items()}
            with ema.applied():
                final_gen = {k: v.clone() for k, v in full_state_dict(gen).items()}
                samples = few_step_generate(gen, cfg, gmm.num_prompts, cfg.eval.num_samples)
            fake_state = full_state_dict(fake)
            if is_main_process():
                save_atomic({"generator": final_gen, "generator_raw": raw, "fake": fake_state},
                            Path(cfg.run_dir) / "final.pt")
            return final_metrics(cfg, samples, reference, cfg.stage, write=is_main_process())

        return WorldSetup(task, models, cfg.sampler, finish, evaluate_now, cfg.eval.every)

    def sample(self, cfg: GMMRunConfig, *, out: Path, texts: Sequence[str] = (), num: int | None = None,
               prompt: int | None = None, seed: int | None = None) -> str:
        """`tiltflow sample --run DIR`: (num, dim) samples of one prompt as .npy (default 1000 of prompt 0,
        seed 0); a teacher run samples the teacher with its many-step Euler sampler, a stage run its EMA
        generator in sampler.num_steps CPS steps."""
        if texts:
            raise UsageError("a gmm problem's prompts are indices: use --prompt I, not --text")
        num, prompt, seed = 1000 if num is None else num, 0 if prompt is None else prompt, seed or 0
        gmm = build_gmm(cfg.problem)
        if not 0 <= prompt < gmm.num_prompts:
            raise UsageError(f"--prompt {prompt} out of range: this problem has prompts 0..{gmm.num_prompts - 1}")
        net, how = load_run_model(cfg, gmm)
        x = run_samples(net, cfg, gmm, num, seed)[prompt]
        out.parent.mkdir(parents=True, exist_ok=True)
        np.save(out, x.numpy())
        return f"wrote {tuple(x.shape)} samples of prompt {prompt} ({how}) to {out}"

    def evaluate_run(self, cfg: GMMRunConfig, *, num: int, seed: int,
                     out_dir: str | Path | None = None) -> dict[str, Any]:
        """`tiltflow eval --run DIR`: metrics of `num` fresh samples per prompt against the reference, and
        what was compared (so that the numbers can be told apart from results.json's). Writes no files
        (out_dir: the command writes the result there)."""
        gmm = build_gmm(cfg.problem)
        net, how = load_run_model(cfg, gmm)
        teacher = load_teacher_net(cfg, gmm) if cfg.teacher.kind == "neural" else None
        cfg = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, num_samples=num))
        metrics = evaluate(run_samples(net, cfg, gmm, num, seed), build_reference(cfg, gmm, teacher))
        target = ("the SIR tilt of the neural teacher's own samples" if cfg.teacher.kind == "neural"
                  else "the exact analytic p_tilde")
        return {"samples": f"{num} per prompt from {how}, seed {seed}",
                "reference": f"{num} samples per prompt of {target} (pool {cfg.eval.reference_pool}, seed 12345)",
                "metrics": metrics}


# ---- the neural teacher ---------------------------------------------------------------------------------
def teacher_dir(cfg: GMMRunConfig) -> Path:
    return Path(cfg.teacher_run) if cfg.teacher_run else Path(cfg.run_dir) / "teacher"


def run_teacher(cfg: GMMRunConfig, gmm: ConditionalGMM, progress: bool = True) -> VelocityMLP:
    """Train the neural teacher into teacher_dir(cfg) (or load it if teacher.pt exists)."""
    out = teacher_dir(cfg)
    path = out / "teacher.pt"
    if path.exists():
        return load_teacher_net(cfg, gmm)
    out.mkdir(parents=True, exist_ok=True)
    tcfg = dataclasses.replace(cfg, stage="teacher", run_dir=str(out), teacher_run=str(out), init_from=None)
    (out / "config.yaml").write_text(to_yaml(tcfg))
    model, curve = train_teacher(gmm, cfg.teacher, cfg.model, cfg.seed, progress)
    with (out / "metrics.jsonl").open("w") as f:
        for step, loss in curve:
            f.write(json.dumps({"step": step, "teacher_fm_loss": loss}) + "\n")
    save_atomic({"model": model.state_dict()}, path)
    return model


def teacher_backbone(cfg: GMMRunConfig, gmm: ConditionalGMM, net: VelocityMLP) -> Backbone:
    """The teacher the stages distil: the exact GMM velocity (teacher.kind: analytic) or the trained MLP."""
    return AnalyticBackbone(gmm) if cfg.teacher.kind == "analytic" else net


def load_teacher_net(cfg: GMMRunConfig, gmm: ConditionalGMM) -> VelocityMLP:
    path = teacher_dir(cfg) / "teacher.pt"
    if not path.exists():
        raise FileNotFoundError(f"no trained teacher at {str(path)!r}: run `tiltflow train` with stage=teacher "
                                "first, or point teacher_run at a run directory that holds teacher.pt")
    model = make_mlp(gmm.dim, gmm.num_prompts, cfg.model)
    model.load_state_dict(load(path)["model"])
    return model.requires_grad_(False).eval()


def load_run_model(cfg: GMMRunConfig, gmm: ConditionalGMM) -> tuple[VelocityMLP, str]:
    """The network a finished run produced: the teacher of a teacher run, else the EMA generator."""
    run_dir = Path(cfg.run_dir)
    if cfg.stage == "teacher":
        return load_teacher_net(cfg, gmm), f"the teacher in {run_dir}, {cfg.teacher.sample_steps} Euler steps"
    final = run_dir / "final.pt"
    if not final.exists():
        raise FileNotFoundError(f"{str(final)!r} does not exist: {str(run_dir)!r} is not a finished stage run "
                                "(a teacher run holds teacher.pt; a stage-1/2 run writes final.pt when it ends)")
    net = make_mlp(gmm.dim, gmm.num_prompts, cfg.model)
    net.load_state_dict(load(final)["generator"])
    return net.requires_grad_(False).eval(), (f"the EMA generator of {run_dir}, {cfg.sampler.num_steps} CPS "
                                              f"steps, eta {cfg.sampler.eta}")


def run_samples(net: VelocityMLP, cfg: GMMRunConfig, gmm: ConditionalGMM, num: int, seed: int) -> list[torch.Tensor]:
    """num samples per prompt of a finished run's network (load_run_model): the teacher's many-step Euler
    sampler for a teacher run, else sampler.num_steps CPS steps."""
    if cfg.stage == "teacher":
        return generate(net, gmm.num_prompts, num, teacher_sigmas(cfg), 0.0, seed, gmm.dim)
    return few_step_generate(net, cfg, gmm.num_prompts, num, seed=seed)


def load_generator(run_dir: str | Path) -> tuple[VelocityMLP, GMMRunConfig]:
    """The EMA generator (or, for a teacher run, the teacher) of a finished run, and its config."""
    cfg = from_dict(GMMRunConfig, read_yaml(Path(run_dir) / "config.yaml"))
    cfg.run_dir = str(run_dir)
    return load_run_model(cfg, build_gmm(cfg.problem))[0], cfg


def final_metrics(cfg: GMMRunConfig, samples: list[torch.Tensor], reference: Reference, label: str, *,
                  write: bool = True) -> dict[str, float]:
    """A finished run's metrics against the reference; with `write`, also final_metrics.json and (eval.plots)
    samples.png and curves.png labelled `label` in its run directory."""
    final = evaluate(samples, reference)
    if write:
        (Path(cfg.run_dir) / "final_metrics.json").write_text(json.dumps(final, indent=2))
        if cfg.eval.plots:
            write_run_plots(Path(cfg.run_dir), cfg, samples, reference, label)
    return final


def write_run_plots(run_dir: Path, cfg: GMMRunConfig, samples: list[torch.Tensor], reference: Reference,
                    label: str) -> None:
    """samples.png (final samples next to p_tilde, per prompt) and curves.png (metrics.jsonl over steps)."""
    from tiltflow.worlds.gmm.plots import metric_curves, scatter_over_density

    panels = []
    for c, (x, ref) in enumerate(zip(samples, reference.prompts)):
        panels += [(f"prompt {c}: p_tilde", ref.target.numpy()), (f"prompt {c}: {label}", x.numpy())]
    pts = torch.cat([r.target for r in reference.prompts])
    lo, hi = pts.quantile(0.005, dim=0) - 0.5, pts.quantile(0.995, dim=0) + 0.5
    extent = (float(lo[0]), float(hi[0]), float(lo[1]), float(hi[1]))
    scatter_over_density(run_dir / "samples.png", panels, None, extent, ncols=2,
                         title=f"{label}: final samples (dims 0, 1)")
    curves = read_curves(run_dir / "metrics.jsonl")
    if curves:
        metric_curves(run_dir / "curves.png", {cfg.stage: curves}, sorted(curves), ncols=4)


def read_curves(path: Path, keys: Sequence[str] | None = None) -> dict[str, list[tuple[float, float]]]:
    """A run's metrics.jsonl as {metric: [(step, value), ...]}: the metrics `keys`, or every number but step
    and time_s."""
    curves: dict[str, list[tuple[float, float]]] = {}
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        for k, v in rec.items():
            if (k in keys) if keys is not None else (k not in ("step", "time_s") and isinstance(v, (int, float))):
                curves.setdefault(k, []).append((rec["step"], v))
    return curves
