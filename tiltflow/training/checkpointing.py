"""Where the loop's training state goes: one interface (save, load, exists), so the storage can change
(one atomic file for one process; a distributed checkpoint across ranks) without touching the loop.

A state is {"step": completed iterations, "model": the trainable modules' state, "algo": optimisers and
EMA}. Everything random is drawn from (seed, rank, step, salt) streams, so step alone resumes the data
position and the RNG exactly."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

from tiltflow.storage import load, save_atomic


class Checkpointer(Protocol):
    def exists(self) -> bool: ...

    def save(self, state: dict[str, Any]) -> None: ...

    def load(self) -> dict[str, Any]: ...

    def describe(self) -> str: ...


class FileCheckpointer:
    """run_dir/checkpoint.pt, written atomically (temporary file, fsync, rename) and loaded weights-only."""

    def __init__(self, run_dir: Path, name: str = "checkpoint.pt"):
        self.path = Path(run_dir) / name

    def exists(self) -> bool:
        return self.path.exists()

    def save(self, state: dict[str, Any]) -> None:
        save_atomic(state, self.path)

    def load(self) -> dict[str, Any]:
        return load(self.path)

    def describe(self) -> str:
        return str(self.path)
