"""Model cards of the shapes world's checkpoints (issue 9): a README.md in text_encoder/, reward_model/ and
teacher/, filled by the teacher stage when it finishes with the exact command of every call, the seed,
the device, the wall time, the git commit and the sizes. Each call appends itself to calls.jsonl."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

CALLS = "calls.jsonl"

TEMPLATE = """# shapes world: {title}

{what}

| | |
|---|---|
| produced by | `{command}` (repeated until it printed "teacher finished"; {num_calls} call(s)) |
| seed | {seed} |
| device | {device} |
| wall time | {wall_s:.0f} s over all calls (this model: {model_s:.0f} s of training) |
| training steps | {steps} |
| git commit | {commit} |
| size | {size_mb:.2f} MB ({dtype} safetensors) |
| config | `config.yaml` of the run directory; model section: `{model}` |

Load it with: `{load}`

Training curve: `{metrics_file}` in the run directory.{extra}
"""

CARDS = {
    "text_encoder": ("text encoder", "A transformers CLIPTextModel over a word-level tokenizer (built with "
                     "`tokenizers`) of the caption vocabulary. Seeded random initialisation, not trained: its token "
                     "and position "
                     "embeddings keep every word distinguishable, and the teacher learns to read them.",
                     "transformers.CLIPTextModel.from_pretrained(folder); AutoTokenizer.from_pretrained(folder)",
                     None),
    "reward_model": ("CLIP reward model", "A transformers CLIPModel trained contrastively on rendered (image, caption) "
                     "pairs of the training captions, with hard-negative captions (wrong colour, count, shape or "
                     "position). Served as CLIPScore (100 cos) by tiltflow.rewards.clip_score.ClipSimilarityReward.",
                     "tiltflow.worlds.shapes.reward_model.load_clip_reward(folder)", "reward_model_metrics.jsonl"),
    "teacher": ("teacher", "A diffusers SD3Transformer2DModel in pixel space (3 channels, no VAE), trained by flow "
                "matching (v = eps - x0, logit-normal sigma) on rendered images of the training captions, with "
                "caption dropout (the empty caption) for CFG. The EMA weights.",
                "diffusers.SD3Transformer2DModel.from_pretrained(folder); "
                "tiltflow.worlds.shapes.models.ShapesAdapter.load(run_dir)", "teacher_metrics.jsonl"),
}


def device_name(device: str) -> str:
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} (torch {torch.__version__})"
    import platform

    return f"CPU {platform.processor() or platform.machine()} (torch {torch.__version__})"


def record_call(run_dir: Path, device: str, started: float, seconds: float) -> None:
    row = {"command": " ".join(shlex.quote(a) for a in ["tiltflow", *sys.argv[1:]]) if sys.argv else "",
           "argv0": sys.argv[0] if sys.argv else "", "device": device_name(device),
           "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)), "seconds": seconds}
    with (run_dir / CALLS).open("a") as f:
        f.write(json.dumps(row) + "\n")


def _commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).parent)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _rows(path: Path) -> list[dict[str, Any]]:
    """The records of a .jsonl file (blank lines skipped); none when the file is missing."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def _model_seconds(path: Path) -> float:
    # elapsed_s restarts at every call: add the last value of each call's run of rows
    total, last = 0.0, 0.0
    for r in _rows(path):
        if r["elapsed_s"] < last:
            total += last
        last = r["elapsed_s"]
    return total + last


def _steps(path: Path, planned: int) -> str:
    if not path.is_file():
        return "none (not trained)"
    rows = _rows(path)
    return f"{rows[-1]['step'] if rows else 0} of {planned} planned"


def _started_from(cfg: Any, folder: str) -> str:
    """For a teacher continued from another (teacher.init_from): where its steps started."""
    start = cfg.teacher.init_from if folder == "teacher" else None
    return f", continuing the teacher in `{start}` (its own card counts the steps before these)" if start else ""


def write_cards(run_dir: Path, cfg: Any) -> list[Path]:
    """README.md in each model folder of a finished teacher-stage run directory."""
    calls = _rows(run_dir / CALLS)
    commands = sorted({c["command"] for c in calls}) or ["(unknown)"]
    written = []
    planned = {"reward_model": cfg.reward_model.num_iters, "teacher": cfg.teacher.num_iters, "text_encoder": 0}
    for folder, (title, what, load, metrics) in CARDS.items():
        d = run_dir / folder
        weights = sorted(d.glob("*.safetensors"))
        size = sum(w.stat().st_size for w in weights) / 1e6
        dtype = "fp16" if folder != "text_encoder" else "fp32"
        extra = "" if len(commands) == 1 else "\n\nCommands of the calls:\n" + "\n".join(f"- `{c}`" for c in commands)
        text = TEMPLATE.format(title=title, what=what, command=commands[0], num_calls=len(calls), seed=cfg.seed,
                               device="; ".join(sorted({c["device"] for c in calls})) or "(unknown)",
                               wall_s=sum(c["seconds"] for c in calls),
                               model_s=_model_seconds(run_dir / metrics) if metrics else 0.0, commit=_commit(),
                               size_mb=size, dtype=dtype, model=json.dumps(vars(cfg.model)), load=load,
                               metrics_file=metrics or "(none: not trained)", extra=extra,
                               steps=_steps(run_dir / metrics, planned[folder]) + _started_from(cfg, folder)
                               if metrics else "none (not trained)")
        (d / "README.md").write_text(text)
        written.append(d / "README.md")
    return written
