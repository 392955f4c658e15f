"""Real backbones on CUDA (WORLDS.md section 3): the bf16-autocast path of the adapters agrees with the stock
pipeline, and a full-size SD3.5-M with random weights runs one stage-1 and one stage-2 iteration at 512 px
through benchmarks/real_backbones.py. Skipped without CUDA (tests/conftest.py and the skipif below).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "real_backbones.py"


def _bench_main():
    spec = importlib.util.spec_from_file_location("real_backbones", BENCH)
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    return module.main


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


@pytest.mark.slow
def test_full_size_sd35_iterations(tmp_path):
    out = tmp_path / "bench.json"
    rc = _bench_main()(["--arch", "sd35_medium", "--layouts", "shared", "--n-fake", "1", "--stage1-batch", "1",
                        "--stage2-group", "2", "--out", str(out)])
    assert rc == 0
    row = json.loads(out.read_text())["results"][0]
    assert "error" not in row, row
    for stage in ("stage1", "stage2_rollout_batch"):
        assert row[stage]["finite"] and row[stage]["peak_mem_gib"] < 75
