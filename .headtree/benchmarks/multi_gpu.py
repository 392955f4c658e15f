"""Multi-GPU scaling of `tiltflow bench` (issue 12): for one architecture, each stage asked and each GPU count
asked, run the bench with one plain process (count 1: the 1-GPU baseline, no sharding) and under
`torchrun --standalone --nproc-per-node N` (FSDP2 as training shards), all in this one call, then write one
summary: throughput (images/s over all ranks), scaling efficiency = throughput_N / (N x throughput_1) against
the count-1 run of this same call (when --gpus includes 1), peak memory per GPU (max over ranks, and the
list), and the time spent in collectives from the profiler (profiled by default; see
tiltflow.bench.collective_time).

    python benchmarks/multi_gpu.py --arch sd35_medium --stage 1 --gpus 1 2 4 --out-dir $OUT -- \
        --resolution 512 --batch 9 --seed 42 --repeats 2 --warmup 1

Everything after `--` goes to every `tiltflow bench` call unchanged (the per-GPU batch is --batch). NVLink
multicast stays off in every run: NCCL_NVLS_ENABLE=0 and TORCH_SYMM_MEM_DISABLE_MULTICAST=1 are set here,
whatever the caller's environment says. On the CPU (--device cpu, a tiny_* arch, gloo) this rehearses the
commands; the times it measures say nothing about GPUs, and the summary says so.

Writes <out-dir>/bench_<arch>_s<stage>_n<N>.json per run and <out-dir>/<summary>.json and .md.
`--merge A.json B.json ... --into C.json` puts several calls' summaries in one file (C.json and C.md), each
call keeping its own count-1 baseline.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

SECONDS_KEY = {"1": "cycle_s", "2": "iter_s"}
REHEARSAL_NOTE = ("CPU/gloo rehearsal of the issue-12 commands on tiny random models: it checks that the runs, "
                  "the sharding and the summary work; its times are not a performance result and say nothing "
                  "about GPU scaling")


def bench_command(n: int, args: argparse.Namespace, stage: str, out: Path) -> list[str]:
    bench = ["bench", "--arch", args.arch, "--stage", stage, "--device", args.device, "--out", str(out)]
    bench += (["--profile"] if args.profile else []) + args.bench_args
    if n == 1:
        return [sys.executable, "-m", "tiltflow.cli", *bench]
    here = Path(sys.executable).with_name("torchrun")
    torchrun = str(here) if here.exists() else shutil.which("torchrun") or "torchrun"
    return [torchrun, "--standalone", "--nproc-per-node", str(n), "-m", "tiltflow.cli", *bench]


def environment() -> dict[str, str]:
    env = {**os.environ, "NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1"}
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("HF_HUB_OFFLINE", "1")
    return env


def run_one(n: int, args: argparse.Namespace, stage: str) -> dict[str, Any]:
    """One bench run; its row for the summary (or the error that stopped it)."""
    out = args.out_dir / f"bench_{args.arch}_s{stage}_n{n}.json"
    out.unlink(missing_ok=True)
    cmd = bench_command(n, args, stage, out)
    print(f"[multi_gpu] {' '.join(cmd)}", flush=True)
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, env=environment(), capture_output=True, text=True, timeout=args.timeout,
                              start_new_session=True)
        rc, tail = proc.returncode, (proc.stdout[-1500:] + proc.stderr[-1500:])
    except subprocess.TimeoutExpired:
        rc, tail = 124, f"timed out after {args.timeout} s"
    wall = time.perf_counter() - t0
    row: dict[str, Any] = {"arch": args.arch, "stage": stage, "gpus": n, "rc": rc, "run_wall_s": round(wall, 1),
                           "file": out.name, "command": " ".join(cmd)}
    report = json.loads(out.read_text()) if out.exists() else None
    runs = [r for r in (report or {}).get("runs", []) if r.get("stage") == stage]
    if rc != 0 or not runs or "error" in runs[0]:
        row["error"] = runs[0]["error"] if runs and "error" in runs[0] else tail.strip()[-1500:]
        return row
    r = runs[0]
    world = r.get("world_size", 1)
    if world != n:
        row["error"] = f"the bench ran on {world} ranks, not {n}"
        return row
    per_rank = r.get("peak_mem_gib_per_rank", [r["peak_mem_gib"]])
    coll = (r.get("profile") or {}).get("collectives")
    row.update(batch_per_gpu=r["batch"], global_batch=r["batch"] * n, seconds=r[SECONDS_KEY[stage]],
               seconds_min=r[SECONDS_KEY[stage] + "_min"], seconds_max=r[SECONDS_KEY[stage] + "_max"],
               images_per_s=r["images_per_s"], peak_mem_gib=r["peak_mem_gib"], peak_mem_gib_per_rank=per_rank,
               profiled_wall_s=(r.get("profile") or {}).get("wall_s"),
               collective_cpu_s=coll["cpu_s"] if coll else None,  # one process: no collectives to count
               collective_cpu_s_max_rank=max(coll["cpu_s_per_rank"]) if coll else None,
               collective_device_s=coll["device_s"] if coll else None,
               collective_device_s_max_rank=(max(coll["device_s_per_rank"]) if coll and coll["device_s"] is not None
                                             else None),
               provenance=report["provenance"])
    return row


def with_efficiency(rows: list[dict[str, Any]]) -> None:
    """Scaling efficiency of each row against the count-1 row of the same stage in this call."""
    base = {r["stage"]: r["images_per_s"] for r in rows if r["gpus"] == 1 and "error" not in r}
    for r in rows:
        one = base.get(r["stage"])
        ok = "error" not in r and one
        r["speedup"] = r["images_per_s"] / one if ok else None
        r["scaling_efficiency"] = r["images_per_s"] / (r["gpus"] * one) if ok else None


def fmt(v: Any, spec: str = ".3g") -> str:
    return "-" if v is None else format(v, spec)


def markdown(summary: dict[str, Any]) -> str:
    lines = [f"# {summary['title']}", "", summary["note"], "",
             f"{summary['date_utc']}; device {summary['device']}; bench settings: `{' '.join(summary['bench_args'])}`",
             "", "| arch | stage | ranks (GPUs) | batch per rank | seconds (median; min-max) | images/s (all ranks) "
             "| speedup | scaling efficiency | peak GiB per rank (max; each) | collectives s (rank 0: CPU; device) "
             "| run wall s |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in summary["runs"]:
        if "error" in r:
            err = r["error"].replace("|", "/").replace("\n", " ")[-160:]
            lines.append(f"| {r['arch']} | {r['stage']} | {r['gpus']} | - | error (rc {r['rc']}): {err} | | | | | "
                         f"| {r['run_wall_s']} |")
            continue
        per_rank = ", ".join(fmt(v) for v in r["peak_mem_gib_per_rank"])
        lines.append(f"| {r['arch']} | {r['stage']} | {r['gpus']} | {r['batch_per_gpu']} | {r['seconds']:.4g} "
                     f"({r['seconds_min']:.4g}-{r['seconds_max']:.4g}) | {r['images_per_s']:.4g} | "
                     f"{fmt(r['speedup'])} | {fmt(r['scaling_efficiency'])} | {fmt(r['peak_mem_gib'])} "
                     f"({per_rank}) | {fmt(r['collective_cpu_s'], '.3f')}; {fmt(r['collective_device_s'], '.3f')} "
                     f"| {r['run_wall_s']} |")
    return "\n".join(lines) + "\n"


def merge(paths: list[Path], into: Path, title: str | None) -> int:
    calls = [json.loads(Path(p).read_text()) for p in paths]
    kinds = sorted({c["kind"] for c in calls})
    merged = {"title": title or "; ".join(c["title"] for c in calls), "kind": ", ".join(kinds),
              "note": " / ".join(sorted({c["note"] for c in calls})), "calls": calls}
    into.parent.mkdir(parents=True, exist_ok=True)
    into.write_text(json.dumps(merged, indent=1) + "\n")
    text = [f"# {merged['title']}", "", merged["note"], ""] + [markdown(c).split("\n", 2)[2] for c in calls]
    into.with_suffix(".md").write_text("\n".join(text))
    print("\n".join(text))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    given = list(argv)
    if argv[:1] == ["--merge"]:
        m = argparse.ArgumentParser(description="merge summaries of several calls")
        m.add_argument("--merge", nargs="+", type=Path, required=True)
        m.add_argument("--into", type=Path, required=True)
        m.add_argument("--title", default=None)
        a = m.parse_args(argv)
        return merge(a.merge, a.into, a.title)
    bench_args = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", required=True)
    p.add_argument("--stage", nargs="+", choices=["1", "2"], default=["1", "2"])
    p.add_argument("--gpus", nargs="+", type=int, default=[1, 2], help="process counts, run in increasing order; "
                   "scaling efficiency needs 1 among them (leave it out only where one GPU cannot hold the run)")
    p.add_argument("--device", default="cuda", help="cuda (NCCL) or cpu (gloo, tiny_* archs: the rehearsal)")
    p.add_argument("--out-dir", type=Path, required=True)
    p.add_argument("--summary", default=None, help="summary file stem (default multi_gpu_<arch>)")
    p.add_argument("--no-profile", dest="profile", action="store_false",
                   help="skip the profiled iteration (then no collective times)")
    p.add_argument("--timeout", type=float, default=580.0, help="seconds per bench run")
    args = p.parse_args(argv)
    args.bench_args = bench_args
    counts = sorted(set(args.gpus))
    args.out_dir.mkdir(parents=True, exist_ok=True)
    rows = [run_one(n, args, stage) for stage in args.stage for n in counts]
    with_efficiency(rows)
    cpu = args.device == "cpu"
    summary = {"title": f"tiltflow bench on 1 to {max(counts)} {'CPU processes' if cpu else 'GPUs'}: {args.arch}",
               "note": REHEARSAL_NOTE if cpu else "Scaling efficiency = images/s on N GPUs / (N x images/s on 1 "
               "GPU), both from this call; seconds are rank 0's, between barriers (the slowest rank's).",
               "kind": "rehearsal (CPU, gloo)" if cpu else "measurement",
               "date_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "device": args.device,
               "driver_command": " ".join(["python", "benchmarks/multi_gpu.py", *given]), "bench_args": bench_args,
               "environment": {k: environment()[k] for k in ("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST",
                                                             "OMP_NUM_THREADS")},
               "collectives_counted": "per run, rank 0's union of the host intervals (collective_cpu_s) and of the "
                                      "device kernel intervals (collective_device_s, CUDA) of profiled ops whose "
                                      "name contains nccl, gloo, all_gather, allgather, reduce_scatter, all_reduce, "
                                      "allreduce or broadcast (not barrier), in one extra profiled iteration",
               "runs": rows}
    stem = args.summary or f"multi_gpu_{args.arch}"
    (args.out_dir / f"{stem}.json").write_text(json.dumps(summary, indent=1) + "\n")
    (args.out_dir / f"{stem}.md").write_text(markdown(summary))
    print(markdown(summary))
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
