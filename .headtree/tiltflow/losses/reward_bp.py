"""Pathwise reward loss on the deterministic last step (METHOD.md 5.5)."""

from __future__ import annotations

import torch
from torch import Tensor

from tiltflow.losses.output import LossOutput


def reward_bp_loss(reward: Tensor, *, kind: str = "hinge", margin: float = 3.0) -> LossOutput:
    """hinge: mean(relu(margin - r)) (reference, m = 3); linear: -mean(r) (exact mode)."""
    if kind == "hinge":
        loss = torch.relu(margin - reward).mean()
    elif kind == "linear":
        loss = -reward.mean()
    else:
        raise ValueError(f"bp loss kind must be 'hinge' or 'linear', got {kind!r}")
    return LossOutput(loss, {"bp_reward": reward.detach().mean()})
