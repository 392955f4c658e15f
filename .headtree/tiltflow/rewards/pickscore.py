"""PickScore (Kirstain et al. 2023): a CLIP ViT-H/14 fine-tuned on human preferences (a training reward).

Score = exp(logit_scale) * cos(image, prompt), as the released model card computes it (about 100 * cos;
typical values 18-24). Weights: yuvalkirstain/PickScore_v1; processor and tokenizer:
laion/CLIP-ViT-H-14-laion2B-s32B-b79K (the base model it was fine-tuned from).
"""

from __future__ import annotations

from pathlib import Path

from tiltflow.rewards.clip_score import ClipSimilarityReward
from tiltflow.rewards.loading import load_clip

DEFAULT_MODEL = "yuvalkirstain/PickScore_v1"
DEFAULT_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"


def build_pickscore(model: str | Path = DEFAULT_MODEL, *, processor: str | Path = DEFAULT_PROCESSOR,
                    device: str = "cpu", dtype: str = "float32", name: str = "pickscore") -> ClipSimilarityReward:
    """PickScore from a hub id or local folder; differentiable in the pixels."""
    encoder = load_clip(model, processor=processor, device=device, dtype=dtype, what="PickScore model")
    return ClipSimilarityReward(encoder, name=name, scale="logit_scale")
