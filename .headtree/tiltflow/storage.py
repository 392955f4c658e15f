"""Atomic, weights-only file I/O for checkpoints and final weights: write to a temporary file in the same
folder, fsync, then rename, so a file is either the old one or the new one, never half-written.

Loading uses torch.load(weights_only=True): a checkpoint holds tensors, numbers, strings and dicts only.

`fault_point` lets the reliability tests (tests/reliability) stop a process at a chosen place, e.g. inside a
checkpoint write, so that a `kill -9` lands there every time; it does nothing unless TILTFLOW_FAULT is set.
"""

from __future__ import annotations

import os
import pickle
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

FAULT_ENV = "TILTFLOW_FAULT"


def fault_point(where: str, step: int | None = None) -> None:
    """Test hook: when TILTFLOW_FAULT is `where` or `where@step`, announce it on stderr and sleep (the test
    kills the process there). Places: checkpoint_write (temporary file written, not yet renamed),
    checkpoint_shards (several ranks: every rank's shards in the temporary directory, not yet committed),
    optimizer_step (inside an iteration, after its first optimiser step), after_loop (last checkpoint written,
    final weights not yet)."""
    wanted = os.environ.get(FAULT_ENV)
    if not wanted or wanted not in (where, f"{where}@{step}"):
        return
    print(f"tiltflow fault point: paused at {where} (step {step}), pid {os.getpid()}", file=sys.stderr, flush=True)
    time.sleep(float(os.environ.get("TILTFLOW_FAULT_PAUSE_S", "60")))


def save_atomic(obj: Any, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        fault_point("checkpoint_write", obj.get("step") if isinstance(obj, dict) else None)
        os.replace(tmp, path)
        fsync_dir(path.parent)  # the rename itself survives a power cut
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def fsync_dir(folder: Path) -> None:
    """fsync a directory, so that a rename inside it survives a power cut (not possible everywhere)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # a platform without directory handles: the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class UnsafeFileError(pickle.UnpicklingError):
    """A file that holds more than tensors, numbers, strings and containers: refused, never unpickled."""


# What load() raises on a torn, truncated or damaged file. UnsafeFileError (a foreign file) is one of them:
# callers that fall back to an older checkpoint re-raise it first.
UNREADABLE = (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError)


def load(path: str | Path, map_location: str | torch.device = "cpu") -> Any:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UnsafeFileError(f"refusing to load {str(path)!r}: it holds objects other than tensors, numbers, "
                              f"strings and containers, and only weights-only loads are allowed ({first})") from err
