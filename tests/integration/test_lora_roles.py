"""Teacher / generator / fake roles as LoRA adapters (METHOD.md 4.4, 5.5) on tiny random models.

The teacher (adapters disabled) is the original model bitwise; training one adapter leaves the base and
the other adapter untouched; every targeted block carries LoRA; gradient checkpointing recomputes with
the right adapters; stage-2 initialisation reproduces the stage-1 generator in both layouts; and one
stage-1 (ACDMD.step) and one stage-2 (RTDMD.step) iteration per family change exactly what they train.
"""

from __future__ import annotations

import copy
import re

import pytest
import torch

from tiltflow.algorithms.ac_dmd import ACDMD
from tiltflow.algorithms.rtdmd import RTDMD
from tiltflow.config.schema import FakeConfig, SamplerConfig, Stage1Config, Stage2Config
from tiltflow.models.adapters.flux import FluxAdapter
from tiltflow.models.adapters.flux2 import Flux2Adapter
from tiltflow.models.adapters.sd3 import SD3Adapter
from tiltflow.models.export import combine_lora_states
from tiltflow.models.lora import FAKE, GENERATOR, STAGE1, LoraSettings, build_roles, lora_state
from tiltflow.rewards.base import RewardSet
from tiltflow.training.spine import build_train_state
from tiltflow.worlds.diffusers_world import DiffusersTask, MeanBrightness

FAMILIES = {"sd3": (SD3Adapter, "tiny_sd3", 3.0), "flux1": (FluxAdapter, "tiny_flux1", 1.0),
            "flux2": (Flux2Adapter, "tiny_flux2", 4.0)}
SMALL = LoraSettings(rank=4, alpha=8.0)


def _inputs(adapter, n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *adapter.latent_shape(32, 32), generator=g)
    return x, torch.rand(n, generator=g) * 0.9 + 0.05, adapter.encode(["a red cat", "a dog"][:n])


def _perturb(params, scale=0.05, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(scale * torch.randn(p.shape, generator=g))


def _snapshot(modules, exclude):
    ids = {id(p) for p in exclude}
    return {(i, n): p.detach().clone() for i, m in enumerate(modules) for n, p in m.named_parameters()
            if id(p) not in ids}


def _unchanged(before, modules):
    now = {(i, n): p for i, m in enumerate(modules) for n, p in m.named_parameters()}
    return all(torch.equal(v, now[k]) for k, v in before.items())


def _changed(before: list[torch.Tensor], params) -> bool:
    return any(not torch.equal(b, p) for b, p in zip(before, params))


@pytest.mark.parametrize("family", FAMILIES)
def test_teacher_is_the_original_model_bitwise(family):
    cls, arch, _ = FAMILIES[family]
    adapter = cls.random(arch, seed=0)
    original = copy.deepcopy(adapter.transformer)
    models = build_roles(adapter, lora=SMALL)
    _perturb(models.roles().generator_params)
    _perturb(models.roles().fake_params, seed=1)
    x, s, cond = _inputs(adapter)
    roles = models.roles()
    v_gen = roles.generator.velocity(x, s, cond)  # switch adapters on first, then back off
    v_teacher = roles.teacher.velocity(x, s, cond)
    assert torch.equal(v_teacher, adapter.forward(original, x, s, cond))
    assert (v_gen - v_teacher).abs().max() > 1e-4
    assert (roles.fake.velocity(x, s, cond) - v_gen).abs().max() > 1e-4


@pytest.mark.parametrize("family", FAMILIES)
def test_every_targeted_block_carries_lora(family):
    cls, arch, _ = FAMILIES[family]
    adapter = cls.random(arch, seed=0)
    models = build_roles(adapter, lora=SMALL)
    names = [n for n, _ in models.generator_named]
    cfg = adapter.transformer.config
    blocks = {"transformer_blocks": cfg.num_layers}
    if family != "sd3":
        blocks["single_transformer_blocks"] = cfg.num_single_layers
    for kind, count in blocks.items():
        for i in range(count):
            hits = [n for n in names if re.match(rf"{kind}\.{i}\.", n)]
            assert hits, f"{kind}.{i} carries no LoRA"
    if family == "flux2":  # the fused single-stream projections are reached
        for i in range(cfg.num_single_layers):
            for proj in ("to_qkv_mlp_proj", "to_out"):
                assert any(f"single_transformer_blocks.{i}.attn.{proj}.lora_A" in n for n in names)
    if family == "sd3":  # SD3.5's second attention in dual-attention blocks
        assert any(".attn2.to_q.lora_A" in n for n in names)
    assert all(p.dtype == torch.float32 for _, p in models.generator_named + models.fake_named)


def test_training_the_generator_leaves_base_and_fake_unchanged():
    adapter = SD3Adapter.random("tiny_sd3", seed=0)
    models = build_roles(adapter, lora=SMALL)
    roles = models.roles()
    _perturb(roles.generator_params)
    before = _snapshot([adapter.transformer], roles.generator_params)
    gen_before = [p.detach().clone() for p in roles.generator_params]
    opt = torch.optim.AdamW(roles.generator_params, lr=1e-2)
    x, s, cond = _inputs(adapter)
    loss = roles.generator.velocity(x, s, cond).square().mean()
    with torch.no_grad():  # the other roles run between forward and backward, as in the algorithms
        roles.teacher.velocity(x, s, cond)
        roles.fake.velocity(x, s, cond)
    loss.backward()
    assert all(p.grad is not None for p in roles.generator_params)
    assert all(p.grad is None for p in roles.fake_params)
    opt.step()
    assert _changed(gen_before, roles.generator_params)
    assert _unchanged(before, [adapter.transformer])


@pytest.mark.parametrize("layout", ["shared", "separate"])
def test_adapter_switch_matches_peft_and_keeps_requires_grad(layout):
    """The switch writes only the two fields peft's LoRA forward reads. Each role's output equals the one
    peft's public enable_adapters / set_adapter give (bitwise: the same forward), and after any sequence of
    switches every LoRA weight requires grad exactly when its role trains it (stage 2: the stage-1 adapter
    stays frozen); peft's own calls would have flipped those flags."""
    adapter = SD3Adapter.random("tiny_sd3", seed=0)
    stage1 = build_roles(adapter, lora=SMALL)
    export, _ = combine_lora_states([(lora_state(stage1.generator, GENERATOR), SMALL.alpha / SMALL.rank)])
    models = build_roles(SD3Adapter.random("tiny_sd3", seed=0), layout=layout, lora=SMALL, stage1_generator=export)
    roles = models.roles()
    _perturb(roles.generator_params)
    _perturb(roles.fake_params, seed=1)
    x, s, cond = _inputs(models.teacher_role.adapter)
    trainable = {id(p) for p in roles.generator_params + roles.fake_params}
    with torch.no_grad():
        for role in (roles.generator, roles.fake, roles.teacher, roles.generator, roles.teacher, roles.fake):
            v = role.velocity(x, s, cond)
            for module in {id(m): m for m in (models.generator, models.fake)}.values():
                flags = {n: p.requires_grad == (id(p) in trainable)
                         for n, p in module.named_parameters() if "lora_" in n}
                assert all(flags.values()), [n for n, ok in flags.items() if not ok][:3]
            for layer in role.switch.layers if role.switch is not None else []:  # peft's own way, then again
                layer.enable_adapters(bool(role.adapters))
                if role.adapters:
                    layer.set_adapter(list(role.adapters))
            expected = role.adapter.forward(role.transformer, x, s, cond, role.guidance)
            if role.switch is not None:
                role.switch.current = None  # peft changed the layers behind the switch's back
                role.switch.rebind()  # and the flags: put them back for the next role
            assert torch.equal(v, expected)


def test_gradient_checkpointing_recomputes_with_the_forward_role():
    grads = []
    for checkpointing in (False, True):
        adapter = Flux2Adapter.random("tiny_flux2", seed=0)
        models = build_roles(adapter, lora=SMALL)
        if checkpointing:
            models.enable_activation_checkpointing()
        roles = models.roles()
        _perturb(roles.generator_params)
        _perturb(roles.fake_params, seed=1)
        adapter.transformer.train()
        x, s, cond = _inputs(adapter)
        loss = roles.generator.velocity(x, s, cond).square().mean()
        with torch.no_grad():
            roles.fake.velocity(x, s, cond)
            roles.teacher.velocity(x, s, cond)
        loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in roles.generator_params]))
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("every", [2, 3])
def test_checkpointing_every_kth_block_recomputes_only_those(every, monkeypatch):
    """parallel.activation_checkpointing_every = k: blocks 0, k, 2k, ... (over the double- then the
    single-stream blocks) are recomputed, the others keep their activations; the gradients are those of
    the run without checkpointing (recomputation repeats the same operations, so within float32 noise)."""
    calls = []
    real = torch.utils.checkpoint.checkpoint

    def counting(fn, *args, **kw):
        calls.append(fn)
        return real(fn, *args, **kw)

    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", counting)
    grads = []
    for k in (None, every):
        adapter = Flux2Adapter.random("tiny_flux2", seed=0)
        models = build_roles(adapter, lora=SMALL)
        if k is not None:
            models.enable_activation_checkpointing(every=k)
        roles = models.roles()
        _perturb(roles.generator_params)
        adapter.transformer.train()
        x, s, cond = _inputs(adapter)
        calls.clear()
        roles.generator.velocity(x, s, cond).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in roles.generator_params]))
    blocks = list(adapter.transformer.transformer_blocks) + list(adapter.transformer.single_transformer_blocks)
    assert [c.__self__ for c in calls] == blocks[::every]
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-5)


def test_checkpointing_every_must_be_a_positive_integer():
    from tiltflow.config.loader import ConfigError
    from tiltflow.worlds.registry import load_run_config

    with pytest.raises(ConfigError, match="parallel.activation_checkpointing_every.*got 0.*>= 1"):
        load_run_config(None, ["parallel.activation_checkpointing_every=0"])
    cfg = load_run_config(None, ["parallel.activation_checkpointing_every=2"])
    assert cfg.parallel.activation_checkpointing_every == 2


@pytest.mark.parametrize("layout", ["shared", "separate"])
def test_stage2_starts_from_the_stage1_generator(layout):
    adapter = SD3Adapter.random("tiny_sd3", seed=0)
    stage1 = build_roles(adapter, lora=SMALL)
    _perturb(stage1.roles().generator_params)
    x, s, cond = _inputs(adapter)
    with torch.no_grad():
        v_stage1 = stage1.roles().generator.velocity(x, s, cond)
    export, rank = combine_lora_states([(lora_state(stage1.generator, GENERATOR), SMALL.alpha / SMALL.rank)])
    assert rank == SMALL.rank
    fresh = SD3Adapter.random("tiny_sd3", seed=0)
    stage2 = build_roles(fresh, layout=layout, lora=SMALL, stage1_generator=export)
    with torch.no_grad():
        v_stage2 = stage2.roles().generator.velocity(x, s, cond)
        v_teacher = stage2.roles().teacher.velocity(x, s, cond)
    torch.testing.assert_close(v_stage2, v_stage1, atol=1e-5, rtol=1e-5)
    assert stage2.generator_adapters == ((STAGE1, GENERATOR) if layout == "shared" else (GENERATOR,))
    assert torch.equal(v_teacher, fresh.forward(SD3Adapter.random("tiny_sd3", seed=0).transformer, x, s, cond))


def test_a_fake_state_of_another_rank_is_refused_by_name():
    """A stage-1 fake score saved at another lora.rank is refused before any weight is copied."""
    stage1 = build_roles(SD3Adapter.random("tiny_sd3", seed=0), lora=LoraSettings(rank=2, alpha=2.0))
    stage2 = build_roles(SD3Adapter.random("tiny_sd3", seed=0), lora=SMALL)
    before = [p.detach().clone() for _, p in stage2.fake_named]
    with pytest.raises(ValueError, match=r"fake parameters do not fit.*\(2, .*\(4, .*lora.rank"):
        stage2.load_trainable_state(stage1.trainable_state(), roles=("fake",))
    assert not _changed(before, [p for _, p in stage2.fake_named])


def test_separate_full_finetune_trains_every_weight_in_fp32():
    adapter = SD3Adapter.random("tiny_sd3", seed=0)
    models = build_roles(adapter, layout="separate", finetune="full")
    n_all = sum(1 for _ in adapter.transformer.parameters())
    assert len(models.generator_named) == n_all and len(models.fake_named) == n_all
    assert models.generator is not adapter.transformer and models.fake is not models.generator
    assert all(p.dtype == torch.float32 and p.requires_grad for _, p in models.generator_named)
    assert not any(p.requires_grad for p in adapter.transformer.parameters())
    with pytest.raises(ValueError, match="separate"):
        build_roles(SD3Adapter.random("tiny_sd3", seed=0), layout="shared", finetune="full")


def _stage_configs(adapter):
    sampler = SamplerConfig(num_steps=4, shift=adapter.sigma_shift(32, 32, 4), eta=0.9)
    s1 = Stage1Config(num_iters=1, batch_size=2, n_fake=1, lr=1e-3, fake=FakeConfig(lr=1e-3))
    s2 = Stage2Config(num_iters=1, num_prompts=1, group_size=2, lr=1e-3, fake=FakeConfig(lr=1e-3))
    return sampler, s1, s2


def _algo(cls, stage_cfg, sampler, task, models):
    """An algorithm with its optimisers built as the training spine builds them."""
    roles = models.roles()
    return cls(stage_cfg, sampler, task, roles, build_train_state(stage_cfg, roles), seed=0)


def _check_step(algo, models, modules, it: int) -> None:
    roles = models.roles()
    trainable = roles.generator_params + roles.fake_params
    frozen = _snapshot(modules, trainable)
    gen, fake = ([p.detach().clone() for p in ps] for ps in (roles.generator_params, roles.fake_params))
    algo.step(it)
    assert _changed(gen, roles.generator_params), "generator did not move"
    assert _changed(fake, roles.fake_params), "fake score did not move"
    assert _unchanged(frozen, modules), "a frozen weight moved"


@pytest.mark.parametrize("family", FAMILIES)
def test_stage1_then_stage2_iteration(family):
    cls, arch, guidance_scale = FAMILIES[family]
    gen_base = (lambda a: a.random_transformer(seed=7)) if family == "flux2" else (lambda a: None)
    adapter = cls.random(arch, seed=0)
    task = DiffusersTask(adapter, ["a red cat", "a blue dog"], RewardSet([MeanBrightness()]), guidance_scale, 32)
    sampler, s1, s2 = _stage_configs(adapter)
    base = gen_base(adapter)
    models = build_roles(adapter, lora=SMALL, generator_base=base)
    modules = [adapter.transformer, adapter.vae] + ([base] if base is not None else [])
    _check_step(_algo(ACDMD, s1, sampler, task, models), models, modules, 0)

    export, _ = combine_lora_states([(lora_state(models.generator, GENERATOR), SMALL.alpha / SMALL.rank)])
    adapter2 = cls.random(arch, seed=0)
    base2 = gen_base(adapter2)
    models2 = build_roles(adapter2, lora=SMALL, generator_base=base2, stage1_generator=export)
    models2.load_trainable_state(models.trainable_state(), roles=("fake",))
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(models.fake_named, models2.fake_named))
    assert FAKE in adapter2.transformer.peft_config
    task2 = DiffusersTask(adapter2, task.prompts, task.rewards, guidance_scale, 32)
    modules2 = [adapter2.transformer, adapter2.vae] + ([base2] if base2 is not None else [])
    _check_step(_algo(RTDMD, s2, sampler, task2, models2), models2, modules2, 0)


@pytest.mark.parametrize("finetune", ["lora", "full"])
def test_separate_layout_stage1_iteration(finetune):
    adapter = SD3Adapter.random("tiny_sd3", seed=0)
    task = DiffusersTask(adapter, ["a red cat", "a blue dog"], RewardSet([MeanBrightness()]), 3.0, 32)
    sampler, s1, _ = _stage_configs(adapter)
    models = build_roles(adapter, layout="separate", finetune=finetune, lora=SMALL)
    _check_step(_algo(ACDMD, s1, sampler, task, models), models,
                [adapter.transformer, adapter.vae], 0)


@pytest.mark.parametrize("family", ["sd3", "flux2"])
def test_keep_input_dtype_changes_nothing_under_autocast(family):
    """keep_input_dtype drops peft's bf16 -> fp32 -> bf16 round trip of a LoRA layer's input under autocast:
    the matrix products see the same bf16 values, so outputs and LoRA gradients are bitwise the same. (CUDA
    autocast is what training uses; the CPU's bf16 autocast casts the same way and runs here.)"""
    from tiltflow.models.lora import add_lora, keep_input_dtype

    cls, arch, _ = FAMILIES[family]
    results = []
    for keep in (False, True):
        adapter = cls.random(arch, base_dtype="bfloat16")
        params = [p for _, p in add_lora(adapter.transformer, GENERATOR, SMALL, adapter.lora_target_modules(
            adapter.transformer))]
        _perturb(params)
        if keep:
            assert keep_input_dtype(adapter.transformer) > 0
        x, sigma, cond = _inputs(adapter)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            v = adapter.forward(adapter.transformer, x, sigma, cond)
        v.float().square().mean().backward()
        results.append((v.detach(), [p.grad.clone() for p in params]))
    (v0, g0), (v1, g1) = results
    assert torch.equal(v0, v1)
    assert all(torch.equal(a, b) for a, b in zip(g0, g1)) and any(a.abs().sum() > 0 for a in g0)


def test_a_second_adapter_on_one_transformer_adds_no_peft_warning():
    """The shared layout puts several adapters on one transformer by design; peft's "Already found a
    `peft_config` attribute" warning on each one after the first is silenced there, and nothing else is."""
    import warnings

    from tiltflow.models.lora import add_lora

    adapter = SD3Adapter.random("tiny_sd3")
    targets = adapter.lora_target_modules(adapter.transformer)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        add_lora(adapter.transformer, GENERATOR, SMALL, targets)
        add_lora(adapter.transformer, FAKE, SMALL, targets)
        warnings.warn("a warning of another kind", UserWarning, stacklevel=1)
    messages = [str(w.message) for w in caught]
    assert not any("peft_config" in m for m in messages), messages
    assert "a warning of another kind" in messages
