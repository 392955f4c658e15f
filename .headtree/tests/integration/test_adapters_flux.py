"""FLUX.1 adapter against stock diffusers on a tiny random FLUX.1-dev-style model (WORLDS.md section 3).

Pins 2x2 packing, the timestep convention (timestep = sigma, x1000 inside), guidance as an input, the
VAE scaling/shift and the dynamic-shift few-step grid (mu from the resolution).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline
from diffusers.pipelines.flux.pipeline_flux import calculate_shift

from tiltflow.flow.conventions import few_step_sigmas
from tiltflow.models.adapters.flux import FluxAdapter, pack_2x2, unpack_2x2
from tiltflow.sampling import NoisePlan, sample

PROMPTS = ["a red cat on a street", "a blue square"]


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    folder = tmp_path_factory.mktemp("flux1")
    FluxAdapter.random("tiny_flux1", seed=0).pipe.save_pretrained(folder)
    return FluxAdapter.from_pretrained(str(folder), max_sequence_length=16, guidance=3.5)


def _run(adapter, guidance: float, output_type: str = "latent"):
    adapter.guidance = guidance
    cond = adapter.encode(PROMPTS)
    x_init = torch.randn(len(PROMPTS), *adapter.latent_shape(32, 32), generator=torch.Generator().manual_seed(2))
    out = adapter.pipe(height=32, width=32, num_inference_steps=4, latents=adapter.to_pipeline_latents(x_init),
                       output_type=output_type, **adapter.pipeline_kwargs(cond)).images
    sigmas = adapter.pipe.scheduler.sigmas.tolist()
    ours = sample(lambda x, s: adapter.velocity(x, s, cond), sigmas, NoisePlan(init=x_init, steps=[None] * 4),
                  eta=0.0).final
    return out, ours


def test_pack_unpack_match_diffusers():
    x = torch.randn(2, 4, 8, 6)
    packed = FluxPipeline._pack_latents(x, 2, 4, 8, 6)
    assert torch.equal(pack_2x2(x), packed)
    assert torch.equal(unpack_2x2(packed, 8, 6), x)
    assert torch.equal(FluxPipeline._unpack_latents(packed, 16, 12, 2), x)  # pipeline sizes are in pixels


@pytest.mark.parametrize("guidance", [3.5, 1.0])
def test_sampler_reproduces_pipeline(adapter, guidance):
    out, ours = _run(adapter, guidance)
    theirs = adapter.from_pipeline_latents(out, 32, 32)
    assert theirs.abs().max() > 0.1
    torch.testing.assert_close(ours, theirs, atol=2e-5, rtol=1e-5)


def test_guidance_is_an_input(adapter):
    cond = adapter.encode(PROMPTS[:1])
    x = torch.randn(1, *adapter.latent_shape(32, 32))
    s = torch.tensor([0.6])
    v_a = adapter.forward(adapter.transformer, x, s, cond, guidance=1.0)
    v_b = adapter.forward(adapter.transformer, x, s, cond, guidance=5.0)
    assert (v_a - v_b).abs().max() > 1e-4


def test_decode_matches_pipeline(adapter):
    images, ours = _run(adapter, 3.5, output_type="pt")
    torch.testing.assert_close(adapter.decode(ours), images.float(), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("resolution", [32, 512, 1024])
def test_dynamic_shift_grid_matches_scheduler(adapter, resolution):
    sched = adapter.pipe.scheduler
    seq_len = (resolution // 16) ** 2 if resolution > 32 else (32 // 4) ** 2  # packed tokens
    cfg = sched.config
    mu = calculate_shift(seq_len, cfg.base_image_seq_len, cfg.max_image_seq_len, cfg.base_shift, cfg.max_shift)
    sched.set_timesteps(sigmas=np.linspace(1.0, 0.25, 4), mu=mu)
    k = adapter.sigma_shift(resolution, resolution, 4) if resolution == 32 else math.exp(mu)
    grid = few_step_sigmas(4, k)
    torch.testing.assert_close(torch.tensor(grid, dtype=torch.float64), sched.sigmas.double(), atol=1e-6, rtol=0)
    if resolution == 32:
        assert k == pytest.approx(math.exp(mu))


def test_full_size_shift_from_arch():
    """FLUX.1-dev at 512 px: 1024 tokens, mu = 0.5 + 0.65 * 768 / 3840 = 0.63."""
    mu = calculate_shift(1024, 256, 4096, 0.5, 1.15)
    assert mu == pytest.approx(0.63)
