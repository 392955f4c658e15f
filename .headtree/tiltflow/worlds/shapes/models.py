"""The shapes world's teacher: a diffusers SD3Transformer2DModel on pixels (3 channels, no VAE) with the
world's text encoder, seen as a tiltflow Backbone through a small adapter that follows the SD3 adapter's
conventions (tiltflow/models/adapters/sd3.py: timestep = 1000 sigma, v = eps - x0, CFG by guided_velocity:
one pass at batch 2B, or two passes with batched_cfg off).
Images are x0 in [-1, 1]; decode maps them to [0, 1]."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from tiltflow.models.adapters.common import TransformerAdapter, batch_sigma, to_unit_range
from tiltflow.models.adapters.sd3 import LORA_PATTERN
from tiltflow.worlds.shapes.scene import parse
from tiltflow.worlds.shapes.text import TextEncoder

IN_CHANNELS = 3


def transformer_config(spec: Any, text_hidden: int) -> dict[str, Any]:
    """SD3Transformer2DModel arguments for a ShapesModelSpec: pixels in, joint attention over the caption's
    token states (width text_hidden) and the pooled [EOS] state."""
    inner = spec.num_heads * spec.head_dim
    return {"sample_size": spec.resolution, "patch_size": spec.patch_size, "in_channels": IN_CHANNELS,
            "out_channels": IN_CHANNELS, "num_layers": spec.num_layers, "attention_head_dim": spec.head_dim,
            "num_attention_heads": spec.num_heads, "joint_attention_dim": text_hidden,
            "caption_projection_dim": inner, "pooled_projection_dim": text_hidden,
            "pos_embed_max_size": spec.resolution // spec.patch_size}


def new_transformer(spec: Any, text_hidden: int, seed: int) -> nn.Module:
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    return SD3Transformer2DModel(**transformer_config(spec, text_hidden))


def load_transformer(folder: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    from diffusers import SD3Transformer2DModel

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"teacher folder {str(folder)!r} has no config.json; train it with "
                                "`tiltflow train --config configs/shapes/teacher.yaml`")
    model = SD3Transformer2DModel.from_pretrained(str(folder), use_safetensors=True, local_files_only=True)
    return model.float().to(device).eval().requires_grad_(False)  # stored in fp16, computed in fp32


class ShapesAdapter(TransformerAdapter):
    """The teacher transformer and the text encoder as a Backbone plus what a Task needs (cf. DiffusersAdapter).
    Any transformer of the same architecture (LoRA-wrapped, a copy) runs through `forward`."""

    family = "sd3"
    guidance = None  # no guidance input: CFG goes through guided_velocity
    lora_pattern = LORA_PATTERN

    def __init__(self, transformer: nn.Module, text: TextEncoder, device: str | torch.device = "cpu"):
        self.transformer = transformer
        self.text = text
        self.device = torch.device(device)
        self._cache: dict[str, dict[str, Tensor]] = {}

    @staticmethod
    def load(models_dir: str | Path, device: str | torch.device = "cpu") -> ShapesAdapter:
        root = Path(models_dir)
        return ShapesAdapter(load_transformer(root / "teacher", device), TextEncoder(root / "text_encoder", device),
                             device)

    @property
    def resolution(self) -> int:
        return int(self.transformer.config.sample_size)

    def forward(self, transformer: nn.Module, x: Tensor, sigma: Tensor, cond: dict[str, Tensor],
                guidance: float | None = None) -> Tensor:
        if guidance is not None:
            raise ValueError("the shapes teacher has no guidance input; CFG is applied by guided_velocity")
        timestep = batch_sigma(sigma, x) * 1000.0  # the SD3 convention
        return transformer(hidden_states=x, timestep=timestep, encoder_hidden_states=cond["prompt_embeds"],
                           pooled_projections=cond["pooled"], return_dict=False)[0].float()

    def encode(self, prompts: Sequence[Any]) -> dict[str, Tensor]:
        """Captions -> conditioning; a caption outside the vocabulary raises VocabularyError naming the word."""
        texts = [str(p) for p in prompts]
        missing = sorted({t for t in texts if t not in self._cache})
        for t in missing:
            if t:
                parse(t)
        if missing:
            fresh = self.text(missing)
            for i, t in enumerate(missing):
                self._cache[t] = {k: v[i].to(self.device) for k, v in fresh.items()}
        return {k: torch.stack([self._cache[t][k] for t in texts]) for k in ("prompt_embeds", "pooled")}

    def latent_shape(self, height: int, width: int) -> tuple[int, ...]:
        return (IN_CHANNELS, height, width)

    decode = staticmethod(to_unit_range)  # x0 in [-1, 1] -> images in [0, 1], differentiable

    @staticmethod
    def encode_images(images: Tensor) -> Tensor:
        """Images in [0, 1] -> x0 in [-1, 1]."""
        return images.float() * 2 - 1


@torch.no_grad()
def euler_sample(velocity: Any, cond: dict[str, Tensor], uncond: dict[str, Tensor] | None, scale: float,
                 shape: tuple[int, ...], num_steps: int, generator: torch.Generator, device: torch.device) -> Tensor:
    """The teacher's many-step sampler: Euler on the probability-flow ODE from sigma = 1 to 0 with CFG
    v_u + scale (v_c - v_u) (scale 1 or no uncond: the conditional velocity alone). Returns x0 (B, *shape)."""
    n = cond["pooled"].shape[0]
    x = torch.randn((n, *shape), generator=generator).to(device)
    sigmas = torch.linspace(1.0, 0.0, num_steps + 1).tolist()
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        sig = torch.full((n,), s, device=device)
        v = velocity(x, sig, cond)
        if uncond is not None and scale != 1.0:
            v_u = velocity(x, sig, uncond)
            v = v_u + scale * (v - v_u)
        x = x + (s_next - s) * v
    return x
