"""`tiltflow demo`: every method of WORLDS.md 1 on one gmm problem, side by side, in one run directory,
each trained through the one training spine.

Writes <out>/results.json (method -> metrics), <out>/report.md (table, scatter plots over the p_tilde
density, metric curves) and one sub-run directory per trained method (resumable: a finished method is
only re-evaluated).

The full demo (no --methods) then runs the bounded problem (tiltflow/configs/gmm/bounded.yaml, r = tanh(a.x)):
the reference recipe in its own regime next to the exact mode, and the reference's effective beta, into
<out>/bounded/ (its own results.json and report.md; a summary at the end of <out>/report.md).
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tiltflow.config.gmm import GMMRunConfig
from tiltflow.config.loader import deep_merge, from_dict, load_config, read_yaml, to_dict, to_yaml, user_tree
from tiltflow.config.schema import STAGE_PRESETS
from tiltflow.models.mlp import VelocityMLP
from tiltflow.training.spine import train
from tiltflow.worlds.gmm.effective_beta import DEFAULT_GRID as DEFAULT_GRID_NOTE
from tiltflow.worlds.gmm.effective_beta import effective_beta
from tiltflow.worlds.gmm.evaluate import (
    Reference,
    build_reference,
    evaluate,
    few_step_generate,
    generate,
    teacher_sigmas,
)
from tiltflow.worlds.gmm.mixture import ConditionalGMM
from tiltflow.worlds.gmm.report import write_report
from tiltflow.worlds.gmm.runs import GMMWorld, load_generator, run_teacher, teacher_backbone
from tiltflow.worlds.gmm.world import build_gmm

STAGE1_METHODS = {"dmd2": "dmd2", "ac_dmd": "ac_dmd"}
STAGE2_METHODS = {"grpo_only": "grpo_only", "bp_only": "bp_only", "dm_bp": "dm_bp",
                  "rtdmd_reference": "rtdmd", "rtdmd_fullchain": "rtdmd_fullchain", "rtdmd_exact": "rtdmd_exact"}
METHODS = ["teacher", "teacher_4step", *STAGE1_METHODS, *STAGE2_METHODS]
BOUNDED_CONFIG = Path(__file__).resolve().parent / "configs" / "gmm" / "bounded.yaml"
BOUNDED_METHODS = ["rtdmd_reference", "rtdmd_exact"]
# The reference recipe also stopped early (these fractions of stage2.num_iters), to show where it passes on
# its way (100 and 200 of the bounded problem's 400 iterations).
BOUNDED_SNAPSHOTS = {"rtdmd_reference": [0.25, 0.5]}
TABLE_KEYS = ["reward_mean", "mode_tv", "energy_distance", "kl_estimate", "kl_base_estimate"]


def method_config(base: GMMRunConfig, stage: str, run_dir: Path, init_from: Path | None,
                  teacher_run: Path, user_tree: dict) -> GMMRunConfig:
    """The base config with the stage's preset applied under the user's own settings."""
    tree = deep_merge(deep_merge(to_dict(base), STAGE_PRESETS.get(stage, {})), user_tree)  # the user's own wins
    tree.update(stage=stage, run_dir=str(run_dir), teacher_run=str(teacher_run),
                init_from=str(init_from) if init_from else None)
    return from_dict(GMMRunConfig, tree)


def run_demo(cfg: GMMRunConfig, user_tree: dict, out: Path, *, log: Callable[[str], None] = print,
             progress: bool = True, methods: list[str] | None = None,
             bounded: GMMRunConfig | bool | None = None) -> dict[str, dict[str, float]]:
    """bounded: None runs the bounded problem after the main one when no methods were picked (the full
    demo); False skips it; a config runs that bounded problem."""
    if bounded is None:
        bounded = methods is None
    methods = METHODS if methods is None else [m for m in METHODS if m in methods]
    needs_stage1 = any(m in STAGE2_METHODS for m in methods) and not (out / "ac_dmd" / "final.pt").exists()
    if needs_stage1 and "ac_dmd" not in methods:
        methods = [m for m in METHODS if m in methods or m == "ac_dmd"]  # stage 2 starts from the AC-DMD student
    t_start = time.time()
    gmm, teacher_net, ref, world = prepare(cfg, out, out, user_tree, log=log, tag="demo", progress=progress)
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
    write_report(out, cfg, results, samples, ref, timings, total)
    log(format_table(results))
    if bounded is not False:
        bcfg = bounded if isinstance(bounded, GMMRunConfig) else load_bounded_config()
        summary = run_bounded(bcfg, out, log=log, progress=progress)
        total = round(time.time() - t_start, 1)
        with (out / "report.md").open("a") as f:
            f.write(bounded_summary(summary, total))
    log(f"[demo] done in {total} s; report: {out / 'report.md'}")
    return results


def prepare(cfg: GMMRunConfig, out: Path, base: Path, tree: dict, *, log: Callable[[str], None], tag: str,
            progress: bool) -> tuple[ConditionalGMM, VelocityMLP, Reference, GMMWorld]:
    """What a demo problem's methods share: its output directory `out` (with config.yaml), the mixtures, the
    neural teacher of <base>/teacher (trained there first, the `teacher` stage, when it is missing), the
    reference p and p_tilde sample sets and a world built on them."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(to_yaml(cfg))
    gmm = build_gmm(cfg.problem)
    if not (base / "teacher" / "teacher.pt").exists():
        log(f"[{tag}] training the neural teacher (flow matching)")
        train(method_config(cfg, "teacher", base / "teacher", None, base / "teacher", tree), progress=progress)
    teacher_net = run_teacher(dataclasses.replace(cfg, teacher_run=str(base / "teacher")), gmm, progress)
    log(f"[{tag}] building the reference p and p_tilde sample sets")
    ref = build_reference(cfg, gmm, teacher_net)
    return gmm, teacher_net, ref, GMMWorld(reference=ref)


def load_bounded_config() -> GMMRunConfig:
    return load_config(GMMRunConfig, BOUNDED_CONFIG, [], presets=STAGE_PRESETS, preset_key="stage")


def run_bounded(cfg: GMMRunConfig, main_out: Path, *, log: Callable[[str], None] = print,
                progress: bool = True) -> dict[str, Any]:
    """The reference recipe and the exact mode on the bounded problem, into <main_out>/bounded: stage 2
    from the main run's AC-DMD student and teacher when the mixtures are the same (p does not depend on the
    reward), else this problem's own. Then the reference's effective beta (tiltflow.worlds.gmm.effective_beta)."""
    out = main_out / "bounded"
    t_start = time.time()
    main_cfg = main_out / "config.yaml"
    same_p = main_cfg.exists() and from_dict(GMMRunConfig, read_yaml(main_cfg)).problem.prompts == cfg.problem.prompts
    base = main_out if same_p and (main_out / "ac_dmd" / "final.pt").exists() else out
    tree = user_tree(BOUNDED_CONFIG if cfg == load_bounded_config() else None, [], STAGE_PRESETS, "stage")
    gmm, _, ref, world = prepare(cfg, out, base, tree, log=log, tag="demo:bounded", progress=progress)
    if not (base / "ac_dmd" / "final.pt").exists():
        log("[demo:bounded] training ac_dmd (stage 1)")
        train(method_config(cfg, "ac_dmd", base / "ac_dmd", None, base / "teacher", tree), world=world,
              progress=progress)
    results: dict[str, dict[str, float]] = {}
    samples: dict[str, list[torch.Tensor]] = {}
    timings: dict[str, float] = {}
    n = cfg.eval.num_samples
    gen, _ = load_generator(base / "ac_dmd")
    samples["ac_dmd"] = few_step_generate(gen, cfg, gmm.num_prompts, n)
    results["ac_dmd"] = evaluate(samples["ac_dmd"], ref)
    stops = {m: sorted({int(f * cfg.stage2.num_iters) for f in BOUNDED_SNAPSHOTS.get(m, [])} - {0})
             for m in BOUNDED_METHODS}
    runs = [(f"{m}@{k}", m, k) for m in BOUNDED_METHODS for k in stops[m]]
    runs += [(m, m, None) for m in BOUNDED_METHODS]
    for name, method, iters in runs:
        t0 = time.time()
        extra = deep_merge(tree, {"stage2": {"num_iters": iters}}) if iters else tree
        mcfg = method_config(cfg, STAGE2_METHODS[method], out / name, base / "ac_dmd", base / "teacher", extra)
        log(f"[demo:bounded] training {name} (stage {mcfg.stage}, {mcfg.stage2.num_iters} iterations from "
            f"{base / 'ac_dmd'})")
        train(mcfg, world=world, progress=progress)
        gen, _ = load_generator(out / name)
        samples[name] = few_step_generate(gen, mcfg, gmm.num_prompts, n)
        results[name] = evaluate(samples[name], ref)
        timings[name] = round(time.time() - t0, 1)
        log(f"[demo:bounded] {name}: " + ", ".join(f"{k}={results[name][k]:.4g}" for k in TABLE_KEYS))
    eff = {name: effective_beta(samples[name], gmm, cfg.problem, results[name]["reward_mean"])
           for name, _, _ in runs}
    total = round(time.time() - t_start, 1)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "effective_beta.json").write_text(json.dumps(eff, indent=2))
    write_report(out, cfg, results, samples, ref, timings, total)
    with (out / "report.md").open("a") as f:
        f.write(effective_beta_text(cfg.stage2.beta, eff))
    log(format_table(results))
    for name, e in eff.items():
        log(f"[demo:bounded] {name} ends nearest the exact tilt at beta = {e['beta_energy']:g} (energy "
            f"distance {e['energy_at_beta_energy']:.4f}); reward-matching beta = {_fmt(e['beta_reward'])}")
    return {"results": results, "effective_beta": eff, "beta": cfg.stage2.beta, "wall_s": total}


def _fmt(x: float | None) -> str:
    return "outside the grid's reach" if x is None else f"{x:.3f}"


def effective_beta_text(beta: float, eff: dict[str, dict]) -> str:
    lines = ["## Effective beta", "",
             f"The problem's beta is {beta:g}. For each method: the beta on a grid of {len(DEFAULT_GRID_NOTE)} "
             "values whose exact tilt p exp(beta r) / Z is closest to the method's samples (energy distance to "
             "exact samples of that tilt, averaged over prompts), and the beta whose exact E[r] equals the "
             "method's mean reward.", "", "| method | beta (energy distance) | energy distance there | "
             "beta (reward) |", "|---|---|---|---|"]
    for name, e in eff.items():
        lines.append(f"| {name} | {e['beta_energy']:g} | {e['energy_at_beta_energy']:.4f} | {_fmt(e['beta_reward'])} |")
    return "\n".join(lines) + "\n"


def bounded_summary(summary: dict[str, Any], total_s: float) -> str:
    res, eff = summary["results"], summary["effective_beta"]
    any_res = next(iter(res.values()))
    span = any_res["reward_target"] - any_res["reward_base"]
    lines = ["", "## The bounded problem (r = tanh(a.x), bounded/report.md)", "",
             f"Same mixtures, reward r = tanh(a.x) with beta = {summary['beta']:g}: the regime the reference "
             "recipe was made for. p_tilde is exact (rejection sampling; mode weights and E[r] by quadrature). "
             f"E_p_tilde[r] = {any_res['reward_target']:.4f}, E_p[r] = {any_res['reward_base']:.4f}, energy "
             f"distance p vs p_tilde = {any_res['energy_base']:.4f}.", "",
             "| method | reward | reward error | mode TV | energy / base | effective beta (energy) | "
             "effective beta (reward) |", "|---|---|---|---|---|---|---|"]
    for name, m in res.items():
        e = eff.get(name)
        err = (m["reward_mean"] - any_res["reward_target"]) / span
        lines.append(f"| {name} | {m['reward_mean']:.4f} | {100 * err:+.1f}% | {m['mode_tv']:.4f} | "
                     f"{100 * m['energy_distance'] / any_res['energy_base']:.1f}% | "
                     f"{e['beta_energy'] if e else '-'} | {_fmt(e['beta_reward']) if e else '-'} |")
    lines += ["", f"Whole demo, both problems: {total_s:.1f} s wall time.", ""]
    return "\n".join(lines)


def format_table(results: dict[str, dict[str, float]]) -> str:
    any_res = next(iter(results.values()))
    head = (f"reward_target={any_res['reward_target']:.4f}  reward_base={any_res['reward_base']:.4f}  "
            f"energy_base={any_res['energy_base']:.4f}  energy_noise_floor={any_res['energy_noise_floor']:.4f}")
    cols = ["method", *TABLE_KEYS]
    lines = [head, "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for name, m in results.items():
        lines.append("| " + " | ".join([name] + [f"{m[k]:.4f}" for k in TABLE_KEYS]) + " |")
    return "\n".join(lines)


__all__: list[Any] = ["METHODS", "format_table", "run_demo", "Reference", "run_shapes_demo", "shapes_demo_config"]

# ---- `tiltflow demo --world shapes` ------------------------------------------------------------------
# A short RTDMD fine-tune of the committed shapes models on the CPU, with the
# 4-step generator's scores and samples before and after, on the same held-out captions and the same noise.
# The generator starts as the committed teacher (a fresh LoRA on it, no stage-1 run needed) and is trained by
# the same spine and configs as every other run (stage rtdmd: distribution matching toward the CFG teacher plus
# the policy gradient and reward back-propagation on the CLIP reward and the verifier). The "before" row is that
# starting generator: the teacher sampled in 4 steps without CFG (or, with init_from=DIR, a stage-1 run's
# generator, as stage 2 normally starts). Writes into OUT: before_metrics.json,
# rtdmd/ (the run directory: config.yaml, metrics.jsonl, final_metrics.json, final_grid.png, ...),
# before_after.png (the same captions and noise: before on the left, after on the right, framed green where the
# verifier passes) and report.md with the table it prints.

# What the demo changes from the shapes defaults (configs/shapes/base.yaml, rtdmd.yaml), sized to finish in
# about 6 minutes on 2 CPU cores (about 10 s an iteration there); any of them can be overridden. lr 1e-4 as
# the GPU runs of benchmarks/results/shapes.json (a try at 5e-4 did worse: CLIP 14.0 -> 9.1).
SHAPES_DEMO_SETTINGS = [
    "world=shapes", "stage=rtdmd", "device=cpu", "log_every=5", "checkpoint_every=1000", "eval.every=0",
    "eval.max_prompts=24", "eval.num_per_prompt=2", "eval.batch_size=48",
    "stage2.num_iters=30", "stage2.num_prompts=4", "stage2.group_size=4", "stage2.lr=1e-4", "stage2.fake.lr=1e-4",
    "stage2.ema_every=1",  # 30 iterations: the EMA (decay 0.9) of the last ten or so, not of three updates
    "rewards=[{name: clip, weight: 0.01}, {name: verifier, weight: 1.0}]",
]
SHAPES_SHOWN = ["verifier/overall", "verifier/single_object", "verifier/two_object", "verifier/counting",
                "verifier/colors", "verifier/position", "verifier/color_attr", "reward/clip", "diversity/within_prompt",
                "fd/reward_embed"]


def init_lora_overrides(overrides: list[str]) -> list[str]:
    """With init_from=DIR: the stage-1 run's lora settings (its fake-score LoRA is loaded into this run's, so
    the shapes must agree), placed before the user's overrides; nothing without init_from or its config.yaml.
    A full-fine-tuning stage-1 run gets a LoRA stage 2 on it (layout separate): full fine-tuning in stage 2
    collapsed under the policy gradient on the GPU (docs/shapes.md)."""
    import yaml

    init = [o.split("=", 1)[1] for o in overrides if o.startswith("init_from=")]
    path = Path(init[-1]) / "config.yaml" if init else None
    if path is None or not path.is_file():
        return []
    lora = (yaml.safe_load(path.read_text()) or {}).get("lora") or {}
    if lora.get("finetune") == "full":
        return ["lora.layout=separate", "lora.finetune=lora"]
    return [f"lora.{k}={lora[k]}" for k in ("layout", "finetune", "rank", "alpha") if k in lora]


# The stage-1 student the demo starts from when models_dir holds one (the committed AC-DMD export,
# checkpoints/shapes/ac_dmd_s0): stage 2 starts from stage 1, as the method does. init_from=null starts from the
# teacher instead (a fresh LoRA), init_from=DIR from another stage-1 run.
SHAPES_DEMO_INIT = "ac_dmd_s0"


def shapes_demo_config(out: Path, overrides: list[str]) -> Any:
    """The shapes demo's config: SHAPES_DEMO_SETTINGS, the run directory OUT/rtdmd, models_dir checkpoints/shapes (the
    committed models, relative to the working directory), init_from models_dir/SHAPES_DEMO_INIT where it exists,
    then the user's overrides."""
    from tiltflow.config.loader import ConfigError
    from tiltflow.worlds.registry import load_run_config

    models_dir = Path(([o.split("=", 1)[1] for o in overrides if o.startswith("models_dir=")] or
                       ["checkpoints/shapes"])[-1])
    if not any(o.startswith("init_from=") for o in overrides) and (models_dir / SHAPES_DEMO_INIT /
                                                                    "final.safetensors").is_file():
        overrides = [f"init_from={models_dir / SHAPES_DEMO_INIT}", *overrides]
    cfg = load_run_config(None, [*SHAPES_DEMO_SETTINGS, "models_dir=checkpoints/shapes", f"run_dir={out / 'rtdmd'}",
                                 *init_lora_overrides(overrides), *overrides], default_world="shapes")
    missing = [p for p in ("teacher", "text_encoder", "reward_model") if not (Path(cfg.models_dir) / p).is_dir()]
    if missing:
        raise ConfigError("models_dir", f"{str(cfg.models_dir)!r} lacks {missing}: the shapes demo starts from the "
                          "committed models in checkpoints/shapes (run it from the repository root) or from a "
                          "teacher stage's run directory (models_dir=runs/shapes/models)")
    if cfg.stage != "rtdmd":
        raise ConfigError("stage", f"the shapes demo runs rtdmd, got {cfg.stage!r}")
    return cfg


def shapes_generator_samples(cfg: Any, init_state: Any) -> tuple[dict[str, float], np.ndarray, list[str]]:
    """Scores and images of the 4-step generator (init_state: None = the starting one) on the run's eval
    prompts with its fixed noise (seeds 10000 + i, as the run's own evaluation uses)."""
    from tiltflow.worlds.shapes.rewards import build_rewards
    from tiltflow.worlds.shapes.world import build_models, evaluate_generator

    adapter, models = build_models(cfg, init_state)
    return evaluate_generator(cfg, adapter, models, build_rewards(cfg.rewards, cfg.models_dir, adapter.device))


def side_by_side(left: Path, right: Path, target: Path, gap: int = 12) -> None:
    from PIL import Image

    a, b = Image.open(left).convert("RGB"), Image.open(right).convert("RGB")
    canvas = Image.new("RGB", (a.width + gap + b.width, max(a.height, b.height)), "white")
    canvas.paste(a, (0, 0))
    canvas.paste(b, (a.width + gap, 0))
    canvas.save(target)


def shapes_table(before: dict[str, float], after: dict[str, float], start: str) -> str:
    keys = [k for k in SHAPES_SHOWN if k in before and k in after]
    lines = ["| generator (4 steps) | " + " | ".join(k.split("/", 1)[1] if k.startswith("verifier/") else k
                                                 for k in keys) + " |",
             "|---" * (len(keys) + 1) + "|"]
    for name, m in ((f"before: {start}", before), ("after: RTDMD fine-tune", after)):
        lines.append(f"| {name} | " + " | ".join(f"{m[k]:.3f}" for k in keys) + " |")
    return "\n".join(lines)


def run_shapes_demo(out: Path, overrides: list[str], *, progress: bool = True) -> dict[str, Any]:
    from tiltflow.training.spine import train
    from tiltflow.worlds.diffusers_world import read_final
    from tiltflow.worlds.shapes.evaluate import write_eval

    out = Path(out)
    cfg = shapes_demo_config(out, overrides)
    t0 = time.monotonic()
    # The starting generator: the teacher itself (a fresh LoRA), or a stage-1 run's (init_from=DIR).
    start = f"the stage-1 run {cfg.init_from}" if cfg.init_from else "the teacher, no CFG"
    before, images, prompts = shapes_generator_samples(cfg, read_final(cfg.init_from) if cfg.init_from else None)
    write_eval(out, "before", before, images, prompts)
    print(f"before: verifier {before['verifier/overall']:.3f}, CLIP {before['reward/clip']:.2f} "
          f"({len(prompts)} samples); training {cfg.stage2.num_iters} RTDMD iterations", flush=True)
    train(cfg, progress=progress)
    run_dir = Path(cfg.run_dir)
    after, images_after, _ = shapes_generator_samples(cfg, read_final(run_dir))  # the EMA one, as final_metrics
    write_eval(out, "after", after, images_after, prompts)
    side_by_side(out / "before_grid.png", out / "after_grid.png", out / "before_after.png")
    text = shapes_table(before, after, start)
    elapsed = time.monotonic() - t0
    report = (f"# shapes demo: a short RTDMD fine-tune on the CPU\n\n{text}\n\n"
              f"{len(prompts)} samples ({cfg.eval.max_prompts} held-out test captions x {cfg.eval.num_per_prompt}), "
              f"the same noise before and after; {cfg.stage2.num_iters} iterations of {cfg.stage2.num_prompts} "
              f"prompts x {cfg.stage2.group_size} samples, seed {cfg.seed}, {elapsed:.0f} s. Samples: "
              "before_after.png (left before, right after; green frame = the verifier passes). A short run on a "
              "few captions: differences of a few samples are noise; benchmarks/results/shapes.json holds the "
              "GPU runs.\n")
    (out / "report.md").write_text(report)
    (out / "demo_metrics.json").write_text(json.dumps({"before": before, "after": after, "elapsed_s": elapsed},
                                                      indent=2) + "\n")
    print(text)
    print(f"wrote {out}/report.md, before_after.png and the run directory {run_dir} ({elapsed:.0f} s)")
    return {"before": before, "after": after}
