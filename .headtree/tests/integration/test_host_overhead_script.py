"""benchmarks/host_overhead.py runs end to end on the CPU and writes its numbers (one call per case)."""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "host_overhead.py"


def test_host_overhead_script_writes_every_case(tmp_path, monkeypatch):
    out = tmp_path / "host.json"
    monkeypatch.setattr(sys, "argv", [str(SCRIPT), "--calls", "1", "--repeats", "1", "--out", str(out)])
    runpy.run_path(str(SCRIPT), run_name="__main__")
    ms = json.loads(out.read_text())["ms"]
    assert set(ms) == {"forward_no_grad", "forward_grad", "forward_backward", "generator_forward", "switch_pair"}
    assert all(v > 0 for k, v in ms.items() if k != "switch_pair")  # a difference of two timings may be < 0
