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
U64 = 2.0**-53  # float64 unit roundoff (eps / 2)


def _gamma(k: int) -> float:
    """Higham's gamma_k = k u / (1 - k u): worst-case relative error of a k-term float64 sum or dot product."""
    return k * U64 / (1 - k * U64)


def _energy_distance_rounding_bound(x: torch.Tensor, y: torch.Tensor) -> float:
    """Worst-case float64 rounding error of energy_distance(x, y), valid for ANY summation order or BLAS.

    Per pair, torch.cdist may use the matmul form |p|^2 + |q|^2 - 2 p.q (a dot product of d + 2 terms whose
    norms are themselves d-term sums), so the squared distance is off by delta <= gamma_{2d+4} (|p| + |q|)^2;
    the distance then by at most min(sqrt(delta), delta / |p - q|), plus 2u |p - q| for the sqrt and the
    subtraction path. Each of the three sums of K = N M pairs adds gamma_K sum|terms| in any order; the
    three divisions and two subtractions add at most 4u (2 cross + within_x + within_y). The bound is
    computed from the data in float64, which is itself exact to a few u relative: negligible here.
    """
    x, y = x.double(), y.double()

    def sum_bound(p: torch.Tensor, q: torch.Tensor) -> tuple[float, float]:
        dist = (p[:, None, :] - q[None, :, :]).norm(dim=-1)
        delta = _gamma(2 * p.shape[1] + 4) * (p.norm(dim=1)[:, None] + q.norm(dim=1)[None, :]) ** 2
        per_pair = torch.minimum(delta.sqrt(), delta / dist) + 2 * U64 * dist  # dist = 0: delta / 0 = inf
        total = float(dist.sum())
        return total, float(per_pair.sum()) + _gamma(dist.numel()) * (total + float(per_pair.sum()))

    n, m = x.shape[0], y.shape[0]
    (sxy, exy), (sxx, exx), (syy, eyy) = sum_bound(x, y), sum_bound(x, x), sum_bound(y, y)
    magnitude = 2 * sxy / (n * m) + sxx / (n * (n - 1)) + syy / (m * (m - 1))
    return 2 * exy / (n * m) + exx / (n * (n - 1)) + eyy / (m * (m - 1)) + 4 * U64 * magnitude


def test_energy_distance_hand_cases():
    # Exact in IEEE float64 on any machine and in any order: the distances are 3 (also via the matmul form:
    # 0 + 9 - 0, sqrt(9) = 3), all partial sums are integers below 2^53, 105 / 35 = 3 and 2 * 3 = 6.
    x, y = torch.zeros(5, 1), torch.full((7, 1), 3.0)
    assert energy_distance(x, y) == 6.0  # point masses at a, b: 2 |a - b|
    x = torch.tensor([[0.0], [1.0], [0.0], [1.0]])
    y = torch.full((4, 1), 2.0)
    # cross mean 1.5; within x over ordered pairs i != j: 8 of 12 differ by 1 -> 2/3; within y 0
    # Distances and sums are small integers (exact); 24 / 16 = 1.5 is exact; only 8 / 12 and the final
    # subtraction round, each by <= u |value|: error <= u (2/3 + 7/3) = 3u absolute on 7/3, i.e. rel <= 1.3u
    # (the reference expression rounds the same two operations). rel = 4u = 2 eps covers both sides.
    assert energy_distance(x, y) == pytest.approx(2 * 1.5 - 2 / 3, rel=4 * U64, abs=0)
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(300, 3, generator=g), torch.randn(200, 3, generator=g)
    # Chunked vs one-shot: the same value computed twice with different rounding, so they may differ by up
    # to twice the worst-case rounding bound. The result (~ -4e-3) cancels terms of ~ 2.2 each (condition
    # sum|terms| / |result| ~ 2000) over sums of up to 90000 terms, so the old rel=1e-10 assumed one
    # machine's summation order. The bound here is ~ 1e-9 absolute (~ 2e-7 relative), far below the
    # ~ 2e-5 change that dropping or repeating a single pair in one chunk would make.
    tol = 2 * _energy_distance_rounding_bound(a, b)
    assert energy_distance(a, b, chunk_size=7) == pytest.approx(energy_distance(a, b), rel=0, abs=tol)


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
    # 1-D: W2 of a shift. theta = +-1 exactly (sqrt(fl(t^2)) = |t| in binary64), so projections are exact;
    # fl(x + 0.7) and rounding is monotone, so the sort pairs x_i with x_i + 0.7. Each difference is
    # 0.7 (1 + e) with |e| <= u (|x| + 0.7) / 0.7 + u <= 9u for |x| <= 4.2 (asserted); squaring doubles it,
    # the 2000-term mean adds gamma_2000 in any order, the sqrt halves the total and adds u:
    # rel <= (18u + u + gamma_2000) / 2 + u < 1011u.
    assert float(x.abs().max()) <= 4.2
    assert sliced_wasserstein2(x, x + 0.7, 4, g) == pytest.approx(0.7, rel=1011 * U64, abs=0)
    y = torch.randn(400, 3, generator=g, dtype=F64)
    # same law: indices (i + 0.5) / 800 * 800 -> i and * 400 -> i // 2 are exact after flooring, so the
    # sorted projections pair equal values up to their rounding: each projection (a 3-term dot product, in
    # whatever order the BLAS picks for an 800- or a 400-row matrix) is off by <= gamma_3 |y_i| (1 + 3u) for a
    # unit theta, sorting is 1-Lipschitz in the max norm, so every difference and hence SW2 is
    # <= 2 gamma_3 max|y_i| (1 + 3u) < 7u max|y_i|.
    same_law_tol = 7 * U64 * float(y.norm(dim=1).max())
    assert sliced_wasserstein2(torch.cat([y, y]), y, 16, g) == pytest.approx(0.0, abs=same_law_tol)
    # y + t e_1 shifts every projection by t theta_1, so SW2 = t sqrt(mean theta_1^2) ~ t / sqrt(d)
    sw = sliced_wasserstein2(y, y + torch.tensor([1.0, 0.0, 0.0], dtype=F64), 2000, g)
    assert sw == pytest.approx(1 / math.sqrt(3), rel=0.05)


# ---- mode TV ----------------------------------------------------------------------------------------------
def test_mode_tv_hand_cases():
    w = torch.tensor([0.5, 0.25, 0.25])
    # counts / 4 and the weights are exact; counts / 5 and the 3-term sum round by a few u. pytest's default
    # rel=1e-6 is loose but cannot hide a wrong count, which moves the result by >= 0.1.
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


def _knn_entropy_rounding_bound(x: torch.Tensor, k: int) -> float:
    """Worst-case float64 rounding error of knn_entropy(x, k), valid for any summation order or BLAS.

    Each computed pairwise distance is off by at most pert_ij = min(sqrt(delta), delta / D_ij) + 2u D_ij,
    with delta = gamma_{2d+4} (|x_i| + |x_j|)^2 (see _energy_distance_rounding_bound). A k-th order statistic
    moves by at most the largest perturbation e_i = max_j pert_ij, so log r_i moves by <= e_i / (r_i - e_i);
    the log adds 2u |log r_i|, the N-term mean gamma_N mean|log r|, and the final sum of the digamma,
    unit-ball and d * mean terms 4u of their absolute sum. All computed from the data in float64.
    """
    x = x.double()
    n, d = x.shape
    dist = (x[:, None, :] - x[None, :, :]).norm(dim=-1)
    norms = x.norm(dim=1)
    delta = _gamma(2 * d + 4) * (norms[:, None] + norms[None, :]) ** 2
    pert = torch.minimum(delta.sqrt(), delta / dist) + 2 * U64 * dist
    pert.fill_diagonal_(0.0)  # the point itself is excluded exactly (set to inf), no rounding
    dist.fill_diagonal_(math.inf)
    r = dist.topk(k, dim=1, largest=False).values[:, -1]
    e = pert.max(dim=1).values
    assert bool((e < r).all()), "rounding bound larger than a neighbour distance: the test data are degenerate"
    log_r = r.log().abs()
    mean_bound = float((e / (r - e)).mean()) + 2 * U64 * float(log_r.mean()) + _gamma(n) * float(log_r.mean())
    # |psi(n)| + |psi(k)| <= 2 log(n) + 1 for 1 <= k < n; |log V_d| <= d log(pi) / 2 + |lgamma(d / 2 + 1)|
    magnitude = 2 * math.log(n) + 1 + 0.5 * d * math.log(math.pi) + abs(math.lgamma(0.5 * d + 1))
    return d * mean_bound + 4 * U64 * (magnitude + d * float(log_r.mean()))


def test_knn_entropy_of_a_gaussian():
    p = gaussian([1.0, -1.0], COV)
    x, _ = p.sample(4000, torch.Generator().manual_seed(4))
    exact = 0.5 * math.log(float(torch.linalg.det(2 * math.pi * math.e * p.covs[0])))
    h = knn_entropy(x, k=3)
    assert abs(h - exact) < 0.03 * exact  # estimator sd ~ 1/sqrt(4000) = 0.016 nats, exact ~ 3.2 nats
    # Chunked vs one-shot: each may differ from the exact value by the worst-case rounding bound below (any
    # summation order or BLAS), so they may differ from each other by twice it (~ 1e-9 relative here); one
    # wrong neighbour would move the mean log-radius by ~ 1e-4.
    assert knn_entropy(x, k=3, chunk_size=333) == pytest.approx(h, rel=0, abs=2 * _knn_entropy_rounding_bound(x, 3))
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
