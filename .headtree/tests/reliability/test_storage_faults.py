"""Storage faults during a checkpoint write (issue 11, item 2): a full disk or a write without permission
gives a one-line error naming the file, the step and the cause (exit code 1); the previous checkpoint stays
intact (no temporary file left); with checkpoint_retries the write is retried, and a run whose retry
succeeds is bitwise the run that never failed."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from reliability_helpers import Child, assert_same_run

from tiltflow import storage
from tiltflow.storage import load


def run(argv: list[str], log: Path) -> tuple[int, str]:
    child = Child(argv, log)
    return child.join(), child.text()


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("error:")]


def assert_previous_checkpoint_intact(run_dir: Path, step: int) -> None:
    assert load(run_dir / "checkpoint.pt")["step"] == step
    assert not [p.name for p in run_dir.iterdir() if p.name.endswith(".tmp")]


def fail_checkpoint_writes(monkeypatch, err: OSError, *, from_step: int, times: int | None = None) -> list[int]:
    """torch.save inside save_atomic writes half of a checkpoint of step >= from_step, then raises `err`
    (a disk that fills up mid-write); `times` failures at most (counted in the process that writes)."""
    real_save = storage.torch.save
    failed: list[int] = []

    def half_then_fail(obj, f, *args, **kwargs):
        step = obj.get("step", 0) if isinstance(obj, dict) else 0
        if step >= from_step and (times is None or len(failed) < times):
            failed.append(step)
            real_save(obj, f, *args, **kwargs)
            f.truncate(f.tell() // 2)
            raise err
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(storage.torch, "save", half_then_fail)
    return failed


def test_disk_full_mid_write_stops_with_a_clear_error(monkeypatch, train_args, tmp_path):
    run_dir = tmp_path / "s1"
    fail_checkpoint_writes(monkeypatch, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), from_step=3)
    code, out = run(train_args("ac_dmd", run_dir), tmp_path / "log")  # the child inherits the patched save
    assert code == 1
    (line,) = error_lines(out)
    assert f"cannot write checkpoint {run_dir / 'checkpoint.pt'} (step 3): No space left on device" in line
    assert "gave up after 1 attempt(s) (checkpoint_retries = 0)" in line
    assert "Traceback" not in out
    assert_previous_checkpoint_intact(run_dir, 2)


def test_write_without_permission_stops_with_a_clear_error(monkeypatch, train_args, tmp_path):
    """The temporary file cannot be created (the folder refuses writes from step 3 on)."""
    run_dir = tmp_path / "s1"
    real_mkstemp = tempfile.mkstemp
    calls: list[str] = []

    def mkstemp(*args, **kwargs):
        if kwargs.get("prefix") == ".checkpoint.pt.":
            calls.append("checkpoint")
            if len(calls) >= 3:
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(kwargs.get("dir")))
        return real_mkstemp(*args, **kwargs)

    monkeypatch.setattr(storage.tempfile, "mkstemp", mkstemp)
    code, out = run(train_args("ac_dmd", run_dir), tmp_path / "log")
    assert code == 1
    (line,) = error_lines(out)
    assert f"cannot write checkpoint {run_dir / 'checkpoint.pt'} (step 3): Permission denied" in line
    assert "Traceback" not in out
    assert_previous_checkpoint_intact(run_dir, 2)


def test_retries_then_success_is_the_same_run(monkeypatch, reference, train_args, tmp_path):
    run_dir = tmp_path / "s1"
    fail_checkpoint_writes(monkeypatch, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), from_step=3,
                                    times=2)
    code, out = run(train_args("ac_dmd", run_dir, "checkpoint_retries=2", "checkpoint_retry_wait_s=0"),
                    tmp_path / "log")
    assert code == 0, out
    assert out.count("retrying in 0 s") == 2
    assert_same_run(run_dir, reference["ac_dmd"])
    assert "(step 3)" in out and "(1/2)" in out and "(2/2)" in out


def test_retries_exhausted_stop_the_run(monkeypatch, train_args, tmp_path):
    run_dir = tmp_path / "s1"
    fail_checkpoint_writes(monkeypatch, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), from_step=4)
    code, out = run(train_args("ac_dmd", run_dir, "checkpoint_retries=1", "checkpoint_retry_wait_s=0"),
                    tmp_path / "log")
    assert code == 1
    (line,) = error_lines(out)
    assert "(step 4): No space left on device; gave up after 2 attempt(s) (checkpoint_retries = 1)" in line
    assert_previous_checkpoint_intact(run_dir, 3)


@pytest.fixture
def tiny_tmpfs(tmp_path):
    """A real 256 KiB filesystem (tmpfs), where a disk really fills up; needs root (mount)."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    yield mnt
    subprocess.run(["umount", str(mnt)], check=True)


def test_a_really_full_disk_keeps_the_previous_checkpoint_and_resumes(tiny_tmpfs, reference, train_args, tmp_path):
    """Free space for one checkpoint but not two: the first write succeeds, the second (which needs room
    for the new file next to the old one) hits ENOSPC. After space is freed, resuming finishes the run
    exactly as if nothing had happened."""
    ckpt_bytes = (reference["ac_dmd"] / "checkpoint.pt").stat().st_size
    run_dir = tiny_tmpfs / "s1"
    filler = tiny_tmpfs / "filler"
    stat = os.statvfs(tiny_tmpfs)
    free = stat.f_bavail * stat.f_frsize
    room = ckpt_bytes + 32 * 1024  # one checkpoint, config.yaml and metrics.jsonl; not a second checkpoint
    assert free > room, (free, room)
    filler.write_bytes(b"\0" * (free - room))

    code, out = run(train_args("ac_dmd", run_dir), tmp_path / "full.log")
    assert code == 1, out
    (line,) = error_lines(out)
    assert "(step 2): No space left on device" in line, line
    assert_previous_checkpoint_intact(run_dir, 1)

    filler.unlink()
    code, out = run(train_args("ac_dmd", run_dir), tmp_path / "resumed.log")
    assert code == 0, out
    assert f"resumed from {run_dir / 'checkpoint.pt'} at step 1" in out
    assert_same_run(run_dir, reference["ac_dmd"])
