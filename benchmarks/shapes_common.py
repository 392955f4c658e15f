"""What the shapes diagnostic scripts share (imported by them as a sibling module: run them as
`python benchmarks/<script>.py`): the stage-2 starting point built from a config and a stage-1 run, and writing
a result with its provenance (shapes_results.py's table too)."""

from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch


def stage2_start(config: Path, run: Path, device: str, seed: int, overrides: Sequence[str] = ()) -> tuple[Any, Any]:
    """(run config, world setup) of a shapes stage-2 config started from the stage-1 run `run` (init_from): the
    generator is that run's, its fresh stage-2 LoRA still zero. Nothing is written outside a temporary folder."""
    from tiltflow.worlds.registry import get_world, load_run_config

    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_run_config(config, [f"device={device}", f"init_from={run}", f"run_dir={tmp}", f"seed={seed}",
                                       *overrides])
        return cfg, get_world(cfg.world)().build(cfg, progress=False)


def cpu_name() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo) and its core count; the architecture where none is given."""
    name = platform.processor() or platform.machine()
    info = Path("/proc/cpuinfo")
    if info.is_file():
        lines = info.read_text().splitlines()
        names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
        name = names[0] if names else name
    return f"{name}, {os.cpu_count()} cores"


def provenance() -> dict[str, str]:
    """How a result was made: the command as typed (quoted), the time, the commit, the host, its CPU, the GPU if
    one is used, and torch."""
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return {"command": shlex.join(["python", *sys.argv]),
            "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "commit": commit, "host": platform.node(), "cpu": cpu_name(), "gpu": gpu, "torch": torch.__version__}


def write_result(out: Path | None, result: dict[str, Any]) -> None:
    """`result` plus its provenance() as JSON at `out` (nothing when None)."""
    if out is None:
        return
    out.write_text(json.dumps({**result, "provenance": provenance()}, indent=1) + "\n")
