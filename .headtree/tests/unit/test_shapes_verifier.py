"""The shapes world's captions, renderer and verifier: parsing round trips, determinism, the verifier on the
renderer's own images (every category, both sizes), on images of other captions and on hand-made failures."""

from __future__ import annotations

import numpy as np
import pytest

from tiltflow.worlds.shapes import render as R
from tiltflow.worlds.shapes.scene import (
    CATEGORIES,
    COLOURS,
    HELD_OUT_BINDINGS,
    Group,
    Scene,
    VocabularyError,
    all_scenes,
    hard_negatives,
    parse,
    prompt_sets,
)
from tiltflow.worlds.shapes.verifier import Detection, check, detect, partial_credit, score, verify


def test_every_caption_parses_back_to_its_scene_and_category():
    for cat in CATEGORIES:
        for s in all_scenes(cat):
            assert parse(s.text) == s
            assert s.category == cat


def test_unknown_word_is_named():
    with pytest.raises(VocabularyError, match="'hexagon'"):
        parse("a photo of a red hexagon")
    with pytest.raises(VocabularyError, match="start with"):
        parse("two circles")
    with pytest.raises(VocabularyError, match="agree"):
        parse("a photo of two circle")


def test_prompt_sets_hold_out_captions_and_bindings():
    sets = prompt_sets()
    train = {s.text for s in sets["train"]}
    test = [s for s in sets["test"]]
    assert {s.category for s in test} == set(CATEGORIES)
    unseen = [s for s in test if s.text not in train]
    assert unseen and {s.category for s in unseen} >= {"colors", "counting", "position", "color_attr"}
    train_bindings = {(g.colour, g.shape) for s in sets["train"] for g in s.groups}
    for b in HELD_OUT_BINDINGS:
        assert b not in train_bindings
        assert any(b in {(g.colour, g.shape) for g in s.groups} for s in test)
    assert prompt_sets() == sets  # deterministic


def test_render_is_deterministic_and_seed_dependent():
    s = parse("a photo of three red squares")
    a, b, c = R.render(s, 32, 7), R.render(s, 32, 7), R.render(s, 32, 8)
    assert a.dtype == np.uint8 and a.shape == (32, 32, 3)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert R.render(s, 64, 7).shape == (64, 64, 3)


@pytest.mark.parametrize("size", [32, 64])
def test_verifier_passes_renders_of_every_caption(size):
    """Every caption of every category, 2 seeds (a 100% pass is required; the issue asks >= 99%)."""
    scenes = [s for c in CATEGORIES for s in all_scenes(c)]
    images = [R.render(s, size, seed) for s in scenes for seed in (0, 1)]
    prompts = [s for s in scenes for _ in (0, 1)]
    failed = [(p.text, v.reason) for img, p in zip(images, prompts) if not (v := verify(img, p)).passed]
    assert failed == []
    out = score(np.stack(images), prompts)
    assert all(out[f"verifier/{c}"] == 1.0 for c in CATEGORIES) and out["verifier/overall"] == 1.0


def test_verifier_fails_renders_of_hard_negative_captions():
    """An image rendered for caption A fails every hard negative of A, with the reason that names the change."""
    expected = {"colour": {"colour"}, "count": {"count"}, "shape": {"shape"}, "position": {"position"}}
    n = 0
    for cat in CATEGORIES:
        for s in all_scenes(cat)[::3]:
            img = R.render(s, 32, 3)
            for kind, negs in hard_negatives(s).items():
                for neg in negs:
                    v = verify(img, neg)
                    assert not v.passed, (s.text, neg.text)
                    assert v.reason in expected[kind] | ({"count"} if kind == "shape" else set()), (kind, v.reason)
                    n += 1
    assert n > 200


def test_hand_made_failures():
    """Documented answers: each edit of a rendered image breaks exactly the check it targets."""
    s = parse("a photo of a red circle left of a blue square")
    img = R.render(s, 32, 0)
    assert verify(img, s).passed
    # Mirror the image left-right: the relation flips, everything else holds.
    assert verify(img[:, ::-1].copy(), s).reason == "position"
    # Repaint the circle green: a colour failure.
    red = np.all(img == COLOURS["red"], axis=-1)
    green = img.copy()
    green[red] = COLOURS["green"]
    assert verify(green, s).reason == "colour"
    # Fill the circle's bounding box: it becomes a square, a shape failure.
    ys, xs = np.nonzero(red)
    boxed = img.copy()
    boxed[ys.min():ys.max() + 1, xs.min():xs.max() + 1] = COLOURS["red"]
    assert verify(boxed, s).reason == "shape"
    # Erase the square: a count failure. A blank image: a count failure too.
    blue = np.all(img == COLOURS["blue"], axis=-1)
    erased = img.copy()
    erased[blue] = 250
    assert verify(erased, s).reason == "count"
    assert verify(np.full_like(img, 250), s).reason == "count"
    # A one-pixel speck is below the minimum object area.
    speck = img.copy()
    speck[0, 0] = COLOURS["yellow"]
    assert verify(speck, s).passed


def test_noise_tolerance():
    """Gaussian pixel noise (sd 12 of 255, far below COLOUR_RADIUS) keeps the verdicts."""
    rng = np.random.default_rng(0)
    scenes = [s for c in CATEGORIES for s in all_scenes(c)[:4]]
    ok = 0
    for s in scenes:
        img = R.render(s, 32, 1).astype(np.float64)
        img = img + rng.normal(0, 12, img.shape)
        ok += verify(img, s).passed
    assert ok == len(scenes)


def test_matching_prefers_coloured_groups():
    red_circle = [d for d in detect(R.render(parse("a photo of a red circle and a blue square"), 32, 0))]
    assert check(Scene((Group("circle"), Group("square", 1, "blue"))), red_circle).passed


def test_partial_credit_is_one_exactly_on_a_pass():
    """On the renderer's images (every caption passes: credit 1), on the same images judged against hard
    negative captions (every one fails: credit < 1), and on random detection sets, credit == 1 iff check passes."""
    for cat in CATEGORIES:
        for s in all_scenes(cat)[::2]:
            found = detect(R.render(s, 32, 5))
            assert partial_credit(s, found) == 1.0
            for negs in hard_negatives(s).values():
                for neg in negs:
                    assert not check(neg, found).passed and 0.0 <= partial_credit(neg, found) < 1.0
    rng = np.random.default_rng(0)
    colours, shapes = list(COLOURS), ["circle", "square", "triangle"]
    scenes = [s for c in CATEGORIES for s in all_scenes(c)]
    agree = passes = 0
    for _ in range(3000):
        s = scenes[rng.integers(len(scenes))]
        n = max(0, s.num_objects + int(rng.integers(-1, 2)))
        found = [Detection(colours[rng.integers(3)], shapes[rng.integers(3)], float(rng.uniform(0, 32)),
                           float(rng.uniform(0, 32)), 20) for _ in range(n)]
        credit = partial_credit(s, found)
        assert 0.0 <= credit <= 1.0
        agree += (credit == 1.0) == check(s, found).passed
        passes += check(s, found).passed
    assert agree == 3000 and passes > 20  # the random sets do include passes (3 colours, 3 shapes)


def test_partial_credit_hand_made_answers():
    """The documented credits for the hand-made failures above: "a red circle left of a blue square" has 6
    checks (count; circle shape and colour; square shape and colour; relation)."""
    s = parse("a photo of a red circle left of a blue square")
    img = R.render(s, 32, 0)
    credit = lambda image: partial_credit(s, detect(image))  # noqa: E731
    assert credit(img[:, ::-1].copy()) == pytest.approx(5 / 6)  # mirrored: only the relation fails
    red = np.all(img == COLOURS["red"], axis=-1)
    green = img.copy()
    green[red] = COLOURS["green"]
    assert credit(green) == pytest.approx(5 / 6)  # the circle's colour fails; it still anchors the relation
    erased = img.copy()
    erased[np.all(img == COLOURS["blue"], axis=-1)] = 250
    assert credit(erased) == pytest.approx(2.5 / 6)  # count 1 of 2 (0.5), circle 2, square 0, relation 0
    assert credit(np.full_like(img, 250)) == 0.0
    two = parse("a photo of three red squares")
    assert partial_credit(two, detect(R.render(parse("a photo of two red squares"), 32, 0))) == pytest.approx(
        (2 / 3 + 2 / 3 + 2 / 3) / 3)  # count 1 - 1/3, shape 2 of 3, colour 2 of 3


def test_component_labelling_matches_scipy():
    """The numpy labelling (no scipy at run time) partitions random colour maps as scipy.ndimage.label does."""
    ndimage = pytest.importorskip("scipy.ndimage")
    from tiltflow.worlds.shapes.verifier import label_components

    rng = np.random.default_rng(0)
    for _ in range(30):
        colours = rng.integers(-1, 3, size=(rng.integers(1, 20), rng.integers(1, 20)))
        ours = label_components(colours)
        assert np.array_equal(ours < 0, colours < 0)
        for c in range(3):
            ref, n = ndimage.label(colours == c)
            for k in range(1, n + 1):
                values = np.unique(ours[ref == k])
                assert values.size == 1  # one component of scipy's is one of ours ...
                assert np.array_equal(ours == values[0], ref == k)  # ... and exactly it
