"""CLIPScore: scaled cosine similarity of CLIP image and prompt embeddings (a training reward, METHOD.md 5.5).

The score is `scale * cos(image, prompt)` with scale = 100 by default, i.e. torchmetrics' CLIPScore
without its clamp at 0 (the clamp would zero the gradient of poorly aligned samples); the CLIPScore
paper's "CLIP-S" is 2.5 * max(cos, 0), i.e. this value times 0.025 where it is positive.
ClipSimilarityReward also serves PickScore and HPSv2, which differ only in weights and scale.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from tiltflow.rewards.base import RewardOutput
from tiltflow.rewards.loading import ClipEncoder, load_clip
from tiltflow.rewards.preprocess import check_images, prompt_texts

DEFAULT_CLIP = "openai/clip-vit-large-patch14"


class ClipSimilarityReward:
    """`scale * cos(image_embed, text_embed)` for a frozen CLIP encoder; differentiable in the pixels.

    scale: a number, or "logit_scale" to use the model's learned temperature exp(logit_scale).
    """

    differentiable = True

    def __init__(self, encoder: ClipEncoder, *, name: str, scale: float | str = 100.0):
        if isinstance(scale, str) and scale != "logit_scale":
            raise ValueError(f"scale must be a number or 'logit_scale', got {scale!r}")
        self.encoder = encoder
        self.name = name
        self.scale = encoder.logit_scale() if scale == "logit_scale" else float(scale)

    def __call__(self, samples: Tensor, prompts: Sequence[Any]) -> RewardOutput:
        check_images(samples)
        texts = prompt_texts(prompts, samples.shape[0])
        image = self.encoder.image_embeds(samples)  # (B, D)
        with torch.no_grad():
            text = self.encoder.text_embeds(texts)  # (B, D)
        cosine = (image * text).sum(dim=-1)
        return RewardOutput(scores=self.scale * cosine, extras={"cosine": cosine.detach()})


def build_clip_score(model: str | Path = DEFAULT_CLIP, *, processor: str | Path | None = None, scale: float = 100.0,
                     device: str = "cpu", dtype: str = "float32", name: str = "clip_score") -> ClipSimilarityReward:
    """CLIPScore on a transformers CLIPModel (hub id or local folder; default openai/clip-vit-large-patch14)."""
    encoder = load_clip(model, processor=processor, device=device, dtype=dtype, what="CLIPScore model")
    return ClipSimilarityReward(encoder, name=name, scale=scale)
