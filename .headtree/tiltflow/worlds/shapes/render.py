"""The shapes world's renderer (WORLDS.md 2): a Scene -> an RGB image of flat, hard-edged shapes on a plain
background, deterministic in (scene, size, seed). Objects never touch (a gap of >= 2 pixels), so colour
segmentation plus connected components recover each of them exactly."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from tiltflow.worlds.shapes.scene import BACKGROUND, COLOURS, Scene

BASE_SIZE = 32
MIN_OBJECT = 8  # object size range in pixels at 32x32; scaled with the image size
MAX_OBJECT = 11
GAP = 2  # free pixels between the boxes of two objects (at 32x32)
DOMINANCE = 2.0  # a drawn relation's main-axis offset is at least this many times its cross-axis offset
_ATTEMPTS = 500


def shape_mask(shape: str, d: int) -> np.ndarray:
    """(d, d) bool mask of a shape filling a d x d box, sampled at pixel centres."""
    c = (np.arange(d) + 0.5) - d / 2  # pixel-centre offsets from the box centre
    yy, xx = np.meshgrid(c, c, indexing="ij")
    if shape == "square":
        return np.ones((d, d), dtype=bool)
    if shape == "circle":
        return xx**2 + yy**2 <= (d / 2) ** 2
    if shape == "triangle":  # apex up, base at the bottom: half-width grows linearly from 0 to d/2
        half = (yy + d / 2) / 2
        return np.abs(xx) <= half
    raise ValueError(f"unknown shape {shape!r}")


def _relation_ok(a: tuple[int, int, int], b: tuple[int, int, int], relation: str) -> bool:
    """Whether box a (x, y, d) stands in `relation` to box b with a clear dominant axis."""
    dx = (b[0] + b[2] / 2) - (a[0] + a[2] / 2)  # b's centre minus a's (y grows downwards)
    dy = (b[1] + b[2] / 2) - (a[1] + a[2] / 2)
    main, cross = {"left of": (dx, dy), "right of": (-dx, dy), "above": (dy, dx), "below": (-dy, dx)}[relation]
    return main > 0 and main >= DOMINANCE * abs(cross)


def _place(sizes: Sequence[int], size: int, gap: int, rng: np.random.Generator) -> list[tuple[int, int, int]] | None:
    boxes: list[tuple[int, int, int]] = []
    for d in sizes:
        for _ in range(50):
            x, y = (int(v) for v in rng.integers(1, size - d, size=2))  # keep one pixel of border
            if all(x + d + gap <= bx or bx + bd + gap <= x or y + d + gap <= by or by + bd + gap <= y
                   for bx, by, bd in boxes):
                boxes.append((x, y, d))
                break
        else:
            return None
    return boxes


def layout(scene: Scene, size: int, rng: np.random.Generator) -> list[tuple[str, str, tuple[int, int, int]]]:
    """[(shape, colour, (x, y, d))] for every object of the scene."""
    lo, hi = MIN_OBJECT * size // BASE_SIZE, MAX_OBJECT * size // BASE_SIZE
    gap = max(1, GAP * size // BASE_SIZE)
    objects = [(g.shape, g.colour) for g in scene.groups for _ in range(g.count)]
    palette = list(COLOURS)
    for _ in range(_ATTEMPTS):
        sizes = [int(v) for v in rng.integers(lo, hi + 1, size=len(objects))]
        boxes = _place(sizes, size, gap, rng)
        if boxes is None:
            continue
        if scene.relation is not None and not _relation_ok(boxes[0], boxes[1], scene.relation):
            continue
        colours = [c if c is not None else palette[int(rng.integers(len(palette)))] for _, c in objects]
        return [(s, c, b) for (s, _), c, b in zip(objects, colours, boxes)]
    raise RuntimeError(f"could not lay out {scene.text!r} at {size}x{size} in {_ATTEMPTS} attempts")


def render(scene: Scene, size: int = BASE_SIZE, seed: int = 0) -> np.ndarray:
    """(size, size, 3) uint8 image of `scene`; the same (scene, size, seed) always gives the same image."""
    if size < BASE_SIZE or size % 16:
        raise ValueError(f"image size must be a multiple of 16 and >= {BASE_SIZE}, got {size}")
    rng = np.random.default_rng([seed, size])
    image = np.full((size, size, 3), BACKGROUND, dtype=np.uint8)
    for shape, colour, (x, y, d) in layout(scene, size, rng):
        image[y:y + d, x:x + d][shape_mask(shape, d)] = COLOURS[colour]
    return image


def to_tensor_images(images: np.ndarray):  # -> torch.Tensor
    """(B, H, W, 3) uint8 -> (B, 3, H, W) float32 in [0, 1]."""
    import torch

    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
