"""Distribution-matching direction and surrogate loss (METHOD.md 4.1 steps 2-5, 5.6).

Two scalings of the same teacher-minus-fake difference:
- "normalized" (reference): g = (x_s^fake - x_s^real) / mean|x_s - x_s^real|, a scale-free direction;
- "kl": g = a (1 - tau) / tau * (v_real - v_fake), which is exactly grad_{x_s} of
  KL(p_theta,tau || p_tau) (the score difference s_fake - s_real = -(1 - tau)/tau (v_fake - v_real),
  times dx_tau/dx_s = a). Only this scaling gives the DM term a definite size relative to beta * grad E[r].
"""

from __future__ import annotations

import torch
from torch import Tensor

from tiltflow.flow.conventions import bcast, forward_kernel
from tiltflow.flow.rng import to_device
from tiltflow.losses.output import LossOutput


def renoise(x_s: Tensor, s: float, tau: Tensor, noise: Tensor) -> Tensor:
    """x_tau = a x_s + sigma_ts n, the forward kernel from level s to tau (per-sample tau (B,))."""
    a, sigma_ts = forward_kernel(s, tau)
    return bcast(a, x_s) * x_s + bcast(sigma_ts, x_s) * noise


def dmd_direction_normalized(x_s: Tensor, x_real: Tensor, x_fake: Tensor, eps: float = 1e-8) -> Tensor:
    """(x_fake - x_real) / mean|x_s - x_real|, the mean taken per sample over non-batch dims (detached)."""
    norm = (x_s - x_real).abs().flatten(1).mean(1).clamp_min(eps)
    return ((x_fake - x_real) / bcast(norm, x_s)).detach()


def dmd_direction_kl(v_real: Tensor, v_fake: Tensor, tau: Tensor, s: float) -> Tensor:
    """a (1 - tau) / tau (v_real - v_fake): the gradient of KL(p_theta,tau || p_tau) with respect to x_s."""
    a, _ = forward_kernel(s, tau)
    scale = a * (1 - tau) / tau
    return (bcast(scale, v_real) * (v_real - v_fake)).detach()


def dmd_surrogate(x_s: Tensor, direction: Tensor, reduction: str = "mean") -> LossOutput:
    """0.5 ||x_s - stopgrad(x_s - g)||^2, whose gradient with respect to x_s is g.

    reduction "mean" averages over every element (the reference); "sum" sums over non-batch dims and
    averages over the batch, so the gradient per sample is exactly g (the KL scaling needs this).
    """
    target = (x_s - direction).detach()
    sq = 0.5 * (x_s - target) ** 2
    if reduction == "mean":
        loss = sq.mean()
    elif reduction == "sum":
        loss = sq.flatten(1).sum(1).mean()
    else:
        raise ValueError(f"dmd reduction must be 'mean' or 'sum', got {reduction!r}")
    return LossOutput(loss, {"dm_grad_norm": direction.detach().flatten(1).norm(dim=1).mean()})


def fisher_dm_surrogate(x0: Tensor, u_real: Tensor, u_fake: Tensor, weight: Tensor) -> LossOutput:
    """Score-identity surrogate for grad_theta E_{p_theta,tau} ||u_theta - u_real||^2 (u: denoisers).

    Per sample, summed over dims: ||u_real||^2 - ||u_fake||^2 + 2 (u_fake - u_real) . x0, with u_real and
    u_fake evaluated at x_tau = (1 - tau) x0 + tau n through networks whose parameters are frozen, so the
    gradient flows only through x0 and x_tau. Its expected gradient equals that of the Fisher divergence at
    tau (the implicit dependence of u_theta on theta is rewritten with E[x0 | x_tau] = u_theta).
    Weighted by (1 - tau) / tau^3 and integrated over tau in [a, 1], it is grad KL(p_theta,a || p_a), because
    KL_a = int_a^1 tau / (1 - tau) E||s_theta - s||^2 dtau for this interpolant (KL_1 = 0).
    """
    per = (u_real**2 - u_fake**2 + 2 * (u_fake - u_real) * x0).flatten(1).sum(1)
    loss = (weight * per).mean()
    gap = ((u_fake - u_real) ** 2).flatten(1).sum(1)
    return LossOutput(loss, {"dm_fisher_gap": (weight * gap).detach().mean()})


def sample_tau(s: float, num: int, *, delta: float, tau_min: float, tau_max: float,
               generator: torch.Generator, device: torch.device | str = "cpu") -> Tensor:
    """tau ~ U[s + delta, 1] clamped to [tau_min, tau_max] (METHOD.md 4.1 step 2)."""
    lo = min(s + delta, 1.0)
    u = to_device(torch.rand(num, generator=generator), device)
    return (lo + (1.0 - lo) * u).clamp(tau_min, tau_max)
