"""`tiltflow demo --world shapes`: a short RTDMD fine-tune of the committed shapes models on the CPU, with the
4-step generator's scores and samples before and after, on the same held-out captions and the same noise.

The generator starts as the committed teacher (a fresh LoRA on it, no stage-1 run needed) and is trained by
the same spine and configs as every other run (stage rtdmd: distribution matching toward the CFG teacher plus
the policy gradient and reward back-propagation on the CLIP reward and the verifier). The "before" row is that
starting generator: the teacher sampled in 4 steps without CFG (or, with init_from=DIR, a stage-1 run's
generator, as stage 2 normally starts). Writes into OUT: before_metrics.json,
rtdmd/ (the run directory: config.yaml, metrics.jsonl, final_metrics.json, final_grid.png, ...),
before_after.png (the same captions and noise: before on the left, after on the right, framed green where the
verifier passes) and report.md with the table it prints.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

# What the demo changes from the shapes defaults (configs/shapes/base.yaml, rtdmd.yaml), sized to finish in
# about 6 minutes on 2 CPU cores (about 10 s an iteration there); any of them can be overridden. lr 1e-4 as
# the GPU runs of benchmarks/results/shapes.json (a try at 5e-4 did worse: CLIP 14.0 -> 9.1).
DEMO_SETTINGS = [
    "world=shapes", "stage=rtdmd", "device=cpu", "log_every=5", "checkpoint_every=1000", "eval.every=0",
    "eval.max_prompts=24", "eval.num_per_prompt=2", "eval.batch_size=48",
    "stage2.num_iters=30", "stage2.num_prompts=4", "stage2.group_size=4", "stage2.lr=1e-4", "stage2.fake.lr=1e-4",
    "stage2.ema_every=1",  # 30 iterations: the EMA (decay 0.9) of the last ten or so, not of three updates
    "rewards=[{name: clip, weight: 0.01}, {name: verifier, weight: 1.0}]",
]
SHOWN = ["verifier/overall", "verifier/single_object", "verifier/two_object", "verifier/counting", "verifier/colors",
         "verifier/position", "verifier/color_attr", "reward/clip", "diversity/within_prompt", "fd/reward_embed"]


def demo_config(out: Path, overrides: list[str]) -> Any:
    """The demo's run config: DEMO_SETTINGS, the run directory OUT/rtdmd, models_dir checkpoints/shapes (the
    committed models, relative to the working directory), then the user's overrides."""
    from tiltflow.config.loader import ConfigError
    from tiltflow.worlds.registry import load_run_config

    cfg = load_run_config(None, [*DEMO_SETTINGS, "models_dir=checkpoints/shapes", f"run_dir={out / 'rtdmd'}",
                                 *overrides], default_world="shapes")
    missing = [p for p in ("teacher", "text_encoder", "reward_model") if not (Path(cfg.models_dir) / p).is_dir()]
    if missing:
        raise ConfigError("models_dir", f"{str(cfg.models_dir)!r} lacks {missing}: the shapes demo starts from the "
                          "committed models in checkpoints/shapes (run it from the repository root) or from a "
                          "teacher stage's run directory (models_dir=runs/shapes/models)")
    if cfg.stage != "rtdmd":
        raise ConfigError("stage", f"the shapes demo runs rtdmd, got {cfg.stage!r}")
    return cfg


def generator_samples(cfg: Any, init_state: Any) -> tuple[dict[str, float], np.ndarray, list[str]]:
    """Scores and images of the 4-step generator (init_state: None = the starting one) on the run's eval
    prompts with its fixed noise (seeds 10000 + i, as the run's own evaluation uses)."""
    from tiltflow.worlds.shapes.evaluate import eval_prompts, evaluate_samples
    from tiltflow.worlds.shapes.rewards import build_rewards
    from tiltflow.worlds.shapes.world import build_models, few_step

    adapter, models = build_models(cfg, init_state)
    rewards = build_rewards(cfg.rewards, cfg.models_dir, adapter.device)
    prompts = eval_prompts(cfg.eval.prompt_set, cfg.eval.max_prompts, cfg.eval.num_per_prompt)
    seeds = [10_000 + i for i in range(len(prompts))]
    b = cfg.eval.batch_size

    def generate(batch: list[str], k: int) -> Any:
        return few_step(models, adapter, cfg.sampler, batch, seeds[k * b:k * b + len(batch)])

    metrics, images = evaluate_samples(generate, prompts, b, rewards, adapter.decode)
    return metrics, images, prompts


def side_by_side(left: Path, right: Path, target: Path, gap: int = 12) -> None:
    from PIL import Image

    a, b = Image.open(left).convert("RGB"), Image.open(right).convert("RGB")
    canvas = Image.new("RGB", (a.width + gap + b.width, max(a.height, b.height)), "white")
    canvas.paste(a, (0, 0))
    canvas.paste(b, (a.width + gap, 0))
    canvas.save(target)


def table(before: dict[str, float], after: dict[str, float], start: str) -> str:
    keys = [k for k in SHOWN if k in before and k in after]
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
    cfg = demo_config(out, overrides)
    t0 = time.monotonic()
    # The starting generator: the teacher itself (a fresh LoRA), or a stage-1 run's (init_from=DIR).
    start = f"the stage-1 run {cfg.init_from}" if cfg.init_from else "the teacher, no CFG"
    before, images, prompts = generator_samples(cfg, read_final(cfg.init_from) if cfg.init_from else None)
    write_eval(out, "before", before, images, prompts)
    print(f"before: verifier {before['verifier/overall']:.3f}, CLIP {before['reward/clip']:.2f} "
          f"({len(prompts)} samples); training {cfg.stage2.num_iters} RTDMD iterations", flush=True)
    train(cfg, progress=progress)
    run_dir = Path(cfg.run_dir)
    after, images_after, _ = generator_samples(cfg, read_final(run_dir))  # the EMA generator, as final_metrics
    write_eval(out, "after", after, images_after, prompts)
    side_by_side(out / "before_grid.png", out / "after_grid.png", out / "before_after.png")
    text = table(before, after, start)
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
