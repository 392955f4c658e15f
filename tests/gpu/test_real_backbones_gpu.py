"""Real backbones on CUDA (WORLDS.md section 3): the bf16-autocast path of the adapters agrees with the stock
pipeline, and a full-size SD3.5-M with random weights runs one stage-1 and one stage-2 iteration at 512 px
through benchmarks/real_backbones.py. Skipped without CUDA (tests/conftest.py and the skipif below).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from bench_scripts import load_benchmark

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

def _bench_main():
    return load_benchmark("real_backbones").main


@pytest.mark.parametrize("family", ["sd3", "flux2"])
def test_bf16_adapter_matches_pipeline_on_cuda(family):
    from tiltflow.models.adapters.flux2 import Flux2Adapter
    from tiltflow.models.adapters.sd3 import SD3Adapter
    from tiltflow.sampling import NoisePlan, sample

    cls, arch = {"sd3": (SD3Adapter, "tiny_sd3"), "flux2": (Flux2Adapter, "tiny_flux2")}[family]
    adapter = cls.random(arch, seed=0, device="cuda")
    assert adapter.precision.base_dtype == torch.bfloat16 and adapter.precision.autocast
    cond = adapter.encode(["a red cat", "a blue dog"])
    x_init = torch.randn(2, *adapter.latent_shape(32, 32), generator=torch.Generator().manual_seed(0)).cuda()
    out = adapter.pipe(height=32, width=32, num_inference_steps=4, latents=adapter.to_pipeline_latents(x_init),
                       output_type="latent", **adapter.pipeline_kwargs(cond)).images
    theirs = adapter.from_pipeline_latents(out, 32, 32)
    ours = sample(lambda x, s: adapter.velocity(x, s, cond), adapter.pipe.scheduler.sigmas.tolist(),
                  NoisePlan(init=x_init, steps=[None] * 4), eta=0.0).final
    assert torch.isfinite(ours).all()
    assert (ours - theirs).abs().max() < 0.1  # bf16 compute on both sides, different casting points


ARCHS = ["sd3_medium", "sd35_medium", "flux1_dev", "flux2_klein_4b", "flux2_klein_9b"]


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHS)
def test_full_size_stage1_and_stage2_step(arch, tmp_path):
    """One stage-1 cycle (10 fake + 1 generator update, batch 4) and one stage-2 rollout batch (a group of 8)
    of each supported architecture at full size with random weights, 512 px, default settings (shared LoRA
    layout, activation checkpointing, the adapter's default attention backend). TILTFLOW_GPU_RESULTS names a
    folder to keep each JSON result in (benchmarks/results/ holds the committed ones)."""
    import os

    out = Path(os.environ.get("TILTFLOW_GPU_RESULTS", tmp_path)) / f"full_size_{arch}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    assert _bench_main()(["--arch", arch, "--layouts", "shared", "--out", str(out)]) == 0
    row = json.loads(out.read_text())["results"][0]
    assert "error" not in row, row
    for stage in ("stage1", "stage2_rollout_batch"):
        assert row[stage]["finite"], (stage, row)
        assert row[stage]["peak_mem_gib"] < 139, (stage, row)  # fits one H200
