"""Process-group set-up for `torchrun`: one process per GPU (or per CPU worker with gloo), on one node or
several; torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) says the rest."""

from __future__ import annotations

import os

import torch

from tiltflow.distributed.comm import LOCAL, Comm, TorchComm


def init_distributed(device: str) -> Comm:
    """Under torchrun with WORLD_SIZE > 1: initialise the default process group (NCCL on CUDA, gloo on
    CPU) and give this process its GPU (LOCAL_RANK); otherwise the single-process LocalComm."""
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 and not dist.is_initialized():
        return LOCAL
    if not dist.is_initialized():
        cuda = device.startswith("cuda")
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if cuda else "gloo")
    return TorchComm()
