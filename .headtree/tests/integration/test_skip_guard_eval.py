"""`tiltflow bench --skip-guard-eval` (issue 8: host time of 4-step inference at batch 1): the timed inference
runs under torch.compiler.set_stance(skip_guard_eval_unsafe=True), where dynamo runs only the guards that tell
its cached graphs apart.

What could go wrong is the "unsafe" part: in the shared LoRA layout the generator and the fake score run the
same compiled blocks with other adapters active, so a guard that is skipped must never make one role run the
other's graph. The check is exact: a compiled graph run twice on the same inputs gives the same bits, so every
role's velocity under the stance must equal, bitwise, its velocity under the default stance. Backend aot_eager,
as in test_compile_blocks.py (inductor compiles for minutes on this CPU); the guards are dynamo's either way.

Compiled blocks (--compile blocks) do not work under the stance: SD3's last block has no context output, its
cache entry differs from the other blocks' by a guard on that missing module, and torch stopped with
"Recompilation triggered with skip_guard_eval_unsafe stance" on the first call (torch 2.13, CPU). So the bench
asks for --compile model (one graph per role and shape), and refuses the rest by name."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

import tiltflow.distributed.fsdp as fsdp
from tiltflow import bench
from tiltflow.cli import main


@pytest.fixture(autouse=True)
def _aot_eager(monkeypatch):
    monkeypatch.setattr(fsdp, "COMPILE_BACKEND", "aot_eager")
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_roles_keep_their_own_graphs_without_guard_evaluation():
    p = argparse.ArgumentParser()
    bench.add_arguments(p)
    b = bench.build(p.parse_args(["--arch", "tiny_sd3", "--device", "cpu", "--resolution", "32", "--batch", "2",
                                  "--no-activation-checkpointing", "--compile", "model", "--out", "unused"]),
                    stage2=False)
    g = torch.Generator().manual_seed(0)
    x, sigma = torch.randn(2, *b.task.sample_shape, generator=g), torch.full((2,), 0.5)
    cond = b.adapter.encode(["a red cat", "a blue dog"])
    roles = {"generator": b.models.generator_role, "fake": b.models.fake_role, "teacher": b.models.teacher_role}
    # Make the adapters matter: a fresh LoRA starts as the identity (B = 0), so give every LoRA weight a value.
    with torch.no_grad():
        for _, prm in b.models.generator_named + b.models.fake_named:
            prm.add_(0.1 * torch.randn(prm.shape, generator=g))

    def velocity(name):
        with torch.no_grad():
            return roles[name].velocity(x, sigma, cond)

    ref = {name: velocity(name) for name in roles}  # compiles each role's graphs
    ref = {name: velocity(name) for name in roles}
    assert not torch.equal(ref["generator"], ref["fake"]) and not torch.equal(ref["fake"], ref["teacher"])
    skipped = bench.without_guards(velocity)
    for name in ["fake", "generator", "teacher", "generator", "fake", "teacher"]:
        assert torch.equal(skipped(name), ref[name]), name


@pytest.mark.slow  # ~5 s on 2 cores
def test_bench_inference_with_skip_guard_eval(tmp_path):
    out = tmp_path / "b.json"
    assert main(["bench", "--arch", "tiny_sd3", "--resolution", "32", "--stage", "infer", "--batch", "1",
                 "--num-steps", "4", "--repeats", "2", "--warmup", "1", "--device", "cpu", "--compile", "model",
                 "--skip-guard-eval", "--skip-pass-timing", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["settings"]["skip_guard_eval"] == "True"
    runs = {(r["stage"], r["batch"]): r for r in report["runs"]}
    assert sorted(runs) == [("infer", 1)] and runs[("infer", 1)]["latency_s"] > 0


@pytest.mark.parametrize("compile_", ["none", "blocks"])
def test_skip_guard_eval_needs_a_compiled_model(tmp_path, capsys, compile_):
    rc = main(["bench", "--arch", "tiny_sd3", "--stage", "infer", "--device", "cpu", "--skip-guard-eval",
               "--compile", compile_, "--out", str(tmp_path / "b.json")])
    assert rc == 2 and f"--skip-guard-eval needs --compile model, got --compile {compile_}" in capsys.readouterr().err
    assert not (tmp_path / "b.json").exists()
