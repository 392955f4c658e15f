"""Several `tiltflow train` runs in one torchrun job, one after the other on the same 2 gloo ranks: each run is
`tiltflow.cli.main(["train", *argv])` (what `torchrun -m tiltflow.cli train ...` runs), so the job pays for
one start of fresh interpreters (several seconds on 2 cores) instead of one per run. The job stops at the
first run that does not exit 0."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

TORCHRUN = Path(sys.executable).with_name("torchrun")

SCRIPT = """
import json, sys
from tiltflow.cli import main
from tiltflow.distributed.launch import finish_process
for argv in json.loads(sys.argv[1]):
    code = main(["train", *argv])
    if code != 0:
        finish_process(code)
finish_process(0)
"""


def torchrun_train(cwd: Path, *runs: list[str]) -> None:
    """Run each argv of `runs` (the arguments after `tiltflow train`) in turn in one 2-rank torchrun job."""
    script = cwd / "train_runs.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("TILTFLOW_FAULT", None)
    cmd = [str(TORCHRUN) if TORCHRUN.exists() else shutil.which("torchrun") or "torchrun", "--standalone",
           "--nproc-per-node", "2", str(script), json.dumps([list(r) for r in runs])]
    out = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=300 * len(runs),
                         start_new_session=True)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
