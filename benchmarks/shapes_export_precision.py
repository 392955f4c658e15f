"""What the fp16 student folder (a shapes run's export_transformer/) costs the student: the fp16 rounding of its
weights against how far training moved them from the teacher, and `tiltflow eval --run` of the run beside the
same run with its generator rounded to fp16 (same captions, same noise seeds).

    python benchmarks/shapes_export_precision.py --run checkpoints/shapes/ac_dmd_s0 \
        --out benchmarks/results/shapes_export_fp16.json device=cpu eval.num_per_prompt=4

Trailing KEY=VALUE overrides go to both evaluations (and to the run's config when its models are built).
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from shapes_common import write_result

from tiltflow.cli import main as tiltflow_main
from tiltflow.models.export import merged_state_dict
from tiltflow.worlds.diffusers_world import sampling_models
from tiltflow.worlds.registry import load_run_config
from tiltflow.worlds.shapes.world import build_models


def rounded_copy(run: Path, dest: Path, student: dict[str, torch.Tensor]) -> None:
    """A copy of `run` whose final.safetensors' export is `student` rounded to fp16 (full weights)."""
    shutil.copytree(run, dest, ignore=shutil.ignore_patterns("final.safetensors", "checkpoint*"))
    with safe_open(str(run / "final.safetensors"), "pt") as f:
        metadata = dict(f.metadata() or {}, export_rank="0")
    state = {f"export/{k}": v.half().float().contiguous() for k, v in student.items()}
    save_file(state, str(dest / "final.safetensors"), metadata=metadata)


def evaluate(run: Path, out: Path, overrides: list[str]) -> dict[str, float]:
    if tiltflow_main(["eval", "--run", str(run), "--out", str(out), "--no-progress", *overrides]) != 0:
        raise SystemExit(f"tiltflow eval --run {run} failed")
    return json.loads((out / "eval_run.json").read_text())["metrics"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, required=True, help="a finished shapes distillation run")
    parser.add_argument("--out", type=Path, default=None, help="result JSON (default: print only)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="e.g. device=cpu eval.num_per_prompt=4")
    args = parser.parse_args(argv)

    cfg = load_run_config(args.run / "config.yaml", [f"run_dir={args.run}", *args.overrides])
    adapter, models = sampling_models(cfg, build_models)  # the run's generator, as tiltflow sample builds it
    student = models.merged_generator_weights()
    teacher = merged_state_dict(adapter.transformer, (), torch.float32)  # its adapters left out: the teacher
    rounding = sum(float(((v.half().float() - v) ** 2).sum()) for v in student.values()) ** 0.5
    moved = sum(float(((v - teacher[k]) ** 2).sum()) for k, v in student.items()) ** 0.5

    with tempfile.TemporaryDirectory() as tmp:
        rounded = Path(tmp) / "rounded_run"
        rounded_copy(args.run, rounded, student)
        as_trained = evaluate(args.run, Path(tmp) / "eval_as_trained", args.overrides)
        in_fp16 = evaluate(rounded, Path(tmp) / "eval_fp16", args.overrides)
    result = {"run": str(args.run), "overrides": args.overrides,
              "rounding_over_moved": rounding / moved, "rounding_norm": rounding, "moved_norm": moved,
              "as_trained": as_trained, "fp16_weights": in_fp16,
              "difference": {k: in_fp16[k] - as_trained[k] for k in as_trained}}
    print(json.dumps(result, indent=1))
    write_result(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
