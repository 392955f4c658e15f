"""Seeded random streams: every random number of a run comes from (seed, rank, step, salt), so a resumed
run redraws the same numbers and every rank knows which numbers the others drew (EDM2's habit)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
from torch import Tensor


def step_generator(seed: int, step: int, salt: str = "", rank: int | None = None) -> torch.Generator:
    """A CPU torch.Generator seeded from (seed, step, salt) and, for a per-rank stream, the rank.

    rank=None is the stream shared by all ranks (the same numbers everywhere)."""
    key = f"{seed}/{step}/{salt}" if rank is None else f"{seed}/{step}/{salt}/rank{rank}"
    digest = hashlib.sha256(key.encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


@dataclass
class Streams:
    """`shared`: identical on every rank (SubGRPO's choice of steps, the seed of group-shared noise).
    `local`: this rank's own (its prompts, its noise, its tau draws)."""

    shared: torch.Generator
    local: torch.Generator


def streams(seed: int, step: int, salt: str, rank: int = 0, world_size: int = 1) -> Streams:
    """The two streams of one iteration. With a single rank one stream is both shared and local, so a
    one-process run draws exactly what it drew before ranks existed."""
    shared = step_generator(seed, step, salt)
    return Streams(shared, shared if world_size == 1 else step_generator(seed, step, salt, rank))


def to_device(t: Tensor, device: torch.device | str, dtype: torch.dtype | None = None) -> Tensor:
    """A CPU tensor (e.g. drawn from a CPU generator, so that the numbers do not depend on the device) on
    `device`, without stopping the host. On CUDA a copy from pageable memory first waits for the stream to
    drain, so the host could never queue work ahead of the GPU (one such wait per noise draw); a copy from
    pinned memory is queued like a kernel. Any dtype change happens on the CPU, before the copy."""
    t = t if dtype is None else t.to(dtype)
    if torch.device(device).type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)
