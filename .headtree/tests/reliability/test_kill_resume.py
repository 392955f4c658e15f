"""Kill and resume (issue 11, item 1): `kill -9` a training run inside an optimiser step, inside a checkpoint
write, between the stages and at random times; resuming gives bitwise the same training state, final
weights and metrics.jsonl (minus time_s) as an uninterrupted run. Checkpoints are never half-written, the
newest `checkpoint_keep` are kept, and the resumed run says which one it loaded.

The runs are `tiltflow train` in forked children (see conftest.Child): the same code path as the command
line, without paying a fresh interpreter's imports for every run."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from reliability_helpers import Child, assert_same_run, run_to_end

from tiltflow.storage import load

PAUSED = "tiltflow fault point: paused at"


def kill_at(fault: str, argv: list[str], log: Path) -> str:
    """Run until the fault point, kill -9 there; returns what the run printed."""
    child = Child(argv, log, fault)
    child.wait_for(PAUSED)
    child.kill()
    return child.text()


@pytest.mark.parametrize("fault", ["optimizer_step@3", "checkpoint_write@3", "after_loop"])
def test_kill_in_stage1_then_resume_is_bitwise_identical(fault, reference, train_args, tmp_path):
    run_dir = tmp_path / "s1"
    argv = train_args("ac_dmd", run_dir)
    kill_at(fault, argv, tmp_path / "killed.log")
    names = {p.name for p in run_dir.iterdir()}
    assert "final.pt" not in names  # killed before the end of the stage
    if fault == "checkpoint_write@3":
        # Killed between writing the temporary file and renaming it: checkpoint.pt is still step 2's, whole.
        assert any(n.startswith(".checkpoint.pt.") and n.endswith(".tmp") for n in names), names
        assert load(run_dir / "checkpoint.pt")["step"] == 2
    expected_step = {"optimizer_step@3": 3, "checkpoint_write@3": 2, "after_loop": 6}[fault]
    assert load(run_dir / "checkpoint.pt")["step"] == expected_step

    out = run_to_end(argv, tmp_path / "resumed.log")
    assert f"resumed from {run_dir / 'checkpoint.pt'} at step {expected_step}" in out
    assert not [p.name for p in run_dir.iterdir() if p.name.endswith(".tmp")]  # the torn write is cleaned up
    assert_same_run(run_dir, reference["ac_dmd"])


def test_kill_in_stage2_then_resume_is_bitwise_identical(reference, train_args, tmp_path):
    """The second stage starts from the first's final weights (init_from); a kill inside one of its
    optimiser steps (after the fake-score step, before the generator's) loses nothing either."""
    run_dir = tmp_path / "s2"
    argv = train_args("rtdmd", run_dir, f"init_from={reference['ac_dmd']}")
    kill_at("optimizer_step@4", argv, tmp_path / "killed.log")
    assert load(run_dir / "checkpoint.pt")["step"] == 4
    out = run_to_end(argv, tmp_path / "resumed.log")
    assert "at step 4" in out
    assert_same_run(run_dir, reference["rtdmd"])


def test_kills_at_random_times_then_resume(reference, train_args, tmp_path):
    """Three kills at seeded random times inside the training loop (each lands anywhere between the loop's
    start and its end: inside a step, inside a write, after the last checkpoint), each followed by a resume;
    then a resume to the end. The loop's duration is the reference run's last time_s."""
    run_dir = tmp_path / "s1"
    argv = train_args("ac_dmd", run_dir)
    loop_s = metrics_with_time(reference["ac_dmd"])[-1]["time_s"]
    rng = random.Random(11)
    for i in range(3):
        started = time.time()
        child = Child(argv, tmp_path / f"killed{i}.log")
        while child.proc.is_alive() and not in_loop(child, run_dir, started):
            time.sleep(0.001)
        time.sleep(rng.uniform(0.0, loop_s))
        child.kill(may_have_finished=True)  # the sleep may outlast the run
        if (run_dir / "checkpoint.pt").exists():
            load(run_dir / "checkpoint.pt")  # whatever the moment, the checkpoint on disk is a whole one
    run_to_end(argv, tmp_path / "resumed.log")
    assert_same_run(run_dir, reference["ac_dmd"])


def in_loop(child: Child, run_dir: Path, started: float) -> bool:
    """The child has reached the training loop: it resumed, or it logged its first step."""
    metrics = run_dir / "metrics.jsonl"
    return "resumed from" in child.text() or (metrics.exists() and metrics.stat().st_mtime >= started)


def metrics_with_time(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def test_keep_last_checkpoints_and_fall_back_from_a_corrupt_one(reference, train_args, tmp_path):
    """checkpoint_keep: 3 keeps checkpoint.pt and the 3 newest checkpoint-step<N>.pt; when checkpoint.pt is
    unreadable (a disk fault), the run resumes from the newest readable one and says so."""
    run_dir = tmp_path / "s1"
    argv = train_args("ac_dmd", run_dir, "checkpoint_keep=3")
    kill_at("optimizer_step@5", argv, tmp_path / "killed.log")
    kept = sorted(p.name for p in run_dir.iterdir() if p.name.startswith("checkpoint"))
    assert kept == ["checkpoint-step00000003.pt", "checkpoint-step00000004.pt", "checkpoint-step00000005.pt",
                    "checkpoint.pt"]
    assert os.path.samefile(run_dir / "checkpoint.pt", run_dir / "checkpoint-step00000005.pt")  # no extra space
    for step in (3, 4, 5):
        assert load(run_dir / f"checkpoint-step{step:08d}.pt")["step"] == step

    with open(run_dir / "checkpoint.pt", "r+b") as f:  # a torn file (same inode as step 5's link)
        f.truncate(100)
    out = run_to_end(argv, tmp_path / "resumed.log")
    assert "cannot be read" in out and "trying an older one" in out
    assert f"resumed from {run_dir / 'checkpoint-step00000004.pt'} at step 4" in out
    assert_same_run(run_dir, reference["ac_dmd"])
    kept = sorted(p.name for p in run_dir.iterdir() if p.name.startswith("checkpoint"))
    assert kept == ["checkpoint-step00000004.pt", "checkpoint-step00000005.pt", "checkpoint-step00000006.pt",
                    "checkpoint.pt"]


@pytest.mark.slow
def test_kill_the_command_line_process_inside_a_checkpoint_write(reference, train_args, tmp_path):
    """The same through a real `tiltflow train` process (a fresh interpreter, as a user runs it)."""
    run_dir = tmp_path / "s1"
    argv = [sys.executable, "-m", "tiltflow.cli", *train_args("ac_dmd", run_dir)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TILTFLOW_FAULT": "checkpoint_write@4"}
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    for line in proc.stderr:
        if PAUSED in line:
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    assert proc.returncode == -signal.SIGKILL
    assert load(run_dir / "checkpoint.pt")["step"] == 3
    env.pop("TILTFLOW_FAULT")
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert f"resumed from {run_dir / 'checkpoint.pt'} at step 3" in done.stderr
    assert_same_run(run_dir, reference["ac_dmd"])
