"""FLUX.1-dev as a tiltflow backbone (WORLDS.md section 3, METHOD.md section 1).

tiltflow latents are the VAE's z normalised as (z - shift_factor) * scaling_factor, shape (B, C, h, w);
the transformer sees them 2x2-packed into (B, h/2 * w/2, 4C) tokens. FluxTransformer2DModel is called
with timestep = sigma (it multiplies by 1000 inside) and predicts v = eps - x0. FLUX.1-dev is guidance
distilled: the teacher's "CFG" is the guidance input (one pass), not two passes. The few-step grid is
shifted by exp(mu), mu from the resolution with diffusers' calculate_shift.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import Tensor, nn

from tiltflow.models.adapters.common import DiffusersAdapter, batch_sigma, shift_from_mu

LORA_PATTERN = (r"(transformer_blocks|single_transformer_blocks)\.\d+\.attn\."
                r"(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)")


def pack_2x2(x: Tensor) -> Tensor:
    """(B, C, h, w) -> (B, h/2 * w/2, 4C): each token holds a 2x2 patch, channel-major."""
    b, c, h, w = x.shape
    x = x.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_2x2(tokens: Tensor, h: int, w: int) -> Tensor:
    """Inverse of pack_2x2 for a (h, w) latent."""
    b, _, c4 = tokens.shape
    x = tokens.reshape(b, h // 2, w // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c4 // 4, h, w)


@functools.lru_cache(maxsize=32)
def image_ids(h2: int, w2: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """(h2 * w2, 3) positions (0, row, col) of the packed tokens, as FluxPipeline builds them; made once per
    shape, device and dtype (a copy from pageable host memory per pass makes the host wait for the GPU).
    Callers only read it."""
    ids = torch.zeros(h2, w2, 3)
    ids[..., 1] = torch.arange(h2)[:, None]
    ids[..., 2] = torch.arange(w2)[None, :]
    return ids.reshape(h2 * w2, 3).to(device=device, dtype=dtype)


class FluxAdapter(DiffusersAdapter):
    family = "flux1"
    pipeline_class = "FluxPipeline"
    default_max_sequence_length = 512
    lora_pattern = LORA_PATTERN

    def __init__(self, pipe: Any, *, guidance: float = 3.5, **kw: Any):
        super().__init__(pipe, **kw)
        self.guidance = float(guidance)  # used when forward() gets none: the teacher's guidance input

    def forward(self, transformer: nn.Module, x: Tensor, sigma: Tensor, cond: dict[str, Tensor],
                guidance: float | None = None) -> Tensor:
        b, _, h, w = x.shape
        dtype = self.input_dtype(transformer)
        g = None
        if transformer.config.guidance_embeds:
            value = self.guidance if guidance is None else float(guidance)
            g = torch.full((b,), value, device=x.device, dtype=torch.float32)
        elif guidance is not None:
            raise ValueError(f"this FLUX transformer has no guidance embedding; got guidance={guidance}")
        txt = cond["prompt_embeds"]
        with self.precision.context(), self.attention():
            tokens = transformer(hidden_states=self._cast(pack_2x2(x), transformer),
                                 timestep=batch_sigma(sigma, x),  # FLUX convention: sigma, x1000 inside
                                 guidance=g, pooled_projections=self._cast(cond["pooled"], transformer),
                                 encoder_hidden_states=self._cast(txt, transformer),
                                 txt_ids=torch.zeros(txt.shape[1], 3, device=x.device, dtype=dtype),
                                 img_ids=image_ids(h // 2, w // 2, x.device, dtype), return_dict=False)[0]
        return unpack_2x2(tokens.float(), h, w)

    def _run_text_encoders(self, prompts: list[str]) -> dict[str, Tensor]:
        embeds, pooled, _ = self.pipe.encode_prompt(prompt=prompts, prompt_2=None, device=self.device,
                                                    max_sequence_length=self.max_sequence_length)
        return {"prompt_embeds": embeds, "pooled": pooled}

    def stub_shapes(self) -> dict[str, tuple[int, ...]]:
        cfg = self.transformer.config
        return {"prompt_embeds": (self.max_sequence_length, cfg.joint_attention_dim),
                "pooled": (cfg.pooled_projection_dim,)}

    def latent_shape(self, height: int, width: int) -> tuple[int, ...]:
        f = self.vae_scale_factor
        if height % (2 * f) or width % (2 * f):
            raise ValueError(f"FLUX resolution must be a multiple of {2 * f}, got {height}x{width}")
        return (self.transformer.config.in_channels // 4, height // f, width // f)

    def sigma_shift(self, height: int, width: int, num_steps: int) -> float:
        """exp(mu) (or mu for a 'linear' time shift): the dynamic shift FluxPipeline applies at this
        resolution; on sigma = 1 the exponential shift is the static shift with k = exp(mu)."""
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        _, h, w = self.latent_shape(height, width)
        cfg = self.pipe.scheduler.config
        mu = calculate_shift((h // 2) * (w // 2), cfg.get("base_image_seq_len", 256),
                             cfg.get("max_image_seq_len", 4096), cfg.get("base_shift", 0.5),
                             cfg.get("max_shift", 1.15))
        return shift_from_mu(mu, cfg)

    def to_pipeline_latents(self, x: Tensor) -> Tensor:
        """FluxPipeline takes (and returns, with output_type='latent') packed latents."""
        return pack_2x2(x)

    def from_pipeline_latents(self, latents: Tensor, height: int, width: int) -> Tensor:
        _, h, w = self.latent_shape(height, width)
        return unpack_2x2(latents.float(), h, w)

    def pipeline_kwargs(self, cond: dict[str, Tensor], uncond: dict[str, Tensor] | None = None,
                        guidance_scale: float = 1.0) -> dict[str, Any]:
        """FLUX.1-dev's guidance input is self.guidance; guidance_scale is the pipeline's true CFG."""
        return {**super().pipeline_kwargs(cond, uncond, self.guidance), "true_cfg_scale": guidance_scale}

