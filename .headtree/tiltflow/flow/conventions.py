"""The one place where tiltflow's flow conventions are written down (METHOD.md section 1).

sigma in [0, 1]; sigma = 1 is pure noise, sigma = 0 is data. x_sigma = (1 - sigma) x0 + sigma eps.
Networks predict the velocity v = eps - x0.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor


def bcast(s: Tensor | float, like: Tensor) -> Tensor | float:
    """Reshape a per-sample (B,) sigma so that it broadcasts against a (B, ...) tensor."""
    if isinstance(s, Tensor) and s.ndim == 1 and like.ndim > 1:
        return s.view(-1, *([1] * (like.ndim - 1)))
    return s


def interpolate(x0: Tensor, eps: Tensor, sigma: Tensor | float) -> Tensor:
    """x_sigma = (1 - sigma) * x0 + sigma * eps."""
    s = bcast(sigma, x0)
    return (1 - s) * x0 + s * eps


def x0_from_v(x: Tensor, v: Tensor, sigma: Tensor | float) -> Tensor:
    """x0_hat = x - sigma * v."""
    return x - bcast(sigma, x) * v


def eps_from_v(x: Tensor, v: Tensor, sigma: Tensor | float) -> Tensor:
    """eps_hat = x + (1 - sigma) * v."""
    return x + (1 - bcast(sigma, x)) * v


def v_from_x0(x: Tensor, x0: Tensor, sigma: Tensor | float) -> Tensor:
    """Inverse of x0_from_v: v = (x - x0) / sigma (sigma > 0)."""
    return (x - x0) / bcast(sigma, x)


def time_shift(sigma: Tensor | float, shift: float) -> Tensor | float:
    """Static SD3-style shift: k s / (1 + (k - 1) s). shift = 1 is the identity."""
    if shift <= 0:
        raise ValueError(f"time shift must be > 0, got {shift}")
    return shift * sigma / (1 + (shift - 1) * sigma)


def few_step_sigmas(num_steps: int, shift: float = 1.0, raw: Sequence[float] | None = None) -> list[float]:
    """The K-step grid, shifted, with a trailing 0: K + 1 values from 1 down to 0.

    The reference grid is raw = [1, 0.75, 0.5, 0.25] (linspace(1, 0, K + 1)[:-1]); shift 3 gives
    [1, 0.9, 0.75, 0.5, 0].
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if raw is None:
        raw = [1.0 - i / num_steps for i in range(num_steps)]
    if len(raw) != num_steps:
        raise ValueError(f"raw sigma grid has {len(raw)} values, expected num_steps = {num_steps}")
    grid = [float(time_shift(float(s), shift)) for s in raw]
    if any(b >= a for a, b in zip(grid, grid[1:])) or grid[0] > 1 or grid[-1] <= 0:
        raise ValueError(f"sigma grid must decrease strictly inside (0, 1], got {grid}")
    return grid + [0.0]


def forward_kernel(s: Tensor | float, tau: Tensor | float) -> tuple[Tensor | float, Tensor | float]:
    """Gaussian kernel from level s to level tau >= s (METHOD.md 4.1 step 2).

    Returns (a, sigma_ts) with x_tau = a * x_s + sigma_ts * n: a = (1 - tau) / (1 - s),
    sigma_ts^2 = tau^2 - a^2 s^2.
    """
    a = (1 - tau) / (1 - s)
    var = tau**2 - (a**2) * (s**2)
    if isinstance(var, Tensor):
        sigma_ts = var.clamp_min(0).sqrt()
    else:
        sigma_ts = max(var, 0.0) ** 0.5
    return a, sigma_ts
