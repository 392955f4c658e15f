"""SD3 adapter against stock diffusers on a tiny random SD3.5-style model (WORLDS.md section 3).

Pins the timestep convention (timestep = 1000 sigma), CFG, the VAE scaling/shift, the static-shift
few-step grid, the text-embedding cache and fast failure (training iterations: test_lora_roles.py).
"""

from __future__ import annotations

import time

import pytest
import torch

from tiltflow.flow.conventions import few_step_sigmas
from tiltflow.models.adapters.common import ModelUnavailableError
from tiltflow.models.adapters.sd3 import SD3Adapter
from tiltflow.models.base import guided_velocity
from tiltflow.sampling import NoisePlan, sample

PROMPTS = ["a red cat on a street", "a blue square"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny random SD3 pipeline written with save_pretrained, as a user's local folder would be."""
    folder = tmp_path_factory.mktemp("sd3")
    SD3Adapter.random("tiny_sd3", seed=0).pipe.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def adapter(saved):
    return SD3Adapter.from_pretrained(str(saved), max_sequence_length=16)


def _pipeline_vs_ours(adapter, guidance_scale: float, output_type: str = "latent"):
    cond = adapter.encode(PROMPTS)
    uncond = adapter.encode_uncond(len(PROMPTS)) if guidance_scale != 1.0 else None
    x_init = torch.randn(len(PROMPTS), *adapter.latent_shape(32, 32), generator=torch.Generator().manual_seed(1))
    out = adapter.pipe(height=32, width=32, num_inference_steps=4, latents=adapter.to_pipeline_latents(x_init),
                       output_type=output_type, **adapter.pipeline_kwargs(cond, uncond, guidance_scale)).images
    sigmas = adapter.pipe.scheduler.sigmas.tolist()

    def velocity(x, s):
        return guided_velocity(adapter, x, s, cond, uncond, guidance_scale)

    ours = sample(velocity, sigmas, NoisePlan(init=x_init, steps=[None] * 4), eta=0.0).final
    return out, ours


@pytest.mark.parametrize("guidance_scale", [1.0, 3.0])
def test_sampler_reproduces_pipeline(adapter, guidance_scale):
    out, ours = _pipeline_vs_ours(adapter, guidance_scale)
    theirs = adapter.from_pipeline_latents(out, 32, 32)
    assert theirs.abs().max() > 0.1
    torch.testing.assert_close(ours, theirs, atol=2e-5, rtol=1e-5)


def test_decode_matches_pipeline(adapter):
    images, ours = _pipeline_vs_ours(adapter, 1.0, output_type="pt")
    torch.testing.assert_close(adapter.decode(ours), images.float(), atol=2e-5, rtol=1e-5)


def test_few_step_grid_is_the_schedulers_static_shift(adapter):
    sched = adapter.pipe.scheduler
    sched.set_timesteps(sigmas=[1.0, 0.75, 0.5, 0.25])
    grid = few_step_sigmas(4, adapter.sigma_shift(512, 512, 4))
    assert adapter.sigma_shift(512, 512, 4) == 3.0
    torch.testing.assert_close(torch.tensor(grid, dtype=torch.float64), sched.sigmas.double(), atol=1e-6, rtol=0)
    assert grid == pytest.approx([1.0, 0.9, 0.75, 0.5, 0.0])


def test_vae_roundtrip_scaling(adapter):
    z = torch.randn(2, 4, 16, 16)
    torch.testing.assert_close(adapter.vae_to_latents(adapter.latents_to_vae(z)), z, atol=1e-6, rtol=0)
    x = adapter.encode_images(torch.rand(1, 3, 32, 32))
    assert x.shape == (1, *adapter.latent_shape(32, 32))


def test_embedding_cache_on_disk(saved, tmp_path):
    first = SD3Adapter.from_pretrained(str(saved), max_sequence_length=16, embed_cache_dir=tmp_path)
    a = first.encode(PROMPTS)
    assert len(list(tmp_path.rglob("*.safetensors"))) == len(PROMPTS)
    second = SD3Adapter.from_pretrained(str(saved), max_sequence_length=16, embed_cache_dir=tmp_path)
    second.pipe.text_encoder = None  # any real encoding would now fail: the cache must answer
    b = second.encode(PROMPTS)
    for k in a:
        assert torch.equal(a[k], b[k])
    other = SD3Adapter.from_pretrained(str(saved), max_sequence_length=8, embed_cache_dir=tmp_path)
    assert other.encode(PROMPTS[:1])["prompt_embeds"].shape[1] == 77 + 8  # other settings, other key


def test_a_fixed_prompt_set_is_encoded_once(saved, capsys):
    """A task over a fixed prompt set larger than the in-memory cache's default (256) keeps all of its
    embeddings once encoded: a second pass over the set runs the text encoders on nothing (before, the
    least recently used entries were dropped and a sequential pass re-encoded every prompt). A set over the
    memory budget keeps the default size and says to use the disk cache."""
    from tiltflow.rewards.base import RewardSet
    from tiltflow.worlds.diffusers_world import DiffusersTask, MeanBrightness

    adapter = SD3Adapter.from_pretrained(str(saved), max_sequence_length=16)
    prompts = [f"a photo of object number {i}" for i in range(300)]
    DiffusersTask(adapter, prompts, RewardSet([MeanBrightness()]), 4.5, 32)
    assert adapter.cache.max_memory == 301  # the prompts and the empty prompt
    encoded = []
    run = adapter._run_text_encoders
    adapter._run_text_encoders = lambda ps: (encoded.extend(ps), run(ps))[1]
    for _ in range(2):
        for i in range(0, len(prompts), 50):
            adapter.encode(prompts[i:i + 50])
    assert len(encoded) == len(prompts)  # each once, in the first pass only
    assert not adapter.hold_prompt_set(prompts, budget_gib=1e-3)
    assert "model.embed_cache_dir" in capsys.readouterr().err
    assert adapter.cache.max_memory == 301


def test_missing_local_folder_fails_fast(tmp_path):
    missing = tmp_path / "no" / "such" / "sd3"
    t0 = time.time()
    with pytest.raises(ModelUnavailableError, match=str(missing)):
        SD3Adapter.from_pretrained(str(missing))
    assert time.time() - t0 < 2.0


def test_offline_hub_id_fails_fast(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.time()
    with pytest.raises(ModelUnavailableError, match="stabilityai/stable-diffusion-3.5-medium"):
        SD3Adapter.from_pretrained("stabilityai/stable-diffusion-3.5-medium")
    assert time.time() - t0 < 2.0

