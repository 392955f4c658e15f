"""The committed shapes models (checkpoints/shapes/) through the normal loaders, and a stage-1 and a stage-2
iteration on the CPU from them with the shipped configs (issue 9's tests: the other shapes tests train tiny
models of their own)."""

from __future__ import annotations

from pathlib import Path

import torch

from tiltflow.training.spine import train
from tiltflow.worlds.registry import load_run_config

ROOT = Path(__file__).resolve().parents[2]
MODELS = ROOT / "checkpoints" / "shapes"
SMALL = ["device=cpu", f"models_dir={MODELS}", "eval.every=0", "eval.max_prompts=2", "eval.num_per_prompt=1",
         "log_every=1", "checkpoint_every=1000"]


def test_committed_models_load_through_the_normal_loaders():
    from diffusers import SD3Transformer2DModel
    from safetensors.torch import load_file
    from transformers import CLIPModel, PreTrainedTokenizerFast

    from tiltflow.worlds.shapes.models import ShapesAdapter
    from tiltflow.worlds.shapes.render import render
    from tiltflow.worlds.shapes.reward_model import load_clip_reward
    from tiltflow.worlds.shapes.scene import parse

    for part, stored in (("teacher", "diffusion_pytorch_model"), ("reward_model", "model")):
        assert {v.dtype for v in load_file(str(MODELS / part / f"{stored}.safetensors")).values()} == {torch.float16}
    teacher = SD3Transformer2DModel.from_pretrained(str(MODELS / "teacher"), local_files_only=True)
    assert teacher.config.in_channels == 3 and teacher.config.out_channels == 3
    CLIPModel.from_pretrained(str(MODELS / "reward_model"), local_files_only=True)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(MODELS / "text_encoder"))
    assert tokenizer.tokenize("a photo of a red square") == ["a", "photo", "of", "a", "red", "square"]
    adapter = ShapesAdapter.load(MODELS)
    cond = adapter.encode(["a photo of a red square"])
    x = torch.zeros(1, 3, 32, 32)
    v = adapter.forward(adapter.transformer, x, torch.tensor([0.5]), cond)
    assert v.shape == x.shape and torch.isfinite(v).all()
    reward = load_clip_reward(MODELS / "reward_model")
    image = torch.from_numpy(render(parse("a photo of a red square"), 32, 0)).permute(2, 0, 1)[None].float() / 255
    right, wrong = (reward(image, [t]).scores.item() for t in ("a photo of a red square", "a photo of a blue square"))
    assert right > wrong  # the trained reward model tells the caption from its wrong-colour negative


def test_a_stage1_and_a_stage2_iteration_from_the_committed_models(tmp_path):
    s1, s2 = tmp_path / "ac_dmd", tmp_path / "rtdmd"
    cfg1 = load_run_config(ROOT / "configs" / "shapes" / "ac_dmd.yaml",
                           [*SMALL, f"run_dir={s1}", "stage1.num_iters=1", "stage1.batch_size=2", "stage1.n_fake=1"])
    m1 = train(cfg1, progress=False)
    assert 0.0 <= m1["verifier/overall"] <= 1.0 and (s1 / "final.safetensors").is_file()
    cfg2 = load_run_config(ROOT / "configs" / "shapes" / "rtdmd.yaml",
                           [*SMALL, f"run_dir={s2}", f"init_from={s1}", "stage2.num_iters=1",
                            "stage2.num_prompts=1", "stage2.group_size=2", "stage2.ema_every=1"])
    m2 = train(cfg2, progress=False)
    assert "reward/clip" in m2 and "reward/verifier" in m2 and (s2 / "final.safetensors").is_file()
