"""Run the shapes world's distillation rows (issue 9) as parallel processes on one GPU.

Every run is the plain `tiltflow train --config configs/shapes/<method>.yaml` with its own seed and run directory
(`<root>/<method>_s<seed>`); stage-2 methods start from the AC-DMD run of the same seed. The small shapes models
leave a GPU mostly idle (a step is bound by the host), so the runs of one phase go side by side, one process
each. A run paused at `time_limit_s` (exit 3) is resumed by running this script again with the same arguments;
a finished run is skipped (its final_metrics.json exists).

    python benchmarks/shapes_distill.py --phase stage1 --seeds 0 1 --time-limit 450 stage1.num_iters=400
    python benchmarks/shapes_distill.py --phase stage2 --seeds 0 1 --time-limit 420 stage2.num_iters=200
    python benchmarks/shapes_distill.py --phase stage2 --root runs/s2_lora --init-root runs/shapes lora.layout=separate

(the last: a LoRA stage 2 in runs/s2_lora from full-fine-tuning stage-1 runs in runs/shapes)

`--finish` exports the paused runs where they stand instead of training further: each paused run (a checkpoint,
no final_metrics.json) is resumed once with `<stage>.num_iters` set to its checkpoint's step, so it finishes at
once and writes final.safetensors, final_metrics.json and final_grid.png (what stage 2's init_from and the CPU
demo read).

Each process's output goes to <root>/<method>_s<seed>.log; the script prints one line per run (exit code, wall
time, the last metrics) and exits non-zero if any run failed (exit codes other than 0 and 3).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

# rtdmd_balanced: RTDMD with w_bp and w_dm raised for this world (configs/shapes/rtdmd_balanced.yaml says why);
# rtdmd_partial / grpo_partial: the same (and GRPO-only) with the verifier's graded score as reward
PHASES = {"stage1": ("ac_dmd", "dmd2"),
          "stage2": ("rtdmd", "rtdmd_balanced", "rtdmd_partial", "grpo_only", "grpo_partial", "bp_only")}


def checkpoint_step(run_dir: Path) -> int | None:
    """The step of a run's newest readable checkpoint, None without one."""
    from tiltflow.training.checkpointing import FileCheckpointer

    ckpt = FileCheckpointer(run_dir)
    return int(ckpt.load()["step"]) if ckpt.exists() else None


def finish_overrides(phase: str, run_dir: Path) -> list[str] | None:
    """`<stage>.num_iters=<checkpoint step>` for a paused run; None for a run with nothing to finish."""
    step = checkpoint_step(run_dir)
    return None if step is None else [f"{phase}.num_iters={step}"]


def commands(phase: str, methods: list[str], seeds: list[int], root: Path, configs: Path, time_limit: float,
             overrides: list[str], init_root: Path | None = None) -> list[tuple[str, list[str]]]:
    """(run name, argv) of every run; stage-2 runs start from `<init_root or root>/ac_dmd_s<seed>`."""
    out = []
    for method in methods:
        for seed in seeds:
            name = f"{method}_s{seed}"
            argv = [sys.executable, "-m", "tiltflow.cli", "train", "--config", str(configs / f"{method}.yaml"),
                    f"seed={seed}", f"run_dir={root / name}", f"time_limit_s={time_limit}"]
            if phase == "stage2":
                argv.append(f"init_from={(init_root or root) / f'ac_dmd_s{seed}'}")
            out.append((name, argv + overrides))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--phase", choices=sorted(PHASES), required=True)
    p.add_argument("--methods", nargs="+", default=None, help="default: every method of the phase")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    p.add_argument("--root", type=Path, default=Path("runs/shapes"))
    p.add_argument("--configs", type=Path, default=Path("configs/shapes"))
    p.add_argument("--init-root", type=Path, default=None, help="stage 2: the folder of the AC-DMD runs to start "
                   "from (<init-root>/ac_dmd_s<seed>; default --root), e.g. to try stage-2 settings side by side "
                   "from one stage 1, each setting in its own --root")
    p.add_argument("--time-limit", type=float, default=0.0, help="time_limit_s of every run (0: none)")
    p.add_argument("--finish", action="store_true", help="export each paused run at its checkpoint's step "
                   "instead of training further (runs without a checkpoint are left alone)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides for every run")
    args = p.parse_args(argv)
    methods = args.methods or list(PHASES[args.phase])
    unknown = sorted(set(methods) - set(PHASES[args.phase]))
    if unknown:
        p.error(f"--methods {unknown} are not {args.phase} methods; expected some of {list(PHASES[args.phase])}")
    args.root.mkdir(parents=True, exist_ok=True)
    todo = [(n, c) for n, c in commands(args.phase, methods, args.seeds, args.root, args.configs, args.time_limit,
                                        args.overrides, args.init_root)
            if not (args.root / n / "final_metrics.json").is_file()]
    if args.finish:  # the overrides come last, so the checkpoint's step wins over any num_iters given
        todo = [(n, c + extra) for n, c in todo if (extra := finish_overrides(args.phase, args.root / n)) is not None]
    t0 = time.time()
    procs = {}
    for name, argv_ in todo:
        print(" ".join(argv_[1:]), flush=True)
        log = open(args.root / f"{name}.log", "a")  # a resumed run appends to its log
        procs[name] = (subprocess.Popen(argv_, stdout=log, stderr=subprocess.STDOUT), log)
    failed = 0
    for name, (proc, log) in procs.items():
        rc = proc.wait()
        log.close()
        failed += rc not in (0, 3)
        metrics = args.root / name / "metrics.jsonl"
        last = json.loads(metrics.read_text().splitlines()[-1]) if metrics.is_file() else {}
        state = {0: "finished", 3: "paused (run again to resume)"}.get(rc, f"FAILED, see {name}.log")
        print(f"{name}: exit {rc} {state}, checkpoint at step {checkpoint_step(args.root / name)} (last logged "
              f"step {last.get('step')}), {time.time() - t0:.0f} s", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
