"""Sample-based metrics against an exact or reference tilted target (WORLDS.md section 1, "Metrics").

Energy distance and sliced Wasserstein-2 between sample sets, mode-mass total variation, and
KL(p_theta || p_tilde) = -H(p_theta) - E_{p_theta}[log p_tilde] with a Kozachenko-Leonenko entropy. All
accumulate in float64; pairwise distances are computed in row chunks so 8000 x 8000 needs ~70 MB at a time.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor


def _as_points(x: Tensor, name: str) -> Tensor:
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"{name} must have shape (N, d) with N > 0, got {tuple(x.shape)}")
    return x.detach().double()


def _distance_sum(x: Tensor, y: Tensor, chunk_size: int) -> float:
    """sum_{i, j} |x_i - y_j|, accumulated over row chunks."""
    return sum(float(torch.cdist(x[start : start + chunk_size], y).sum()) for start in range(0, x.shape[0], chunk_size))


def energy_distance(x: Tensor, y: Tensor, *, chunk_size: int = 1024) -> float:
    """Squared energy distance 2 E|X - Y| - E|X - X'| - E|Y - Y'| (>= 0, zero iff the laws agree).

    The within-sample terms are U-statistics (pairs i != j), so the estimate is unbiased and its
    expectation is exactly 0 for two samples of the same law (it can be slightly negative).
    """
    x, y = _as_points(x, "x"), _as_points(y, "y")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"x and y have different dimensions {x.shape[1]} and {y.shape[1]}")
    n, m = x.shape[0], y.shape[0]
    if n < 2 or m < 2:
        raise ValueError("energy_distance needs at least 2 samples in each set")
    cross = _distance_sum(x, y, chunk_size) / (n * m)
    within_x = _distance_sum(x, x, chunk_size) / (n * (n - 1))  # the diagonal contributes zero
    within_y = _distance_sum(y, y, chunk_size) / (m * (m - 1))
    return 2 * cross - within_x - within_y


def sliced_wasserstein2(x: Tensor, y: Tensor, num_projections: int = 128,
                        generator: torch.Generator | None = None) -> float:
    """SW_2 = (E_theta W_2^2(theta.x, theta.y))^(1/2) over uniform directions theta on the sphere.

    1-D W_2 is computed between empirical quantile functions; unequal sizes are compared on a common grid
    of max(N, M) quantile levels.
    """
    x, y = _as_points(x, "x"), _as_points(y, "y")
    d = x.shape[1]
    if y.shape[1] != d:
        raise ValueError(f"x and y have different dimensions {d} and {y.shape[1]}")
    theta = torch.randn(num_projections, d, generator=generator, dtype=torch.float64)
    theta = (theta / theta.norm(dim=1, keepdim=True)).to(x.device)
    px, py = (x @ theta.T).sort(dim=0).values, (y @ theta.T).sort(dim=0).values  # (N, P), (M, P)
    if px.shape[0] != py.shape[0]:
        m = max(px.shape[0], py.shape[0])
        levels = (torch.arange(m, dtype=torch.float64, device=x.device) + 0.5) / m
        px = px[(levels * px.shape[0]).long()]
        py = py[(levels * py.shape[0]).long()]
    return float(((px - py) ** 2).mean().sqrt())


def mode_tv(assign_x: Tensor, target_weights: Tensor, num_modes: int) -> float:
    """Mode-mass total variation 0.5 * sum_k |fraction of samples in mode k - target weight k|."""
    if target_weights.shape != (num_modes,):
        raise ValueError(f"target_weights must have shape ({num_modes},), got {tuple(target_weights.shape)}")
    if assign_x.numel() == 0:
        raise ValueError("assign_x is empty")
    counts = torch.bincount(assign_x.reshape(-1).long(), minlength=num_modes)
    if counts.shape[0] > num_modes:
        raise ValueError(f"assignments must lie in [0, {num_modes}), got {int(assign_x.max())}")
    fractions = counts.double() / assign_x.numel()
    return float(0.5 * (fractions - target_weights.detach().double().to(fractions.device)).abs().sum())


def _kth_neighbour_distance(x: Tensor, k: int, chunk_size: int) -> Tensor:
    """Distance from each point to its k-th nearest other point, (N,)."""
    out = torch.empty(x.shape[0], dtype=x.dtype, device=x.device)
    for start in range(0, x.shape[0], chunk_size):
        dist = torch.cdist(x[start : start + chunk_size], x)
        rows = torch.arange(dist.shape[0], device=x.device)
        dist[rows, rows + start] = math.inf  # a point is not its own neighbour
        out[start : start + chunk_size] = dist.topk(k, dim=1, largest=False).values[:, -1]
    return out


def knn_entropy(x: Tensor, k: int = 3, *, chunk_size: int = 1024) -> float:
    """Kozachenko-Leonenko differential entropy (nats):
    H = psi(N) - psi(k) + log V_d + (d / N) sum_i log r_i,
    r_i the distance to the k-th nearest neighbour, V_d = pi^(d/2) / Gamma(d/2 + 1) the unit-ball volume.
    If k + 1 samples coincide, r_i = 0 and H = -inf (a collapsed sample has no density).
    """
    x = _as_points(x, "x")
    n, d = x.shape
    if not 1 <= k < n:
        raise ValueError(f"k must lie in [1, N - 1] = [1, {n - 1}], got {k}")
    r = _kth_neighbour_distance(x, k, chunk_size)
    log_unit_ball = 0.5 * d * math.log(math.pi) - math.lgamma(0.5 * d + 1)
    psi = torch.special.digamma(torch.tensor([float(n), float(k)], dtype=torch.float64))
    return float(psi[0] - psi[1]) + log_unit_ball + d * float(r.log().mean())


def kl_estimate(x: Tensor, target_log_prob_fn: Callable[[Tensor], Tensor], k: int = 3) -> float:
    """KL(p_x || p_target) ~= -H_knn(x) - mean_i log p_target(x_i), with the exact target log-density."""
    log_p = target_log_prob_fn(_as_points(x, "x")).detach().double()
    return -knn_entropy(x, k) - float(log_p.mean())
