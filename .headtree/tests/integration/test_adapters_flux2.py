"""FLUX.2-klein adapter against stock diffusers on a tiny random model (WORLDS.md section 3).

Pins patchify + BatchNorm latent statistics, token packing with 4-axis ids, the timestep convention
(timestep = sigma, x1000 inside), two-pass CFG, the empirical-mu few-step grid, and loading the
step-distilled generator init as a separate transformer.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import Flux2KleinPipeline
from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu

from tiltflow.flow.conventions import few_step_sigmas
from tiltflow.models.adapters.flux2 import Flux2Adapter, patchify, unpatchify
from tiltflow.models.base import guided_velocity
from tiltflow.sampling import NoisePlan, sample

PROMPTS = ["a red cat on a street", "a blue square"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("flux2")
    Flux2Adapter.random("tiny_flux2", seed=0).pipe.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def adapter(folder):
    return Flux2Adapter.from_pretrained(str(folder), max_sequence_length=16, text_encoder_out_layers=[1, 2, 3])


def _run(adapter, guidance_scale: float, output_type: str = "latent"):
    cond = adapter.encode(PROMPTS)
    uncond = adapter.encode_uncond(len(PROMPTS)) if guidance_scale != 1.0 else None
    x_init = torch.randn(len(PROMPTS), *adapter.latent_shape(32, 32), generator=torch.Generator().manual_seed(3))
    out = adapter.pipe(height=32, width=32, num_inference_steps=4, latents=adapter.to_pipeline_latents(x_init),
                       output_type=output_type, **adapter.pipeline_kwargs(cond, uncond, guidance_scale)).images
    sigmas = adapter.pipe.scheduler.sigmas.tolist()
    ours = sample(lambda x, s: guided_velocity(adapter, x, s, cond, uncond, guidance_scale), sigmas,
                  NoisePlan(init=x_init, steps=[None] * 4), eta=0.0).final
    return out, ours


def test_patchify_matches_diffusers():
    z = torch.randn(2, 4, 8, 6)
    assert torch.equal(patchify(z), Flux2KleinPipeline._patchify_latents(z))
    assert torch.equal(unpatchify(patchify(z)), z)


@pytest.mark.parametrize("guidance_scale", [1.0, 4.0])
def test_sampler_reproduces_pipeline(adapter, guidance_scale):
    out, ours = _run(adapter, guidance_scale)
    theirs = adapter.from_pipeline_latents(out, 32, 32)  # the pipeline returns de-normalised VAE z
    assert theirs.abs().max() > 0.1
    torch.testing.assert_close(ours, theirs, atol=2e-5, rtol=1e-5)


def test_decode_uses_latent_statistics(adapter):
    images, ours = _run(adapter, 1.0, output_type="pt")
    torch.testing.assert_close(adapter.decode(ours), images.float(), atol=2e-5, rtol=1e-5)
    bn = adapter.vae.bn
    assert bn.running_mean.abs().max() > 0.05 and (bn.running_var - 1).abs().max() > 0.05  # non-trivial stats


def test_empirical_mu_grid_matches_scheduler(adapter):
    sched = adapter.pipe.scheduler
    for res, tokens in [(32, 64), (512, 1024), (1024, 4096)]:
        mu = compute_empirical_mu(image_seq_len=tokens, num_steps=4)
        sched.set_timesteps(sigmas=np.linspace(1.0, 0.25, 4), mu=mu)
        k = adapter.sigma_shift(res, res, 4) if res == 32 else float(np.exp(mu))
        grid = torch.tensor(few_step_sigmas(4, k), dtype=torch.float64)
        torch.testing.assert_close(grid, sched.sigmas.double(), atol=1e-6, rtol=0)


def test_generator_init_loads_as_separate_transformer(adapter, folder):
    gen = adapter.load_transformer(str(folder))  # a pipeline folder: transformer/ is used
    assert gen is not adapter.transformer
    gen_direct = adapter.load_transformer(str(folder / "transformer"))
    for (n, a), (_, b) in zip(gen.state_dict().items(), gen_direct.state_dict().items()):
        assert torch.equal(a, b), n
    assert not any(p.requires_grad for p in gen.parameters())


def test_stub_text_for_full_size_shapes():
    """Full-size klein-4B conditioning is (512, 7680): 3 stacked Qwen3-4B layers of width 2560."""
    from tiltflow.models.arch import load_arch

    cfg = load_arch("flux2_klein_4b")["components"]["transformer"]
    assert cfg["joint_attention_dim"] == 3 * 2560
    assert (cfg["num_layers"], cfg["num_single_layers"]) == (5, 20)


def test_position_ids_are_made_once_per_shape_and_read_only_afterwards():
    """The coordinates (t, row, col, l) the pipeline's forward takes, built once per (h, w, L, device): a second
    call at another batch returns views of the same tensors (no host-to-device copy per pass), equal to a fresh
    construction; the sampler test above checks the transformer's output with them against the pipeline's."""
    from tiltflow.models.adapters.flux2 import device_position_ids, position_ids

    device_position_ids.cache_clear()
    img, txt = position_ids(2, 3, 4, 5, torch.device("cpu"))
    img3, txt3 = position_ids(3, 3, 4, 5, torch.device("cpu"))
    assert img.data_ptr() == img3.data_ptr() and txt.data_ptr() == txt3.data_ptr()
    assert img.shape == (2, 12, 4) and txt.shape == (2, 5, 4) and img3.shape == (3, 12, 4)
    rows, cols = torch.meshgrid(torch.arange(3), torch.arange(4), indexing="ij")
    expected = torch.stack([torch.zeros(12, dtype=torch.long), rows.flatten(), cols.flatten(),
                            torch.zeros(12, dtype=torch.long)], dim=1)
    assert torch.equal(img3[1], expected)
    assert torch.equal(txt3[2], torch.stack([torch.zeros(5, dtype=torch.long)] * 3 + [torch.arange(5)], dim=1))
    assert device_position_ids.cache_info().misses == 1
