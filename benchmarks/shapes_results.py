"""The shapes world's results table (issue 9): benchmarks/results/shapes.json and a Markdown table.

Rows: rendered images (the data: what a perfect generator would score, and the finite-sample floor of the
Frechet distance), the teacher (many steps with CFG, and 4 steps), then every finished distillation run
given with --run LABEL=DIR (several DIRs with one LABEL are seeds of one method: mean and spread).
Columns: verifier on the held-out test prompts (overall and per category), the CLIP reward model's score,
diversity within a prompt and the Frechet distance to renders, both in the reward model's image-embedding
space (tiltflow.worlds.shapes.evaluate).

    python benchmarks/shapes_results.py --models checkpoints/shapes \\
        --teacher checkpoints/shapes/eval_h200/teacher_50steps_cfg3_metrics.json \\
        --teacher checkpoints/shapes/eval/teacher_4steps_cfg3_metrics.json \\
        --run ac_dmd=runs/shapes/ac_dmd_s0 --run ac_dmd=runs/shapes/ac_dmd_s1 ... --out benchmarks/results/shapes.json

The distillation runs of benchmarks/results/shapes.json are kept in benchmarks/results/shapes_runs_wide/ (protocol
A: every method side by side at equal wall time) and shapes_runs_long/ (protocol B: AC-DMD and RTDMD alone, for
longer); how they were made: their PROVENANCE.json, given with --runs-provenance. That table reads each run's
64-sample re-evaluation (--metrics final_64pp_metrics.json --per-prompt 64, the folders under eval64/); its
provenance has the command.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from tiltflow.worlds.registry import load_run_config
from tiltflow.worlds.shapes.evaluate import eval_prompts, evaluate_samples
from tiltflow.worlds.shapes.render import render
from tiltflow.worlds.shapes.rewards import build_rewards
from tiltflow.worlds.shapes.scene import parse

COLUMNS = ["verifier/overall", "verifier/single_object", "verifier/two_object", "verifier/counting",
           "verifier/colors", "verifier/position", "verifier/color_attr", "reward/clip", "diversity/within_prompt",
           "fd/reward_embed"]
DATA_SEED = 70_000  # the data row's renders; the Frechet reference uses other seeds (90_000 + i)


def data_row(models: Path, device: str, per_prompt: int = 0) -> dict[str, float]:
    """Renders of the evaluated prompts (one per sample), scored like a generator's samples; `per_prompt` > 0
    replaces the teacher stage's eval.num_per_prompt (the Frechet distance's finite-sample floor depends on it)."""
    overrides = [f"run_dir={models}", f"device={device}"]
    if per_prompt:
        overrides.append(f"eval.num_per_prompt={per_prompt}")
    cfg = load_run_config(models / "config.yaml", overrides)
    prompts = eval_prompts(cfg.eval.prompt_set, cfg.eval.max_prompts, cfg.eval.num_per_prompt)
    size = cfg.model.resolution
    images = np.stack([render(parse(p), size, DATA_SEED + i) for i, p in enumerate(prompts)])

    def generate(batch: list[str], k: int) -> torch.Tensor:
        start = k * cfg.eval.batch_size
        x = torch.from_numpy(images[start:start + len(batch)]).permute(0, 3, 1, 2).float()
        return x / 127.5 - 1.0

    rewards = build_rewards(cfg.rewards, models, device)
    metrics, _ = evaluate_samples(generate, prompts, cfg.eval.batch_size, rewards)
    return metrics


def summarise(label: str, rows: list[dict[str, float]], source: list[str]) -> dict:
    out: dict = {"method": label, "num_seeds": len(rows), "source": source}
    for c in COLUMNS:
        vals = [r[c] for r in rows if c in r]
        if vals:
            out[c] = float(np.mean(vals))
            if len(vals) > 1:
                out[c + "_std"] = float(np.std(vals, ddof=1))
                out[c + "_min"], out[c + "_max"] = float(min(vals)), float(max(vals))
    return out


def markdown(rows: list[dict]) -> str:
    names = {"reward/clip": "CLIP reward", "diversity/within_prompt": "diversity", "fd/reward_embed": "FD"}
    head = ["method", "seeds", *[names.get(c, c.split("/")[-1]) for c in COLUMNS]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["method"], str(r["num_seeds"])]
        for c in COLUMNS:
            if c not in r:
                cells.append("-")
            elif c + "_std" in r:
                cells.append(f"{r[c]:.3f} ± {r[c + '_std']:.3f}")
            else:
                cells.append(f"{r[c]:.3f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from shapes_common import provenance

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", type=Path, default=Path("checkpoints/shapes"), help="the teacher stage's folder")
    p.add_argument("--teacher", type=Path, action="append", default=[],
                   help="a teacher metrics JSON written by `tiltflow eval --run MODELS` (repeatable)")
    p.add_argument("--run", action="append", default=[], metavar="LABEL=DIR",
                   help="a finished stage run (its --metrics file); repeat a LABEL for its seeds")
    p.add_argument("--metrics", default="final_metrics.json",
                   help="the metrics file read in each --run folder, e.g. final_64pp_metrics.json written by "
                   "`tiltflow eval --run RUN --out DIR eval.num_per_prompt=64` (default %(default)s)")
    p.add_argument("--runs-provenance", type=Path, action="append", default=[],
                   help="a JSON saying how the --run directories were made (device, commands, commit), copied in "
                   "under its path (repeatable: runs made in several sets of calls)")
    p.add_argument("--per-prompt", type=int, default=0, help="renders per test prompt in the data row (default: "
                   "the teacher stage's eval.num_per_prompt); give the runs' own, e.g. 64 with final_64pp_metrics.json")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)

    data = data_row(args.models, args.device, args.per_prompt)
    rows = [summarise("data (renders)", [data], ["render seeds 70000+i"])]
    for path in args.teacher:
        m = json.loads(path.read_text())
        rows.append(summarise(f"teacher ({m['num_steps']:.0f} steps, CFG {m['guidance_scale']:g})", [m], [str(path)]))
    runs: dict[str, list[Path]] = {}
    for item in args.run:
        label, _, folder = item.partition("=")
        runs.setdefault(label, []).append(Path(folder))
    for label, folders in runs.items():
        metrics = [json.loads((f / args.metrics).read_text()) for f in folders]
        rows.append(summarise(label, metrics, [str(f) for f in folders]))
    result = {"provenance": provenance(), "columns": COLUMNS, "rows": rows}
    if args.runs_provenance:
        result["runs_provenance"] = {str(f): json.loads(f.read_text()) for f in args.runs_provenance}
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
