"""Process-group set-up for `torchrun`: one process per GPU (or per CPU worker with gloo), on one node or
several; torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) says the rest."""

from __future__ import annotations

import os
import sys
from typing import NoReturn

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


def finish_process(code: int) -> NoReturn:
    """End this process with exit status `code`. A process that joined a process group (a torchrun rank)
    destroys the group and ends at once (os._exit), after flushing its output, without the interpreter's
    finalization; any other exits normally (sys.exit).

    Why: gloo's worker threads drop a finished collective's work object just after signalling its
    completion, and that object's captured thread-local state can hold Python objects, whose release needs
    the GIL. A rank that reaches interpreter finalization inside that window aborts in the worker thread
    ("terminate called without an active exception", SIGABRT: take_gil -> pthread_exit during finalization,
    seen in a core dump under torch 2.13), so torchrun reports the job failed after all its work was done:
    2 of 275 runs of the 2-rank job of tests/distributed/dcp_toy.py on 2 CPU cores.
    destroy_process_group does not join those threads while DTensor caches keep the group alive. Every file
    tiltflow writes is closed (and atomically renamed) before this point, so skipping finalization loses
    nothing."""
    import logging

    import torch.distributed as dist

    from tiltflow.distributed.state import in_process_group

    if not in_process_group():
        sys.exit(code)
    dist.destroy_process_group()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
