"""LAION aesthetic predictor (improved-aesthetic-predictor, "sac+logos+ava1-l14-linearMSE"): an MLP head
on the L2-normalised CLIP ViT-L/14 image embedding, predicting a 1-10 rating. Prompts are ignored.

The released head is a stack of linear layers stored as `layers.{0,2,4,6,7}.{weight,bias}` with
widths 768 -> 1024 -> 128 -> 64 -> 16 -> 1; the gaps in the indices are dropout layers, and there is no
non-linearity between them (the "linear" in the file name), so at eval time the head is the plain
composition of those linear maps, which is what AestheticHead computes from whatever indices it finds.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from tiltflow.rewards.base import RewardOutput
from tiltflow.rewards.clip_score import DEFAULT_CLIP
from tiltflow.rewards.loading import ClipEncoder, load_clip, load_state_dict
from tiltflow.rewards.preprocess import check_images

HEAD_FILE = "sac+logos+ava1-l14-linearMSE.pth"
_LAYER_KEY = re.compile(r"^layers\.(\d+)\.(weight|bias)$")


class AestheticHead(nn.Module):
    """The composition of the linear layers found in a `layers.N.{weight,bias}` state dict, in N order."""

    def __init__(self, state: dict[str, Tensor]):
        super().__init__()
        indices = sorted({int(m.group(1)) for k in state if (m := _LAYER_KEY.match(k))})
        unknown = [k for k in state if not _LAYER_KEY.match(k)]
        if not indices or unknown:
            raise ValueError(f"aesthetic head: expected keys layers.N.weight/bias, got unexpected {unknown[:5]} "
                             f"and {len(indices)} layers")
        self.linears = nn.Sequential()
        for i in indices:
            weight, bias = state[f"layers.{i}.weight"], state.get(f"layers.{i}.bias")
            layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
            with torch.no_grad():
                layer.weight.copy_(weight)
                if bias is not None:
                    layer.bias.copy_(bias)
            self.linears.append(layer)
        for a, b in zip(self.linears[:-1], self.linears[1:]):
            if a.out_features != b.in_features:
                raise ValueError(f"aesthetic head: layer widths do not chain ({a} then {b})")
        if self.linears[-1].out_features != 1:
            raise ValueError(f"aesthetic head: last layer must output 1 value, got {self.linears[-1]}")

    @property
    def in_features(self) -> int:
        return self.linears[0].in_features

    def forward(self, embeds: Tensor) -> Tensor:
        return self.linears(embeds).squeeze(-1)


class AestheticReward:
    """Aesthetic score (about 1-10) of each image; differentiable in the pixels."""

    differentiable = True

    def __init__(self, encoder: ClipEncoder, head: AestheticHead, *, name: str = "aesthetic"):
        self.encoder, self.head, self.name = encoder, head, name

    def __call__(self, samples: Tensor, prompts: Sequence[Any]) -> RewardOutput:
        check_images(samples)
        embeds = self.encoder.image_embeds(samples)  # (B, 768), unit norm
        return RewardOutput(scores=self.head(embeds.to(self.head.linears[0].weight.dtype)))


def build_aesthetic(head: str | Path | None = None, *, clip: str | Path = DEFAULT_CLIP, device: str = "cpu",
                    dtype: str = "float32", name: str = "aesthetic") -> AestheticReward:
    """head: local path to the released MLP head (.pth, loaded weights_only, or a .safetensors copy)."""
    if head is None:
        raise ValueError(f"aesthetic: pass head=PATH to the MLP head {HEAD_FILE!r} (released with LAION's "
                         "improved-aesthetic-predictor); see docs/rewards.md")
    head_path = Path(head).expanduser()
    if not head_path.is_file():
        raise FileNotFoundError(f"aesthetic: head file {head_path} does not exist (expected {HEAD_FILE})")
    mlp = AestheticHead(load_state_dict(head_path)).to(device).eval().requires_grad_(False)
    encoder = load_clip(clip, device=device, dtype=dtype, vision_only=True, what="aesthetic CLIP model")
    projection_dim = encoder.model.config.projection_dim
    if mlp.in_features != projection_dim:
        raise ValueError(f"aesthetic: head expects {mlp.in_features}-d embeddings but the CLIP model gives "
                         f"{projection_dim}-d (the released head needs CLIP ViT-L/14)")
    return AestheticReward(encoder, mlp, name=name)
