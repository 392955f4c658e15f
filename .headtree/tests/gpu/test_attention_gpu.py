"""FLUX.1-dev at full size on CUDA with the adapter's default attention backend (issue 14): one forward and
backward, with and without activation checkpointing, is finite. With cuDNN 9.19's fused SDPA backward this
faulted (an illegal memory access); benchmarks/flux1_attention.py has the diagnosis. Skipped without CUDA.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.fixture(scope="module")
def flux1_dev():
    from tiltflow.models.adapters.flux import FluxAdapter

    adapter = FluxAdapter.random("flux1_dev", seed=0, device="cuda", text_encoders=False, guidance=3.5)
    yield adapter
    del adapter
    torch.cuda.empty_cache()


@pytest.mark.slow
@pytest.mark.parametrize("checkpointed", [False, True])
def test_flux1_dev_full_size_backward_default_backend(flux1_dev, checkpointed):
    adapter = flux1_dev
    assert adapter.model_name == "flux1_dev"
    if checkpointed:
        adapter.transformer.enable_gradient_checkpointing()
    else:
        adapter.transformer.disable_gradient_checkpointing()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, *adapter.latent_shape(512, 512), generator=g).cuda().requires_grad_()
    cond = {k: v.clone().requires_grad_() for k, v in adapter.encode(["a red cat on a street"]).items()}
    v = adapter.forward(adapter.transformer, x, torch.tensor([0.6], device="cuda"), cond)
    weights = torch.linspace(-1, 1, v.shape[1], device="cuda")[None, :, None, None]
    (v * weights).mean().backward()
    torch.cuda.synchronize()
    assert torch.isfinite(v).all()
    for grad in (x.grad, cond["prompt_embeds"].grad):  # the attention backward ran through every block
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
