"""Whole-model views of sharded modules: who writes files (rank 0) and full state dicts to write."""

from __future__ import annotations

from torch import Tensor, nn


def is_main_process() -> bool:
    """True on rank 0 of a process group, and in a single process: the one that writes run files."""
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def is_sharded(module: nn.Module) -> bool:
    return any(hasattr(p, "device_mesh") for p in module.parameters())


def full_state_dict(module: nn.Module) -> dict[str, Tensor]:
    """module.state_dict() with every sharded parameter gathered (a collective: call it on every rank)."""
    if not is_sharded(module):
        return module.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
