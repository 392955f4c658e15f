"""Sharding plans (torch.distributed.fsdp.fully_shard, "FSDP2"), in torchtitan's order: each block of a
model is sharded on its own, then the root. A plan is plain data: which modules, cut into which blocks."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class ShardUnit:
    """One model to shard: its root module and the blocks that get their own all-gather."""

    root: nn.Module
    blocks: Sequence[nn.Module]


def fsdp_shard(units: Sequence[ShardUnit], *, device_type: str, bf16: bool) -> None:
    """fully_shard every block, then every root, over all ranks. With bf16, parameters are gathered and
    computed in bf16 while the sharded master weights stay fp32 and gradients are reduced in fp32."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device_type, (dist.get_world_size(),))
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else None
    kw = {"mesh": mesh} if mp is None else {"mesh": mesh, "mp_policy": mp}
    for unit in units:
        for block in unit.blocks:
            fully_shard(block, **kw)
        fully_shard(unit.root, **kw)


class FSDPGradSync:
    """Gradient-sync hook for FSDP2: reduce-scatter only on the last micro-batch
    (set_requires_gradient_sync(False) on the others)."""

    def __init__(self, roots: Sequence[nn.Module]):
        self.roots = list(roots)

    def __call__(self, enabled: bool) -> FSDPGradSync:
        for root in self.roots:
            root.set_requires_gradient_sync(enabled)  # type: ignore[operator]
        return self

    def __enter__(self) -> FSDPGradSync:
        return self

    def __exit__(self, *exc: object) -> bool:
        return False
