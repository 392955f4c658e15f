"""The shapes world's distribution columns (issue 9): the Frechet distance and the within-prompt diversity
in an image-embedding space, checked against closed forms in float64."""

import numpy as np
import torch

from tiltflow.worlds.shapes.evaluate import embedding_metrics, frechet_distance
from tiltflow.worlds.shapes.render import render
from tiltflow.worlds.shapes.scene import parse


def test_frechet_distance_matches_the_closed_form_for_commuting_covariances():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(4000, 3, generator=g, dtype=torch.float64)
    # b = a centred, scaled along the eigenvectors V of cov_a by s, shifted: cov_b = V diag(s^2 w) V^T commutes
    # with cov_a = V diag(w) V^T, so FD = |mu_a - mu_b|^2 + sum_i (sqrt(w_i) - s_i sqrt(w_i))^2 exactly.
    w, v = torch.linalg.eigh(torch.cov(a.T))
    scales = torch.tensor([0.3, 1.7, 2.5], dtype=torch.float64)
    shift = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    b = (a - a.mean(0)) @ v @ torch.diag(scales) @ v.T + shift
    expected = float((a.mean(0) - shift).square().sum() + ((w.sqrt() - scales * w.sqrt()) ** 2).sum())
    assert abs(frechet_distance(a, b) - expected) < 1e-9 * max(1.0, expected)
    assert abs(frechet_distance(a, a)) < 1e-9
    # Non-commuting covariances: symmetric in its arguments and >= 0.
    c = torch.randn(3000, 3, generator=g, dtype=torch.float64) @ torch.tensor(
        [[1.0, 0.8, 0.0], [0.0, 1.0, 0.3], [0.2, 0.0, 1.0]], dtype=torch.float64)
    assert abs(frechet_distance(a, c) - frechet_distance(c, a)) < 1e-9
    assert frechet_distance(a, c) > 0


def _pixel_embed(x):
    """A stand-in embedding: the mean colour of the image, (B, 3)."""
    return x.mean(dim=(2, 3))


def test_diversity_is_zero_for_copies_and_positive_for_different_samples():
    prompt = "a photo of a red circle"
    img = render(parse(prompt), 32, 0)
    copies = np.stack([img] * 4)
    out = embedding_metrics(_pixel_embed, copies, [prompt] * 4, batch_size=2)
    assert abs(out["diversity/within_prompt"]) < 1e-12
    others = np.stack([img, render(parse("a photo of a blue circle"), 32, 1)])
    spread = embedding_metrics(_pixel_embed, others, [prompt] * 2, batch_size=2)["diversity/within_prompt"]
    f = torch.nn.functional.normalize(torch.from_numpy(others).double().mean(dim=(1, 2)), dim=-1)
    # the embedding runs in float32 (as the reward model does): a few float32 ulps of a unit-norm dot product
    assert abs(spread - float(1 - f[0] @ f[1])) < 1e-6 and spread > 0


def test_renders_are_close_to_renders_and_blank_images_are_not():
    prompts = ["a photo of a red circle", "a photo of two blue squares", "a photo of a green triangle"] * 8
    renders = np.stack([render(parse(p), 32, 500 + i) for i, p in enumerate(prompts)])
    blank = np.full_like(renders, 250)
    near = embedding_metrics(_pixel_embed, renders, prompts, batch_size=8)["fd/reward_embed"]
    far = embedding_metrics(_pixel_embed, blank, prompts, batch_size=8)["fd/reward_embed"]
    assert far > 10 * max(near, 1e-6)


def test_one_sample_has_no_distribution_columns_and_frechet_says_why():
    """One evaluated sample (eval.max_prompts=1 eval.num_per_prompt=1): no covariance, so no FD and no
    diversity, instead of a failed eigendecomposition at the end of a run."""
    prompt = "a photo of a red circle"
    assert embedding_metrics(_pixel_embed, render(parse(prompt), 32, 0)[None], [prompt], batch_size=2) == {}
    one = torch.zeros(1, 3, dtype=torch.float64)
    try:
        frechet_distance(one, torch.zeros(5, 3, dtype=torch.float64))
    except ValueError as err:
        assert "at least 2 samples" in str(err) and "got 1 and 5" in str(err)
    else:
        raise AssertionError("frechet_distance accepted one sample")
