"""Checkpoints of a sharded (FSDP2) run: the trainable state gathered to full tensors, written by rank 0
as one atomic file, and loaded on any number of ranks (each rank takes its shards back). A checkpoint saved
on N ranks therefore loads on M, and on one process.

The trainable state of LoRA training is small (adapters, their optimiser moments, the EMA), so gathering it
is cheap; the frozen base is never written (it is the pretrained model)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tiltflow.algorithms.common import TrainState
from tiltflow.distributed import Comm
from tiltflow.distributed.state import barrier, full_tensor
from tiltflow.storage import load, save_atomic


class ShardedCheckpointer:
    def __init__(self, run_dir: Path, comm: Comm, modules: Mapping[str, nn.Module], state: TrainState,
                 name: str = "checkpoint.pt"):
        self.path = Path(run_dir) / name
        self.comm, self.modules, self.state = comm, dict(modules), state
        self.optims = {"generator": state.gen_opt, "fake": state.fake_opt}

    def exists(self) -> bool:
        return self.path.exists()

    def describe(self) -> str:
        return f"{self.path} (trainable state gathered from {self.comm.world_size} ranks)"

    def save(self, state: dict[str, Any]) -> None:
        """Everything but `state["step"]` is taken from the modules and optimisers themselves (full tensors)."""
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
        full = {"step": state["step"], "sharded": True,
                "model": {r: get_model_state_dict(m, options=opts) for r, m in self.modules.items()},
                "optim": {r: get_optimizer_state_dict(self.modules[r], o, options=opts)
                          for r, o in self.optims.items()},
                "ema": {"decay": self.state.ema.decay, "shadow": [full_tensor(s).cpu() for s in self.state.ema.shadow]}}
        if self.comm.rank == 0:
            save_atomic(full, self.path)
        barrier()

    def load(self) -> dict[str, Any]:
        """Load the full state into this rank's shards; returns {"step": ...} for the loop (the model and
        optimiser states are already in place)."""
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        full = load(self.path)
        opts = StateDictOptions(full_state_dict=True, strict=False)
        for role, module in self.modules.items():
            set_model_state_dict(module, full["model"][role], options=opts)
            set_optimizer_state_dict(module, self.optims[role], full["optim"][role], options=opts)
        with torch.no_grad():
            for shadow, saved in zip(self.state.ema.shadow, full["ema"]["shadow"]):
                if hasattr(shadow, "device_mesh"):
                    from torch.distributed.tensor import distribute_tensor

                    saved = distribute_tensor(saved.to(shadow.device), shadow.device_mesh, shadow.placements)
                shadow.copy_(saved)
        return {"step": full["step"], "model": None, "algo": None}
