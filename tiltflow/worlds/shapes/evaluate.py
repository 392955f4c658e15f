"""Evaluation in the shapes world: samples for a fixed prompt set (fixed seeds), their verifier score
overall and per category, the rewards' means, and a grid of samples with captions and pass/fail marks."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from tiltflow.worlds.shapes.scene import Scene, prompt_sets
from tiltflow.worlds.shapes.verifier import score, to_uint8, verify

# (prompts, batch index) -> x0 samples of shape (B, 3, H, W) in [-1, 1]
Generate = Callable[[list[str], int], Tensor]


def eval_prompts(prompt_set: str, max_prompts: int, num_per_prompt: int) -> list[str]:
    scenes: list[Scene] = prompt_sets()[prompt_set]
    if max_prompts:  # an even spread over the set (it is ordered by category)
        idx = np.linspace(0, len(scenes) - 1, max_prompts).round().astype(int)
        scenes = [scenes[int(i)] for i in idx]
    return [s.text for s in scenes for _ in range(num_per_prompt)]


@torch.no_grad()
def evaluate_samples(generate: Generate, prompts: list[str], batch_size: int, rewards: Any = None,
                     decode: Callable[[Tensor], Tensor] | None = None) -> tuple[dict[str, float], np.ndarray]:
    """Metrics (verifier/*, reward/<name>) and the uint8 images (N, H, W, 3)."""
    images, per_reward = [], {}
    for b, start in enumerate(range(0, len(prompts), batch_size)):
        batch = prompts[start:start + batch_size]
        x = generate(batch, b)
        pixels = decode(x) if decode is not None else ((x.float() + 1) / 2).clamp(0, 1)
        images.append(to_uint8(pixels))
        if rewards is not None:
            out = rewards(pixels, batch)
            for name, s in out.per_reward.items():
                per_reward.setdefault(name, []).append(s.float().cpu())
    imgs = np.concatenate(images)
    metrics = score(imgs, prompts)
    metrics.update({f"reward/{k}": float(torch.cat(v).mean()) for k, v in per_reward.items()})
    return metrics, imgs


def write_marked_grid(images: np.ndarray, prompts: Sequence[str], target: Path, *, max_images: int = 48,
                      scale: int = 4) -> None:
    """A grid PNG: each sample upscaled (nearest), framed green (verifier pass) or red (fail), captioned."""
    from PIL import Image, ImageDraw

    n = min(len(prompts), max_images)
    h, w = images.shape[1:3]
    cell_w, cell_h, text_h, pad = w * scale + 8, h * scale + 8, 40, 6
    cols = int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / cols))
    grid = Image.new("RGB", (cols * (cell_w + pad) + pad, rows * (cell_h + text_h + pad) + pad), "white")
    draw = ImageDraw.Draw(grid)
    for i in range(n):
        x0 = pad + (i % cols) * (cell_w + pad)
        y0 = pad + (i // cols) * (cell_h + text_h + pad)
        ok = verify(images[i], prompts[i]).passed
        draw.rectangle([x0, y0, x0 + cell_w - 1, y0 + cell_h - 1], fill=(40, 170, 60) if ok else (210, 40, 40))
        tile = Image.fromarray(images[i]).resize((w * scale, h * scale), Image.NEAREST)
        grid.paste(tile, (x0 + 4, y0 + 4))
        words = prompts[i].removeprefix("a photo of ").split()
        lines = [" ".join(words[:4]), " ".join(words[4:8]), " ".join(words[8:])]
        mark = "PASS" if ok else "FAIL"
        draw.text((x0, y0 + cell_h + 1), f"{mark} {lines[0]}", fill=(0, 0, 0))
        for k, line in enumerate(lines[1:]):
            draw.text((x0, y0 + cell_h + 12 * (k + 1) + 1), line, fill=(0, 0, 0))
    target.parent.mkdir(parents=True, exist_ok=True)
    grid.save(target)


def write_eval(out_dir: Path, name: str, metrics: dict[str, float], images: np.ndarray, prompts: list[str]) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}_metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    write_marked_grid(images, prompts, out_dir / f"{name}_grid.png")
