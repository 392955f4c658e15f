"""FLUX.2-klein (4B / 9B) as a tiltflow backbone (WORLDS.md section 3, METHOD.md section 1).

tiltflow latents are what Flux2KleinPipeline denoises: the VAE's z (32 channels), 2x2-patchified to
(B, 128, H/16, W/16) and normalised with the VAE's BatchNorm running statistics. The transformer sees
them flattened to (B, h*w, 128) tokens with 4-axis position ids, is called with timestep = sigma (x1000
inside) and predicts v = eps - x0. Text conditioning: Qwen3 hidden states of several layers, stacked.
The base model is the teacher and the fake score; the step-distilled model initialises the generator
(load it with `load_transformer`). The few-step grid is shifted by exp(mu), mu from diffusers'
compute_empirical_mu at this resolution and step count.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from tiltflow.models.adapters.common import DiffusersAdapter, batch_sigma, shift_from_mu

# Double-stream attention projections, and the single-stream blocks' fused projections (qkv + MLP in,
# attention + MLP out): without the latter, 20 of klein-4B's 25 blocks would carry no LoRA.
LORA_PATTERN = (r"transformer_blocks\.\d+\.attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|"
                r"to_add_out)|single_transformer_blocks\.\d+\.attn\.(to_qkv_mlp_proj|to_out)")


def patchify(z: Tensor) -> Tensor:
    """(B, C, H, W) VAE latents -> (B, 4C, H/2, W/2), 2x2 patches channel-major (as diffusers does)."""
    b, c, h, w = z.shape
    z = z.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4)
    return z.reshape(b, c * 4, h // 2, w // 2)


def unpatchify(x: Tensor) -> Tensor:
    b, c4, h, w = x.shape
    x = x.reshape(b, c4 // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3)
    return x.reshape(b, c4 // 4, h * 2, w * 2)


def position_ids(b: int, h: int, w: int, text_len: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """(img_ids (B, h*w, 4), txt_ids (B, L, 4)): coordinates (t, row, col, l) of image and text tokens, views of
    tensors built once per shape and device (see device_position_ids)."""
    img, txt = device_position_ids(h, w, text_len, torch.device(device))
    return img.expand(b, -1, -1), txt.expand(b, -1, -1)


@functools.lru_cache(maxsize=32)
def device_position_ids(h: int, w: int, text_len: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """The (1, N, 4) coordinates on `device`, made once: built on the host, their copy to a GPU from pageable
    memory made the host wait for the GPU twice a pass (8 of the 9 stream synchronisations of batch-1 inference
    on the H200, 2026-12-04). Callers only read them (the transformer takes positions, it does not write them)."""
    zero = torch.arange(1)
    img = torch.cartesian_prod(zero, torch.arange(h), torch.arange(w), zero)
    txt = torch.cartesian_prod(zero, zero, zero, torch.arange(text_len))
    return img.unsqueeze(0).to(device), txt.unsqueeze(0).to(device)


class Flux2Adapter(DiffusersAdapter):
    family = "flux2"
    pipeline_class = "Flux2KleinPipeline"
    default_max_sequence_length = 512
    lora_pattern = LORA_PATTERN

    def __init__(self, pipe: Any, *, text_encoder_out_layers: Sequence[int] = (9, 18, 27), **kw: Any):
        self.text_encoder_out_layers = tuple(int(i) for i in text_encoder_out_layers)
        super().__init__(pipe, **kw)

    def encoder_settings(self) -> str:
        return f"layers={self.text_encoder_out_layers}"

    def forward(self, transformer: nn.Module, x: Tensor, sigma: Tensor, cond: dict[str, Tensor],
                guidance: float | None = None) -> Tensor:
        b, c, h, w = x.shape
        g = None
        if guidance is not None:
            if not transformer.config.guidance_embeds:
                raise ValueError(f"FLUX.2-klein has no guidance embedding (CFG goes through guided_velocity); "
                                 f"got guidance={guidance}")
            g = torch.full((b,), float(guidance), device=x.device, dtype=torch.float32)
        txt = cond["prompt_embeds"]
        img_ids, txt_ids = position_ids(b, h, w, txt.shape[1], x.device)
        tokens = x.reshape(b, c, h * w).permute(0, 2, 1)  # (B, h*w, C)
        with self.precision.context(), self.attention():
            out = transformer(hidden_states=self._cast(tokens, transformer),
                              encoder_hidden_states=self._cast(txt, transformer),
                              timestep=batch_sigma(sigma, x), guidance=g,  # FLUX.2 convention: sigma, x1000 inside
                              img_ids=img_ids, txt_ids=txt_ids, return_dict=False)[0]
        return out[:, : h * w].float().permute(0, 2, 1).reshape(b, c, h, w)

    def _run_text_encoders(self, prompts: list[str]) -> dict[str, Tensor]:
        embeds, _ = self.pipe.encode_prompt(prompt=prompts, device=self.device,
                                            max_sequence_length=self.max_sequence_length,
                                            text_encoder_out_layers=self.text_encoder_out_layers)
        return {"prompt_embeds": embeds}

    def stub_shapes(self) -> dict[str, tuple[int, ...]]:
        return {"prompt_embeds": (self.max_sequence_length, self.transformer.config.joint_attention_dim)}

    def latent_shape(self, height: int, width: int) -> tuple[int, ...]:
        f = 2 * self.vae_scale_factor
        if height % f or width % f:
            raise ValueError(f"FLUX.2 resolution must be a multiple of {f}, got {height}x{width}")
        return (self.transformer.config.in_channels, height // f, width // f)

    def sigma_shift(self, height: int, width: int, num_steps: int) -> float:
        """The dynamic shift Flux2KleinPipeline applies for this token count and number of steps."""
        from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu

        _, h, w = self.latent_shape(height, width)
        return shift_from_mu(compute_empirical_mu(image_seq_len=h * w, num_steps=num_steps),
                              self.pipe.scheduler.config)

    def _bn_stats(self, like: Tensor) -> tuple[Tensor, Tensor]:
        bn = self.vae.bn
        mean = bn.running_mean.view(1, -1, 1, 1).to(like.device, torch.float32)
        std = torch.sqrt(bn.running_var.view(1, -1, 1, 1).float() + self.vae.config.batch_norm_eps).to(like.device)
        return mean, std

    def latents_to_vae(self, x: Tensor) -> Tensor:
        mean, std = self._bn_stats(x)
        return unpatchify(x * std + mean)

    def vae_to_latents(self, z: Tensor) -> Tensor:
        p = patchify(z)
        mean, std = self._bn_stats(p)
        return (p - mean) / std

    def from_pipeline_latents(self, latents: Tensor, height: int, width: int) -> Tensor:
        """The pipeline's output_type='latent' is the de-normalised, unpatchified VAE z."""
        return self.vae_to_latents(latents.float())
