"""`tiltflow <verb>`: train, sample, eval, demo, bench. Every verb has --help; long work shows a progress bar.

Exit codes: 0 success; 2 a usage, config or input error (a bad flag, config key or value, a missing file,
model or run directory); 1 a failure while running (a non-finite loss, a device fault, a reward server
that keeps failing)."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import traceback
from pathlib import Path
from typing import Any

from tiltflow.config.loader import ConfigError, UsageError, to_yaml, user_tree
from tiltflow.config.schema import RENAMED_STAGES, STAGE_PRESETS
from tiltflow.worlds.registry import get_world, load_run_config

DEFAULT_GMM_CONFIG = Path(__file__).parent / "configs" / "gmm" / "default.yaml"
EXIT_PAUSED = 3
EXIT_CODES = ("exit codes: 0 success, 2 usage/config/input error, 1 failure while running, 3 (train) paused at "
              "time_limit_s with a checkpoint: run the same command again to resume")


def _add_config_args(p: argparse.ArgumentParser, required: bool) -> None:
    p.add_argument("--config", type=Path, required=required, default=None,
                   help="YAML run config (see tiltflow/configs/gmm/ and configs/<family>/); a top-level "
                   "`base: other.yaml` extends another file")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="dotted overrides applied after the file, e.g. stage2.beta=0.5 run_dir=runs/x")


def _run_config(run: Path, overrides: list[str]) -> Any:
    """The resolved config of a run directory, pointed at that directory."""
    if not (run / "config.yaml").is_file():
        raise UsageError(f"--run {str(run)!r}: no config.yaml there; is it a run directory?")
    cfg = load_run_config(run / "config.yaml", [*overrides, f"run_dir={run}"])
    _require_device(cfg)
    return cfg


def _require_device(cfg: Any) -> None:
    """A config's CUDA device on a machine without one: a usage error naming the key, not torch's traceback
    from deep inside the first model move."""
    device = str(getattr(cfg, "device", "cpu"))
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise UsageError(f"device: the config says {device!r}, but this torch ({torch.__version__}) sees no "
                             "CUDA device; add the override device=cpu")


def _world(cfg: Any, verb: str) -> Any:
    world = get_world(cfg.world)()
    if not hasattr(world, verb):
        raise UsageError(f"the {cfg.world} world has no `{verb}`")
    return world


def cmd_train(args: argparse.Namespace) -> int:
    from tiltflow.training.spine import train

    cfg = load_run_config(args.config, args.overrides)
    if args.dry_run:
        print(to_yaml(cfg), end="")
        return 0
    _require_device(cfg)
    from tiltflow.distributed.state import is_main_process

    metrics = train(cfg)
    if not is_main_process():  # under torchrun, rank 0 speaks for the run
        return 0
    if "paused_at" in metrics:
        print(f"{cfg.stage} paused at step {metrics['paused_at']:.0f} of {metrics['num_iters']:.0f} "
              f"(time_limit_s={cfg.time_limit_s:g}); run the same command again to resume")
        return EXIT_PAUSED
    scalars = {k: v for k, v in metrics.items() if isinstance(v, float)}
    print(f"{cfg.stage} finished: " + ", ".join(f"{k}={v:.4g}" for k, v in scalars.items()))
    if isinstance(metrics.get("note"), str):  # what the world wants the user to know, e.g. where a teacher went
        print(metrics["note"])
    print(f"run directory: {cfg.run_dir}")
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    if (args.run is None) == (args.config is None):
        raise UsageError("give --run DIR (a finished gmm run) or --config FILE (a diffusers sample config)")
    if args.out is None:
        raise UsageError("--out is required (gmm: a .npy file; diffusers: a folder)")
    cfg = (_run_config(args.run, args.overrides) if args.run is not None
           else load_run_config(args.config, args.overrides))
    if args.prompts is not None:
        if not hasattr(cfg, "prompt_file"):
            raise UsageError(f"--prompts: the {cfg.world} world samples from condition indices (--prompt N), not "
                             "a caption file")
        # The file's prompts alone, not a sample config's own list too; the world reads and checks the file.
        extra = {"prompts": []} if hasattr(cfg, "prompts") else {}
        cfg = dataclasses.replace(cfg, prompt_file=str(args.prompts), **extra)
    _require_device(cfg)
    print(_world(cfg, "sample").sample(cfg, out=args.out, texts=args.text, num=args.num, prompt=args.prompt,
                                        seed=args.seed))
    return 0


EXPORT_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def cmd_export(args: argparse.Namespace) -> int:
    import torch

    if args.out.exists() and (not args.out.is_dir() or any(args.out.iterdir())):
        raise UsageError(f"--out {str(args.out)!r} exists and is not an empty folder; give a new one (an export "
                         "replaces its folder whole)")
    cfg = _run_config(args.run, args.overrides)
    dtype = getattr(torch, EXPORT_DTYPES[args.dtype]) if args.dtype else None
    folder = _world(cfg, "export").export(cfg, out=args.out, dtype=dtype)
    print(folder)
    return 0


_IMAGE_EVAL_REQUIRED = {"reward": "--reward", "out": "--out"}


def cmd_eval(args: argparse.Namespace) -> int:
    if args.run is None:
        from tiltflow.eval.harness import run_eval

        missing = [flag for dest, flag in _IMAGE_EVAL_REQUIRED.items() if getattr(args, dest, None) is None]
        if missing:
            raise UsageError(f"tiltflow eval needs {' and '.join(missing)} (or --run DIR for a gmm run)")
        if args.overrides:
            raise UsageError(f"tiltflow eval: KEY=VALUE overrides ({' '.join(args.overrides)}) need --run DIR")
        return run_eval(args)
    import json

    cfg = _run_config(args.run, args.overrides)
    result = _world(cfg, "evaluate_run").evaluate_run(cfg, num=args.num, seed=args.seed, out_dir=args.out)
    if args.out is not None:  # the result beside whatever the world wrote there (the teacher's metrics, grid)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "eval_run.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"samples: {result['samples']}\nreference: {result['reference']}", file=sys.stderr)
    print(json.dumps(result["metrics"], indent=2))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from tiltflow.demo import METHODS, run_demo

    if args.world == "shapes":
        from tiltflow.demo import run_shapes_demo, shapes_demo_config

        if args.config is not None or args.methods is not None:
            raise UsageError("--world shapes runs one RTDMD fine-tune from the committed models: it takes "
                             "KEY=VALUE overrides, not --config or --methods")
        out = args.out if args.out is not None else Path("runs/demo_shapes")
        if args.dry_run:
            print(to_yaml(shapes_demo_config(out, args.overrides)), end="")
            return 0
        run_shapes_demo(out, args.overrides)
        return 0
    args.out = args.out if args.out is not None else Path("runs/demo")
    path = args.config or DEFAULT_GMM_CONFIG
    cfg = load_run_config(path, args.overrides)
    if cfg.world != "gmm":
        raise UsageError(f"the demo runs a gmm problem; {str(path)!r} is a {cfg.world!r} config")
    if args.dry_run:
        print(to_yaml(cfg), end="")
        return 0
    methods = args.methods.split(",") if args.methods else None
    unknown = sorted(set(methods or []) - set(METHODS))
    if unknown:
        renamed = [RENAMED_STAGES[m] for m in unknown if m in RENAMED_STAGES]
        raise UsageError(f"unknown --methods {unknown}; choose from {METHODS}" + "".join(f" ({r})" for r in renamed))
    user = user_tree(path, args.overrides, STAGE_PRESETS, "stage")
    run_demo(cfg, user, args.out, methods=methods)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    import torch

    from tiltflow.bench import run_bench

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {args.device}: no CUDA device is visible; use --device cpu with a tiny_* arch")
    if not args.device.startswith("cuda") and not args.arch.startswith("tiny_"):
        raise UsageError(f"--arch {args.arch} is full size: it needs --device cuda (tiny_* archs run on the CPU)")
    if min(args.batch, args.repeats, args.rollout_batches, args.n_fake) < 1 or args.warmup < 0:
        raise UsageError("--batch, --repeats, --rollout-batches and --n-fake must be >= 1, --warmup >= 0")
    if args.stage in ("2", "all") and args.batch < 2:
        raise UsageError(f"--batch {args.batch}: stage 2 needs a group of at least 2 samples")
    return run_bench(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tiltflow", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="verb", required=True)

    def verb(name: str, help_text: str, func: Any) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text, epilog=EXIT_CODES)
        p.set_defaults(func=func)
        return p

    p = verb("train", "train one stage (teacher, ac_dmd, dmd2, rtdmd, rtdmd_exact, rtdmd_fullchain, grpo_only, "
             "bp_only, dm_bp) of any world into run_dir; resumes if run_dir holds a checkpoint", cmd_train)
    _add_config_args(p, required=True)
    p = verb("sample", "samples of a trained generator: a gmm run (--run DIR, .npy) or a diffusers model "
             "(--config configs/<family>/sample.yaml: PNGs + a captioned grid)", cmd_sample)
    p.add_argument("--run", type=Path, default=None, help="gmm: a finished run directory (a teacher run samples "
                   "the teacher with its many-step sampler)")
    p.add_argument("--config", type=Path, default=None,
                   help="diffusers: a sample config (configs/<family>/sample.yaml)")
    p.add_argument("--text", action="append", default=[], help="diffusers: a prompt (repeatable; default: the "
                   "config's prompts)")
    p.add_argument("--prompts", type=Path, default=None, metavar="FILE", help="shapes and diffusers: a caption file, "
                   "one per line (as the override prompt_file=FILE); shapes: --run DIR --prompts FILE --out DIR")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted config overrides")
    p.add_argument("--num", type=int, default=None, help="gmm: number of samples (default 1000)")
    p.add_argument("--prompt", type=int, default=None, help="gmm: prompt (condition) index (default 0)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (default: gmm 0, else sample.seed)")
    p.add_argument("--out", type=Path, default=None, help="gmm: output .npy file, shape (num, dim); diffusers: "
                   "output folder")
    p = verb("eval", "evaluate a gmm run (--run) or score images with rewards (see docs/rewards.md)", cmd_eval)
    p.add_argument("--run", type=Path, default=None, help="a run directory: gmm runs are evaluated against "
                   "p_tilde, shapes runs with the verifier (a teacher run samples the teacher)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="with --run: dotted overrides of the run's config, e.g. eval.teacher_steps=4 device=cpu")
    p.add_argument("--num", type=int, default=4000, help="samples per prompt (gmm)")
    p.add_argument("--seed", type=int, default=999, help="seed of the samples (gmm; 999 is what runs report)")
    try:
        from tiltflow.eval.harness import add_eval_arguments

        add_eval_arguments(p)
    except ImportError:  # pragma: no cover - the image harness is optional
        pass
    # The image harness's required options do not apply to `eval --run DIR`: cmd_eval checks them instead.
    for action in p._actions:
        if action.dest in _IMAGE_EVAL_REQUIRED:
            action.required = False
    p = verb("export", "write a finished diffusers or shapes run's generator as a transformer folder (its LoRA merged "
             "into its base) that the diffusers class reads with from_pretrained, for tools that take no LoRA",
             cmd_export)
    p.add_argument("--run", type=Path, required=True, help="a finished stage run directory (with final.safetensors)")
    p.add_argument("--out", type=Path, required=True, help="a new (or empty) folder for config.json and the weights")
    p.add_argument("--dtype", choices=sorted(EXPORT_DTYPES), default=None,
                   help="weights' dtype (default: bf16 for the real backbones, fp16 for shapes)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="dotted overrides of the run's config, e.g. device=cpu or model.source=/local/folder")
    p = verb("demo", "every method on a gmm problem, side by side (default: the embedded 2-D problem); with "
             "--world shapes, a short RTDMD fine-tune of the committed shapes models on the CPU, before and after",
             cmd_demo)
    _add_config_args(p, required=False)
    p.add_argument("--world", choices=["gmm", "shapes"], default="gmm", help="gmm (default): every method on a gmm "
                   "problem; shapes: an RTDMD fine-tune from checkpoints/shapes (about 6 min on 2 CPU cores), its "
                   "scores and samples before and after")
    p.add_argument("--out", type=Path, default=None, help="output directory (default runs/demo, or "
                   "runs/demo_shapes with --world shapes)")
    p.add_argument("--methods", default=None,
                   help="comma-separated subset of methods (default: all). Stage-2 methods need ac_dmd.")
    p = verb("bench", "time one stage-1 cycle, one stage-2 iteration and 4-step inference of a random-weight "
             "architecture: seconds, images/s, peak memory, MFU, efficiency (JSON + a table)", cmd_bench)
    from tiltflow.bench import add_arguments as add_bench_arguments

    add_bench_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from tiltflow.eval.prompts import PromptFileError
    from tiltflow.rewards.base import RewardError
    from tiltflow.rewards.remote import RemoteRewardError
    from tiltflow.storage import UnsafeFileError
    from tiltflow.training.checkpointing import CheckpointError

    try:
        return int(args.func(args) or 0)
    except (ConfigError, UsageError, FileNotFoundError, PromptFileError, RewardError, UnsafeFileError,
            FloatingPointError, CheckpointError, RemoteRewardError) as e:
        print(f"error: {e}", file=sys.stderr)  # one line, no traceback
        # 1: a failure while running, already explained; 2: the user's input
        return 1 if isinstance(e, (FloatingPointError, CheckpointError, RemoteRewardError)) else 2


def run() -> None:
    """The `tiltflow` command (and `python -m tiltflow.cli`): main(), then the exit; a torchrun rank ends
    through tiltflow.distributed.launch.finish_process (see there why), also when main raises (the traceback
    printed, exit status 1)."""
    from tiltflow.distributed.launch import finish_process
    from tiltflow.distributed.state import in_process_group

    try:
        code = main()
    except Exception:
        if not in_process_group():
            raise
        traceback.print_exc()
        code = 1
    finish_process(code)


if __name__ == "__main__":
    run()
