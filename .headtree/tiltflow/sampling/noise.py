"""Noise plans: who draws which noise for which step (METHOD.md 5.2).

A plan holds one noise tensor per step. For SubGRPO, steps outside the trained subset use noise that
all members of a group share (common random numbers seeded from the prompt, the step and the
iteration); trained steps use fresh independent noise per sample.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from tiltflow.flow.rng import to_device


def _seed_from(*keys: object) -> int:
    digest = hashlib.sha256(repr(keys).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def group_noise(shape: Sequence[int], group_keys: Sequence[object], *, seed: int, step: int, iteration: int,
                dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> Tensor:
    """One noise draw per sample where samples with the same group key get the same noise.

    The draw depends only on (seed, key, step, iteration), so it is the same on every rank.
    """
    cache: dict[object, Tensor] = {}
    for key in group_keys:
        if key not in cache:
            g = torch.Generator().manual_seed(_seed_from(seed, key, step, iteration))
            cache[key] = torch.randn(tuple(shape), generator=g, dtype=dtype)
    return to_device(torch.stack([cache[key] for key in group_keys]), device)  # built on the CPU: one copy


@dataclass
class NoisePlan:
    """Initial noise and one noise tensor per step (None for a deterministic step)."""

    init: Tensor
    steps: list[Tensor | None]

    @staticmethod
    def fresh(num_samples: int, shape: Sequence[int], num_steps: int, generator: torch.Generator,
              dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> NoisePlan:
        """Independent noise everywhere; the last step (to sigma = 0) needs none."""
        def draw() -> Tensor:
            return to_device(torch.randn((num_samples, *shape), generator=generator, dtype=dtype), device)
        init = draw()
        return NoisePlan(init=init, steps=[draw() for _ in range(num_steps - 1)] + [None])

    @staticmethod
    def subgrpo(group_keys: Sequence[object], shape: Sequence[int], num_steps: int, trained_steps: set[int],
                generator: torch.Generator, *, seed: int, iteration: int,
                dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> NoisePlan:
        """Fresh noise for trained steps, group-shared noise for the other steps and for the initial
        noise, so that differences inside a group come from the trained steps alone."""
        n = len(group_keys)

        def fresh() -> Tensor:
            return to_device(torch.randn((n, *shape), generator=generator, dtype=dtype), device)

        def shared(step: int) -> Tensor:
            return group_noise(shape, group_keys, seed=seed, step=step, iteration=iteration,
                               dtype=dtype, device=device)

        init = shared(-1)
        return NoisePlan(init=init, steps=[fresh() if k in trained_steps else shared(k) for k in range(num_steps - 1)]
                         + [None])
