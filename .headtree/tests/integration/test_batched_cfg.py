"""The teacher's classifier-free guidance as one transformer pass at batch 2B (issue 8, item 3): on tiny
random-weight SD3 and FLUX.2-klein models and the shapes world's pixel SD3 teacher, float32 on the CPU, the
batched pass gives the two passes' guided velocity, it really is one pass at 2B (and the two-pass path
really is two at B), and the spine's parallel.batched_cfg switches between them.

Tolerance, fixed before any comparison was run. Batched and two-pass evaluate the same per-sample function
(no attention mask, per-sample timestep), so the exact values are equal; in float32 they may differ only
through the order of the reductions inside kernels whose blocking depends on the batch (GEMM over B or 2B
rows, attention tiling). Each evaluation differs from the exact value by its own forward rounding error. We
measure one of them, e = max |guided(two passes, float32) - guided(two passes, a float64 copy)|; an error
bound of the kind gamma_K * sum |a_i b_i| depends on the reduction length and magnitudes, not on the order,
so another order's error is of the same size, and we allow it 2e. By the triangle inequality
    max |batched - two passes| <= e + 2e = 3e.
The check can fail: a batched pass that swapped the cond and uncond halves would be off by
(2 scale - 1) |v_c - v_u|, which each test asserts is above 10 x the tolerance, and a batched path that
silently ran two passes is caught by the pass counts.
"""

from __future__ import annotations

import copy

import pytest
import torch

from tiltflow.models.adapters.common import join_conditions
from tiltflow.models.base import guided_velocity

B, RES = 3, 32
PROMPTS = ["a red cat", "a blue dog on a street", "two green cars"]


class PassCounter:
    """The batch of every forward of a transformer (a pre-hook)."""

    def __init__(self, transformer: torch.nn.Module):
        self.batches: list[int] = []
        self.handle = transformer.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        self.batches.append(int(kwargs["hidden_states"].shape[0]))

    def take(self) -> list[int]:
        out, self.batches = self.batches, []
        return out


class Plain:
    """A backbone without cfg_conditions (two passes), over `fn`."""

    def __init__(self, fn):
        self.velocity = fn


def _inputs(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((B, *shape), generator=g)
    sigma = 0.1 + 0.8 * torch.rand(B, generator=g)
    return x, sigma


def _check(adapter, reference64, x, sigma, cond, uncond, scale):
    """batched == two passes within 3e (module docstring), with the pass structure of each path."""
    counter = PassCounter(adapter.transformer)
    adapter.batched_cfg = False
    two = guided_velocity(adapter, x, sigma, cond, uncond, scale)
    assert counter.take() == [B, B]
    adapter.batched_cfg = True
    one = guided_velocity(adapter, x, sigma, cond, uncond, scale)
    assert counter.take() == [2 * B]
    counter.handle.remove()
    exact = guided_velocity(Plain(reference64), x, sigma, cond, uncond, scale)
    e = (two - exact).abs().max().item()
    tol = 3 * e
    v_c = adapter.velocity(x, sigma, cond)
    v_u = adapter.velocity(x, sigma, uncond)
    swap = ((2 * scale - 1) * (v_c - v_u)).abs().max().item()
    assert swap > 10 * tol, (swap, tol)  # the check discriminates a swapped batch
    diff = (one - two).abs().max().item()
    assert diff <= tol, f"batched vs two passes: {diff:.3g} > 3e = {tol:.3g} (e = {e:.3g})"
    assert one.dtype == torch.float32 and one.shape == x.shape


@pytest.mark.parametrize("family,arch,scale", [("sd3", "tiny_sd3", 4.5), ("flux2", "tiny_flux2", 4.0)])
def test_batched_cfg_equals_two_passes_on_diffusers_families(family, arch, scale):
    from tiltflow.models.adapters.flux2 import Flux2Adapter
    from tiltflow.models.adapters.sd3 import SD3Adapter

    cls = {"sd3": SD3Adapter, "flux2": Flux2Adapter}[family]
    adapter = cls.random(arch, seed=0, device="cpu")
    assert adapter.batched_cfg  # the default
    t64 = copy.deepcopy(adapter.transformer).double()
    x, sigma = _inputs(adapter.latent_shape(RES, RES))
    cond, uncond = adapter.encode(PROMPTS), adapter.encode_uncond(B)
    _check(adapter, lambda x_, s_, c_: adapter.forward(t64, x_, s_, c_), x, sigma, cond, uncond, scale)


def test_batched_cfg_equals_two_passes_on_the_shapes_teacher(tmp_path):
    from tiltflow.config.shapes import ShapesModelSpec
    from tiltflow.worlds.shapes.models import ShapesAdapter, new_transformer
    from tiltflow.worlds.shapes.text import TextEncoder, build_text_encoder

    spec = ShapesModelSpec(num_layers=2, num_heads=2, head_dim=8, text_hidden=16, text_layers=1, clip_hidden=16,
                           clip_layers=1, clip_projection=16)
    text = TextEncoder(build_text_encoder(tmp_path / "text", seed=0, hidden_size=16, num_layers=1, num_heads=2))
    adapter = ShapesAdapter(new_transformer(spec, 16, seed=0).eval().requires_grad_(False), text)
    t64 = copy.deepcopy(adapter.transformer).double()

    def reference(x_, s_, c_):
        return adapter.forward(t64, x_.double(), s_, {k: v.double() for k, v in c_.items()})

    x, sigma = _inputs(adapter.latent_shape(spec.resolution, spec.resolution))
    prompts = ["a photo of a red circle", "a photo of two blue squares", "a photo of a green triangle"]
    cond, uncond = adapter.encode(prompts), adapter.encode_uncond(B)
    with torch.no_grad():
        _check(adapter, reference, x, sigma, cond, uncond, 3.0)


def test_conditions_that_do_not_concatenate_fall_back_to_two_passes():
    from tiltflow.models.adapters.sd3 import SD3Adapter

    a = {"prompt_embeds": torch.zeros(2, 5, 4), "pooled": torch.zeros(2, 3)}
    assert join_conditions(a, a)["prompt_embeds"].shape == (4, 5, 4)
    assert join_conditions(a, {**a, "prompt_embeds": torch.zeros(2, 6, 4)}) is None  # other text length
    assert join_conditions(a, {"prompt_embeds": a["prompt_embeds"]}) is None  # other keys
    assert join_conditions(a, {**a, "pooled": a["pooled"].double()}) is None
    assert join_conditions(torch.zeros(2, 3), torch.zeros(2, 3)) is None  # not a dict: the gmm world's tensors

    adapter = SD3Adapter.random("tiny_sd3", seed=0, device="cpu")
    x, sigma = _inputs(adapter.latent_shape(RES, RES))
    cond = adapter.encode(PROMPTS[:B])
    short = {k: v[:, :-1] if k == "prompt_embeds" else v for k, v in adapter.encode_uncond(B).items()}
    counter = PassCounter(adapter.transformer)
    guided_velocity(adapter, x, sigma, cond, short, 4.5)
    assert counter.take() == [B, B]
    guided_velocity(adapter, x, sigma, cond, None, 1.0)  # scale 1: the conditional model alone
    assert counter.take() == [B]
    calls = []
    gmm_like = Plain(lambda x_, s_, c_: calls.append(x_.shape[0]) or x_ * c_)
    guided_velocity(gmm_like, x, sigma, torch.ones(B, 1, 1, 1), torch.zeros(B, 1, 1, 1), 2.0)
    assert calls == [B, B]


def test_parallel_plan_sets_batched_cfg_on_the_teacher_role():
    """The spine's switch reaches the teacher role (tiltflow.models.lora), whose passes follow it."""
    from tiltflow.config.schema import ParallelConfig
    from tiltflow.distributed import LOCAL
    from tiltflow.models.adapters.sd3 import SD3Adapter
    from tiltflow.models.lora import LoraSettings, build_roles
    from tiltflow.training.spine import apply_parallel_plan

    assert ParallelConfig().batched_cfg is True and ParallelConfig().compile == "none"
    adapter = SD3Adapter.random("tiny_sd3", seed=0, device="cpu")
    models = build_roles(adapter, layout="shared", lora=LoraSettings(4, 8.0))
    x, sigma = _inputs(adapter.latent_shape(RES, RES))
    cond, uncond = adapter.encode(PROMPTS), adapter.encode_uncond(B)
    counter = PassCounter(models.teacher)
    out = {}
    for on in (False, True):
        apply_parallel_plan(models, ParallelConfig(batched_cfg=on), LOCAL)
        assert adapter.batched_cfg is on
        with torch.no_grad():
            out[on] = guided_velocity(models.roles().teacher, x, sigma, cond, uncond, 4.5)
        assert counter.take() == ([2 * B] if on else [B, B])
    assert out[True].shape == out[False].shape


@pytest.mark.parametrize("override,fragment", [("parallel.compile=all", "'none' | 'blocks'"),
                                               ("parallel.batched_cfg=maybe", "true or false"),
                                               ("parallel.batched_cgf=false", "batched_cgf")])
def test_parallel_options_are_checked_at_load(override, fragment):
    from tiltflow.config.loader import ConfigError
    from tiltflow.worlds.registry import load_run_config

    base = ["world=diffusers", "model.random_weights=true", "model.arch=tiny_sd3", "model.resolution=32",
            "prompts=[a red cat]"]
    cfg = load_run_config(None, [*base, "parallel.batched_cfg=false", "parallel.compile=blocks"])
    assert cfg.parallel.batched_cfg is False and cfg.parallel.compile == "blocks"
    with pytest.raises(ConfigError) as info:
        load_run_config(None, [*base, override])
    assert "parallel." in str(info.value) and fragment in str(info.value), str(info.value)
