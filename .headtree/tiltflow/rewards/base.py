"""The Reward protocol and RewardSet (METHOD.md 5.3, 5.5).

A reward maps samples (images in [0, 1] of shape (B, 3, H, W) in image worlds; vectors (B, d) in the
analytic world) and their prompts to scores (B,). Differentiable rewards feed both the policy-gradient
and the pathwise (back-propagation) terms; the others feed only the policy gradient.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor


class RewardError(ValueError):
    """A reward returned something other than one floating-point score per sample (a bug in the reward)."""


@dataclass
class RewardOutput:
    scores: Tensor  # (B,)
    extras: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class Reward(Protocol):
    name: str
    differentiable: bool

    def __call__(self, samples: Tensor, prompts: Sequence[Any]) -> RewardOutput: ...


@dataclass
class RewardSetOutput:
    total: Tensor  # (B,) weighted sum of all rewards
    per_reward: dict[str, Tensor]  # name -> (B,) unweighted scores
    differentiable_total: Tensor | None  # (B,) weighted sum of differentiable rewards, None if none


class RewardSet:
    """Weighted rewards with a per-reward breakdown."""

    def __init__(self, rewards: Sequence[Reward], weights: Sequence[float] | None = None):
        if len(rewards) == 0:
            raise ValueError("a RewardSet needs at least one reward")
        weights = [1.0] * len(rewards) if weights is None else list(weights)
        if len(weights) != len(rewards):
            raise ValueError(f"got {len(rewards)} rewards but {len(weights)} weights")
        names = [r.name for r in rewards]
        if len(set(names)) != len(names):
            raise ValueError(f"reward names must be unique, got {names}")
        self.rewards = list(rewards)
        self.weights = [float(w) for w in weights]

    @property
    def names(self) -> list[str]:
        return [r.name for r in self.rewards]

    @property
    def differentiable(self) -> bool:
        """True when at least one reward can be back-propagated."""
        return any(r.differentiable for r in self.rewards)

    def __call__(self, samples: Tensor, prompts: Sequence[Any], *,
                 only_differentiable: bool = False) -> RewardSetOutput:
        used = [(r, w) for r, w in zip(self.rewards, self.weights) if r.differentiable or not only_differentiable]
        # A reward placed on another device (its options' device) scores there; its scores come back to the
        # samples' device (a differentiable move), so rewards on several devices sum and back-propagate.
        per = {r.name: check_scores(r(samples, prompts), r.name, samples.shape[0]).to(samples.device)
               for r, _ in used}
        terms = [w * per[r.name] for r, w in used]
        diff_terms = [t for t, (r, _) in zip(terms, used) if r.differentiable]
        # sum(rest, first): the scores' own dtype, w1 s1 + w2 s2 + ... in reward order
        total = sum(terms[1:], terms[0]) if terms else torch.zeros(samples.shape[0], device=samples.device)
        diff_total = sum(diff_terms[1:], diff_terms[0]) if diff_terms else None
        return RewardSetOutput(total=total, per_reward=per, differentiable_total=diff_total)


def check_scores(output: Any, name: str, batch_size: int) -> Tensor:
    """The scores of a reward's output, or RewardError saying what it returned instead of a floating-point
    (B,) tensor. Non-finite scores are the training step's FiniteGuard's to report (with the step)."""
    scores = getattr(output, "scores", None)
    if not isinstance(scores, Tensor):
        raise RewardError(f"reward {name!r} returned {type(output).__name__} with scores of type "
                          f"{type(scores).__name__}, expected a RewardOutput holding a tensor of shape ({batch_size},)")
    if scores.shape != (batch_size,):
        raise RewardError(f"reward {name!r} returned scores of shape {tuple(scores.shape)}, expected ({batch_size},)")
    if not scores.is_floating_point():
        raise RewardError(f"reward {name!r} returned scores of dtype {scores.dtype}, expected a floating-point dtype")
    return scores
