"""Collectives the algorithms use, behind one small interface: a single process (LocalComm) or
torch.distributed (TorchComm, any backend: gloo on CPU, NCCL on GPUs)."""

from __future__ import annotations

from typing import Protocol

import torch
import torch.distributed as dist
from torch import Tensor


class Comm(Protocol):
    rank: int
    world_size: int

    def all_gather(self, x: Tensor) -> Tensor:
        """Concatenate every rank's x along dim 0, in rank order (equal shapes on every rank)."""
        ...

    def any(self, flag: bool) -> bool:
        """True on every rank if the flag is true on any rank (so all ranks stop together)."""
        ...


class LocalComm:
    rank, world_size = 0, 1

    def all_gather(self, x: Tensor) -> Tensor:
        return x

    def any(self, flag: bool) -> bool:
        return flag


class TorchComm:
    """torch.distributed's default process group (initialised by the caller, e.g. under torchrun)."""

    def __init__(self) -> None:
        if not dist.is_initialized():
            raise RuntimeError("TorchComm needs an initialised process group (torch.distributed.init_process_group)")
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        # NCCL reduces device tensors only; gloo reduces CPU tensors.
        self._device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None

    def all_gather(self, x: Tensor) -> Tensor:
        if hasattr(x, "full_tensor"):  # a DTensor (e.g. a gradient norm of sharded parameters): its value
            x = x.full_tensor()
        parts = [torch.empty_like(x) for _ in range(self.world_size)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    def any(self, flag: bool) -> bool:
        t = torch.tensor([1.0 if flag else 0.0], device=self._device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item() > 0)


class ReplicatedDataComm(LocalComm):
    """Every rank trains on the same data as rank 0 of a one-process run (a parity check of the sharding:
    N ranks must then reproduce one process). The data looks single-rank (LocalComm's rank, world size and
    all_gather); stopping is still agreed by all."""

    def __init__(self, comm: Comm):
        self.comm = comm

    def any(self, flag: bool) -> bool:
        return self.comm.any(flag)


LOCAL = LocalComm()
