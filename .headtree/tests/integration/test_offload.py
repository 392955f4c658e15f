"""parallel.offload_frozen (issue 8, item 1): the models no role trains (a separate teacher, the text
encoders) are group-offloaded (diffusers.hooks, block level), and every pass gives the same numbers as
before. On the CPU the weights stay where they are (onload and offload are both the CPU), so this checks the
plumbing and the numbers; a GPU test checks that the weights leave the GPU."""

from __future__ import annotations

import pytest
import torch

from tiltflow.config.loader import ConfigError
from tiltflow.config.schema import ParallelConfig
from tiltflow.distributed import LOCAL
from tiltflow.training import spine

B = 2


def _setup(layout, device="cpu"):
    from tiltflow.models.adapters.sd3 import SD3Adapter
    from tiltflow.models.lora import LoraSettings, build_roles

    adapter = SD3Adapter.random("tiny_sd3", seed=0, device=device, base_dtype="float32")
    torch.manual_seed(0)
    return adapter, build_roles(adapter, layout=layout, lora=LoraSettings(4, 8.0))


def _hooked(module):
    return getattr(module, "_diffusers_hook", None) is not None


def _passes(adapter, models, device="cpu"):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, *adapter.latent_shape(32, 32), generator=g).to(device)
    sigma = torch.tensor([0.3, 0.6], device=device)
    adapter.cache.memory.clear()  # encode through the text encoders, not the cache
    cond = adapter.encode(["a red cat", "a blue dog"])
    roles = models.roles()
    with torch.no_grad():
        return cond, [r.velocity(x, sigma, cond) for r in (roles.teacher, roles.generator, roles.fake)]


@pytest.mark.parametrize("layout", ["separate", "shared"])
def test_offloaded_frozen_models_give_the_same_passes(layout):
    adapter, models = _setup(layout)
    cond, before = _passes(adapter, models)
    spine.apply_parallel_plan(models, ParallelConfig(offload_frozen=True), LOCAL)
    assert _hooked(models.teacher) == (layout == "separate")  # shared: the teacher is the fake's base, trained
    assert not _hooked(models.generator) and not _hooked(models.fake)
    assert all(_hooked(getattr(adapter.pipe, n)) for n in ("text_encoder", "text_encoder_2", "text_encoder_3"))
    cond_after, after = _passes(adapter, models)
    assert all(torch.equal(cond[k], cond_after[k]) for k in cond)
    assert all(torch.equal(a, b) for a, b in zip(before, after))


def test_offloading_refuses_what_it_cannot_do():
    from tiltflow.worlds.registry import load_run_config

    with pytest.raises(ConfigError, match="parallel.offload_frozen.*compile 'blocks'"):
        load_run_config(None, ["parallel.offload_frozen=true", "parallel.compile=blocks"])
    models = type("NoFrozen", (), {"roles": lambda self: type("R", (), {"teacher": object()})()})()
    with pytest.raises(ConfigError, match="parallel.offload_frozen.*no frozen models"):
        spine.apply_parallel_plan(models, ParallelConfig(offload_frozen=True), LOCAL)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_offloaded_weights_leave_the_gpu():
    adapter, models = _setup("separate", "cuda")
    _, before = _passes(adapter, models, "cuda")
    spine.apply_parallel_plan(models, ParallelConfig(offload_frozen=True), LOCAL, device_type="cuda")
    assert all(p.device.type == "cpu" for p in models.teacher.parameters())
    assert all(p.device.type == "cpu" for p in adapter.pipe.text_encoder_3.parameters())
    assert all(p.device.type == "cuda" for p in models.generator.parameters())
    _, after = _passes(adapter, models, "cuda")
    assert all(torch.equal(a, b) for a, b in zip(before, after))
