"""Where the loop's training state goes: one interface (save, load, exists), so the storage can change
(one atomic file for one process; a distributed checkpoint across ranks) without touching the loop.

A state is {"step": completed iterations, "model": the trainable modules' state, "algo": optimisers and
EMA}. Everything random is drawn from (seed, rank, step, salt) streams, so step alone resumes the data
position and the RNG exactly."""

from __future__ import annotations

import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from tiltflow.storage import UNREADABLE, UnsafeFileError, load, save_atomic


class Checkpointer(Protocol):
    def exists(self) -> bool: ...

    def save(self, state: dict[str, Any]) -> None: ...

    def load(self) -> dict[str, Any]: ...

    def describe(self) -> str: ...


class CheckpointError(RuntimeError):
    """A checkpoint could not be written (disk full, no permission) after the configured retries."""


def write_with_retries(write: Callable[[], None], what: str, failures: type[Exception] | tuple[type[Exception], ...],
                       retries: int, wait_s: float, warn: Callable[[str], None]) -> None:
    """write(); on one of `failures`, retried `retries` times `wait_s` apart (each failure warned), then
    CheckpointError naming `what` (the checkpoint) and the reason."""
    for attempt in range(retries + 1):
        try:
            write()
            return
        except failures as err:
            message = f"cannot write checkpoint {what}: {getattr(err, 'strerror', None) or err}"
            if attempt == retries:
                raise CheckpointError(f"{message}; gave up after {attempt + 1} attempt(s) (checkpoint_retries = "
                                      f"{retries}); the previous checkpoint is intact") from err
            warn(f"{message}; retrying in {wait_s:g} s ({attempt + 1}/{retries})")
            time.sleep(wait_s)


class FileCheckpointer:
    """run_dir/checkpoint.pt, written atomically (temporary file, fsync, rename) and loaded weights-only.

    keep > 1 also keeps the newest `keep` checkpoints as checkpoint-step<N>.pt (hard links, so the newest
    costs no extra space); if checkpoint.pt cannot be read, load() falls back to the newest of those that
    can. A failed write is retried `retries` times, `retry_wait_s` apart, then raises CheckpointError; the
    previous checkpoint is never touched by a failed write."""

    def __init__(self, run_dir: Path, name: str = "checkpoint.pt", *, keep: int = 1, retries: int = 0,
                 retry_wait_s: float = 10.0, warn: Callable[[str], None] | None = None):
        if keep < 1 or retries < 0 or retry_wait_s < 0:
            raise ValueError(f"need keep >= 1, retries >= 0, retry_wait_s >= 0; got {keep}, {retries}, {retry_wait_s}")
        self.path = Path(run_dir) / name
        self.keep, self.retries, self.retry_wait_s = keep, retries, retry_wait_s
        self.warn = warn or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self.loaded: Path | None = None
        self._remove_temporaries()

    def exists(self) -> bool:
        return self.path.exists() or bool(self.history())

    def history(self) -> list[Path]:
        """The kept checkpoint-step<N>.pt files, newest first."""
        stem, suffix = self.path.stem, self.path.suffix
        found = []
        for p in self.path.parent.glob(f"{stem}-step*{suffix}"):
            digits = p.name[len(stem) + len("-step"):-len(suffix) or None]
            if digits.isdigit():
                found.append((int(digits), p))
        return [p for _, p in sorted(found, reverse=True)]

    def save(self, state: dict[str, Any]) -> None:
        write_with_retries(lambda: save_atomic(state, self.path), f"{self.path} (step {state.get('step')})",
                           OSError, self.retries, self.retry_wait_s, self.warn)
        if self.keep > 1:
            self._keep_history(int(state["step"]))

    def load(self) -> dict[str, Any]:
        """The newest readable checkpoint; `self.loaded` says which file it was."""
        candidates = ([self.path] if self.path.exists() else []) + self.history()
        errors = []
        for path in candidates:
            try:
                state = load(path)
            except UnsafeFileError:  # not a torn file but a foreign one: refuse, do not look for another
                raise
            except UNREADABLE as err:
                errors.append(f"{path.name}: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
                self.warn(f"checkpoint {path} cannot be read ({errors[-1]}); trying an older one")
                continue
            self.loaded = path
            return state
        raise CheckpointError(f"no readable checkpoint in {self.path.parent}: " + "; ".join(errors))

    def describe(self) -> str:
        return str(self.loaded or self.path)

    def _keep_history(self, step: int) -> None:
        """checkpoint-step<step>.pt is a hard link to the new checkpoint.pt; the oldest beyond `keep` go."""
        link = self.path.with_name(f"{self.path.stem}-step{step:08d}{self.path.suffix}")
        tmp = link.with_name(f".{link.name}.tmp")
        try:
            if tmp.exists():
                tmp.unlink()
            try:
                os.link(self.path, tmp)
            except OSError:  # a filesystem without hard links: a copy
                shutil.copyfile(self.path, tmp)
            os.replace(tmp, link)
        except OSError as err:  # the new checkpoint itself is written; an older one just is not kept
            self.warn(f"cannot keep {link.name} ({err}); checkpoint.pt is written")
            return
        for old in self.history()[self.keep:]:
            old.unlink(missing_ok=True)

    def _remove_temporaries(self) -> None:
        """Temporary files of writes a killed process never finished."""
        for tmp in self.path.parent.glob(f".{self.path.stem}*.tmp"):
            tmp.unlink(missing_ok=True)
