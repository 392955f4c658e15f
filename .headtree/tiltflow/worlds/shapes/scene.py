"""The shapes world's vocabulary (WORLDS.md 2): colours, shapes, the six GenEval-like caption categories,
a parser from caption text back to a Scene (what the verifier checks), and the fixed train / test prompt
sets (the test set holds prompts, and colour-shape bindings, that no training caption contains)."""

from __future__ import annotations

import hashlib
import itertools
from dataclasses import dataclass

# Palette in uint8 RGB; pairwise distances are >= 100 so a blurred pixel is still assigned unambiguously.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 40),
    "blue": (30, 60, 220),
    "yellow": (235, 215, 20),
    "purple": (140, 40, 180),
    "cyan": (30, 200, 220),
}
BACKGROUND: tuple[int, int, int] = (250, 250, 250)
SHAPES = ("circle", "square", "triangle")
NUMBERS = {"one": 1, "two": 2, "three": 3, "four": 4}
RELATIONS = ("left of", "right of", "above", "below")
CATEGORIES = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
PREFIX = "a photo of"
# Colour-shape bindings that no training caption names; the test set has captions with each of them.
HELD_OUT_BINDINGS = (("purple", "triangle"), ("cyan", "circle"), ("yellow", "square"))
TEST_FRACTION = 0.2  # of each category's remaining captions, chosen by hash (stable across versions)


class VocabularyError(ValueError):
    """A caption outside the shapes world's vocabulary or grammar; the message names the offending word."""


@dataclass(frozen=True)
class Group:
    """`count` objects of one shape, all of `colour` (None: any palette colour)."""

    shape: str
    count: int = 1
    colour: str | None = None


@dataclass(frozen=True)
class Scene:
    """What a caption asks for: groups of objects and, for two single objects, a relation of the first to
    the second. The image must hold exactly these objects and nothing else."""

    groups: tuple[Group, ...]
    relation: str | None = None
    numbered: bool = False  # a single group named with a number word ("one circle", a counting caption)

    @property
    def category(self) -> str:
        if self.relation is not None:
            return "position"
        if len(self.groups) == 2:
            return "color_attr" if any(g.colour for g in self.groups) else "two_object"
        g = self.groups[0]
        if g.count > 1 or self.numbered:
            return "counting"
        return "colors" if g.colour else "single_object"

    @property
    def num_objects(self) -> int:
        return sum(g.count for g in self.groups)

    @property
    def text(self) -> str:
        phrases = [_phrase(g, numeric=self.numbered or g.count > 1) for g in self.groups]
        joiner = f" {self.relation} " if self.relation else " and "
        return f"{PREFIX} {joiner.join(phrases)}"


def _phrase(g: Group, numeric: bool) -> str:
    words = [f"{g.colour} {g.shape}" if g.colour else g.shape]
    if g.count == 1 and not numeric:
        return f"a {words[0]}"
    name = {v: k for k, v in NUMBERS.items()}[g.count]
    return f"{name} {words[0]}" + ("s" if g.count > 1 else "")


def vocabulary() -> list[str]:
    """Every word a caption may use (the text encoder's word-level vocabulary)."""
    words = PREFIX.split() + list(NUMBERS) + list(COLOURS) + list(SHAPES) + [s + "s" for s in SHAPES]
    words += ["and"] + [w for r in RELATIONS for w in r.split()]
    return sorted(set(words))


def _parse_group(words: list[str], text: str) -> Group:
    if not words:
        raise VocabularyError(f"caption {text!r}: expected an object (e.g. 'a red circle') but found nothing")
    head, rest = words[0], words[1:]
    if head in ("a", "an"):
        count = 1
    elif head in NUMBERS:
        count = NUMBERS[head]
    else:
        raise VocabularyError(f"caption {text!r}: expected 'a' or a number (one..four) before an object, got {head!r}")
    colour = None
    if rest and rest[0] in COLOURS:
        colour, rest = rest[0], rest[1:]
    if len(rest) != 1:
        got = " ".join(rest) or "nothing"
        raise VocabularyError(f"caption {text!r}: expected one shape word after {head!r}, got {got!r}")
    noun = rest[0]
    shape = noun[:-1] if count > 1 and noun.endswith("s") else noun
    if shape not in SHAPES:
        raise VocabularyError(f"caption {text!r}: unknown shape {noun!r}; known shapes: {', '.join(SHAPES)}")
    if (count > 1) != noun.endswith("s"):
        raise VocabularyError(f"caption {text!r}: {head!r} {noun!r} do not agree in number")
    return Group(shape, count, colour)


def parse(text: str) -> Scene:
    """Caption text -> Scene; VocabularyError names the first unknown word or the grammar break."""
    words = text.strip().lower().replace(",", " ").split()
    known = set(vocabulary())
    for w in words:
        if w not in known:
            raise VocabularyError(f"caption {text!r}: unknown word {w!r} "
                                  f"(the shapes vocabulary: {' '.join(sorted(known))})")
    if words[:3] != PREFIX.split():
        raise VocabularyError(f"caption {text!r}: expected it to start with {PREFIX!r}")
    body = words[3:]
    for rel in RELATIONS:
        r = rel.split()
        for i in range(len(body) - len(r) + 1):
            if body[i:i + len(r)] == r:
                a, b = _parse_group(body[:i], text), _parse_group(body[i + len(r):], text)
                if a.count != 1 or b.count != 1:
                    raise VocabularyError(f"caption {text!r}: a relation needs one object on each side")
                return Scene((a, b), rel)
    if "and" in body:
        i = body.index("and")
        groups = (_parse_group(body[:i], text), _parse_group(body[i + 1:], text))
        return Scene(groups)
    return Scene((_parse_group(body, text),), numbered=body[0] in NUMBERS)


def all_scenes(category: str) -> list[Scene]:
    """Every caption of a category, in a fixed order."""
    cs, ss = list(COLOURS), SHAPES
    if category == "single_object":
        return [Scene((Group(s),)) for s in ss]
    if category == "colors":
        return [Scene((Group(s, 1, c),)) for c in cs for s in ss]
    if category == "two_object":
        return [Scene((Group(a), Group(b))) for a, b in itertools.permutations(ss, 2)]
    if category == "counting":
        return [Scene((Group(s, n),), numbered=True) for n in range(1, 5) for s in ss]
    if category == "position":
        return [Scene((Group(a), Group(b)), r) for r in RELATIONS for a, b in itertools.permutations(ss, 2)]
    if category == "color_attr":
        return [Scene((Group(s1, 1, c1), Group(s2, 1, c2)))
                for c1, c2 in itertools.permutations(cs, 2) for s1, s2 in itertools.permutations(ss, 2)]
    raise ValueError(f"unknown category {category!r}; expected one of {CATEGORIES}")


def names_held_out_binding(scene: Scene) -> bool:
    """Whether a group of `scene` is a colour-shape binding of HELD_OUT_BINDINGS."""
    return any((g.colour, g.shape) in HELD_OUT_BINDINGS for g in scene.groups)


def _held_out(scene: Scene) -> bool:
    digest = hashlib.sha256(scene.text.encode()).digest()
    return names_held_out_binding(scene) or int.from_bytes(digest[:4], "little") / 2**32 < TEST_FRACTION


def prompt_sets() -> dict[str, list[Scene]]:
    """{"train": ..., "test": ...}. Categories with fewer than 10 captions (single_object, two_object)
    cannot spare held-out captions: their test captions are all of them (seen in training), as in GenEval."""
    train: list[Scene] = []
    test: list[Scene] = []
    for cat in CATEGORIES:
        scenes = all_scenes(cat)
        small = len(scenes) < 10
        train += [s for s in scenes if small or not _held_out(s)]
        test += [s for s in scenes if small or _held_out(s)]
    return {"train": train, "test": test}


_OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


def hard_negatives(scene: Scene) -> dict[str, list[Scene]]:
    """Captions that no image of `scene` satisfies, by what they change: "colour" (a named colour),
    "count" (one group's count by one), "shape" (one group's shape to one the scene lacks) and "position"
    (the opposite relation). Used as the reward model's hard negatives and in the verifier's tests."""
    out: dict[str, list[Scene]] = {"colour": [], "count": [], "shape": [], "position": []}
    groups = list(scene.groups)

    def with_group(i: int, g: Group) -> Scene:
        return Scene(tuple(groups[:i] + [g] + groups[i + 1:]), scene.relation, scene.numbered)

    used = {g.shape for g in groups}
    for i, g in enumerate(groups):
        if g.colour is not None:
            out["colour"] += [with_group(i, Group(g.shape, g.count, c)) for c in COLOURS if c != g.colour]
        if scene.relation is None:
            out["count"] += [with_group(i, Group(g.shape, n, g.colour)) for n in (g.count - 1, g.count + 1)
                             if 1 <= n <= 4]
        out["shape"] += [with_group(i, Group(s, g.count, g.colour)) for s in SHAPES if s not in used]
    if scene.relation is not None:
        out["position"].append(Scene(scene.groups, _OPPOSITE[scene.relation]))
    if len(groups) == 1 and not scene.numbered and groups[0].count == 1:  # "a circle" vs "two circles"
        out["count"] = [Scene((Group(groups[0].shape, 2, groups[0].colour),))]
    return out
