"""Differentiable image preprocessing for reward models: resize, center crop, normalise (all torch).

On ordinary inputs it reproduces transformers' CLIPImageProcessor and open_clip's eval transform up to
the uint8 rounding those processors apply after resizing, while gradients flow back to the pixels.
Also holds the small input checks shared by every scorer (image batch layout, prompt text).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch.nn.functional as F
from torch import Tensor

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# PIL resampling codes as stored in preprocessor_config.json ("resample").
_PIL_RESAMPLE = {2: "bilinear", 3: "bicubic"}


@dataclass(frozen=True)
class ImagePreprocess:
    """Resize -> center crop -> normalise, for images in [0, 1] of shape (B, 3, H, W).

    shortest_edge: resize so the short side has this length, keeping the aspect ratio (the long side is
        truncated to an int, as both transformers and torchvision do); size: resize to exactly (h, w)
        instead; both None: no resize.
    resample: "bicubic" or "bilinear", always antialiased (PIL filters with a support that grows when
        shrinking; torch's antialias=True implements the same kernels, Keys a = -0.5 for bicubic).
    crop_rounding: "floor" puts the crop at (H - h) // 2 like transformers; "round" at round((H - h) / 2)
        like torchvision (and so open_clip). They differ by one pixel when H - h is odd.
    clamp: clip the resized image to [0, 1], as the processors' uint8 output does (bicubic overshoots).
    """

    shortest_edge: int | None = 224
    size: tuple[int, int] | None = None
    crop_size: tuple[int, int] | None = (224, 224)
    resample: str = "bicubic"
    mean: tuple[float, ...] = OPENAI_CLIP_MEAN
    std: tuple[float, ...] = OPENAI_CLIP_STD
    crop_rounding: str = "floor"
    clamp: bool = True

    def __post_init__(self) -> None:
        if self.resample not in ("bicubic", "bilinear"):
            raise ValueError(f"resample must be 'bicubic' or 'bilinear', got {self.resample!r}")
        if self.crop_rounding not in ("floor", "round"):
            raise ValueError(f"crop_rounding must be 'floor' or 'round', got {self.crop_rounding!r}")
        if self.shortest_edge is not None and self.size is not None:
            raise ValueError("give shortest_edge or size, not both")
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ValueError(f"mean and std need 3 values, got {self.mean} and {self.std}")

    @classmethod
    def from_processor_config(cls, config: Mapping[str, Any], **overrides: Any) -> ImagePreprocess:
        """Build from a transformers preprocessor_config.json dictionary (CLIPImageProcessor fields)."""
        resample_code = int(config.get("resample", 3))
        if resample_code not in _PIL_RESAMPLE:
            raise ValueError(f"preprocessor 'resample'={resample_code} is not supported; expected one of "
                             f"{sorted(_PIL_RESAMPLE)} (PIL bilinear, bicubic)")
        if config.get("do_rescale", True) and abs(float(config.get("rescale_factor", 1 / 255)) - 1 / 255) > 1e-9:
            raise ValueError(f"preprocessor 'rescale_factor'={config['rescale_factor']} is not 1/255; inputs here "
                             "are already in [0, 1]")
        shortest_edge, size = None, None
        if config.get("do_resize", True):
            shortest_edge, size = _parse_resize(config.get("size", {"shortest_edge": 224}))
        crop_size = _parse_hw(config.get("crop_size", 224)) if config.get("do_center_crop", True) else None
        normalize = config.get("do_normalize", True)
        kwargs: dict[str, Any] = dict(
            shortest_edge=shortest_edge,
            size=size,
            crop_size=crop_size,
            resample=_PIL_RESAMPLE[resample_code],
            mean=tuple(config.get("image_mean", OPENAI_CLIP_MEAN)) if normalize else (0.0, 0.0, 0.0),
            std=tuple(config.get("image_std", OPENAI_CLIP_STD)) if normalize else (1.0, 1.0, 1.0),
        )
        kwargs.update(overrides)
        return cls(**kwargs)

    @classmethod
    def from_pretrained(cls, folder: str | Path, **overrides: Any) -> ImagePreprocess:
        """Read <folder>/preprocessor_config.json."""
        path = Path(folder) / "preprocessor_config.json"
        if not path.is_file():
            raise FileNotFoundError(f"no preprocessor_config.json in {folder}")
        return cls.from_processor_config(json.loads(path.read_text()), **overrides)

    def resized_hw(self, height: int, width: int) -> tuple[int, int]:
        """(h, w) after the resize step, before cropping."""
        if self.size is not None:
            return self.size
        if self.shortest_edge is None:
            return height, width
        short, long = min(height, width), max(height, width)
        new_short, new_long = self.shortest_edge, int(self.shortest_edge * long / short)
        return (new_short, new_long) if height <= width else (new_long, new_short)

    def __call__(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, 3, crop_h, crop_w) normalised, float32, differentiable."""
        check_images(images)
        x = images.float()
        h, w = self.resized_hw(x.shape[-2], x.shape[-1])
        x = self._resize(x, h, w)
        if self.crop_size is not None:
            x = center_crop(x, self.crop_size, rounding=self.crop_rounding)
        mean = x.new_tensor(self.mean).view(1, 3, 1, 1)
        std = x.new_tensor(self.std).view(1, 3, 1, 1)
        return (x - mean) / std

    def _resize(self, x: Tensor, height: int, width: int) -> Tensor:
        """One separable antialiased resize, clamped once at the end. PIL rounds and clips its 8-bit
        intermediate pass too; that only matters where bicubic overshoots past 0 or 1 (hard edges against
        pure black or white), where results can differ by a few uint8 levels."""
        if (height, width) == tuple(x.shape[-2:]):
            return x
        x = F.interpolate(x, size=(height, width), mode=self.resample, align_corners=False, antialias=True)
        return x.clamp(0.0, 1.0) if self.clamp else x


def center_crop(x: Tensor, crop_size: tuple[int, int], *, rounding: str = "floor") -> Tensor:
    """Crop the central (h, w) window of (..., H, W); see ImagePreprocess for `rounding`."""
    height, width = x.shape[-2], x.shape[-1]
    crop_h, crop_w = crop_size
    if crop_h > height or crop_w > width:
        raise ValueError(f"crop size {crop_size} is larger than the resized image ({height}, {width})")
    if rounding == "floor":
        top, left = (height - crop_h) // 2, (width - crop_w) // 2
    else:
        top, left = int(round((height - crop_h) / 2.0)), int(round((width - crop_w) / 2.0))
    return x[..., top : top + crop_h, left : left + crop_w]


def check_images(images: Tensor) -> None:
    """Raise unless images is a floating (B, 3, H, W) tensor (values are expected in [0, 1])."""
    if not isinstance(images, Tensor):
        raise TypeError(f"images must be a torch.Tensor of shape (B, 3, H, W), got {type(images).__name__}")
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must have shape (B, 3, H, W), got {tuple(images.shape)}")
    if not images.is_floating_point():
        raise ValueError(f"images must be floating point in [0, 1], got dtype {images.dtype}")


class Prompt(str):
    """A prompt string that carries metadata (e.g. GenEval's "tag" and "include") for rewards that use it.

    It behaves as its text everywhere a str is expected; the remote reward sends the metadata along.
    """

    metadata: dict[str, Any]

    def __new__(cls, text: str, metadata: Mapping[str, Any] | None = None) -> Prompt:
        obj = super().__new__(cls, text)
        obj.metadata = dict(metadata or {})
        return obj

    def __reduce__(self) -> tuple[Any, ...]:
        return (Prompt, (str(self), self.metadata))


def prompt_texts(prompts: Sequence[Any], batch_size: int) -> list[str]:
    """Plain strings from prompts given as str (or str subclasses) or mappings with a "prompt" key."""
    if len(prompts) != batch_size:
        raise ValueError(f"got {len(prompts)} prompts for {batch_size} images")
    texts = []
    for i, p in enumerate(prompts):
        if isinstance(p, str):
            texts.append(str.__str__(p))  # a plain str, even for str subclasses carrying metadata
        elif isinstance(p, Mapping) and isinstance(p.get("prompt"), str):
            texts.append(p["prompt"])
        else:
            raise TypeError(f"prompt {i} must be a str or a mapping with a 'prompt' string, got {type(p).__name__}")
    return texts


def _parse_hw(value: Any) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    if isinstance(value, Mapping) and "height" in value and "width" in value:
        return int(value["height"]), int(value["width"])
    raise ValueError(f"expected an int or {{'height', 'width'}} for a size, got {value!r}")


def _parse_resize(value: Any) -> tuple[int | None, tuple[int, int] | None]:
    """(shortest_edge, size) from a processor 'size' entry; an int means shortest edge, as for CLIP."""
    if isinstance(value, int):
        return value, None
    if isinstance(value, Mapping):
        if "shortest_edge" in value and value.get("longest_edge") is None:
            return int(value["shortest_edge"]), None
        if "height" in value and "width" in value:
            return None, (int(value["height"]), int(value["width"]))
    raise ValueError(
        f"unsupported processor 'size' {value!r}; expected an int, {{'shortest_edge'}} or {{'height', 'width'}}"
    )
