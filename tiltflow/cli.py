"""`tiltflow <verb>`: train, sample, eval, demo. Every verb has --help; long work shows a progress bar."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tiltflow.config.loader import ConfigError

DEFAULT_GMM_CONFIG = Path(__file__).parent / "configs" / "gmm" / "default.yaml"


def _add_config_args(p: argparse.ArgumentParser, required: bool) -> None:
    p.add_argument("--config", type=Path, required=required, default=None,
                   help="YAML run config (see tiltflow/configs/gmm/ and configs/<family>/)")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="dotted overrides applied after the file, e.g. stage2.beta=0.5 run_dir=runs/x")


def _load_gmm(path: Path | None, overrides: list[str]):
    from tiltflow.config.loader import apply_overrides, deep_merge, from_dict, read_yaml
    from tiltflow.config.schema import STAGE_PRESETS, RunConfig

    user = apply_overrides(read_yaml(path) if path else {}, overrides)
    stage = user.get("stage", "ac_dmd")
    tree = deep_merge(STAGE_PRESETS.get(stage, {}), user)
    return from_dict(RunConfig, tree), user


def _world_of(path: Path | None) -> str:
    from tiltflow.config.loader import read_yaml

    return str(read_yaml(path).get("world", "gmm")) if path else "gmm"


def cmd_train(args: argparse.Namespace) -> int:
    if _world_of(args.config) != "gmm":
        from tiltflow.worlds import diffusers_world  # noqa: F401  (real backbones: issue B)

        return diffusers_world.cli_train(args.config, args.overrides, dry_run=args.dry_run)
    from tiltflow.config.loader import to_yaml

    cfg, _ = _load_gmm(args.config, args.overrides)
    if args.dry_run:
        print(to_yaml(cfg), end="")
        return 0
    if cfg.stage == "teacher":
        from tiltflow.worlds.gmm.runs import prepare_run_dir, run_teacher

        prepare_run_dir(cfg)
        cfg.teacher_run = cfg.teacher_run or cfg.run_dir
        run_teacher(cfg)
        print(f"teacher written to {cfg.teacher_run}/teacher.pt")
        return 0
    from tiltflow.worlds.gmm.runs import run_stage

    metrics = run_stage(cfg)
    print("final metrics: " + ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
    print(f"run directory: {cfg.run_dir}")
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    if args.config is not None and _world_of(args.config) != "gmm":
        from tiltflow.worlds import diffusers_world

        if args.out is None:
            raise SystemExit("error: --out DIR is required (images, index.jsonl and grid.png go there)")
        return diffusers_world.cli_sample(args.config, args.overrides, args.text, args.out)
    if args.run is None or args.out is None:
        raise SystemExit("error: gmm sampling needs --run DIR and --out FILE.npy (or --config for a diffusers model)")
    import numpy as np

    from tiltflow.worlds.gmm.evaluate import few_step_generate
    from tiltflow.worlds.gmm.runs import load_generator

    gen, cfg = load_generator(args.run)
    num_prompts = len(cfg.problem.prompts)
    if not 0 <= args.prompt < num_prompts:
        raise SystemExit(f"error: --prompt {args.prompt} out of range: this problem has prompts 0..{num_prompts - 1}")
    x = few_step_generate(gen, cfg, num_prompts, args.num, seed=args.seed)[args.prompt]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.save(args.out, x.numpy())
    print(f"wrote {tuple(x.shape)} samples of prompt {args.prompt} to {args.out}")
    return 0


_IMAGE_EVAL_REQUIRED = {"reward": "--reward", "out": "--out"}


def cmd_eval(args: argparse.Namespace) -> int:
    if args.run is None:
        from tiltflow.eval.harness import run_eval

        missing = [flag for dest, flag in _IMAGE_EVAL_REQUIRED.items() if getattr(args, dest, None) is None]
        if missing:
            print(f"error: tiltflow eval needs {' and '.join(missing)} (or --run DIR for a gmm run)", file=sys.stderr)
            return 2

        return run_eval(args)
    import json

    from tiltflow.worlds.gmm.evaluate import build_reference, evaluate, few_step_generate
    from tiltflow.worlds.gmm.runs import load_generator, load_teacher_net
    from tiltflow.worlds.gmm.world import build_gmm

    gen, cfg = load_generator(args.run)
    cfg.eval.num_samples = args.num
    gmm = build_gmm(cfg.problem)
    teacher = load_teacher_net(cfg) if cfg.teacher.kind == "neural" else None
    metrics = evaluate(few_step_generate(gen, cfg, gmm.num_prompts, args.num), build_reference(cfg, gmm, teacher))
    print(json.dumps(metrics, indent=2))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from tiltflow.config.loader import to_yaml
    from tiltflow.worlds.gmm.demo import run_demo

    cfg, user = _load_gmm(args.config or DEFAULT_GMM_CONFIG, args.overrides)
    if args.dry_run:
        print(to_yaml(cfg), end="")
        return 0
    from tiltflow.worlds.gmm.demo import METHODS

    methods = args.methods.split(",") if args.methods else None
    unknown = sorted(set(methods or []) - set(METHODS))
    if unknown:
        raise SystemExit(f"error: unknown --methods {unknown}; choose from {METHODS}")
    run_demo(cfg, user, args.out, methods=methods)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tiltflow", description=__doc__)
    sub = parser.add_subparsers(dest="verb", required=True)
    p = sub.add_parser("train", help="train one stage (teacher, ac_dmd, dmd2, rtdmd, rtdmd_exact, grpo_only, "
                       "bp_only, dm_bp) into run_dir; resumes if run_dir holds a checkpoint")
    _add_config_args(p, required=True)
    p.set_defaults(func=cmd_train)
    p = sub.add_parser("sample", help="samples of a trained generator: gmm (--run, .npy) or a diffusers model "
                       "(--config configs/<family>/sample.yaml: PNGs + a captioned grid)")
    p.add_argument("--run", type=Path, default=None, help="gmm: a finished stage-1 or stage-2 run directory")
    p.add_argument("--config", type=Path, default=None,
                   help="diffusers: a sample config (configs/<family>/sample.yaml)")
    p.add_argument("--text", action="append", default=[], help="diffusers: a prompt (repeatable; default: the "
                   "config's prompt file)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="diffusers: dotted config overrides")
    p.add_argument("--num", type=int, default=1000, help="number of samples")
    p.add_argument("--prompt", type=int, default=0, help="prompt (condition) index")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="gmm: output .npy file, shape (num, dim); diffusers: "
                   "output folder")
    p.set_defaults(func=cmd_sample)
    p = sub.add_parser("eval", help="evaluate a gmm run (--run) or score images with rewards (see docs/rewards.md)")
    p.add_argument("--run", type=Path, default=None, help="a gmm run directory to evaluate against p_tilde")
    p.add_argument("--num", type=int, default=4000, help="samples per prompt (gmm)")
    try:
        from tiltflow.eval.harness import add_eval_arguments

        add_eval_arguments(p)
    except ImportError:  # pragma: no cover - the image harness is optional
        pass
    # The image harness's required options do not apply to `eval --run DIR`: cmd_eval checks them instead.
    for action in p._actions:
        if action.dest in _IMAGE_EVAL_REQUIRED:
            action.required = False
    p.set_defaults(func=cmd_eval)
    p = sub.add_parser("demo", help="every method on a gmm problem, side by side (default: the embedded 2-D problem)")
    _add_config_args(p, required=False)
    p.add_argument("--out", type=Path, default=Path("runs/demo"), help="output directory (default runs/demo)")
    p.add_argument("--methods", default=None,
                   help="comma-separated subset of methods (default: all). Stage-2 methods need ac_dmd.")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except FloatingPointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
