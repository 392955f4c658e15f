"""`tiltflow bench` under torchrun on 2 CPU processes (gloo, tiny SD3): it shards as training does, times each
iteration between barriers, gathers every rank's peak memory and collective time, counts every rank's images,
and rank 0 alone writes the JSON and the profile summaries (an audit hook on Python's open records what each
rank opened for writing)."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from write_audit import WRITE_AUDIT

from tiltflow.bench import collective_time, union_us

TORCHRUN = Path(sys.executable).with_name("torchrun")
K, N_FAKE, BATCH = 4, 2, 2

SCRIPT = WRITE_AUDIT + """
from tiltflow.cli import main
rc = main(sys.argv[1:])
with open(f"rank{os.environ['RANK']}.json", "w") as f:
    json.dump({"rc": rc, "writes": writes}, f)
from tiltflow.distributed.launch import finish_process
finish_process(0)
"""


@pytest.mark.slow  # ~1-2 min on 2 busy cores
@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
def test_bench_on_two_gloo_ranks(tmp_path):
    (tmp_path / "run.py").write_text(SCRIPT)
    out = tmp_path / "out" / "bench.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    torchrun = str(TORCHRUN) if TORCHRUN.exists() else shutil.which("torchrun") or "torchrun"
    # With activation checkpointing (the default), as training runs (test_fsdp_checkpointing.py pins it).
    cmd = [torchrun, "--standalone", "--nproc-per-node", "2", "run.py", "bench", "--arch", "tiny_sd3",
           "--resolution", "32", "--stage", "all", "--batch", str(BATCH), "--n-fake", str(N_FAKE), "--num-steps",
           str(K), "--repeats", "2", "--warmup", "1", "--device", "cpu", "--profile", "--out",
           str(out)]
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          start_new_session=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["rc"] for r in ranks] == [0, 0]
    out_dir = os.path.realpath(out.parent)
    written = [{p for p in r["writes"] if p.startswith(out_dir)} for r in ranks]
    assert os.path.realpath(out) in written[0] and any(p.endswith(".md") for p in written[0])
    assert written[1] == set()  # rank 1 wrote neither the JSON nor a profile summary

    report = json.loads(out.read_text())
    assert report["provenance"]["world_size"] == 2 and report["provenance"]["backend"] == "gloo"
    assert report["settings"]["world_size"] == "2"
    assert report["provenance"]["command"].startswith("tiltflow bench ")
    runs = {(r["stage"], r["batch"]): r for r in report["runs"]}
    assert sorted(runs) == [("1", BATCH), ("2", BATCH), ("infer", 1), ("infer", BATCH)]
    images = {("1", BATCH): (N_FAKE + 1) * BATCH, ("2", BATCH): BATCH, ("infer", 1): 1, ("infer", BATCH): BATCH}
    for (stage, batch), run in runs.items():
        key = {"1": "cycle_s", "2": "iter_s", "infer": "latency_s"}[stage]
        assert run["world_size"] == 2
        assert all(math.isfinite(v) and v > 0 for v in run[f"{key}_all"]) and len(run[f"{key}_all"]) == 2
        assert run["peak_mem_gib_per_rank"] == [None, None] and run["peak_mem_gib"] is None  # CPU: not measured
        # Throughput counts both ranks' images: twice one rank's, over rank 0's median time.
        assert run["images_per_s_per_gpu"] == pytest.approx(images[(stage, batch)] / run[key])
        assert run["images_per_s"] == pytest.approx(2 * run["images_per_s_per_gpu"])
        coll = run["profile"]["collectives"]
        assert coll["device_s"] is None and len(coll["cpu_s_per_rank"]) == 2
        assert all(0 < v <= run["profile"]["wall_s"] * 1.5 for v in coll["cpu_s_per_rank"])
        names = {r["name"] for r in coll["by_name"]}
        assert "gloo:all_gather" in names and not any("barrier" in n for n in names)
    # The sharded run runs the passes of a one-process run (each rank its own data, the same structure):
    # each fake update one DSM pass at B, back-propagated, and one consistency pass at 2B without a graph
    # (consistency_grad: anchor, the default).
    stage1 = {(p["component"], p["name"], p["batch"], p["grad"]): p for p in runs[("1", BATCH)]["passes"]}
    assert stage1[("transformer", "fake", BATCH, True)]["backwards"] == [N_FAKE, N_FAKE]
    assert stage1[("transformer", "fake", 2 * BATCH, False)]["calls"] == [N_FAKE, N_FAKE]
    assert stage1[("transformer", "fake", 2 * BATCH, False)]["backwards"] == [0, 0]
    assert stage1[("transformer", "generator", BATCH, True)]["calls"] == [1, 1]
    # Stage 2 reduce-scatters the gradients of its one optimiser step.
    names2 = {r["name"] for r in runs[("2", BATCH)]["profile"]["collectives"]["by_name"]}
    assert any("reduce_scatter" in n for n in names2), names2


def test_union_counts_overlaps_once():
    assert union_us([]) == 0.0
    assert union_us([(0.0, 10.0), (2.0, 5.0), (8.0, 12.0), (20.0, 21.0)]) == 13.0


def test_collective_time_counts_named_ops_and_not_barriers():
    """A CPU profile of an op named like a collective, nested in another, beside a barrier and a matmul: the
    union covers the outer region only; the barrier and the matmul are not counted."""
    import time

    from torch.profiler import ProfilerActivity, profile, record_function

    x = torch.randn(64, 64)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        with record_function("FSDP::all_gather (test)"):
            with record_function("gloo:all_gather"):
                time.sleep(0.02)
        with record_function("gloo:barrier"):
            time.sleep(0.05)
        x @ x
    c = collective_time(prof, cuda=False)
    names = {r["name"] for r in c["by_name"]}
    assert names == {"FSDP::all_gather (test)", "gloo:all_gather"}
    outer = next(r["cpu_s"] for r in c["by_name"] if r["name"] == "FSDP::all_gather (test)")
    # The union is the outer region alone (the barrier's 0.05 s is not in it); no upper bound on the time
    # itself: a busy machine stretches a 0.02 s sleep (0.077 s seen in a clean-clone CI run).
    assert c["cpu_s"] == pytest.approx(outer) and c["cpu_s"] >= 0.02
    assert c["device_s"] is None and c["ops"] == 2
