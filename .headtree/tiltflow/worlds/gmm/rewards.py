"""Rewards of the analytic world whose tilted targets are exact (WORLDS.md section 1, "Rewards").

Linear r = a.x, quadratic r = -(x - b).A(x - b)/2 and the bounded r = tanh(a.x - c) are differentiable
(pathwise and policy-gradient terms of METHOD.md 5.1); the half-space indicator r = 1[a.x >= c] is not
(policy gradient only). Prompts are accepted and ignored: these rewards do not depend on the condition.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from tiltflow.rewards.base import RewardOutput


def _vector(a: Tensor | Sequence[float], name: str) -> Tensor:
    a = torch.as_tensor(a)
    if a.ndim != 1 or not a.is_floating_point():
        raise ValueError(f"{name} must be a 1-D floating-point vector, got {a.dtype} {tuple(a.shape)}")
    return a


def _check_samples(samples: Tensor, dim: int, reward: str) -> None:
    if samples.ndim != 2 or samples.shape[1] != dim:
        raise ValueError(f"reward {reward!r} expects samples of shape (B, {dim}), got {tuple(samples.shape)}")


class _AlongA:
    """What the rewards of a.x share: the vector a (and offset c), the shape check and a.x itself."""

    differentiable: bool = True

    def __init__(self, a: Tensor | Sequence[float], c: float = 0.0, *, name: str):
        self.a, self.c, self.name = _vector(a, "a"), float(c), name

    def _ax(self, samples: Tensor) -> Tensor:
        _check_samples(samples, self.a.shape[0], self.name)
        return samples @ self.a.to(samples)


class LinearReward(_AlongA):
    """r(x) = a.x."""

    def __init__(self, a: Tensor | Sequence[float], *, name: str = "linear"):
        super().__init__(a, name=name)

    def __call__(self, samples: Tensor, prompts: Sequence[Any] | None = None) -> RewardOutput:
        return RewardOutput(scores=self._ax(samples))


class QuadraticReward:
    """r(x) = -(x - b).A(x - b)/2 with A symmetric (positive semi-definite for an exact tilt)."""

    differentiable: bool = True

    def __init__(self, A: Tensor | Sequence[Sequence[float]], b: Tensor | Sequence[float], *, name: str = "quadratic"):
        self.b = _vector(b, "b")
        A = torch.as_tensor(A).to(self.b)
        d = self.b.shape[0]
        if A.shape != (d, d):
            raise ValueError(f"A must have shape ({d}, {d}) to match b, got {tuple(A.shape)}")
        if not torch.allclose(A, A.T, rtol=1e-6, atol=1e-9):
            raise ValueError("A must be symmetric")
        self.A = A
        self.name = name

    def __call__(self, samples: Tensor, prompts: Sequence[Any] | None = None) -> RewardOutput:
        _check_samples(samples, self.b.shape[0], self.name)
        diff = samples - self.b.to(samples)
        return RewardOutput(scores=-0.5 * ((diff @ self.A.to(samples)) * diff).sum(dim=1))


class HalfspaceReward(_AlongA):
    """r(x) = 1[a.x >= c], returned as detached float 0/1 scores (no gradient exists)."""

    differentiable: bool = False

    def __init__(self, a: Tensor | Sequence[float], c: float, *, name: str = "halfspace"):
        super().__init__(a, c, name=name)
        if not bool((self.a != 0).any()):
            raise ValueError("a must be non-zero")

    def __call__(self, samples: Tensor, prompts: Sequence[Any] | None = None) -> RewardOutput:
        return RewardOutput(scores=(self._ax(samples.detach()) >= self.c).to(samples.dtype))


class TanhReward(_AlongA):
    """r(x) = tanh(a.x - c): bounded in (-1, 1), differentiable (the bounded regime of real reward models)."""

    def __init__(self, a: Tensor | Sequence[float], c: float = 0.0, *, name: str = "tanh"):
        super().__init__(a, c, name=name)

    def __call__(self, samples: Tensor, prompts: Sequence[Any] | None = None) -> RewardOutput:
        return RewardOutput(scores=torch.tanh(self._ax(samples) - self.c))
