"""CPSScheduler (METHOD.md section 2) inside stock diffusers pipelines.

eta = 0 reproduces FlowMatchEulerDiscreteScheduler on the few-step grid; eta > 0 reproduces tiltflow's
own sampler given the same noise; the grid follows the static shift (SD3) or the pipeline's mu (FLUX).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tiltflow.flow.conventions import few_step_sigmas
from tiltflow.models.adapters.flux import FluxAdapter
from tiltflow.models.adapters.sd3 import SD3Adapter
from tiltflow.sampling import NoisePlan, cps_step, sample
from tiltflow.sampling.scheduler import CPSScheduler

PROMPTS = ["a red cat", "a blue dog"]


@pytest.fixture(scope="module")
def sd3():
    return SD3Adapter.random("tiny_sd3", seed=0)


def _run(adapter, x_init, cond, **kw):
    out = adapter.pipe(height=32, width=32, latents=adapter.to_pipeline_latents(x_init), output_type="latent",
                       **adapter.pipeline_kwargs(cond), **kw).images
    return adapter.from_pipeline_latents(out, 32, 32)


def test_grid_static_and_dynamic():
    s = CPSScheduler(shift=3.0)
    s.set_timesteps(4)
    assert s.sigmas.tolist() == pytest.approx([1.0, 0.9, 0.75, 0.5, 0.0])
    assert s.timesteps.tolist() == pytest.approx([1000.0, 900.0, 750.0, 500.0])
    d = CPSScheduler(use_dynamic_shifting=True)
    d.set_timesteps(sigmas=np.linspace(1.0, 0.25, 4), mu=0.63)
    assert d.sigmas.tolist() == pytest.approx(few_step_sigmas(4, math.exp(0.63)), abs=1e-6)
    with pytest.raises(ValueError, match="mu"):
        d.set_timesteps(4)
    with pytest.raises(ValueError, match="eta"):
        CPSScheduler(eta=1.5)


def test_step_is_cps_step():
    s = CPSScheduler(shift=3.0, eta=0.9)
    s.set_timesteps(4)
    x, v, z = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    out = s.step(v, s.timesteps[1], x, noise=z)
    ref = cps_step(x, v, 0.9, 0.75, eta=0.9, noise=z)
    torch.testing.assert_close(out.prev_sample, ref.x_next)
    torch.testing.assert_close(out.pred_original_sample, ref.x0_hat)
    assert s.step_index == 2


def test_eta0_equals_flow_match_euler_in_sd3_pipeline(sd3):
    cond = sd3.encode(PROMPTS)
    x_init = torch.randn(2, *sd3.latent_shape(32, 32), generator=torch.Generator().manual_seed(0))
    stock = _run(sd3, x_init, cond, sigmas=[1.0, 0.75, 0.5, 0.25])  # stock scheduler, shifted like ours
    original = sd3.pipe.scheduler
    try:
        sd3.pipe.scheduler = CPSScheduler.from_config(original.config, eta=0.0)
        ours = _run(sd3, x_init, cond, num_inference_steps=4)
        assert sd3.pipe.scheduler.sigmas.tolist() == pytest.approx([1.0, 0.9, 0.75, 0.5, 0.0])
    finally:
        sd3.pipe.scheduler = original
    torch.testing.assert_close(ours, stock, atol=1e-5, rtol=1e-5)


def test_stochastic_steps_match_tiltflow_sampler(sd3):
    """With eta = 0.9 the pipeline's steps draw noise from torch's global RNG (pipelines pass no
    generator to step); seeding it identically reproduces tiltflow's sampler with the same noise."""
    cond = sd3.encode(PROMPTS)
    shape = (2, *sd3.latent_shape(32, 32))
    x_init = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    original = sd3.pipe.scheduler
    try:
        sd3.pipe.scheduler = CPSScheduler.from_config(original.config, eta=0.9)
        torch.manual_seed(123)
        theirs = _run(sd3, x_init, cond, num_inference_steps=4)
    finally:
        sd3.pipe.scheduler = original
    torch.manual_seed(123)
    noises = [torch.randn(shape) for _ in range(3)] + [None]
    ours = sample(lambda x, s: sd3.velocity(x, s, cond), few_step_sigmas(4, 3.0), NoisePlan(x_init, noises),
                  eta=0.9).final
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_flux_pipeline_passes_mu():
    flux = FluxAdapter.random("tiny_flux1", seed=0)
    cond = flux.encode(PROMPTS)
    x_init = torch.randn(2, *flux.latent_shape(32, 32), generator=torch.Generator().manual_seed(2))
    stock = _run(flux, x_init, cond, num_inference_steps=4)
    original = flux.pipe.scheduler
    flux.pipe.scheduler = CPSScheduler.from_config(original.config, eta=0.0)
    ours = _run(flux, x_init, cond, num_inference_steps=4)
    grid = few_step_sigmas(4, flux.sigma_shift(32, 32, 4))
    assert flux.pipe.scheduler.sigmas.tolist() == pytest.approx(grid, abs=1e-6)
    torch.testing.assert_close(ours, stock, atol=1e-5, rtol=1e-5)


def test_scale_noise_and_config_roundtrip(tmp_path):
    s = CPSScheduler(shift=3.0, eta=0.7)
    s.set_timesteps(4)
    x0, eps = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    xt = s.scale_noise(x0, s.timesteps[2:3].repeat(2), eps)
    torch.testing.assert_close(xt, 0.25 * x0 + 0.75 * eps)
    s.save_config(tmp_path)
    back = CPSScheduler.from_pretrained(tmp_path)
    assert back.config.eta == 0.7 and back.config.shift == 3.0
