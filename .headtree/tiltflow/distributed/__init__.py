"""What the algorithms need to know about other ranks: a Comm (gather, reduce, agree on a flag)."""

from tiltflow.distributed.comm import LOCAL, Comm, LocalComm, ReplicatedDataComm, TorchComm

__all__ = ["LOCAL", "Comm", "LocalComm", "ReplicatedDataComm", "TorchComm"]
