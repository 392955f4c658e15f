"""Where the host waits for the GPU in a stage-1 cycle and in 4-step sampling (issue 8: no host synchronisation
inside the loop). Every synchronising call is caught with torch.cuda.set_sync_debug_mode("warn"), which
warns at each one (a blocking copy to or from the device, .item(), .tolist(), torch.cuda.synchronize ...)
with the Python line that made it.

A stage-1 cycle may wait only where it has to read a value: the finite-value guard of each update (one read
of its losses and gradient norm) and the step's metrics (one read). Noise and the timesteps it draws on the
host reach the device through pinned memory, without a wait; the sampler decides on the host whether a step
is stochastic. Sampling waits once, for the images it returns to the host. Skipped without CUDA.
"""

from __future__ import annotations

import argparse
import traceback
import warnings
from collections import Counter

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _built(arch="tiny_sd3", *extra):
    from tiltflow import bench

    p = argparse.ArgumentParser()
    bench.add_arguments(p)
    args = p.parse_args([*extra, "--arch", arch, "--device", "cuda", "--resolution", "32", "--batch", "2",
                         "--n-fake", "3", "--guidance-scale", "4.5", "--batched-cfg", "--no-activation-checkpointing",
                         "--out", "unused.json"])
    return bench, args, bench.build(args, stage2=False)


def _syncs(fn) -> Counter:
    """Where fn synchronises: for each synchronising call, the innermost frame outside torch (package
    folder/file, line, source), counted."""
    seen: Counter = Counter()

    def record(message, category, filename, lineno, file=None, line=None):
        if "called a synchronizing" not in str(message):
            return
        frames = [f for f in traceback.extract_stack()[:-1]
                  if "/torch/" not in f.filename and not f.filename.endswith("warnings.py")]
        f = frames[-1]
        seen["/".join(f.filename.split("/")[-2:]), f.lineno, f.line] += 1

    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")  # outside the recording: the H200 run counted one warning here
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = record
            fn()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return seen


def test_stage1_cycle_waits_only_for_the_guard_and_the_metrics():
    bench, args, b = _built()
    algo = bench.algorithm("1", b, args)
    algo.step(0)  # warm: caches, allocator
    syncs = _syncs(lambda: algo.step(1))
    assert {where for where, _, _ in syncs} <= {"algorithms/common.py"}, f"host waits elsewhere: {dict(syncs)}"
    # One guard read per update (n_fake fake updates + 1 generator update) and one metrics read.
    assert sum(syncs.values()) == args.n_fake + 2, dict(syncs)


def test_stage1_cycle_with_the_check_once_per_step_waits_twice():
    """nonfinite_check = step: the finite guard reads every update's values once, at the end of the step; the
    cycle then waits only for that read and the metrics."""
    bench, args, b = _built("tiny_sd3", "--nonfinite-check", "step")
    algo = bench.algorithm("1", b, args)
    algo.step(0)
    syncs = _syncs(lambda: algo.step(1))
    assert {where for where, _, _ in syncs} <= {"algorithms/common.py"}, f"host waits elsewhere: {dict(syncs)}"
    assert sum(syncs.values()) == 2, dict(syncs)


# FLUX.2: its position ids were copied from pageable host memory on every pass (two waits a pass, 8 of the 9
# stream synchronisations of batch-1 inference on the H200, 2026-12-04) until they were made once per shape.
@pytest.mark.parametrize("arch", ["tiny_sd3", "tiny_flux2"])
def test_sampling_waits_once_for_the_images(arch):
    from tiltflow.flow.conventions import few_step_sigmas
    from tiltflow.sampling import NoisePlan, sample

    _, _, b = _built(arch)
    cond = b.adapter.encode(["a red cat", "a blue dog"])
    sigmas = few_step_sigmas(b.sampler.num_steps, b.sampler.shift)
    g = torch.Generator().manual_seed(0)

    def once():
        with torch.no_grad():
            plan = NoisePlan.fresh(2, b.task.sample_shape, b.sampler.num_steps, g, device=b.task.device)
            x = sample(lambda x, s: b.roles.generator.velocity(x, s, cond), sigmas, plan, eta=b.sampler.eta).final
            return (b.task.decode(x) * 255).round().to(torch.uint8).cpu()

    once()
    syncs = _syncs(once)
    assert sum(syncs.values()) == 1, dict(syncs)
