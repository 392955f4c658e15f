"""Kill and resume on 2 ranks (torchrun, gloo, CPU): `kill -9` of the whole job inside the write of a
distributed checkpoint (tiltflow/training/sharded_checkpoint.py) leaves the previous checkpoint loadable, and
resuming on 2 ranks gives bitwise the same training state (every tensor of the DCP checkpoint and its
tiltflow.pt record), final weights and metrics.jsonl (minus time_s) as an uninterrupted 2-rank run. Two places:

- checkpoint_shards: every rank's shards of step 2 are in checkpoint-dcp/.step00000002.tmp, not committed.
  The test then tears that directory further (rank 1's shard file truncated, the metadata gone), as a kill
  earlier in the write would leave it;
- checkpoint_write: step00000002 is renamed into place, but checkpoint.pt (the commit record) is still being
  replaced (its temporary file written, not yet renamed).

Slow: every torchrun starts fresh interpreters."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from reliability_helpers import assert_bitwise, metrics_without_time

from tiltflow.storage import load
from tiltflow.training.sharded_checkpoint import FOLDER, read_checkpoint

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not torch.distributed.is_available(),
                                                   reason="torch.distributed is not available")]

TORCHRUN = Path(sys.executable).with_name("torchrun")


def torchrun(cwd: Path, args: list[str], fault: str | None = None) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("TILTFLOW_FAULT", None)
    if fault:
        env["TILTFLOW_FAULT"] = fault
    cmd = [str(TORCHRUN) if TORCHRUN.exists() else shutil.which("torchrun") or "torchrun", "--standalone",
           "--nproc-per-node", "2", "-m", "tiltflow.cli", "train", *args]
    return subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # its own process group: killed as a whole


def finish(proc: subprocess.Popen) -> str:
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    return out


def common(tiny_yaml: Path, teacher_run: Path) -> list[str]:
    # Both ranks on rank 0's data: stage 1 draws its random stop step from each rank's own stream, so with
    # their own data the ranks would run different numbers of sharded forwards (a collective mismatch).
    return [f"--config={tiny_yaml}", "stage=ac_dmd", f"teacher_run={teacher_run}", "stage1.num_iters=4",
            "parallel.same_data_on_every_rank=true"]


@pytest.fixture(scope="module")
def straight(tiny_yaml, teacher_run, tmp_path_factory) -> Path:
    """The uninterrupted 2-rank run."""
    root = tmp_path_factory.mktemp("straight")
    finish(torchrun(root, [*common(tiny_yaml, teacher_run), f"run_dir={root / 'run'}"]))
    return root / "run"


def kill_at(fault: str, cwd: Path, args: list[str]) -> str:
    """Start the job with the fault point set, kill -9 its whole process group once a rank announces the
    pause; returns the output so far."""
    proc = torchrun(cwd, args, fault=fault)
    assert proc.stdout is not None
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if f"tiltflow fault point: paused at {fault.partition('@')[0]}" in line:
            break
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(30)
    time.sleep(0.2)
    return "".join(seen)


@pytest.mark.parametrize("fault", ["checkpoint_shards@2", "checkpoint_write@2"])
def test_kill_two_ranks_inside_the_checkpoint_write_then_resume(fault, straight, tiny_yaml, teacher_run, tmp_path):
    run_dir = tmp_path / "killed"
    args = [*common(tiny_yaml, teacher_run), f"run_dir={run_dir}"]
    seen = kill_at(fault, tmp_path, args)
    left = sorted(p.name for p in (run_dir / FOLDER).iterdir())
    record = load(run_dir / "checkpoint.pt")
    assert record["step"] == 1 and record["dirs"] == ["step00000001"], (record, seen[-3000:])  # the previous one
    if fault.startswith("checkpoint_shards"):
        assert left == [".step00000002.tmp", "step00000001"], left
        torn = run_dir / FOLDER / ".step00000002.tmp"
        with open(torn / "__1_0.distcp", "r+b") as f:
            f.truncate(10)
        (torn / ".metadata").unlink()
    else:
        assert left == ["step00000001", "step00000002"], left  # complete, but not committed
        assert list(run_dir.glob(".checkpoint.pt.*.tmp"))  # the interrupted replacement of the record
    tensors, meta = read_checkpoint(run_dir)  # the previous checkpoint is whole
    assert meta["loop"]["step"] == 1 and any(k.startswith("optim/") for k in tensors)

    out = finish(torchrun(tmp_path, args))
    assert f"resumed from {run_dir / FOLDER / 'step00000001'}" in out and "at step 1" in out
    assert sorted(p.name for p in (run_dir / FOLDER).iterdir()) == ["step00000004"]  # leftovers removed
    assert not list(run_dir.glob(".checkpoint.pt.*.tmp"))
    got, got_meta = read_checkpoint(run_dir)
    want, want_meta = read_checkpoint(straight)
    assert_bitwise(got, want, "checkpoint")
    assert_bitwise(got_meta, want_meta, "checkpoint record")
    assert_bitwise(load(run_dir / "final.pt"), load(straight / "final.pt"), "final")
    assert metrics_without_time(run_dir) == metrics_without_time(straight)
