"""CLIP-based scorers on tiny random CLIP models built from configs and loaded by path (offline)."""

from __future__ import annotations

import sys
import types

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_rewards import make_aesthetic_head, make_tiny_clip_folder

from tiltflow.rewards.aesthetic import AestheticHead, build_aesthetic
from tiltflow.rewards.base import RewardOutput, RewardSet
from tiltflow.rewards.clip_score import build_clip_score
from tiltflow.rewards.loading import load_state_dict
from tiltflow.rewards.pickscore import build_pickscore

PROMPTS = ["a red cube", "two dogs on grass"]



@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return make_tiny_clip_folder(tmp_path_factory.mktemp("tiny_clip"), seed=0)


def uint8_images(seed: int, size: int = 32) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(2, size, size, 3), dtype=np.uint8)


def as_float(arrays: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(arrays).permute(0, 3, 1, 2).float() / 255


def reference_cosine(clip_dir, arrays: np.ndarray, prompts: list[str]) -> torch.Tensor:
    """transformers' own pipeline: CLIPProcessor on PIL images + get_*_features."""
    from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer

    model = CLIPModel.from_pretrained(str(clip_dir)).eval()
    pixels = CLIPImageProcessor.from_pretrained(str(clip_dir))(
        images=[Image.fromarray(a) for a in arrays], return_tensors="pt"
    )["pixel_values"]
    tokens = CLIPTokenizer.from_pretrained(str(clip_dir))(
        prompts, padding="max_length", max_length=16, truncation=True, return_tensors="pt"
    )
    with torch.no_grad():
        image, text = model.get_image_features(pixel_values=pixels), model.get_text_features(**tokens)
    image = image if isinstance(image, torch.Tensor) else image.pooler_output
    text = text if isinstance(text, torch.Tensor) else text.pooler_output
    return torch.nn.functional.cosine_similarity(image, text, dim=-1)


def test_clip_score_matches_transformers_pipeline(clip_dir):
    # 32x32 inputs need no resize, so preprocessing is exact and only float rounding remains.
    arrays = uint8_images(1)
    reward = build_clip_score(clip_dir)
    out = reward(as_float(arrays), PROMPTS)
    expected = reference_cosine(clip_dir, arrays, PROMPTS)
    assert reward.name == "clip_score" and reward.differentiable
    torch.testing.assert_close(out.extras["cosine"], expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.scores, 100 * expected, atol=1e-3, rtol=0)


def test_pickscore_uses_logit_scale(clip_dir):
    reward = build_pickscore(clip_dir, processor=clip_dir)
    out = reward(as_float(uint8_images(2)), PROMPTS)
    assert reward.scale == pytest.approx(float(reward.encoder.model.logit_scale.exp()))
    torch.testing.assert_close(out.scores, reward.scale * out.extras["cosine"])


def test_aesthetic_head_follows_released_layout(clip_dir, tmp_path):
    head_path = make_aesthetic_head(tmp_path / "head.pth", in_features=16)
    state = load_state_dict(head_path)
    reference = torch.nn.Module()  # the released module: `layers`, linear maps with dropouts between
    reference.layers = torch.nn.Sequential(
        torch.nn.Linear(16, 24),
        torch.nn.Dropout(0.2),
        torch.nn.Linear(24, 12),
        torch.nn.Dropout(0.2),
        torch.nn.Linear(12, 8),
        torch.nn.Dropout(0.1),
        torch.nn.Linear(8, 4),
        torch.nn.Linear(4, 1),
    )
    reference.load_state_dict(state)
    reference = reference.layers.eval()
    embeds = torch.nn.functional.normalize(torch.randn(5, 16), dim=-1)
    torch.testing.assert_close(AestheticHead(state)(embeds), reference(embeds).squeeze(-1))

    reward = build_aesthetic(head_path, clip=clip_dir)
    images = as_float(uint8_images(3))
    with torch.no_grad():
        expected = reference(reward.encoder.image_embeds(images))
    torch.testing.assert_close(reward(images, PROMPTS).scores.detach(), expected.squeeze(-1))


def test_aesthetic_errors_name_the_problem(clip_dir, tmp_path):
    with pytest.raises(ValueError, match="head=PATH"):
        build_aesthetic(None, clip=clip_dir)
    with pytest.raises(ValueError, match="expects 12-d embeddings"):
        build_aesthetic(make_aesthetic_head(tmp_path / "h.pth", in_features=12), clip=clip_dir)
    with pytest.raises(ValueError, match="layers.N.weight"):
        AestheticHead({"fc.weight": torch.zeros(1, 4)})


@pytest.mark.parametrize("which", ["clip_score", "pickscore", "aesthetic"])
def test_gradients_reach_pixels(clip_dir, tmp_path, which):
    if which == "clip_score":
        reward = build_clip_score(clip_dir)
    elif which == "pickscore":
        reward = build_pickscore(clip_dir, processor=clip_dir)
    else:
        reward = build_aesthetic(make_aesthetic_head(tmp_path / "h.pth"), clip=clip_dir)
    images = torch.rand(2, 3, 48, 40).mul(0.8).add(0.1).requires_grad_(True)  # needs a resize
    reward(images, PROMPTS).scores.sum().backward()
    assert images.grad is not None and torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0
    assert all(p.grad is None for p in reward.encoder.model.parameters())  # frozen scorer


class Constant:
    name, differentiable = "constant", False

    def __call__(self, samples, prompts):
        return RewardOutput(scores=torch.full((samples.shape[0],), 2.0))


def test_reward_set_arithmetic(clip_dir, tmp_path):
    clip = build_clip_score(clip_dir)
    aesthetic = build_aesthetic(make_aesthetic_head(tmp_path / "h.pth"), clip=clip_dir)
    reward_set = RewardSet([clip, aesthetic, Constant()], weights=[2.0, 0.5, 3.0])
    images = as_float(uint8_images(4))
    out = reward_set(images, PROMPTS)
    c, a = clip(images, PROMPTS).scores, aesthetic(images, PROMPTS).scores
    torch.testing.assert_close(out.total, 2 * c + 0.5 * a + 6.0)
    torch.testing.assert_close(out.differentiable_total, 2 * c + 0.5 * a)
    torch.testing.assert_close(out.per_reward["constant"], torch.full((2,), 2.0))
    only = reward_set(images, PROMPTS, only_differentiable=True)
    assert set(only.per_reward) == {"clip_score", "aesthetic"} and reward_set.differentiable


def test_imagereward_missing_package_gives_install_hint(monkeypatch):
    from tiltflow.rewards.imagereward import build_imagereward

    monkeypatch.setitem(sys.modules, "ImageReward", None)  # makes `import ImageReward` fail
    with pytest.raises(ImportError, match="pip install image-reward"):
        build_imagereward()


def test_imagereward_wrapper_with_a_stand_in_package(monkeypatch):
    from tiltflow.rewards.imagereward import build_imagereward

    calls = []

    class StandIn(torch.nn.Module):
        def score(self, prompt, image):
            calls.append((prompt, image.size))
            return float(len(prompt))

    module = types.ModuleType("ImageReward")
    module.load = lambda name, device, download_root, med_config: StandIn()
    monkeypatch.setitem(sys.modules, "ImageReward", module)
    reward = build_imagereward()
    out = reward(torch.rand(2, 3, 20, 24), PROMPTS)
    assert not reward.differentiable and out.scores.tolist() == [10.0, 17.0]
    assert calls == [("a red cube", (24, 20)), ("two dogs on grass", (24, 20))]
