"""Ambient denoising score matching for the fake score (METHOD.md 4.2).

The fake score only sees the noisy x_s at level s, renoised to tau. The regression target
  v_star = -x_s / (1 - s) + (tau + (1 - tau) s^2 / (1 - s)^2) / sigma_ts * n
has E[v_star | x_tau] equal to the exact velocity at tau of the step's distribution diffused to tau.
"""

from __future__ import annotations

import torch
from torch import Tensor

from tiltflow.flow.conventions import bcast, forward_kernel
from tiltflow.losses.output import LossOutput

WEIGHTINGS = ("none", "clamped")


def ambient_target(x_s: Tensor, s: float, tau: Tensor, noise: Tensor) -> Tensor:
    _, sigma_ts = forward_kernel(s, tau)
    coef = (tau + (1 - tau) * s**2 / (1 - s) ** 2) / sigma_ts
    return -x_s / (1 - s) + bcast(coef, x_s) * noise


def fake_weight(sigma_ts: Tensor, kind: str = "none", c: float = 10.0) -> Tensor:
    """"none" (paper) or "clamped": min(1, c sigma_ts^2), which damps tiny sigma_ts (released configs)."""
    if kind == "none":
        return torch.ones_like(sigma_ts)
    if kind == "clamped":
        return (c * sigma_ts**2).clamp(max=1.0)
    raise ValueError(f"fake-score weighting must be one of {WEIGHTINGS}, got {kind!r}")


def fake_score_loss(v_pred: Tensor, v_star: Tensor, weight: Tensor) -> LossOutput:
    """weight * ||v_fake - v_star||^2, averaged over dims and batch (the mean only rescales the lr)."""
    per_sample = ((v_pred - v_star) ** 2).flatten(1).mean(1)
    loss = (weight * per_sample).mean()
    return LossOutput(loss, {"fake_adsm": loss.detach()})
