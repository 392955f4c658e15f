"""Whole-model views of sharded modules: who writes files (rank 0) and full state dicts to write."""

from __future__ import annotations

import torch.distributed as dist
from torch import Tensor, nn


def in_process_group() -> bool:
    """Whether this process belongs to an initialised torch.distributed process group (torchrun ranks)."""
    return dist.is_available() and dist.is_initialized()


def is_main_process() -> bool:
    """True on rank 0 of a process group, and in a single process: the one that writes run files."""
    return not in_process_group() or dist.get_rank() == 0


def full_state_dict(module: nn.Module) -> dict[str, Tensor]:
    """module.state_dict() with every sharded parameter gathered (a collective: call it on every rank)."""
    if not any(hasattr(p, "device_mesh") for p in module.parameters()):  # no sharded parameter
        return module.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def full_tensor(t: Tensor) -> Tensor:
    """A sharded tensor (DTensor) gathered to its full value (a collective: call it on every rank, in the same
    order); any other tensor as it is."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def barrier() -> None:
    """Wait for every rank (e.g. until rank 0 has written the run files); nothing in a single process."""
    if in_process_group():
        dist.barrier()


def gather_objects(obj: object) -> list[object]:
    """Every rank's picklable `obj`, in rank order (a collective: call it on every rank); [obj] in a single
    process."""
    if not in_process_group():
        return [obj]
    out: list[object] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out
