"""DM toward the diffused tilted target (METHOD.md 5.6) at its fixed point, float64, analytic teacher.

The generator's samples ARE p_tilde and the fake score is p_tilde's exact velocity. Then the tilted DM
direction must vanish: exactly (per sample) for the linear shift, whose D~ equals the tilted mixture's
denoiser in closed form, and in the mean over samples for split-SNIS and the shifted proposal. The
reference pairing that the old exact mode uses (DM toward the teacher plus the reward's pathwise force
-beta a) does not vanish there: p_tilde is not its fixed point.
"""

from __future__ import annotations

import math

import pytest
import torch

from tiltflow.algorithms.common import Batch
from tiltflow.algorithms.dm import DMSettings, TauRange, TiltSettings, dm_loss
from tiltflow.models.roles import Roles
from tiltflow.worlds.gmm.mixture import ConditionalGMM, GaussianMixture
from tiltflow.worlds.gmm.targets import tilt_linear
from tiltflow.worlds.gmm.world import AnalyticBackbone

BETA = 0.5
A = torch.tensor([1.0, 0.5], dtype=torch.float64)
NUM = 4000  # samples of p_tilde; standard errors are estimated from them
# Tolerances, fixed before running: 4 standard errors per coordinate for a zero mean (two-sided p ~ 6e-5
# each); 8 standard errors of separation for a mean that must not vanish; 1e-6 per sample for the linear
# shift (the closed forms agree to 1e-10, tests/unit/test_tilted_denoisers.py; the normaliser is >= ~1e-3).
ZERO_SE, NONZERO_SE, EXACT_TOL = 4.0, 8.0, 1e-6


def _base() -> GaussianMixture:
    """Prompt 0 of the default gmm problem: four modes on the corners of a square."""
    means = torch.tensor([[2.0, 2.0], [-2.0, 2.0], [2.0, -2.0], [-2.0, -2.0]], dtype=torch.float64)
    return GaussianMixture(torch.full((4,), 0.25, dtype=torch.float64), means,
                           0.09 * torch.eye(2, dtype=torch.float64).expand(4, 2, 2).clone())


def _linear_reward(x0: torch.Tensor, prompts: list) -> torch.Tensor:
    return x0 @ A.to(x0)


def directions(estimator: str | None, scaling: str = "normalized", seed: int = 0) -> torch.Tensor:
    """Per-sample DM direction (the surrogate's gradient with respect to x0) at p_tilde, (NUM, 2)."""
    base = _base()
    teacher = AnalyticBackbone(ConditionalGMM([base]))
    fake = AnalyticBackbone(ConditionalGMM([tilt_linear(base, A, BETA)]))
    roles = Roles(teacher, teacher, fake, [], [])
    g = torch.Generator().manual_seed(seed)
    x0 = tilt_linear(base, A, BETA).sample(NUM, g)[0].requires_grad_(True)
    tilt = None if estimator is None else TiltSettings(
        estimator, BETA, num_pairs=4, reward=_linear_reward, linear_a=A, exact_posterior=teacher.posterior_sampler)
    dm = DMSettings(TauRange(0.0, 0.02, 0.98), eta=0.9, guidance_scale=1.0, scaling=scaling, reduction="sum",
                    tilt=tilt)
    batch = Batch([0] * NUM, torch.zeros(NUM, dtype=torch.long), None)
    out = dm_loss(roles, x0, 0.0, batch, dm, g)
    (grad,) = torch.autograd.grad(out.loss, x0)
    return grad * NUM  # the surrogate is a mean over the batch


def mean_and_se(d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return d.mean(0), d.std(0) / math.sqrt(d.shape[0])


@pytest.mark.parametrize("scaling", ["normalized", "kl"])
def test_linear_shift_direction_vanishes_per_sample_at_p_tilde(scaling):
    d = directions("linear_shift", scaling)
    assert d.abs().max() < EXACT_TOL


@pytest.mark.parametrize("estimator", ["split_snis", "shifted_proposal"])
@pytest.mark.parametrize("scaling", ["normalized", "kl"])
def test_importance_sampled_direction_has_zero_mean_at_p_tilde(estimator, scaling):
    d = directions(estimator, scaling)
    mean, se = mean_and_se(d)
    assert d.abs().max() > 1e-3  # the estimator is noisy per sample: the check below is not vacuous
    assert (mean.abs() <= ZERO_SE * se).all(), f"mean {mean.tolist()} vs standard error {se.tolist()}"


def test_teacher_dm_plus_reward_force_does_not_vanish_at_p_tilde():
    """The old exact mode's per-sample force with the KL scaling: DM toward the teacher, minus beta grad r.

    Measured once with the normalised scaling (the rtdmd_fullchain preset's, formerly rtdmd_exact), same
    seed: the mean force was (0.038, 0.055) with standard errors (0.014, 0.006), 4.4 standard errors in
    norm, short of the 8 fixed above; so that case is not asserted (METHOD.md 8 records the number)."""
    force = directions(None, "kl") - BETA * A
    mean, se = mean_and_se(force)
    assert mean.norm() > NONZERO_SE * se.norm(), f"mean {mean.tolist()} vs standard error {se.tolist()}"
