"""Helpers of the reliability tests: `tiltflow train` in a forked child that a test can kill, and bitwise
comparisons of run directories."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import sys
import time
from pathlib import Path

import torch

from tiltflow.storage import load


# ---- a `tiltflow train` that can be killed --------------------------------------------------------------
def _child(argv: list[str], log: str, fault: str | None) -> None:
    """The body of the forked child: `tiltflow train` with stdout and stderr in `log`."""
    out = open(log, "w", buffering=1)  # noqa: SIM115 - lives as long as the child
    os.dup2(out.fileno(), 1)
    os.dup2(out.fileno(), 2)
    sys.stdout = sys.stderr = out
    if fault is None:
        os.environ.pop("TILTFLOW_FAULT", None)
    else:
        os.environ["TILTFLOW_FAULT"] = fault
    torch.set_num_threads(1)
    from tiltflow.cli import main

    code = main(argv)
    out.flush()
    os._exit(code)


class Child:
    """`tiltflow train` in a forked child (the test process has imported torch already, so it starts in
    milliseconds rather than the seconds a fresh interpreter takes); `kill()` is `kill -9`."""

    def __init__(self, argv: list[str], log: Path, fault: str | None = None):
        self.log = log
        self.proc = multiprocessing.get_context("fork").Process(target=_child, args=(argv, str(log), fault))
        self.proc.start()

    def text(self) -> str:
        return self.log.read_text() if self.log.exists() else ""

    def wait_for(self, marker: str, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while marker not in self.text():
            assert self.proc.is_alive() or marker in self.text(), f"child ended before {marker!r}:\n{self.text()}"
            assert time.monotonic() < deadline, f"no {marker!r} after {timeout_s} s:\n{self.text()}"
            time.sleep(0.01)

    def kill(self, may_have_finished: bool = False) -> None:
        """kill -9; with may_have_finished, a child that ended by itself just before is accepted too."""
        try:
            os.kill(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.join(10)
        allowed = (-signal.SIGKILL, 0) if may_have_finished else (-signal.SIGKILL,)
        assert self.proc.exitcode in allowed, (self.proc.exitcode, self.text())

    def join(self, timeout_s: float = 120.0) -> int:
        self.proc.join(timeout_s)
        assert self.proc.exitcode is not None, f"child still running after {timeout_s} s:\n{self.text()}"
        return self.proc.exitcode


def run_to_end(argv: list[str], log: Path) -> str:
    """`tiltflow train` in a child, to the end; returns its output (asserting exit code 0)."""
    child = Child(argv, log)
    code = child.join()
    assert code == 0, child.text()
    return child.text()


# ---- comparing runs ------------------------------------------------------------------------------------
def assert_bitwise(a, b, where: str = "") -> None:
    """Same structure, same tensors (dtype and every bit), same numbers and strings."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, where
        # Compare the bytes: NaN == NaN and -0.0 != 0.0, as bitwise equality means.
        assert torch.equal(_bytes(a), _bytes(b)), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), (where, sorted(a), sorted(b))
        for k in a:
            assert_bitwise(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_bitwise(x, y, f"{where}[{i}]")
    else:
        assert a == b or (a != a and b != b), (where, a, b)


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)


def metrics_without_time(run_dir: Path) -> list[dict]:
    """metrics.jsonl without time_s (wall-clock time differs between runs, everything else must not)."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [{k: v for k, v in r.items() if k != "time_s"} for r in records]


def assert_same_run(got: Path, want: Path) -> None:
    """Two finished stage runs are the same: training state, final weights, final metrics, metrics.jsonl."""
    assert_bitwise(load(got / "checkpoint.pt"), load(want / "checkpoint.pt"), "checkpoint")
    assert_bitwise(load(got / "final.pt"), load(want / "final.pt"), "final")
    assert json.loads((got / "final_metrics.json").read_text()) == json.loads((want / "final_metrics.json").read_text())
    assert metrics_without_time(got) == metrics_without_time(want)
