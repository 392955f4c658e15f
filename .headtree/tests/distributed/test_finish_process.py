"""How a process ends (tiltflow.distributed.launch.finish_process, the `tiltflow` command's exit): a torchrun
rank destroys its process group and ends at once with its exit status, its buffered output flushed and the
interpreter's finalization skipped (where gloo's worker threads can abort it); a process without a group
exits normally. Each case runs in a fresh interpreter: a 1-rank gloo group over a file store stands in for a
torchrun rank (the exit path does not depend on the rank count)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")

SCRIPT = """
import atexit, sys
import torch.distributed as dist
from tiltflow.distributed.launch import finish_process
atexit.register(lambda: print("|finalized", end=""))
if sys.argv[1] == "group":
    dist.init_process_group("gloo", init_method="file://" + sys.argv[2], rank=0, world_size=1)
    t = dist.all_reduce(__import__("torch").ones(3), async_op=True)  # a collective just before the end
    t.wait()
print("written", end="")  # no newline: still in the pipe's buffer unless the exit flushes it
finish_process(int(sys.argv[3]))
"""


def run(tmp_path, mode: str, code: int) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", SCRIPT, mode, str(tmp_path / "store"), str(code)],
                          capture_output=True, text=True, timeout=120)


def test_a_rank_ends_with_its_status_its_output_flushed_without_finalization(tmp_path):
    out = run(tmp_path, "group", 3)
    assert out.returncode == 3, out.stderr[-2000:]
    assert out.stdout == "written"  # flushed; the atexit handler did not run: no finalization
    assert "Traceback" not in out.stderr and "terminate called" not in out.stderr


def test_a_process_without_a_group_exits_normally(tmp_path):
    out = run(tmp_path, "plain", 4)
    assert out.returncode == 4, out.stderr[-2000:]
    assert out.stdout == "written|finalized"


def test_a_rank_whose_command_raises_prints_the_traceback_and_ends_with_1(tmp_path):
    script = ("import atexit, sys\nimport torch.distributed as dist\nfrom tiltflow import cli\n"
              "atexit.register(lambda: print('|finalized', end=''))\n"
              "dist.init_process_group('gloo', init_method='file://' + sys.argv[1], rank=0, world_size=1)\n"
              "cli.main = lambda: 1 / 0\ncli.run()\n")
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path / "store")], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 1, out.stderr[-2000:]
    assert "ZeroDivisionError" in out.stderr and "Traceback" in out.stderr
    assert out.stdout == ""  # no finalization


def test_the_command_ends_through_it(monkeypatch):
    """`tiltflow` (and `python -m tiltflow.cli`) is cli.run: main's exit status, through finish_process."""
    from tiltflow import cli

    monkeypatch.setattr(cli, "main", lambda: 7)
    with pytest.raises(SystemExit) as exc:
        cli.run()
    assert exc.value.code == 7


def test_without_a_group_an_exception_propagates(monkeypatch):
    from tiltflow import cli

    def boom() -> int:
        raise ZeroDivisionError("from main")

    monkeypatch.setattr(cli, "main", boom)
    with pytest.raises(ZeroDivisionError, match="from main"):
        cli.run()
