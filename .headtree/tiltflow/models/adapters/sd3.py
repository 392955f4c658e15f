"""SD3-M / SD3.5-M as a tiltflow backbone (WORLDS.md section 3, METHOD.md section 1).

diffusers' SD3Transformer2DModel predicts v = eps - x0 at timestep = 1000 * sigma; latents are the VAE's
z normalised as (z - shift_factor) * scaling_factor; the few-step grid uses the scheduler's static
shift (3). Text conditioning: CLIP-L + CLIG-G hidden states and pooled outputs, T5-XXL hidden states,
exactly as StableDiffusion3Pipeline.encode_prompt builds them.
"""

from __future__ import annotations

from torch import Tensor, nn

from tiltflow.models.adapters.common import DiffusersAdapter, batch_sigma

# Attention projections of the joint blocks (attn) and of SD3.5's extra self-attention (attn2).
LORA_PATTERN = (r"transformer_blocks\.\d+\.(attn|attn2)\."
                r"(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)")
CLIP_TOKENS = 77


class SD3Adapter(DiffusersAdapter):
    family = "sd3"
    pipeline_class = "StableDiffusion3Pipeline"
    default_max_sequence_length = 256
    lora_pattern = LORA_PATTERN

    def forward(self, transformer: nn.Module, x: Tensor, sigma: Tensor, cond: dict[str, Tensor],
                guidance: float | None = None) -> Tensor:
        if guidance is not None:
            raise ValueError("SD3 has no guidance input; CFG is applied by guided_velocity")
        timestep = batch_sigma(sigma, x) * 1000.0  # SD3 convention: timestep = 1000 sigma
        with self.precision.context(), self.attention():
            v = transformer(hidden_states=self._cast(x, transformer), timestep=timestep,
                            encoder_hidden_states=self._cast(cond["prompt_embeds"], transformer),
                            pooled_projections=self._cast(cond["pooled"], transformer), return_dict=False)[0]
        return v.float()

    def _run_text_encoders(self, prompts: list[str]) -> dict[str, Tensor]:
        embeds, _, pooled, _ = self.pipe.encode_prompt(
            prompt=prompts, prompt_2=None, prompt_3=None, device=self.device, do_classifier_free_guidance=False,
            max_sequence_length=self.max_sequence_length)
        return {"prompt_embeds": embeds, "pooled": pooled}

    def stub_shapes(self) -> dict[str, tuple[int, ...]]:
        cfg = self.transformer.config
        return {"prompt_embeds": (CLIP_TOKENS + self.max_sequence_length, cfg.joint_attention_dim),
                "pooled": (cfg.pooled_projection_dim,)}

    def latent_shape(self, height: int, width: int) -> tuple[int, ...]:
        step = self.vae_scale_factor * self.transformer.config.patch_size
        if height % step or width % step:
            raise ValueError(f"SD3 resolution must be a multiple of {step}, got {height}x{width}")
        f = self.vae_scale_factor
        return (self.transformer.config.in_channels, height // f, width // f)

    def sigma_shift(self, height: int, width: int, num_steps: int) -> float:
        """Static shift from the scheduler config (3.0 for SD3-M and SD3.5-M), whatever the resolution."""
        return float(self.pipe.scheduler.config.shift)

    def from_pipeline_latents(self, latents: Tensor, height: int, width: int) -> Tensor:
        return latents.float()
