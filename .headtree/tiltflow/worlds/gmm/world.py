"""The analytic world assembled from a ProblemSpec (WORLDS.md 1): the conditional GMM, its rewards, the
Task the algorithms train on, the analytic and neural teachers, and the reward-tilted targets."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from tiltflow.config.gmm import ProblemSpec, RewardSpec
from tiltflow.rewards.base import RewardSet
from tiltflow.worlds.gmm.mixture import ConditionalGMM, GaussianMixture
from tiltflow.worlds.gmm.posterior import GMMPosterior
from tiltflow.worlds.gmm.rewards import HalfspaceReward, LinearReward, QuadraticReward, TanhReward
from tiltflow.worlds.gmm.targets import HalfspaceTiltedTarget, TanhTiltedTarget, Target, tilt_linear, tilt_quadratic


def build_gmm(spec: ProblemSpec, dtype: torch.dtype = torch.float64) -> ConditionalGMM:
    mixes = [GaussianMixture(torch.tensor(p.weights, dtype=dtype), torch.tensor(p.means, dtype=dtype),
                             torch.tensor(p.covs, dtype=dtype)) for p in spec.prompts]
    return ConditionalGMM(mixes)


def _reward(spec: RewardSpec, index: int):
    name = f"{spec.type}" if index == 0 else f"{spec.type}_{index}"
    if spec.type == "linear":
        return LinearReward(spec.a, name=name)
    if spec.type == "quadratic":
        return QuadraticReward(spec.A, spec.b, name=name)
    if spec.type == "tanh":
        return TanhReward(spec.a, spec.c, name=name)
    return HalfspaceReward(spec.a, spec.c, name=name)


def build_rewards(spec: ProblemSpec) -> RewardSet:
    return RewardSet([_reward(r, i) for i, r in enumerate(spec.rewards)], [r.weight for r in spec.rewards])


def exact_target(base: GaussianMixture, spec: ProblemSpec, beta: float) -> Target | None:
    """p exp(beta sum_i w_i r_i) / Z in closed form when there is a single reward; None otherwise."""
    if len(spec.rewards) != 1:
        return None
    r = spec.rewards[0]
    b = beta * r.weight
    if r.type == "linear":
        return tilt_linear(base, torch.tensor(r.a, dtype=base.dtype), b)
    if r.type == "quadratic":
        return tilt_quadratic(base, torch.tensor(r.A, dtype=base.dtype), torch.tensor(r.b, dtype=base.dtype), b)
    if r.type == "tanh":
        return TanhTiltedTarget(base, torch.tensor(r.a, dtype=base.dtype), r.c, b)
    return HalfspaceTiltedTarget(base, torch.tensor(r.a, dtype=base.dtype), r.c, b)


class AnalyticBackbone:
    """The exact teacher velocity of the conditional GMM, in the training dtype."""

    def __init__(self, gmm: ConditionalGMM):
        self.gmm = gmm

    def velocity(self, x: Tensor, sigma: Tensor, cond: Tensor) -> Tensor:
        v = self.gmm.velocity(x.to(torch.float64), sigma.to(torch.float64), cond)
        return v.to(x.dtype)

    def posterior_sampler(self, cond: Tensor) -> GMMPosterior:
        """The exact posterior p(x0 | x_tau, cond) of this teacher, one prompt per row (METHOD.md 5.6): the
        split-SNIS estimators of the tilted denoiser use it instead of a reverse sampler."""
        return GMMPosterior(self.gmm, cond)


@dataclass
class GMMTask:
    """Prompts are integers 0..C-1; the condition is their LongTensor; index C is 'no prompt'."""

    num_prompts: int
    dim: int
    rewards: RewardSet
    guidance_scale: float = 1.0
    device: torch.device = torch.device("cpu")

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return (self.dim,)

    def sample_prompts(self, n: int, generator: torch.Generator) -> list[int]:
        return torch.randint(self.num_prompts, (n,), generator=generator).tolist()

    def encode(self, prompts: Sequence[Any]) -> Tensor:
        return torch.as_tensor(list(prompts), dtype=torch.long, device=self.device)

    def encode_uncond(self, n: int) -> Tensor:
        return torch.full((n,), self.num_prompts, dtype=torch.long, device=self.device)

    def decode(self, x: Tensor) -> Tensor:
        return x

    def linear_reward(self) -> Tensor | None:
        """a with total reward r(x) = a.x when every reward is linear (the linear-shift estimator of the
        tilted denoiser, METHOD.md 5.6); None otherwise."""
        rewards = self.rewards.rewards
        if not all(isinstance(r, LinearReward) for r in rewards):
            return None
        return sum(w * r.a.to(torch.float64) for r, w in zip(rewards, self.rewards.weights))  # type: ignore[return-value, union-attr]
