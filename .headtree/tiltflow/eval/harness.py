"""`tiltflow eval`: score a folder of images, or images from `generate(prompts)`, with a RewardSet; write
per_prompt.jsonl, summary.{json,md} (mean and 95% CI per reward), index.html and grid.png (see report.py).

Folder layouts (PNG, JPEG or WebP images):
  1. sidecar: DIR/prompts.jsonl, one object a line: {"file": "00000_00.png", "prompt": "...",
     "index": 0 (optional: groups samples of one prompt; default: by prompt text), ...metadata}.
     Generated runs are saved in this layout (OUT/samples/), so they can be re-scored.
  2. GenEval: DIR/<00000>/metadata.jsonl (one object with "prompt") + DIR/<00000>/samples/*.png.
The full prompt set is used unless --limit is given.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm import tqdm

from tiltflow.eval.prompts import Prompt, PromptFileError, load_prompts
from tiltflow.eval.report import TOTAL, PromptResult, summary_markdown, write_reports
from tiltflow.rewards.base import RewardSet

SIDECAR = "prompts.jsonl"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
Generate = Callable[[list[Prompt]], Any]


@dataclass
class Sample:
    prompt_index: int
    prompt: Prompt
    path: Path


def discover_folder(folder: str | Path) -> list[Sample]:
    """The samples of an image folder in either layout (see the module docstring)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder {folder} does not exist")
    if (folder / SIDECAR).is_file():
        return _read_sidecar(folder)
    subdirs = sorted(d for d in folder.iterdir() if (d / "metadata.jsonl").is_file())
    if subdirs:
        return _read_geneval_layout(subdirs)
    raise FileNotFoundError(f"{folder} has neither {SIDECAR} nor GenEval-style <index>/metadata.jsonl folders; "
                            "see tiltflow.eval.harness for the layouts")


def _read_sidecar(folder: Path) -> list[Sample]:
    sidecar = folder / SIDECAR
    samples, index_of = [], {}
    for lineno, line in enumerate(sidecar.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as err:
            raise PromptFileError(f"{sidecar}:{lineno}: not valid JSON ({err})") from err
        if not (
            isinstance(record, dict) and isinstance(record.get("file"), str) and isinstance(record.get("prompt"), str)
        ):
            raise PromptFileError(f"{sidecar}:{lineno}: expected an object with string 'file' and 'prompt'")
        path = folder / record["file"]
        if not path.is_file():
            raise PromptFileError(f"{sidecar}:{lineno}: image {path} does not exist")
        metadata = {k: v for k, v in record.items() if k not in ("file", "prompt", "index")}
        key = record.get("index", record["prompt"])
        index = index_of.setdefault(key, len(index_of))
        samples.append(Sample(index, Prompt(record["prompt"], metadata), path))
    if not samples:
        raise PromptFileError(f"{sidecar} lists no images")
    return samples


def _read_geneval_layout(subdirs: list[Path]) -> list[Sample]:
    samples = []
    for index, sub in enumerate(subdirs):
        (prompt,) = load_prompts(sub / "metadata.jsonl", format="jsonl")[:1]
        images = sorted(p for p in (sub / "samples").glob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not images:
            raise FileNotFoundError(f"{sub / 'samples'} holds no images")
        samples += [Sample(index, prompt, p) for p in images]
    return samples


def generate_samples(prompts: Sequence[Prompt], generate: Generate, out_dir: Path, *, samples_per_prompt: int = 1,
                     batch_size: int = 8, progress: bool = True) -> list[Sample]:
    """Generate `samples_per_prompt` images per prompt; save OUT/samples/<i>_<k>.png and the sidecar."""
    folder = out_dir / "samples"
    folder.mkdir(parents=True, exist_ok=True)
    jobs = [(i, k) for i in range(len(prompts)) for k in range(samples_per_prompt)]
    samples: list[Sample] = []
    with tqdm(total=len(jobs), desc="generate", disable=not progress) as bar:
        for start in range(0, len(jobs), batch_size):
            chunk = jobs[start : start + batch_size]
            images = to_pil_list(generate([prompts[i] for i, _ in chunk]), len(chunk))
            for (i, k), image in zip(chunk, images):
                path = folder / f"{i:05d}_{k:02d}.png"
                image.save(path)
                samples.append(Sample(i, prompts[i], path))
            bar.update(len(chunk))
    records = [{"file": s.path.name, "prompt": str(s.prompt), "index": s.prompt_index, **s.prompt.metadata}
               for s in samples]
    (folder / SIDECAR).write_text("".join(json.dumps(record) + "\n" for record in records))
    return samples


def to_pil_list(images: Any, expected: int) -> list[Any]:
    """A (B, 3, H, W) tensor in [0, 1] or a list of PIL images -> B PIL RGB images."""
    from PIL import Image

    if isinstance(images, Tensor):
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"generate() returned a tensor of shape {tuple(images.shape)}, expected (B, 3, H, W)")
        arrays = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()
        out = [Image.fromarray(a.numpy(), mode="RGB") for a in arrays]
    elif isinstance(images, (list, tuple)) and all(isinstance(i, Image.Image) for i in images):
        out = [i.convert("RGB") for i in images]
    else:
        raise TypeError(
            f"generate() must return a (B, 3, H, W) tensor or a list of PIL images, got {type(images).__name__}"
        )
    if len(out) != expected:
        raise ValueError(f"generate() returned {len(out)} images for {expected} prompts")
    return out


def load_image(path: Path) -> Tensor:
    """(3, H, W) float in [0, 1]."""
    import numpy as np
    from PIL import Image

    with Image.open(path) as image:
        array = np.asarray(image.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float() / 255.0


def score_samples(
    samples: Sequence[Sample], reward_set: RewardSet, *, batch_size: int = 8, progress: bool = True
) -> list[PromptResult]:
    """Score every sample (no gradients); one PromptResult per prompt, in prompt order."""
    results: dict[int, PromptResult] = {}
    with tqdm(total=len(samples), desc="score", disable=not progress) as bar:
        for start in range(0, len(samples), batch_size):
            chunk = samples[start : start + batch_size]
            images = [load_image(s.path) for s in chunk]
            for group in _same_shape_groups(images):
                batch = torch.stack([images[j] for j in group])
                with torch.no_grad():
                    out = reward_set(batch, [chunk[j].prompt for j in group])
                columns = {**out.per_reward, TOTAL: out.total}
                for row, j in enumerate(group):
                    s = chunk[j]
                    result = results.setdefault(s.prompt_index, PromptResult(s.prompt_index, s.prompt))
                    result.images.append(str(s.path))
                    for name, column in columns.items():  # each reward, then the weighted total
                        result.scores.setdefault(name, []).append(float(column[row]))
            bar.update(len(chunk))
    return [results[i] for i in sorted(results)]


def _same_shape_groups(images: list[Tensor]) -> list[list[int]]:
    groups: dict[tuple[int, ...], list[int]] = {}
    for j, image in enumerate(images):
        groups.setdefault(tuple(image.shape), []).append(j)
    return list(groups.values())


def limit_samples(samples: list[Sample], limit: int | None) -> list[Sample]:
    """The samples of the first `limit` prompts (all when limit is None)."""
    if limit is None:
        return samples
    keep = set(sorted({s.prompt_index for s in samples})[:limit])
    return [s for s in samples if s.prompt_index in keep]


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `tiltflow eval`; run_eval(args) consumes them."""
    src = parser.add_argument_group("what to score (one of)")
    src.add_argument("--images", type=Path, help="score this image folder (prompts.jsonl or GenEval layout)")
    src.add_argument("--generator", help="MODULE:CALLABLE, a generate(prompts) -> images callable; needs --prompts")
    parser.add_argument("--prompts", type=Path, help="prompt file: text (one a line) or GenEval-style .jsonl")
    parser.add_argument("--prompt-format", default="auto", choices=("auto", "text", "jsonl"))
    parser.add_argument(
        "--reward",
        action="append",
        required=True,
        metavar="NAME[=JSON]",
        help='reward to score with, repeatable; e.g. clip_score or pickscore=\'{"weight": 0.5, '
        '"model": "/models/pickscore"}\'',
    )
    parser.add_argument("--out", type=Path, required=True,
                        help="output folder for the reports (with --run: what the run's evaluation writes, e.g. a "
                             "shapes teacher's metrics and grid, or a shapes stage run's final generator "
                             "evaluated afresh, and eval_run.json)")
    parser.add_argument("--samples-per-prompt", type=int, default=1, help="images per prompt when generating")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--limit", type=int, default=None, help="only the first N prompts (default: all)")
    parser.add_argument("--device", default=None, help="device for every reward that takes one (e.g. cuda)")
    parser.add_argument("--grid-size", type=int, default=16, help="images in grid.png")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def run_eval(args: argparse.Namespace, *, generate: Generate | None = None) -> int:
    """Run `tiltflow eval`; 0 on success, 2 on a usage or input error, 1 when a reward server fails
    (messages go to stderr; other exceptions propagate with their traceback).

    generate: a generate(prompts) callable supplied by the caller (e.g. the CLI after loading a model);
    it takes the place of --generator.
    """
    from tiltflow.rewards.remote import RemoteRewardError

    try:
        return _run(args, generate)
    except (PromptFileError, ValueError, FileNotFoundError, ImportError, RemoteRewardError) as err:
        print(f"tiltflow eval: error: {err}", file=sys.stderr)
        # 1: a reward server failed (its message says why, no traceback needed); 2: a usage or input error
        return 1 if isinstance(err, RemoteRewardError) else 2


def _run(args: argparse.Namespace, generate: Generate | None) -> int:
    from tiltflow.rewards.registry import build_reward_set, parse_reward_spec

    if generate is None and args.generator:
        generate = _import_callable(args.generator)
    if (args.images is None) == (generate is None):
        raise ValueError(
            "give exactly one source: --images DIR, or --generator (or a generate callable) with --prompts FILE"
        )
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be >= 1, got {args.limit}")
    specs = [parse_reward_spec(text) for text in args.reward]
    reward_set = build_reward_set(specs, defaults={"device": args.device} if args.device else None)
    progress = not args.no_progress
    if args.images is not None:
        if args.prompts is not None:
            raise ValueError("--prompts is not used with --images: the folder's prompts.jsonl (or GenEval "
                             "metadata) gives the prompts")
        samples = limit_samples(discover_folder(args.images), args.limit)
        source = {"images": str(args.images)}
    else:
        if args.prompts is None:
            raise ValueError("generating needs --prompts FILE")
        prompts = load_prompts(args.prompts, format=args.prompt_format)[: args.limit]
        samples = generate_samples(prompts, generate, args.out, samples_per_prompt=args.samples_per_prompt,
                                   batch_size=args.batch_size, progress=progress)
        source = {"prompts": str(args.prompts), "samples_per_prompt": args.samples_per_prompt}
    results = score_samples(samples, reward_set, batch_size=args.batch_size, progress=progress)
    extra = {"source": source, "limit": args.limit,
             "rewards_spec": [{"name": s.name, "weight": s.weight, "kwargs": s.kwargs} for s in specs]}
    summary = write_reports(results, reward_set.names + [TOTAL], args.out, extra=extra, grid_size=args.grid_size)
    print(summary_markdown(summary), end="")
    return 0


def _import_callable(target: str) -> Generate:
    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"--generator must look like MODULE:CALLABLE, got {target!r}")
    obj = getattr(importlib.import_module(module_name), attr, None)
    if not callable(obj):
        raise ValueError(f"--generator {target!r} is not a callable")
    return obj
