"""Pure loss functions of METHOD.md sections 4-5. Each returns a LossOutput (loss + metrics)."""

from tiltflow.losses.advantages import group_advantages, subgrpo_steps
from tiltflow.losses.consistency import consistency_loss
from tiltflow.losses.dmd import dmd_direction_kl, dmd_direction_normalized, dmd_surrogate, fisher_dm_surrogate, renoise
from tiltflow.losses.fake_score import ambient_target, fake_score_loss, fake_weight
from tiltflow.losses.output import LossOutput
from tiltflow.losses.ppo import ppo_clip_loss
from tiltflow.losses.reward_bp import reward_bp_loss
from tiltflow.losses.tilted import (
    PosteriorSampler,
    ReverseSamplerPosterior,
    TiltedEstimate,
    shifted_denoiser,
    shifted_velocity,
    snis_denoiser,
    split_snis_direction,
    tilted_direction,
)

__all__ = ["LossOutput", "PosteriorSampler", "ReverseSamplerPosterior", "TiltedEstimate", "ambient_target",
           "consistency_loss", "dmd_direction_kl", "dmd_direction_normalized", "dmd_surrogate", "fake_score_loss",
           "fake_weight", "fisher_dm_surrogate", "group_advantages", "ppo_clip_loss", "renoise", "reward_bp_loss",
           "shifted_denoiser", "shifted_velocity", "snis_denoiser", "split_snis_direction", "subgrpo_steps",
           "tilted_direction"]
