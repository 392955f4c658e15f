"""Differentiable preprocessing vs transformers' CLIPImageProcessor and open_clip's eval transform.

Tolerance (pixel space, before normalisation): 1.2 / 255. Derivation, not tuning: the processors round
their resized image to uint8 (<= 0.5 level) and PIL also rounds its first (horizontal) pass to uint8
(<= 0.5 level), which the second pass scales by at most the L1 norm of the Keys a = -0.5 kernel weights
(1.25): 0.5 + 0.5 * 1.25 = 1.125 levels, plus float-vs-fixed-point noise far below 0.01 level.
"Ordinary" inputs: smooth images with values in [16, 239], where bicubic never overshoots past 0 or 255
(PIL clips its uint8 intermediate there, which this single-pass float resize does not; see preprocess.py).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tiltflow.rewards.preprocess import ImagePreprocess, Prompt, center_crop, check_images, prompt_texts

TOL = 1.2 / 255
FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "hpsv2"



def smooth_image(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    coarse = rng.uniform(16, 239, size=(5, 6, 3)).astype(np.uint8)
    return np.asarray(Image.fromarray(coarse).resize((width, height), Image.Resampling.BILINEAR))


def to_tensor(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(array.copy()).permute(2, 0, 1)[None].float() / 255


def unnormalize(x: torch.Tensor, pre: ImagePreprocess) -> torch.Tensor:
    return x * torch.tensor(pre.std).view(1, 3, 1, 1) + torch.tensor(pre.mean).view(1, 3, 1, 1)


@pytest.mark.parametrize("resample", [3, 2])  # bicubic, bilinear
@pytest.mark.parametrize("hw", [(97, 131), (200, 150), (40, 50), (64, 64), (300, 65), (33, 300)])
def test_matches_clip_image_processor(hw, resample):
    from transformers import CLIPImageProcessor

    processor = CLIPImageProcessor(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64}, resample=resample)
    pre = ImagePreprocess.from_processor_config(processor.to_dict())
    array = smooth_image(np.random.default_rng(sum(hw)), *hw)
    expected = processor(images=Image.fromarray(array), return_tensors="pt")["pixel_values"]
    got = pre(to_tensor(array))
    assert got.shape == expected.shape == (1, 3, 64, 64)
    assert (unnormalize(got, pre) - unnormalize(expected, pre)).abs().max() <= TOL


def test_matches_open_clip_eval_transform_fixture():
    """The fixture image has an odd crop margin, where torchvision rounds and transformers floors."""
    from safetensors.torch import load_file

    io = load_file(str(FIXTURE / "io.safetensors"))
    image = io["image_uint8"].permute(2, 0, 1)[None].float() / 255
    pre = ImagePreprocess(shortest_edge=32, crop_size=(32, 32), crop_rounding="round")
    assert (unnormalize(pre(image), pre) - unnormalize(io["pixel_values"], pre)).abs().max() <= TOL
    floor = ImagePreprocess(shortest_edge=32, crop_size=(32, 32), crop_rounding="floor")
    assert (unnormalize(floor(image), pre) - unnormalize(io["pixel_values"], pre)).abs().max() > 10 * TOL


def test_output_size_rule_matches_transformers():
    pre = ImagePreprocess(shortest_edge=224, crop_size=None)
    assert pre.resized_hw(480, 640) == (224, 298)  # int(224 * 640 / 480) = 298 (truncated)
    assert pre.resized_hw(1000, 300) == (746, 224)


def test_center_crop_rounding():
    x = torch.arange(7.0).view(1, 1, 1, 7).expand(1, 1, 4, 7)
    assert center_crop(x, (4, 4), rounding="floor")[0, 0, 0].tolist() == [1, 2, 3, 4]
    assert center_crop(x, (4, 4), rounding="round")[0, 0, 0].tolist() == [2, 3, 4, 5]  # round(1.5) = 2
    with pytest.raises(ValueError, match="larger than"):
        center_crop(x, (5, 8))


def test_gradient_reaches_pixels():
    pre = ImagePreprocess(shortest_edge=32, crop_size=(32, 32))
    x = torch.rand(2, 3, 50, 40, dtype=torch.float64).mul(0.5).add(0.25).requires_grad_(True)
    pre(x).square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_from_processor_config_variants_and_errors():
    legacy = ImagePreprocess.from_processor_config({"size": 224, "crop_size": 224, "resample": 3})
    assert legacy.shortest_edge == 224 and legacy.crop_size == (224, 224)
    square = ImagePreprocess.from_processor_config({"size": {"height": 32, "width": 48}, "do_center_crop": False})
    assert square.size == (32, 48) and square.crop_size is None
    with pytest.raises(ValueError, match="resample"):
        ImagePreprocess.from_processor_config({"resample": 1})
    with pytest.raises(ValueError, match="rescale_factor"):
        ImagePreprocess.from_processor_config({"rescale_factor": 1.0})


def test_input_checks_name_what_was_given():
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\), got \(3, 8, 8\)"):
        check_images(torch.rand(3, 8, 8))
    with pytest.raises(ValueError, match="floating point"):
        check_images(torch.zeros(1, 3, 8, 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match="2 prompts for 3 images"):
        prompt_texts(["a", "b"], 3)


def test_prompt_carries_metadata_and_is_a_str():
    p = Prompt("a photo of a cat", {"tag": "single_object"})
    assert p == "a photo of a cat" and p.metadata == {"tag": "single_object"}
    texts = prompt_texts([p, {"prompt": "x"}], 2)
    assert texts == ["a photo of a cat", "x"] and type(texts[0]) is str
