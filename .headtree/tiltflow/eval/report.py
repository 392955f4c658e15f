"""Evaluation reports: per-prompt JSONL, summary (mean and 95% CI per reward; markdown + JSON), HTML page,
PNG grid of samples.

The confidence interval treats prompts as the independent units: each prompt's samples are averaged
first, then mean +- t_{0.975, n-1} * sd / sqrt(n) over the n prompt means (Student t; with n = 1 there is
no interval). With equal samples per prompt the mean equals the mean over all images.
"""

from __future__ import annotations

import html
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from statistics import NormalDist
from typing import Any

from tiltflow.rewards.preprocess import Prompt

TOTAL = "weighted_total"


@dataclass
class PromptResult:
    """The scores of one prompt's samples; images are file paths."""

    index: int
    prompt: Prompt
    images: list[str] = field(default_factory=list)
    scores: dict[str, list[float]] = field(default_factory=dict)  # reward (and TOTAL) -> per sample

    def mean(self, name: str) -> float:
        values = self.scores[name]
        return sum(values) / len(values)

    def to_json(self) -> dict[str, Any]:
        return {"index": self.index, "prompt": str(self.prompt), "metadata": getattr(self.prompt, "metadata", {}),
                "images": self.images, "scores": self.scores, "mean": {name: self.mean(name) for name in self.scores}}


def t_quantile_975(dof: int) -> float:
    """97.5% quantile of Student's t with `dof` degrees of freedom (scipy if present, else a series)."""
    try:
        from scipy.stats import t

        return float(t.ppf(0.975, dof))
    except ImportError:
        # Cornish-Fisher expansion around the normal quantile: accurate to ~1e-3 for dof >= 3.
        z = NormalDist().inv_cdf(0.975)
        return z + (z**3 + z) / (4 * dof) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * dof**2)


def summarize(results: Sequence[PromptResult], names: Sequence[str]) -> dict[str, Any]:
    """{"rewards": {name: stats}, "by_tag": {tag: {name: mean}}, "num_prompts", "num_images"}."""
    rewards = {name: _stats([r.mean(name) for r in results]) for name in names}
    by_tag: dict[str, dict[str, float]] = {}
    tags = sorted({str(r.prompt.metadata["tag"]) for r in results if "tag" in getattr(r.prompt, "metadata", {})})
    for tag in tags:
        members = [r for r in results if str(getattr(r.prompt, "metadata", {}).get("tag")) == tag]
        by_tag[tag] = {name: sum(r.mean(name) for r in members) / len(members) for name in names}
    return {"rewards": rewards, "by_tag": by_tag, "num_prompts": len(results),
            "num_images": sum(len(r.images) for r in results)}


def _stats(values: list[float]) -> dict[str, Any]:
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return {"mean": mean, "std": None, "ci95_low": None, "ci95_high": None, "ci95_halfwidth": None, "n": n}
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = t_quantile_975(n - 1) * std / math.sqrt(n)
    return {"mean": mean, "std": std, "ci95_low": mean - half, "ci95_high": mean + half, "ci95_halfwidth": half, "n": n}


def summary_markdown(summary: dict[str, Any]) -> str:
    lines = [f"Prompts: {summary['num_prompts']}, images: {summary['num_images']}", "",
             "| reward | mean | 95% CI | ± | prompts |", "|---|---:|---:|---:|---:|"]
    for name, s in summary["rewards"].items():
        ci = "n/a" if s["ci95_low"] is None else f"[{s['ci95_low']:.4f}, {s['ci95_high']:.4f}]"
        half = "n/a" if s["ci95_halfwidth"] is None else f"{s['ci95_halfwidth']:.4f}"
        lines.append(f"| {name} | {s['mean']:.4f} | {ci} | {half} | {s['n']} |")
    if summary["by_tag"]:
        names = list(summary["rewards"])
        lines += ["", "| tag | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
        for tag, means in summary["by_tag"].items():
            lines.append(f"| {tag} | " + " | ".join(f"{means[n]:.4f}" for n in names) + " |")
    return "\n".join(lines) + "\n"


def write_reports(results: Sequence[PromptResult], names: Sequence[str], out_dir: Path, *,
                  extra: dict[str, Any] | None = None, grid_size: int = 16) -> dict[str, Any]:
    """Write per_prompt.jsonl, summary.json, summary.md, index.html and grid.png; return the summary."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "per_prompt.jsonl").write_text("".join(json.dumps(r.to_json()) + "\n" for r in results))
    summary = {**summarize(results, names), **(extra or {})}
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out_dir / "summary.md").write_text(summary_markdown(summary))
    (out_dir / "index.html").write_text(render_html(results, names, summary, out_dir))
    write_grid([p for r in results for p in r.images][:grid_size], out_dir / "grid.png")
    return summary


def render_html(results: Sequence[PromptResult], names: Sequence[str], summary: dict[str, Any], out_dir: Path) -> str:
    esc = html.escape
    rows = []
    for name, s in summary["rewards"].items():
        ci = "n/a" if s["ci95_low"] is None else f"[{s['ci95_low']:.4f}, {s['ci95_high']:.4f}]"
        rows.append(f"<tr><td>{esc(name)}</td><td>{s['mean']:.4f}</td><td>{ci}</td><td>{s['n']}</td></tr>")
    head = "".join(f"<th>{esc(n)}</th>" for n in names)
    body = []
    for r in results:
        thumbs = "".join(f'<img src="{esc(_rel(p, out_dir))}" width="128" loading="lazy">' for p in r.images)
        cells = "".join(f"<td>{r.mean(n):.4f}</td>" for n in names)
        body.append(f"<tr><td>{r.index}</td><td>{esc(str(r.prompt))}</td>{cells}<td>{thumbs}</td></tr>")
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>tiltflow eval</title><style>"
        "body{font-family:sans-serif}table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px}"
        "img{margin:2px}</style></head><body><h1>tiltflow eval</h1>"
        f"<p>{summary['num_prompts']} prompts, {summary['num_images']} images. CI: Student t over prompt means."
        "</p><table><tr><th>reward</th><th>mean</th><th>95% CI</th><th>prompts</th></tr>"
        + "".join(rows)
        + f"</table><h2>Per prompt</h2><table><tr><th>#</th><th>prompt</th>{head}<th>samples</th></tr>"
        + "".join(body)
        + "</table></body></html>\n"
    )


def _rel(path: str, out_dir: Path) -> str:
    try:
        return Path(os.path.relpath(Path(path).resolve(), out_dir.resolve())).as_posix()
    except ValueError:  # another drive on Windows
        return Path(path).resolve().as_uri()


def write_grid(paths: Sequence[str], target: Path, *, cell: int = 192, gap: int = 4,
               captions: Sequence[str] | None = None) -> None:
    """Tile the images (resized to cell x cell, `gap` white pixels apart) into a near-square grid PNG,
    each with its caption (e.g. its prompt) underneath when `captions` is given."""
    from PIL import Image, ImageDraw

    if not paths:
        return
    cols = math.ceil(math.sqrt(len(paths)))
    rows = math.ceil(len(paths) / cols)
    text_h = 14 * 2 if captions else 0
    step_x, step_y = cell + gap, cell + gap + text_h
    grid = Image.new("RGB", (cols * step_x + gap, rows * step_y + gap), "white")
    draw = ImageDraw.Draw(grid)
    for i, path in enumerate(paths):
        with Image.open(path) as image:
            tile = image.convert("RGB").resize((cell, cell), Image.Resampling.BICUBIC)
        x, y = gap + (i % cols) * step_x, gap + (i // cols) * step_y
        grid.paste(tile, (x, y))
        if captions:
            text = str(captions[i])
            width = max(1, cell // 6)  # ~6 px per character with PIL's default font
            lines = [text[j:j + width] for j in range(0, len(text), width)][:2]
            for k, line in enumerate(lines):
                draw.text((x, y + cell + 1 + 13 * k), line, fill="black")
    grid.save(target)
