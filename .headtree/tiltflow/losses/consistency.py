"""Consistency regulariser on the fake denoiser h(x, tau) = x - tau v_fake(x, tau) (METHOD.md 4.3).

The optimal denoiser is a martingale along its own reverse transitions, so
E[h(x', tau') | x_tau] = h(x_tau, tau). With two independent transitions x'_1, x'_2,
mean((h1 - h0) * (h2 - h0)) is an unbiased estimate of ||E[h(x') | x_tau] - h0||^2; the one-sample
form ||h1 - h0||^2 adds the conditional variance (biased; kept as an option).
"""

from __future__ import annotations

from torch import Tensor

from tiltflow.losses.output import LossOutput


def consistency_loss(h0: Tensor, h1: Tensor, h2: Tensor | None, *, two_sample: bool = True) -> LossOutput:
    if two_sample:
        if h2 is None:
            raise ValueError("the two-sample consistency estimator needs h2")
        loss = ((h1 - h0) * (h2 - h0)).flatten(1).mean(1).mean()
    else:
        loss = ((h1 - h0) ** 2).flatten(1).mean(1).mean()
    return LossOutput(loss, {"fake_consistency": loss.detach()})
