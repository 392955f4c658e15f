"""Running one stage of the analytic world into a run directory: teacher, stage 1 or stage 2.

A run directory holds config.yaml (resolved), metrics.jsonl, checkpoint.pt (training state, resumed
by default) and final.pt (teacher.pt for the teacher stage): plain state dicts, loaded weights-only.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch

from tiltflow.algorithms.ac_dmd import ACDMD
from tiltflow.algorithms.common import Roles
from tiltflow.algorithms.rtdmd import RTDMD
from tiltflow.config.loader import to_yaml
from tiltflow.config.schema import STAGE1_STAGES, RunConfig
from tiltflow.models.base import Backbone
from tiltflow.models.mlp import VelocityMLP
from tiltflow.training.checkpoint import load, save_atomic
from tiltflow.training.loop import LoopHooks, run_loop
from tiltflow.worlds.gmm.evaluate import Reference, build_reference, evaluate, few_step_generate
from tiltflow.worlds.gmm.teacher import make_mlp, train_teacher
from tiltflow.worlds.gmm.world import AnalyticBackbone, GMMTask, build_gmm, build_rewards


def prepare_run_dir(cfg: RunConfig) -> Path:
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(to_yaml(cfg))
    return run_dir


def teacher_dir(cfg: RunConfig) -> Path:
    return Path(cfg.teacher_run) if cfg.teacher_run else Path(cfg.run_dir) / "teacher"


def run_teacher(cfg: RunConfig, progress: bool = True) -> VelocityMLP:
    """Train the neural teacher into teacher_dir(cfg) (or load it if teacher.pt exists)."""
    out = teacher_dir(cfg)
    path = out / "teacher.pt"
    if path.exists():
        return load_teacher_net(cfg)
    out.mkdir(parents=True, exist_ok=True)
    tcfg = copy.deepcopy(cfg)
    tcfg.stage, tcfg.run_dir = "teacher", str(out)
    (out / "config.yaml").write_text(to_yaml(tcfg))
    model, curve = train_teacher(build_gmm(cfg.problem), cfg.teacher, cfg.model, cfg.seed, progress)
    with (out / "metrics.jsonl").open("w") as f:
        for step, loss in curve:
            f.write(json.dumps({"step": step, "teacher_fm_loss": loss}) + "\n")
    save_atomic({"model": model.state_dict()}, path)
    return model


def load_teacher_net(cfg: RunConfig) -> VelocityMLP:
    path = teacher_dir(cfg) / "teacher.pt"
    if not path.exists():
        raise FileNotFoundError(f"no trained teacher at {str(path)!r}: run `tiltflow train` with stage=teacher "
                                "first, or point teacher_run at a run directory that holds teacher.pt")
    gmm = build_gmm(cfg.problem)
    model = make_mlp(gmm.dim, gmm.num_prompts, cfg.model)
    model.load_state_dict(load(path)["model"])
    return model.requires_grad_(False).eval()


def teacher_backbone(cfg: RunConfig, net: VelocityMLP) -> Backbone:
    return AnalyticBackbone(build_gmm(cfg.problem)) if cfg.teacher.kind == "analytic" else net


def load_generator(run_dir: str | Path) -> tuple[VelocityMLP, RunConfig]:
    """The EMA generator of a finished stage run."""
    from tiltflow.config.loader import from_dict, read_yaml

    run_dir = Path(run_dir)
    cfg = from_dict(RunConfig, read_yaml(run_dir / "config.yaml"))
    final = run_dir / "final.pt"
    if not final.exists():
        raise FileNotFoundError(f"{str(final)!r} does not exist: is {str(run_dir)!r} a finished stage-1/2 run?")
    state = load(final)
    gmm = build_gmm(cfg.problem)
    net = make_mlp(gmm.dim, gmm.num_prompts, cfg.model)
    net.load_state_dict(state["generator"])
    return net.requires_grad_(False).eval(), cfg


def _init_nets(cfg: RunConfig, teacher_net: VelocityMLP) -> tuple[VelocityMLP, VelocityMLP]:
    gen, fake = copy.deepcopy(teacher_net), copy.deepcopy(teacher_net)
    if cfg.init_from:
        state = load(Path(cfg.init_from) / "final.pt")
        gen.load_state_dict(state["generator"])
        fake.load_state_dict(state["fake"])
    return gen.requires_grad_(True).train(), fake.requires_grad_(True).train()


def run_stage(cfg: RunConfig, reference: Reference | None = None, progress: bool = True) -> dict[str, Any]:
    """Train stage 1 (ac_dmd, dmd2) or stage 2 (rtdmd and baselines); returns the final metrics."""
    run_dir = prepare_run_dir(cfg)
    teacher_net = run_teacher(cfg, progress)
    teacher = teacher_backbone(cfg, teacher_net)
    gmm = build_gmm(cfg.problem)
    gen, fake = _init_nets(cfg, teacher_net)
    roles = Roles(teacher, gen, fake, [p for p in gen.parameters()], [p for p in fake.parameters()])
    task = GMMTask(gmm.num_prompts, gmm.dim, build_rewards(cfg.problem), cfg.teacher.cfg_scale,
                   torch.device(cfg.device))
    stage1 = cfg.stage in STAGE1_STAGES
    algo: Any = (ACDMD(cfg.stage1, cfg.sampler, task, roles, cfg.seed) if stage1
                 else RTDMD(cfg.stage2, cfg.sampler, task, roles, cfg.seed))
    num_iters = cfg.stage1.num_iters if stage1 else cfg.stage2.num_iters
    if reference is None:
        reference = build_reference(cfg, gmm, teacher_net)
    ema_gen = copy.deepcopy(gen).requires_grad_(False)

    def ema_model() -> VelocityMLP:
        algo.ema.copy_to(list(ema_gen.parameters()))
        return ema_gen

    def evaluate_now(step: int) -> dict[str, float]:
        samples = few_step_generate(ema_model(), cfg, gmm.num_prompts, cfg.eval.curve_samples, seed=step)
        m = evaluate(samples, reference, with_kl=False)
        return {f"eval_{k}": m[k] for k in ("reward_mean", "mode_tv", "energy_distance", "energy_to_base")}

    hooks = LoopHooks(model_state=lambda: {"generator": gen.state_dict(), "fake": fake.state_dict()},
                      load_model_state=lambda s: (gen.load_state_dict(s["generator"]), fake.load_state_dict(s["fake"])),
                      evaluate=evaluate_now)
    run_loop(algo, hooks, run_dir=run_dir, num_iters=num_iters, checkpoint_every=cfg.checkpoint_every,
             log_every=cfg.log_every, eval_every=cfg.eval.every, desc=cfg.stage, progress=progress)
    save_atomic({"generator": ema_model().state_dict(), "generator_raw": gen.state_dict(),
                 "fake": fake.state_dict()}, run_dir / "final.pt")
    samples = few_step_generate(ema_model(), cfg, gmm.num_prompts, cfg.eval.num_samples)
    final = evaluate(samples, reference)
    (run_dir / "final_metrics.json").write_text(json.dumps(final, indent=2))
    if cfg.eval.plots:
        write_run_plots(run_dir, cfg, samples, reference)
    return final


def write_run_plots(run_dir: Path, cfg: RunConfig, samples: list[torch.Tensor], reference: Reference) -> None:
    """samples.png (final samples next to p_tilde, per prompt) and curves.png (metrics.jsonl over steps)."""
    from tiltflow.worlds.gmm.plots import metric_curves, scatter_over_density

    panels = []
    for c, (x, ref) in enumerate(zip(samples, reference.prompts)):
        panels += [(f"prompt {c}: p_tilde", ref.target.numpy()), (f"prompt {c}: {cfg.stage}", x.numpy())]
    pts = torch.cat([r.target for r in reference.prompts])
    lo, hi = pts.quantile(0.005, dim=0) - 0.5, pts.quantile(0.995, dim=0) + 0.5
    extent = (float(lo[0]), float(hi[0]), float(lo[1]), float(hi[1]))
    scatter_over_density(run_dir / "samples.png", panels, None, extent, ncols=2,
                         title=f"{cfg.stage}: final samples (dims 0, 1)")
    curves: dict[str, list[tuple[float, float]]] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        for k, v in rec.items():
            if k not in ("step", "time_s") and isinstance(v, (int, float)):
                curves.setdefault(k, []).append((rec["step"], v))
    if curves:
        metric_curves(run_dir / "curves.png", {cfg.stage: curves}, sorted(curves), ncols=4)
