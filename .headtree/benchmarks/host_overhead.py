"""Host time per transformer pass, measured on the CPU with a narrow SD3.5 (`--arch narrow_sd35`: SD3.5-M's 24
blocks, dual attention and LoRA layout at tiny widths), where the arithmetic takes a few milliseconds and the
rest of a pass is the host's own work: what a GPU waits for when the host cannot run ahead of it.

Prints, in milliseconds per call (median of --repeats rounds of --calls calls each): a forward without
gradient, a forward with gradient, a forward + backward, and a pair of role switches (generator forward, fake
forward, minus the two forwards alone: what switching the LoRA adapters costs). Run it at two commits, one
after the other on the same machine, to compare host work (e.g. from a git worktree of the older commit):

    python benchmarks/host_overhead.py --compile none --out host.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from tiltflow import bench
from tiltflow.distributed import fsdp


def _time(fn, calls: int) -> float:
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) / calls * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--compile", choices=["none", "blocks", "model"], default="none",
                   help="blocks / model: torch.compile each block / the whole transformer with --backend "
                        "(inductor on the CPU compiles for minutes on a small machine)")
    p.add_argument("--backend", default="inductor", help="torch.compile's backend with --compile blocks "
                   "(aot_eager: dynamo and AOTAutograd with eager kernels, compiles in seconds on a CPU)")
    p.add_argument("--skip-guard-eval", action="store_true", help="with --compile model: also time the no-grad "
                   "forwards under torch.compiler.set_stance(skip_guard_eval_unsafe=True) (cases *_noguards), "
                   "interleaved with the others")
    p.add_argument("--calls", type=int, default=10)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: the host's own work, not BLAS)")
    p.add_argument("--out", type=Path, default=None, help="also write the numbers as JSON")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.skip_guard_eval and args.compile != "model":
        p.error("--skip-guard-eval needs --compile model (as tiltflow bench)")
    fsdp.COMPILE_BACKEND = args.backend
    bp = argparse.ArgumentParser()
    bench.add_arguments(bp)
    b = bench.build(bp.parse_args(["--arch", "narrow_sd35", "--device", "cpu", "--resolution", "32", "--batch", "2",
                                   "--no-activation-checkpointing", "--compile", args.compile, "--out", "unused"]),
                    stage2=False)
    g = torch.Generator().manual_seed(0)
    x, sigma = torch.randn(2, *b.task.sample_shape, generator=g), torch.full((2,), 0.5)
    cond = b.adapter.encode(["a red cat", "a blue dog"])
    fake, gen = b.models.fake_role, b.models.generator_role

    def forward(role, grad: bool = False):
        with torch.set_grad_enabled(grad):
            return role.velocity(x, sigma, cond)

    cases = {"forward_no_grad": lambda: forward(fake), "forward_grad": lambda: forward(fake, True),
             "forward_backward": lambda: forward(fake, True).sum().backward(),
             "generator_forward": lambda: forward(gen), "switch_pair": lambda: (forward(gen), forward(fake))}
    if args.skip_guard_eval:
        cases.update(forward_no_grad_noguards=bench.without_guards(lambda: forward(fake)),
                     generator_forward_noguards=bench.without_guards(lambda: forward(gen)))
    for fn in cases.values():  # warm (and compile)
        fn(), fn()
    rounds: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(args.repeats):  # interleaved, so that a busy moment of the machine hits every case
        for name, fn in cases.items():
            rounds[name].append(_time(fn, args.calls))
    ms = {k: statistics.median(v) for k, v in rounds.items()}
    ms["switch_pair"] -= ms["forward_no_grad"] + ms["generator_forward"]
    for name, value in ms.items():
        print(f"{name:18s} {value:8.2f} ms")
    if args.out:
        args.out.write_text(json.dumps({"compile": args.compile, "backend": args.backend if args.compile != "none"
                                        else None, "threads": args.threads, "calls": args.calls,
                                        "repeats": args.repeats, "ms": ms, "rounds_ms": rounds}, indent=1))


if __name__ == "__main__":
    main()
