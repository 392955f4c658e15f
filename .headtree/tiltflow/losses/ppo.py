"""PPO-clip policy loss on the trained stochastic steps (METHOD.md 5.4)."""

from __future__ import annotations

import torch
from torch import Tensor

from tiltflow.losses.output import LossOutput


def ppo_clip_loss(logp: Tensor, logp_old: Tensor, adv: Tensor, clip_eps: float | None) -> LossOutput:
    """mean(max(-A ratio, -A clip(ratio, 1 - eps, 1 + eps))); clip_eps=None gives -mean(A ratio),
    whose gradient at ratio = 1 is the plain score-function estimate -mean(A grad log pi)."""
    ratio = torch.exp(logp - logp_old)
    unclipped = -adv * ratio
    if clip_eps is None:
        loss = unclipped.mean()
        clip_frac = torch.zeros((), device=ratio.device)
    else:
        clipped = -adv * ratio.clamp(1 - clip_eps, 1 + clip_eps)
        loss = torch.maximum(unclipped, clipped).mean()
        clip_frac = ((ratio.detach() - 1).abs() > clip_eps).float().mean()
    return LossOutput(loss, {"ratio_mean": ratio.detach().mean(),
                             "ratio_max_dev": (ratio.detach() - 1).abs().max(),
                             "clip_frac": clip_frac})
