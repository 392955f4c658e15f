"""Exports for stock diffusers (WORLDS.md section 3): an exported LoRA loaded with `load_lora_weights`
changes the stock pipeline's output and reproduces our generator; a stage-2 generator (stage-1 LoRA +
fresh LoRA) exports as one LoRA; a merged transformer export reproduces it too; and a whole run
(stage 1 -> stage 2 -> export -> sample) goes through the world's entry points.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch

from tiltflow.models.adapters.flux import FluxAdapter
from tiltflow.models.adapters.flux2 import Flux2Adapter
from tiltflow.models.adapters.sd3 import SD3Adapter
from tiltflow.models.export import LORA_WEIGHT_NAME, combine_lora_states, export_lora, export_merged_transformer
from tiltflow.models.lora import GENERATOR, LoraSettings, build_roles, lora_state
from tiltflow.sampling import NoisePlan, sample

FAMILIES = {"sd3": (SD3Adapter, "tiny_sd3"), "flux1": (FluxAdapter, "tiny_flux1"),
            "flux2": (Flux2Adapter, "tiny_flux2")}
SMALL = LoraSettings(rank=4, alpha=8.0)
PROMPTS = ["a red cat", "a blue dog"]


def _perturbed_generator(cls, arch, stage1=None):
    adapter = cls.random(arch, seed=0)
    models = build_roles(adapter, lora=SMALL, stage1_generator=stage1)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in models.roles().generator_params:
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return adapter, models


def _pipeline_latents(stock, adapter, x_init, cond):
    out = stock.pipe(height=32, width=32, num_inference_steps=4, latents=stock.to_pipeline_latents(x_init),
                     output_type="latent", **stock.pipeline_kwargs(cond)).images
    return stock.from_pipeline_latents(out, 32, 32), stock.pipe.scheduler.sigmas.tolist()


def _check_stock_pipeline_reproduces(cls, arch, adapter, models, folder):
    stock = cls.random(arch, seed=0)  # a fresh stock pipeline with the same base weights
    cond = adapter.encode(PROMPTS)
    x_init = torch.randn(2, *adapter.latent_shape(32, 32), generator=torch.Generator().manual_seed(9))
    before, sigmas = _pipeline_latents(stock, adapter, x_init, cond)
    stock.pipe.load_lora_weights(folder)
    after, _ = _pipeline_latents(stock, adapter, x_init, cond)
    with torch.no_grad():
        ours = sample(lambda x, s: models.generator_role.velocity(x, s, cond), sigmas,
                      NoisePlan(init=x_init, steps=[None] * 4), eta=0.0).final
    assert (after - before).abs().max() > 1e-3, "the loaded LoRA changed nothing"
    torch.testing.assert_close(after, ours, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_exported_lora_loads_into_stock_pipeline(family, tmp_path):
    cls, arch = FAMILIES[family]
    adapter, models = _perturbed_generator(cls, arch)
    path = export_lora(models.generator, models.generator_adapters, tmp_path, type(adapter.pipe))
    assert path.name == LORA_WEIGHT_NAME and path.is_file()
    _check_stock_pipeline_reproduces(cls, arch, adapter, models, tmp_path)


def test_stage2_generator_exports_as_one_lora(tmp_path):
    _, stage1 = _perturbed_generator(SD3Adapter, "tiny_sd3")
    s1_state, rank = combine_lora_states([(lora_state(stage1.generator, GENERATOR), SMALL.alpha / SMALL.rank)])
    adapter, models = _perturbed_generator(SD3Adapter, "tiny_sd3", stage1=s1_state)
    assert len(models.generator_adapters) == 2
    export_lora(models.generator, models.generator_adapters, tmp_path, type(adapter.pipe))
    _check_stock_pipeline_reproduces(SD3Adapter, "tiny_sd3", adapter, models, tmp_path)
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / LORA_WEIGHT_NAME))
    a_key = next(k for k in saved if k.endswith("lora_A.weight"))
    assert saved[a_key].shape[0] == 2 * SMALL.rank and rank == SMALL.rank


def test_merged_transformer_export(tmp_path):
    adapter, models = _perturbed_generator(Flux2Adapter, "tiny_flux2")
    teacher_before = copy.deepcopy({k: v for k, v in adapter.transformer.state_dict().items() if "lora_" not in k})
    folder = export_merged_transformer(models.generator, models.generator_adapters, tmp_path / "merged",
                                       dtype=torch.float32)
    merged = type(adapter.transformer).from_pretrained(folder)
    cond = adapter.encode(PROMPTS)
    x = torch.randn(2, *adapter.latent_shape(32, 32))
    s = torch.tensor([0.3, 0.9])
    with torch.no_grad():
        torch.testing.assert_close(adapter.forward(merged, x, s, cond),
                                   models.generator_role.velocity(x, s, cond), atol=2e-5, rtol=1e-5)
    after = {k: v for k, v in adapter.transformer.state_dict().items() if "lora_" not in k}
    assert all(torch.equal(v, after[k]) for k, v in teacher_before.items())


@pytest.mark.slow
def test_world_run_stage1_stage2_export_and_sample(tmp_path):
    from tiltflow.training.spine import train
    from tiltflow.worlds.diffusers_world import build_models
    from tiltflow.worlds.diffusers_world import sample as world_sample
    from tiltflow.worlds.registry import load_run_config

    common = ["world=diffusers", "model.family=sd3", "model.random_weights=true", "model.arch=tiny_sd3",
              "model.resolution=32", "model.guidance_scale=3.0", "device=cpu", "prompts=[a red cat, a blue dog]",
              "lora.rank=4",
              "lora.alpha=8", "checkpoint_every=1", "log_every=1"]
    s1 = load_run_config(None, common + ["stage=ac_dmd", f"run_dir={tmp_path}/s1", "stage1.num_iters=1",
                                         "stage1.batch_size=2", "stage1.n_fake=1", "stage1.lr=1e-2",
                                         "stage1.fake.lr=1e-3", "stage1.ema_decay=0.0"])
    assert "gen_dm_loss" in train(s1, progress=False)
    s2 = load_run_config(None, common + ["stage=rtdmd", f"run_dir={tmp_path}/s2", f"init_from={tmp_path}/s1",
                                         "stage2.num_iters=1", "stage2.num_prompts=1", "stage2.group_size=2",
                                         "stage2.lr=1e-2", "stage2.fake.lr=1e-3", "stage2.ema_decay=0.0",
                                         "stage2.ema_every=1"])
    assert "reward_brightness" in train(s2, progress=False)
    for name in ("config.yaml", "resolved.json", "metrics.jsonl", "checkpoint.pt", "final.safetensors",
                 "samples/grid.png"):
        assert (tmp_path / "s2" / name).is_file(), name
    from tiltflow.worlds.diffusers_world import read_final

    adapter, models = build_models(s2, read_final(tmp_path / "s2"))
    _check_stock_pipeline_reproduces(SD3Adapter, "tiny_sd3", adapter, models, tmp_path / "s2" / "export_lora")
    paths = world_sample(s2, ["a cat"], tmp_path / "samples")
    assert len(paths) == 1 and paths[0].stat().st_size > 0
    assert (tmp_path / "samples" / "grid.png").is_file()  # captioned with the prompts
    # `tiltflow sample --run DIR --prompts FILE`: the file's prompts alone (the run config's two are not added).
    from tiltflow.cli import main

    (tmp_path / "p.txt").write_text("a green frog\n\na yellow duck\n")
    assert main(["sample", "--run", str(tmp_path / "s2"), "--prompts", str(tmp_path / "p.txt"), "--out",
                 str(tmp_path / "from_file")]) == 0
    rows = [json.loads(line) for line in (tmp_path / "from_file" / "index.jsonl").read_text().splitlines()]
    assert sorted({r["prompt"] for r in rows}) == ["a green frog", "a yellow duck"]


def test_full_fine_tuning_run_exports_a_transformer_folder(tmp_path):
    """A full-fine-tuning stage has no LoRA to export: the run writes export_transformer/, its EMA generator as a
    bf16 folder that SD3Transformer2DModel.from_pretrained reads with nothing missing, and no export_lora/. Each
    weight is the final.safetensors export rounded to bf16 (round-to-nearest: at most 2^-8 relative, normal
    range), and the 1e-2 step moved some weight past that rounding, so a stale (untrained) folder would fail."""
    from diffusers import SD3Transformer2DModel
    from safetensors.torch import load_file

    from tiltflow.training.spine import train
    from tiltflow.worlds.diffusers_world import build_models, exported_generator, read_final
    from tiltflow.worlds.registry import load_run_config

    run = tmp_path / "full"
    cfg = load_run_config(None, ["world=diffusers", "model.family=sd3", "model.random_weights=true",
                                 "model.arch=tiny_sd3", "model.resolution=32", "device=cpu", "prompts=[a red cat]",
                                 "lora.finetune=full", "lora.layout=separate", "stage=ac_dmd", f"run_dir={run}",
                                 "stage1.num_iters=1", "stage1.batch_size=2", "stage1.n_fake=1", "stage1.lr=1e-2",
                                 "stage1.ema_decay=0.0", "checkpoint_every=1", "log_every=1"])
    train(cfg, progress=False)
    assert not (run / "export_lora").exists()
    export = exported_generator(read_final(run))
    folder = run / "export_transformer"
    saved = load_file(str(folder / "diffusion_pytorch_model.safetensors"))
    assert {v.dtype for v in saved.values()} == {torch.bfloat16}
    model, info = SD3Transformer2DModel.from_pretrained(str(folder), output_loading_info=True, local_files_only=True)
    assert not any(info.values()), info
    got = {k: v.float() for k, v in model.state_dict().items()}
    assert export is not None and set(got) == set(export)
    adapter, _ = build_models(cfg, None)  # the teacher, where the generator started (the same seeded init)
    teacher = {k: v.float() for k, v in adapter.transformer.state_dict().items()}
    moved = False
    for key, value in export.items():
        bound = 2**-8 * value.abs() + 2**-133  # bf16: 8 significant bits; its subnormal step is 2^-133
        assert torch.all((got[key] - value).abs() <= bound), key
        moved |= bool(torch.any((value - teacher[key]).abs() > 2 * bound))
    assert moved, "no weight moved past bf16 rounding: the check above could not tell a stale folder"


def test_a_large_transformer_folder_is_written_in_shards_that_diffusers_reads(tmp_path):
    """Past max_shard_bytes the folder holds numbered shards and diffusers' index (as its own save_pretrained
    writes them); from_pretrained reads them back whole and exact (float32 written as float32)."""
    from diffusers import SD3Transformer2DModel

    from tiltflow.models.export import merged_state_dict, save_transformer_folder, shard_keys

    adapter, models = _perturbed_generator(SD3Adapter, "tiny_sd3")
    state = merged_state_dict(models.generator, models.generator_adapters, torch.float32)
    total = sum(v.numel() for v in state.values()) * 4
    folder = save_transformer_folder(adapter.transformer, state, tmp_path / "sharded", torch.float32,
                                     max_shard_bytes=total // 3)
    shards = sorted(p.name for p in folder.glob("diffusion_pytorch_model-*.safetensors"))
    assert len(shards) >= 3 and shards[0].endswith(f"-00001-of-{len(shards):05d}.safetensors")
    assert not (folder / "diffusion_pytorch_model.safetensors").exists()
    index = json.loads((folder / "diffusion_pytorch_model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == total and set(index["weight_map"]) == set(state)
    model, info = SD3Transformer2DModel.from_pretrained(str(folder), output_loading_info=True, local_files_only=True)
    assert not any(info.values()), info
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state.items())
    # The grouping: in order, every group within the limit unless one tensor alone exceeds it.
    sizes = {k: v.numel() * 4 for k, v in state.items()}
    groups = shard_keys(state, 4, total // 3)
    assert [k for g in groups for k in g] == list(state)
    assert all(sum(sizes[k] for k in g) <= total // 3 or len(g) == 1 for g in groups)


@pytest.mark.parametrize("init", ["teacher", "generator_init"])
def test_tiltflow_export_merges_the_lora_into_the_generator_s_own_base(init, tmp_path, capsys):
    """`tiltflow export` of a LoRA run: the generator's LoRA merged into the generator's base - the teacher, or
    with model.generator_init (FLUX.2's step-distilled model; here another random transformer) that model, not
    the teacher. The float32 folder reproduces the sampling generator's velocity (the tolerance of
    test_merged_transformer_export: (W + BA)x against Wx + B(Ax), a few float32 roundings)."""
    from diffusers import SD3Transformer2DModel
    from safetensors.torch import load_file

    from tiltflow.cli import main
    from tiltflow.training.spine import train
    from tiltflow.worlds.diffusers_world import build_models, sampling_models
    from tiltflow.worlds.registry import load_run_config

    run = tmp_path / "run"
    extra = ["model.generator_init=random", "lora.layout=separate"] if init == "generator_init" else []
    cfg = load_run_config(None, ["world=diffusers", "model.family=sd3", "model.random_weights=true",
                                 "model.arch=tiny_sd3", "model.resolution=32", "device=cpu", "prompts=[a red cat]",
                                 "lora.rank=4", "lora.alpha=8", "stage=ac_dmd", f"run_dir={run}", *extra,
                                 "stage1.num_iters=1", "stage1.batch_size=2", "stage1.n_fake=1", "stage1.lr=1e-2",
                                 "stage1.ema_decay=0.0", "checkpoint_every=1", "log_every=1"])
    train(cfg, progress=False)
    out = tmp_path / "merged"
    assert main(["export", "--run", str(run), "--out", str(out), "--dtype", "fp32"]) == 0
    merged = SD3Transformer2DModel.from_pretrained(str(out), local_files_only=True)
    adapter, models = sampling_models(cfg, build_models)
    x = torch.randn(2, *adapter.latent_shape(32, 32), generator=torch.Generator().manual_seed(0))
    s, cond = torch.tensor([0.3, 0.9]), adapter.encode(PROMPTS)
    with torch.no_grad():
        torch.testing.assert_close(adapter.forward(merged, x, s, cond), models.generator_role.velocity(x, s, cond),
                                   atol=2e-5, rtol=1e-5)
        assert not torch.allclose(adapter.forward(merged, x, s, cond), models.teacher_role.velocity(x, s, cond),
                                  atol=1e-3)
    assert main(["export", "--run", str(run), "--out", str(tmp_path / "bf16")]) == 0  # the default: bf16
    weights = next((tmp_path / "bf16").glob("*.safetensors"))
    assert {v.dtype for v in load_file(str(weights)).values()} == {torch.bfloat16}
