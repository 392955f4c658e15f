"""Evaluation in the shapes world: samples for a fixed prompt set (fixed seeds), their verifier score
overall and per category, the rewards' means, diversity within a prompt and the Frechet distance to renders
(both in the CLIP reward model's image-embedding space), and a grid of samples with pass/fail marks."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from tiltflow.models.adapters.common import to_unit_range
from tiltflow.worlds.shapes.render import render, to_tensor_images
from tiltflow.worlds.shapes.scene import Scene, parse, prompt_sets
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
        pixels = (decode or to_unit_range)(x)
        images.append(to_uint8(pixels))
        if rewards is not None:
            out = rewards(pixels, batch)
            for name, s in out.per_reward.items():
                per_reward.setdefault(name, []).append(s.float().cpu())
    imgs = np.concatenate(images)
    metrics = score(imgs, prompts)
    metrics.update({f"reward/{k}": float(torch.cat(v).mean()) for k, v in per_reward.items()})
    embed = image_embedder(rewards)
    if embed is not None:
        metrics.update(embedding_metrics(embed, imgs, prompts, batch_size))
    return metrics, imgs


def image_embedder(rewards: Any) -> Callable[[Tensor], Tensor] | None:
    """The image embedding (B, 3, H, W) in [0, 1] -> (B, D) of the first CLIP-type reward, if any."""
    encoders = [getattr(reward, "encoder", None) for reward in getattr(rewards, "rewards", [])]
    return next((e.image_embeds for e in encoders if hasattr(e, "image_embeds")), None)


def _embed_all(embed: Callable[[Tensor], Tensor], images: np.ndarray, batch_size: int) -> Tensor:
    return torch.cat([embed(to_tensor_images(images[start:start + batch_size])).double().cpu()
                      for start in range(0, len(images), batch_size)])


def frechet_distance(a: Tensor, b: Tensor) -> float:
    """|mu_a - mu_b|^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)) of two sets of row vectors (float64); the trace
    of the matrix square root is that of the symmetric S_a^(1/2) S_b S_a^(1/2), whose eigenvalues are >= 0.
    Each set needs two rows at least (a covariance of one row is undefined)."""
    if min(len(a), len(b)) < 2:
        raise ValueError(f"the Frechet distance needs at least 2 samples in each set, got {len(a)} and {len(b)}")
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)
    w, v = torch.linalg.eigh(cov_a)
    root_a = (v * w.clamp_min(0).sqrt()) @ v.T
    cross = torch.linalg.eigvalsh(root_a @ cov_b @ root_a).clamp_min(0).sqrt().sum()
    return float((mu_a - mu_b).square().sum() + cov_a.trace() + cov_b.trace() - 2 * cross)


def embedding_metrics(embed: Callable[[Tensor], Tensor], images: np.ndarray, prompts: list[str],
                      batch_size: int, render_seed: int = 90_000) -> dict[str, float]:
    """diversity/within_prompt: the mean pairwise cosine distance (1 - cos) between the embeddings of the
    samples of one prompt, averaged over prompts with at least two samples. fd/reward_embed: the Frechet
    distance between the samples' embeddings and those of renders of the same prompts (one render per sample,
    seed render_seed + i), i.e. against the data distribution of the evaluated prompt set; left out for
    fewer than 2 samples."""
    with torch.no_grad():
        feats = _embed_all(embed, images, batch_size)
        size = images.shape[1]
        renders = np.stack([render(parse(p), size, render_seed + i) for i, p in enumerate(prompts)])
        ref = _embed_all(embed, renders, batch_size)
    groups: dict[str, list[int]] = {}
    for i, p in enumerate(prompts):
        groups.setdefault(p, []).append(i)
    spreads = []
    for idx in groups.values():
        if len(idx) > 1:
            f = torch.nn.functional.normalize(feats[idx], dim=-1)
            cos = f @ f.T
            n = len(idx)
            spreads.append(float((n * n - cos.sum()) / (n * (n - 1))))  # the diagonal's 1 - 1 adds nothing
    out = {"fd/reward_embed": frechet_distance(feats, ref)} if len(prompts) > 1 else {}
    if spreads:
        out["diversity/within_prompt"] = float(np.mean(spreads))
    return out


def grid_indices(prompts: Sequence[str], max_images: int) -> list[int]:
    """The samples a grid shows: at most `max_images`, spread over the distinct captions (evenly over them when
    there are more captions than places), the first sample of each, then the second, and so on, in the samples'
    order. With many samples per caption the grid still shows many captions, not the first caption's samples."""
    by_caption: dict[str, list[int]] = {}
    for i, p in enumerate(prompts):
        by_caption.setdefault(p, []).append(i)
    groups = list(by_caption.values())
    if len(groups) > max_images:
        groups = [groups[int(i)] for i in np.linspace(0, len(groups) - 1, max_images).round()]
    chosen: list[int] = []
    for k in range(max((len(g) for g in groups), default=0)):
        chosen += [g[k] for g in groups if k < len(g)]
    return sorted(chosen[:max_images])


def write_marked_grid(images: np.ndarray, prompts: Sequence[str], target: Path, *, max_images: int = 48,
                      scale: int = 4) -> None:
    """A grid PNG of the samples `grid_indices` picks: each upscaled (nearest), framed green (verifier pass) or
    red (fail), captioned."""
    from PIL import Image, ImageDraw

    keep = grid_indices(prompts, max_images)
    images, prompts = images[keep], [prompts[i] for i in keep]
    n = len(keep)
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
        lines = [f"{'PASS' if ok else 'FAIL'} " + " ".join(words[:4]), " ".join(words[4:8]), " ".join(words[8:])]
        for k, line in enumerate(lines):  # the mark, then the caption in rows of four words
            draw.text((x0, y0 + cell_h + 12 * k + 1), line, fill=(0, 0, 0))
    target.parent.mkdir(parents=True, exist_ok=True)
    grid.save(target)


def write_eval(out_dir: Path, name: str, metrics: dict[str, float], images: np.ndarray, prompts: list[str]) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}_metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    write_marked_grid(images, prompts, out_dir / f"{name}_grid.png")
