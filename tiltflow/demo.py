"""`tiltflow demo`: every method of WORLDS.md 1 on one gmm problem, side by side, in one run directory,
each trained through the one training spine.

Writes <out>/results.json (method -> metrics), <out>/report.md (table, scatter plots over the p_tilde
density, metric curves) and one sub-run directory per trained method (resumable: a finished method is
only re-evaluated).
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from tiltflow.config.gmm import GMMRunConfig
from tiltflow.config.loader import deep_merge, from_dict, to_dict, to_yaml
from tiltflow.config.schema import STAGE_PRESETS
from tiltflow.training.spine import train
from tiltflow.worlds.gmm.evaluate import (
    Reference,
    build_reference,
    evaluate,
    few_step_generate,
    generate,
    teacher_sigmas,
)
from tiltflow.worlds.gmm.runs import GMMWorld, load_generator, run_teacher, teacher_backbone
from tiltflow.worlds.gmm.world import build_gmm

STAGE1_METHODS = {"dmd2": "dmd2", "ac_dmd": "ac_dmd"}
STAGE2_METHODS = {"grpo_only": "grpo_only", "bp_only": "bp_only", "dm_bp": "dm_bp",
                  "rtdmd_reference": "rtdmd", "rtdmd_fullchain": "rtdmd_fullchain", "rtdmd_exact": "rtdmd_exact"}
METHODS = ["teacher", "teacher_4step", *STAGE1_METHODS, *STAGE2_METHODS]
TABLE_KEYS = ["reward_mean", "mode_tv", "energy_distance", "kl_estimate", "kl_base_estimate"]


def method_config(base: GMMRunConfig, stage: str, run_dir: Path, init_from: Path | None,
                  teacher_run: Path, user_tree: dict) -> GMMRunConfig:
    """The base config with the stage's preset applied under the user's own settings."""
    tree = to_dict(base)
    tree = deep_merge(tree, STAGE_PRESETS.get(stage, {}))
    tree = deep_merge(tree, user_tree)  # what the user wrote explicitly still wins
    tree.update(stage=stage, run_dir=str(run_dir), teacher_run=str(teacher_run),
                init_from=str(init_from) if init_from else None)
    return from_dict(GMMRunConfig, tree)


def run_demo(cfg: GMMRunConfig, user_tree: dict, out: Path, *, log: Callable[[str], None] = print,
             progress: bool = True, methods: list[str] | None = None) -> dict[str, dict[str, float]]:
    methods = METHODS if methods is None else [m for m in METHODS if m in methods]
    needs_stage1 = any(m in STAGE2_METHODS for m in methods) and not (out / "ac_dmd" / "final.pt").exists()
    if needs_stage1 and "ac_dmd" not in methods:
        methods = [m for m in METHODS if m in methods or m == "ac_dmd"]  # stage 2 starts from the AC-DMD student
    t_start = time.time()
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(to_yaml(cfg))
    gmm = build_gmm(cfg.problem)
    if not (out / "teacher" / "teacher.pt").exists():
        log("[demo] training the neural teacher (flow matching)")
        train(method_config(cfg, "teacher", out / "teacher", None, out / "teacher", user_tree), progress=progress)
    teacher_cfg = copy.deepcopy(cfg)
    teacher_cfg.teacher_run = str(out / "teacher")
    teacher_net = run_teacher(teacher_cfg, gmm, progress)
    log("[demo] building the reference p and p_tilde sample sets")
    ref = build_reference(cfg, gmm, teacher_net)
    world = GMMWorld(reference=ref)
    results: dict[str, dict[str, float]] = {}
    samples: dict[str, list[torch.Tensor]] = {}
    timings: dict[str, float] = {}
    n = cfg.eval.num_samples
    teacher = teacher_backbone(cfg, gmm, teacher_net)
    for name in methods:
        t0 = time.time()
        if name == "teacher":
            samples[name] = generate(teacher, gmm.num_prompts, n, teacher_sigmas(cfg), 0.0, 7, gmm.dim)
        elif name == "teacher_4step":
            samples[name] = few_step_generate(teacher, cfg, gmm.num_prompts, n)
        else:
            stage = {**STAGE1_METHODS, **STAGE2_METHODS}[name]
            init = out / "ac_dmd" if name in STAGE2_METHODS else None
            mcfg = method_config(cfg, stage, out / name, init, out / "teacher", user_tree)
            log(f"[demo] training {name} (stage {stage})")
            train(mcfg, world=world, progress=progress)
            gen, _ = load_generator(out / name)
            samples[name] = few_step_generate(gen, mcfg, gmm.num_prompts, n)
        results[name] = evaluate(samples[name], ref)
        timings[name] = round(time.time() - t0, 1)
        log(f"[demo] {name}: " + ", ".join(f"{k}={results[name][k]:.4g}" for k in TABLE_KEYS))
    total = round(time.time() - t_start, 1)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    from tiltflow.worlds.gmm.report import write_report

    write_report(out, cfg, results, samples, ref, timings, total)
    log(format_table(results))
    log(f"[demo] done in {total} s; report: {out / 'report.md'}")
    return results


def format_table(results: dict[str, dict[str, float]]) -> str:
    any_res = next(iter(results.values()))
    head = (f"reward_target={any_res['reward_target']:.4f}  reward_base={any_res['reward_base']:.4f}  "
            f"energy_base={any_res['energy_base']:.4f}  energy_noise_floor={any_res['energy_noise_floor']:.4f}")
    cols = ["method", *TABLE_KEYS]
    lines = [head, "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for name, m in results.items():
        lines.append("| " + " | ".join([name] + [f"{m[k]:.4f}" for k in TABLE_KEYS]) + " |")
    return "\n".join(lines)


__all__: list[Any] = ["METHODS", "format_table", "run_demo", "Reference"]
