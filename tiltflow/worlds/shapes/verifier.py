"""The shapes world's verifier (WORLDS.md 2, the GenEval analogue): colour segmentation, connected
components, shape classification by fill ratio, counting and relative position; pass/fail per prompt
and a per-category score. Every threshold is derived from the palette or the ideal shapes (see below)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from tiltflow.worlds.shapes.render import BASE_SIZE, MIN_OBJECT
from tiltflow.worlds.shapes.scene import BACKGROUND, CATEGORIES, COLOURS, Scene, parse

_NAMES = list(COLOURS) + ["background"]
_REFS = np.array(list(COLOURS.values()) + [BACKGROUND], dtype=np.float64)  # (C + 1, 3)
# A pixel takes the nearest reference colour only when it is closer than half the smallest distance
# between two references: then it is nearer to that reference than to any other, whatever the blur.
_PAIRWISE = np.linalg.norm(_REFS[:, None] - _REFS[None], axis=-1)
COLOUR_RADIUS = 0.5 * float(_PAIRWISE[~np.eye(len(_REFS), dtype=bool)].min())
# Fill ratio (area / bounding-box area) of the ideal shapes: square 1, circle pi/4, triangle 1/2; the
# class boundaries are the midpoints between neighbours.
SQUARE_MIN_FILL = (1.0 + math.pi / 4) / 2
CIRCLE_MIN_FILL = (math.pi / 4 + 0.5) / 2
# Components smaller than a quarter of the smallest drawn object (a triangle of MIN_OBJECT pixels has
# about MIN_OBJECT**2 / 2 pixels) are specks, not objects.
MIN_AREA_FRACTION = 0.25 * (MIN_OBJECT**2 / 2) / BASE_SIZE**2


@dataclass(frozen=True)
class Detection:
    colour: str
    shape: str
    cx: float
    cy: float
    area: int


@dataclass
class Verdict:
    passed: bool
    reason: str  # "ok", or what failed: "count", "shape", "colour", "position"
    detections: list[Detection] = field(default_factory=list)


def classify_fill(fill: float) -> str:
    if fill >= SQUARE_MIN_FILL:
        return "square"
    return "circle" if fill >= CIRCLE_MIN_FILL else "triangle"


def label_components(colours: np.ndarray) -> np.ndarray:
    """4-connected components of equal, non-negative values of an (H, W) int map: each pixel gets the
    smallest flat index of its component (-1 where the map is negative). Minimum-label propagation with
    pointer jumping: a label is always a pixel of the same component, so taking that pixel's label is
    allowed and lets labels travel further than one pixel a pass."""
    h, w = colours.shape
    big = h * w
    labels = np.where(colours >= 0, np.arange(big).reshape(h, w), big)
    while True:
        new = labels.copy()
        same_v = (colours[1:] == colours[:-1]) & (colours[1:] >= 0)  # pixel and the one above it
        same_h = (colours[:, 1:] == colours[:, :-1]) & (colours[:, 1:] >= 0)  # pixel and its left neighbour
        new[1:] = np.where(same_v, np.minimum(new[1:], labels[:-1]), new[1:])
        new[:-1] = np.where(same_v, np.minimum(new[:-1], labels[1:]), new[:-1])
        new[:, 1:] = np.where(same_h, np.minimum(new[:, 1:], labels[:, :-1]), new[:, 1:])
        new[:, :-1] = np.where(same_h, np.minimum(new[:, :-1], labels[:, 1:]), new[:, :-1])
        valid = new < big
        new[valid] = new.ravel()[new[valid]]  # jump: the label of my label
        if np.array_equal(new, labels):
            return np.where(colours >= 0, labels, -1)
        labels = new


def detect(image: np.ndarray) -> list[Detection]:
    """Objects in an (H, W, 3) image (uint8, or float in [0, 255])."""
    h, w, _ = image.shape
    dist = np.linalg.norm(image.astype(np.float64)[:, :, None, :] - _REFS[None, None], axis=-1)  # (H, W, C+1)
    nearest = dist.argmin(-1)
    nearest[dist.min(-1) >= COLOUR_RADIUS] = -1  # ambiguous pixels belong to no colour
    nearest[nearest == len(_NAMES) - 1] = -1  # nor does the background
    min_area = max(2, int(MIN_AREA_FRACTION * h * w))
    labels = label_components(nearest)
    out: list[Detection] = []
    for k in np.unique(labels[labels >= 0]):
        ys, xs = np.nonzero(labels == k)
        if ys.size < min_area:
            continue
        box = (int(ys.max() - ys.min()) + 1) * (int(xs.max() - xs.min()) + 1)
        name = _NAMES[int(nearest[ys[0], xs[0]])]
        out.append(Detection(name, classify_fill(ys.size / box), float(xs.mean()), float(ys.mean()), int(ys.size)))
    return out


def relation_holds(a: Detection, b: Detection, relation: str) -> bool:
    """`a relation b` on centroids: the offset along the relation's axis has the right sign and is the
    larger of the two (y grows downwards)."""
    dx, dy = b.cx - a.cx, b.cy - a.cy
    main, cross = {"left of": (dx, dy), "right of": (-dx, dy), "above": (dy, dx), "below": (-dy, dx)}[relation]
    return main > 0 and abs(main) > abs(cross)


@dataclass(frozen=True)
class GroupMatch:
    """What the greedy matching gave one group of a scene."""

    index: int  # the group's position in scene.groups
    same_shape: int  # free detections of the group's shape when its turn came
    fits: int  # of those, the ones of its colour (all of them where it names none)
    taken: list[Detection]  # what it claims: up to its count, those of its colour first


def match_groups(scene: Scene, detections: list[Detection]) -> list[GroupMatch]:
    """The verifier's greedy matching: groups that name a colour first, each taking up to its count of the
    still-free detections of its shape, those of its colour first; what a group takes is no longer free."""
    free = list(detections)
    out = []
    for i in sorted(range(len(scene.groups)), key=lambda i: scene.groups[i].colour is None):
        g = scene.groups[i]
        same_shape = [d for d in free if d.shape == g.shape]
        fits = [d for d in same_shape if g.colour is None or d.colour == g.colour]
        taken = (fits + [d for d in same_shape if d not in fits])[:g.count]
        for d in taken:
            free.remove(d)
        out.append(GroupMatch(i, len(same_shape), len(fits), taken))
    return out


def check(scene: Scene, detections: list[Detection]) -> Verdict:
    """Exactly the scene's objects (shapes, counts, colours where named) and its relation, nothing else."""
    if len(detections) != scene.num_objects:
        return Verdict(False, "count", detections)
    matches = match_groups(scene, detections)
    for m in matches:  # the first group that fails names the reason (a group that passes took only its colour)
        count = scene.groups[m.index].count
        if m.same_shape < count:
            return Verdict(False, "shape", detections)
        if m.fits < count:
            return Verdict(False, "colour", detections)
    first = {m.index: m.taken[0] for m in matches}
    if scene.relation is not None and not relation_holds(first[0], first[1], scene.relation):
        return Verdict(False, "position", detections)
    return Verdict(True, "ok", detections)


def partial_credit(scene: Scene, detections: list[Detection]) -> float:
    """The fraction of the caption's checks a set of detections meets, in [0, 1]; 1 exactly when `check`
    passes. A denser training signal than pass/fail for the policy gradient (a group of samples that all
    fail still differs in how much of the caption each got right); evaluation keeps pass/fail.

    The checks, each worth 1: the object count (1 - |found - asked| / asked, floored at 0); per group, in
    `check`'s order (coloured groups first), the fraction of its objects found with its shape, and, where
    it names a colour, the fraction found with shape and colour; the relation, on the groups' first
    matched objects (0 if either group has none). The matching is `check`'s (match_groups), so where every
    check scores 1 the two agree."""
    credits = [max(0.0, 1.0 - abs(len(detections) - scene.num_objects) / scene.num_objects)]
    first: dict[int, Detection] = {}
    for m in match_groups(scene, detections):
        g = scene.groups[m.index]
        credits.append(min(m.same_shape, g.count) / g.count)
        if g.colour is not None:
            credits.append(min(m.fits, g.count) / g.count)
        if m.taken:
            first[m.index] = m.taken[0]
    if scene.relation is not None:
        credits.append(float(0 in first and 1 in first and relation_holds(first[0], first[1], scene.relation)))
    return float(np.mean(credits))


def verify(image: np.ndarray, prompt: str | Scene) -> Verdict:
    scene = parse(prompt) if isinstance(prompt, str) else prompt
    return check(scene, detect(image))


def to_uint8(images) -> np.ndarray:
    """(B, 3, H, W) tensor in [0, 1] -> (B, H, W, 3) uint8 numpy (rounded, as a saved PNG would be)."""
    return (images.detach().float().clamp(0, 1) * 255).round().to("cpu").numpy().astype(np.uint8).transpose(0, 2, 3, 1)


def score(images: np.ndarray, prompts: Sequence[str | Scene]) -> dict[str, float]:
    """Pass rate overall (mean over the categories present, as GenEval averages its tasks) and per category."""
    by_cat: dict[str, list[bool]] = {}
    for img, p in zip(images, prompts):
        scene = parse(p) if isinstance(p, str) else p
        by_cat.setdefault(scene.category, []).append(verify(img, scene).passed)
    out = {f"verifier/{c}": float(np.mean(by_cat[c])) for c in CATEGORIES if c in by_cat}
    out["verifier/overall"] = float(np.mean([out[f"verifier/{c}"] for c in CATEGORIES if c in by_cat]))
    return out
