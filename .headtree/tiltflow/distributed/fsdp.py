"""Sharding plans (torch.distributed.fsdp.fully_shard, "FSDP2"), in torchtitan's order: each block of a
model is compiled (if asked) and sharded on its own, then the root. A plan is plain data: which modules,
cut into which blocks."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_map_only


@dataclass
class ShardUnit:
    """One model to shard: its root module and the blocks that get their own all-gather."""

    root: nn.Module
    blocks: Sequence[nn.Module]


# torch._dynamo settings for compiled blocks: every block of a transformer runs the same code (one compile
# cache) for several roles (LoRA adapters on or off), with and without gradient, at several batches (B, the
# 2B of batched CFG and of the consistency pass, ...): one static graph per case (dynamic=False), and room
# for all of them.
DYNAMO_LIMITS = {"recompile_limit": 64, "accumulated_recompile_limit": 4096}
# torch.compile's backend for compile_blocks when none is given. Tests set "aot_eager" here: inductor works
# on a CPU with a C compiler, but compiling even a tiny model's graphs takes minutes on a small one.
COMPILE_BACKEND = "inductor"


def compile_blocks(units: Sequence[ShardUnit], *, backend: str | None = None, whole: bool = False,
                   cuda_graphs: bool = False) -> int:
    """torch.compile each distinct block of the units in place (nn.Module.compile: the module and its
    parameters stay what they are, so fully_shard and the optimisers see the same objects), or with `whole`
    each distinct root instead (one graph per pass), and raise dynamo's recompile limits to DYNAMO_LIMITS for
    the process. Returns the number of modules compiled. Used by the training spine (parallel.compile) and by
    `tiltflow bench --compile`.

    cuda_graphs (whole roots only): inductor's "reduce-overhead" mode, which records each compiled pass as a
    CUDA graph and replays it. A replay reuses its output buffers, and each call outside a pending backward
    starts a new replay generation, so the root's outputs are cloned before they are returned: a caller may
    keep a pass's result across later passes (the teacher's output while the fake score runs)."""
    found = [unit.root for unit in units] if whole else [block for unit in units for block in unit.blocks]
    modules = {id(m): m for m in found}  # distinct modules, first seen first
    for module in modules.values():
        compile_module(module, backend=backend, cuda_graphs=cuda_graphs)
    return len(modules)


def compile_module(module: nn.Module, *, backend: str | None = None, cuda_graphs: bool = False) -> None:
    """torch.compile one module in place, static shapes (one graph per input shape and grad mode), raising
    dynamo's recompile limits as compile_blocks does. cuda_graphs: inductor's "reduce-overhead" mode, its
    outputs cloned (compile_blocks says why). Also used for a VAE decoder (parallel.compile_vae)."""
    import torch._dynamo.config as dynamo_config

    for key, value in DYNAMO_LIMITS.items():
        if hasattr(dynamo_config, key):
            setattr(dynamo_config, key, max(getattr(dynamo_config, key), value))
    if cuda_graphs:
        module.forward = _cloning(torch.compile(module.forward, mode="reduce-overhead", dynamic=False))
    else:
        module.compile(backend=backend or COMPILE_BACKEND, dynamic=False)


def _cloning(fn: Callable[..., Any]) -> Callable[..., Any]:
    def call(*args: Any, **kwargs: Any) -> Any:
        return tree_map_only(torch.Tensor, torch.clone, fn(*args, **kwargs))
    return call


def fsdp_shard(units: Sequence[ShardUnit], *, device_type: str, bf16: bool, replicate: bool = False) -> None:
    """fully_shard every block, then every root, over all ranks. With bf16, parameters are gathered and
    computed in bf16 while the sharded master weights stay fp32 and gradients are reduced in fp32.
    replicate: a (ranks x 1) mesh (HSDP with one rank per shard): every rank holds whole parameters and
    gradients are all-reduced, DistributedDataParallel's layout on FSDP2's hooks and gradient-sync control."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    ranks = dist.get_world_size()
    mesh = (init_device_mesh(device_type, (ranks, 1), mesh_dim_names=("replicate", "shard")) if replicate
            else init_device_mesh(device_type, (ranks,)))
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
