"""Metrics of the gmm world (WORLDS.md section 1, "Metrics") on hand-computed and closed-form cases.

Monte Carlo tolerances were fixed in advance: 5 standard errors, estimated from independent replicates or
from the known variance of the estimator's leading term.
"""

from __future__ import annotations

import math

import pytest
import torch

from tiltflow.worlds.gmm import (
    GaussianMixture,
    energy_distance,
    kl_estimate,
    knn_entropy,
    metric_curves,
    mode_tv,
    scatter_over_density,
    sliced_wasserstein2,
)

F64 = torch.float64


def gaussian(mean: list[float], cov: list[list[float]]) -> GaussianMixture:
    return GaussianMixture(torch.ones(1, dtype=F64), torch.tensor([mean], dtype=F64), torch.tensor([cov], dtype=F64))


# ---- energy distance --------------------------------------------------------------------------------------
def test_energy_distance_hand_cases():
    x, y = torch.zeros(5, 1), torch.full((7, 1), 3.0)
    assert energy_distance(x, y) == pytest.approx(6.0)  # point masses at a, b: 2 |a - b|
    x = torch.tensor([[0.0], [1.0], [0.0], [1.0]])
    y = torch.full((4, 1), 2.0)
    # cross mean 1.5; within x over ordered pairs i != j: 8 of 12 differ by 1 -> 2/3; within y 0
    assert energy_distance(x, y) == pytest.approx(2 * 1.5 - 2 / 3, rel=1e-12)
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(300, 3, generator=g), torch.randn(200, 3, generator=g)
    assert energy_distance(a, b, chunk_size=7) == pytest.approx(energy_distance(a, b), rel=1e-10)


def _abs_normal_mean(m: float, s: float) -> float:
    """E|N(m, s^2)|."""
    return s * math.sqrt(2 / math.pi) * math.exp(-m * m / (2 * s * s)) + m * math.erf(m / (s * math.sqrt(2)))


@pytest.mark.parametrize("shift", [0.0, 1.0])
def test_energy_distance_of_gaussians_matches_closed_form(shift):
    """N(0, 1) vs N(shift, 1): 2 E|N(shift, 2)| - 2 E|N(0, 2)|, estimated from 8 independent replicates."""
    exact = 2 * _abs_normal_mean(shift, math.sqrt(2)) - 2 * _abs_normal_mean(0.0, math.sqrt(2))
    g = torch.Generator().manual_seed(1)
    reps = torch.tensor(
        [
            energy_distance(
                torch.randn(1500, 1, generator=g, dtype=F64), shift + torch.randn(1500, 1, generator=g, dtype=F64)
            )
            for _ in range(8)
        ]
    )
    se = float(reps.std() / math.sqrt(len(reps)))
    assert abs(float(reps.mean()) - exact) <= 5 * se
    if shift > 0:
        assert float(reps.mean()) > 10 * se  # a shift of one standard deviation is far above the noise


def test_energy_distance_detects_a_small_shift_in_2d():
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(4000, 2, generator=g, dtype=F64), torch.randn(4000, 2, generator=g, dtype=F64)
    same = energy_distance(x, y)
    shifted = energy_distance(x, y + torch.tensor([0.3, 0.0], dtype=F64))
    assert abs(same) < 0.2 * shifted  # 1-D closed form at shift 0.3: ~0.05; noise sd at n = 4000: ~1e-3


# ---- sliced Wasserstein ------------------------------------------------------------------------------------
def test_sliced_wasserstein_closed_cases():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(500, 1, generator=g, dtype=F64)
    assert sliced_wasserstein2(x, x + 0.7, 4, g) == pytest.approx(0.7, rel=1e-12)  # 1-D: W2 of a shift
    y = torch.randn(400, 3, generator=g, dtype=F64)
    assert sliced_wasserstein2(torch.cat([y, y]), y, 16, g) == pytest.approx(0.0, abs=1e-12)  # same law
    # y + t e_1 shifts every projection by t theta_1, so SW2 = t sqrt(mean theta_1^2) ~ t / sqrt(d)
    sw = sliced_wasserstein2(y, y + torch.tensor([1.0, 0.0, 0.0], dtype=F64), 2000, g)
    assert sw == pytest.approx(1 / math.sqrt(3), rel=0.05)


# ---- mode TV ----------------------------------------------------------------------------------------------
def test_mode_tv_hand_cases():
    w = torch.tensor([0.5, 0.25, 0.25])
    assert mode_tv(torch.tensor([0, 0, 1, 2]), w, 3) == pytest.approx(0.0)
    assert mode_tv(torch.tensor([0, 0, 0, 0]), w, 3) == pytest.approx(0.5)
    assert mode_tv(torch.tensor([2, 2, 2, 2]), w, 3) == pytest.approx(0.75)
    assert mode_tv(torch.tensor([1, 1, 1, 1, 0]), w, 3) == pytest.approx(0.5 * (0.3 + 0.55 + 0.25))
    with pytest.raises(ValueError, match="assignments"):
        mode_tv(torch.tensor([3]), w, 3)
    with pytest.raises(ValueError, match="target_weights"):
        mode_tv(torch.tensor([0]), w, 4)


# ---- kNN entropy and KL -----------------------------------------------------------------------------------
COV = [[1.0, 0.5], [0.5, 2.0]]


def test_knn_entropy_of_a_gaussian():
    p = gaussian([1.0, -1.0], COV)
    x, _ = p.sample(4000, torch.Generator().manual_seed(4))
    exact = 0.5 * math.log(float(torch.linalg.det(2 * math.pi * math.e * p.covs[0])))
    h = knn_entropy(x, k=3)
    assert abs(h - exact) < 0.03 * exact  # estimator sd ~ 1/sqrt(4000) = 0.016 nats, exact ~ 3.2 nats
    assert knn_entropy(x, k=3, chunk_size=333) == pytest.approx(h, rel=1e-12)
    assert knn_entropy(torch.cat([x, x[:1]]), k=1) == -math.inf  # k + 1 coinciding points: no density


def test_kl_estimate_against_closed_form():
    """KL(N(m, S) || N(0, S)) = m.S^{-1}m / 2; tolerance 0.08 nats = 5 x the ~0.016 sd at n = 4000."""
    target = gaussian([0.0, 0.0], COV)
    g = torch.Generator().manual_seed(5)
    x, _ = target.sample(4000, g)
    assert abs(kl_estimate(x, target.log_prob)) < 0.08
    m = torch.tensor([1.0, 1.0], dtype=F64)
    exact = 0.5 * float(m @ torch.linalg.solve(target.covs[0], m))
    assert abs(kl_estimate(x + m, target.log_prob) - exact) < 0.08


# ---- plots (smoke) ----------------------------------------------------------------------------------------
def test_plots_write_files(tmp_path):
    p = gaussian([0.0, 0.0, 0.0], [[1.0, 0.2, 0.0], [0.2, 1.0, 0.0], [0.0, 0.0, 1.0]])
    x, _ = p.sample(500, torch.Generator().manual_seed(6))
    panels = [("teacher", x.numpy()), ("student", (x + 0.5).numpy())]
    out = scatter_over_density(tmp_path / "a" / "scatter.png", panels, p.marginal([0, 1]).log_prob, grid_size=40)
    assert out.stat().st_size > 1000
    assert scatter_over_density(tmp_path / "plain.png", panels, None).exists()
    curves = {"rtdmd": {"mode_tv": [(0, 0.5), (10, 0.2)], "kl": [(0, 2.0), (10, 1.0)]}, "bp": {"kl": [(0, 3.0)]}}
    assert metric_curves(tmp_path / "curves.png", curves, ["mode_tv", "kl"], references={"kl": 0.1}).exists()
