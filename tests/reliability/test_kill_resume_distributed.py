"""Kill and resume on 2 ranks (torchrun, gloo, CPU): `kill -9` of the whole job while rank 0 is inside the
write of the gathered checkpoint (tiltflow/training/sharded_checkpoint.py) leaves the previous checkpoint
whole, and resuming on 2 ranks gives bitwise the same training state, final weights and metrics.jsonl (minus
time_s) as an uninterrupted 2-rank run. Slow: every torchrun starts fresh interpreters."""

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


def test_kill_two_ranks_inside_the_checkpoint_write_then_resume(tiny_yaml, teacher_run, tmp_path):
    # Both ranks on rank 0's data: stage 1 draws its random stop step from each rank's own stream, so with
    # their own data the ranks would run different numbers of sharded forwards (a collective mismatch).
    common = [f"--config={tiny_yaml}", "stage=ac_dmd", f"teacher_run={teacher_run}", "stage1.num_iters=4",
              "parallel.same_data_on_every_rank=true"]
    straight = torchrun(tmp_path, [*common, f"run_dir={tmp_path / 'straight'}"])
    run_dir = tmp_path / "killed"
    proc = torchrun(tmp_path, [*common, f"run_dir={run_dir}"], fault="checkpoint_write@2")
    assert proc.stdout is not None
    seen = []
    for line in proc.stdout:  # rank 0 announces the pause inside the write; rank 1 waits at the barrier
        seen.append(line)
        if "tiltflow fault point: paused at checkpoint_write" in line:
            break
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(30)
    time.sleep(0.2)
    assert (run_dir / "checkpoint.pt").exists(), (sorted(p.name for p in run_dir.iterdir()), "".join(seen)[-3000:])
    assert load(run_dir / "checkpoint.pt")["step"] == 1  # the previous checkpoint, whole
    assert any(p.name.endswith(".tmp") for p in run_dir.iterdir())  # the interrupted write

    out = finish(torchrun(tmp_path, [*common, f"run_dir={run_dir}"]))
    assert "at step 1" in out
    finish(straight)
    assert_bitwise(load(run_dir / "checkpoint.pt"), load(tmp_path / "straight" / "checkpoint.pt"), "checkpoint")
    assert_bitwise(load(run_dir / "final.pt"), load(tmp_path / "straight" / "final.pt"), "final")
    assert metrics_without_time(run_dir) == metrics_without_time(tmp_path / "straight")
