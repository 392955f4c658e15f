"""Training data of the shapes world's models: a pool of rendered (image, caption) pairs, drawn with the
categories balanced (as GenEval weighs its tasks equally), rendered once and kept in the run directory."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tiltflow.worlds.shapes.render import render
from tiltflow.worlds.shapes.scene import CATEGORIES, Scene


def balanced_indices(scenes: list[Scene], n: int, rng: np.random.Generator) -> np.ndarray:
    """n indices into `scenes`: a category uniformly, then a caption of it uniformly."""
    by_cat = [[i for i, s in enumerate(scenes) if s.category == c] for c in CATEGORIES]
    by_cat = [ids for ids in by_cat if ids]
    cats = rng.integers(len(by_cat), size=n)
    return np.array([by_cat[c][int(rng.integers(len(by_cat[c])))] for c in cats], dtype=np.int64)


def image_pool(path: Path, scenes: list[Scene], n: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(images (n, size, size, 3) uint8, caption index (n,)), from `path` (.npz) if it holds this pool."""
    key = np.array([n, size, seed, len(scenes)], dtype=np.int64)
    if path.is_file():
        with np.load(path) as f:
            if np.array_equal(f["key"], key):
                return f["images"], f["captions"]
    rng = np.random.default_rng([seed, size, 17])
    captions = balanced_indices(scenes, n, rng)
    images = np.stack([render(scenes[int(c)], size, seed * 10_000_019 + i) for i, c in enumerate(captions)])
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, key=key, images=images, captions=captions)
    tmp.replace(path)
    return images, captions
