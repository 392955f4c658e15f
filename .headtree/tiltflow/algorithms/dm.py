"""Distribution matching, the part both stages share: the generator's DM loss on a sample x_s at level s
(METHOD.md 4.1 steps 2-5), toward the teacher or toward the diffused tilted target (5.6), and the fake
score's loss on such samples (4.2 ambient DSM + 4.3 consistency); and the algorithms' shared base
(TwoNetworkAlgorithm), whose fake-score update is the same in both stages."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from tiltflow.algorithms.common import Batch, FiniteGuard, Phases, Task, TrainState, optimizer_step, randn
from tiltflow.config.schema import FakeConfig
from tiltflow.distributed import Comm
from tiltflow.flow.conventions import bcast, few_step_sigmas, forward_kernel
from tiltflow.flow.rng import to_device
from tiltflow.losses import (
    LossOutput,
    ambient_target,
    consistency_loss,
    dmd_direction_kl,
    dmd_direction_normalized,
    dmd_surrogate,
    fake_score_loss,
    fake_weight,
    fisher_dm_surrogate,
    renoise,
)
from tiltflow.losses.dmd import sample_tau
from tiltflow.losses.tilted import (
    PosteriorSampler,
    ReverseSamplerPosterior,
    repeat_rows,
    shifted_velocity,
    split_snis_velocity,
    tilted_direction,
    tilted_direction_normalized,
)
from tiltflow.models.base import guided_velocity
from tiltflow.models.roles import Roles
from tiltflow.sampling.cps import cps_sample, cps_step


@dataclass
class TauRange:
    delta: float
    tau_min: float
    tau_max: float

    def draw(self, s: float, n: int, generator: torch.Generator, device: torch.device) -> Tensor:
        return sample_tau(s, n, delta=self.delta, tau_min=self.tau_min, tau_max=self.tau_max,
                          generator=generator, device=device)


TILT_ESTIMATORS = ("linear_shift", "split_snis", "shifted_proposal")


@dataclass
class TiltSettings:
    """What DM toward the diffused tilted target p_tilde_tau needs (METHOD.md 5.6): the estimator of the
    tilted denoiser D~, beta, the reward of clean samples, and where posterior draws come from.

    reward(x0 (N, *S), prompts (N)) -> r (N,); linear_a: a with r = a.x (linear_shift only);
    exact_posterior(cond) -> the teacher's exact posterior sampler, or None: the teacher's DDPM ancestral
    reverse sampler (posterior_steps steps, CFG included) is used instead.
    """

    estimator: str
    beta: float
    num_pairs: int = 4
    posterior_steps: int = 32
    reward: Callable[[Tensor, list[Any]], Tensor] | None = None
    linear_a: Tensor | None = None
    exact_posterior: Callable[[Any], PosteriorSampler] | None = None

    def __post_init__(self) -> None:
        if self.estimator not in TILT_ESTIMATORS:
            raise ValueError(f"tilt estimator must be one of {TILT_ESTIMATORS}, got {self.estimator!r}")
        if self.estimator == "linear_shift" and self.linear_a is None:
            raise ValueError("the linear_shift tilt estimator needs the linear reward's vector a (r = a.x)")
        if self.estimator != "linear_shift" and self.reward is None:
            raise ValueError(f"the {self.estimator} tilt estimator needs the reward of clean samples")


@dataclass
class DMSettings:
    """How the generator's DM loss is formed: tau range, CPS eta of the map back, the teacher's CFG scale,
    the direction's scaling (normalized | kl | fisher), its reduction over dimensions (mean | sum), and the
    target: the teacher (tilt None) or the diffused tilted target (METHOD.md 5.6)."""

    taus: TauRange
    eta: float
    guidance_scale: float
    scaling: str = "normalized"
    reduction: str = "mean"
    tilt: TiltSettings | None = None


@dataclass
class FakeSettings:
    """The fake score's objective (METHOD.md 4.2-4.3)."""

    taus: TauRange
    eta: float
    weighting: str
    gamma: float
    delta_max: float
    two_sample: bool
    grad: str = "anchor"  # "anchor" | "both": which denoiser outputs of the consistency term carry gradient

    @staticmethod
    def of(cfg: FakeConfig, taus: TauRange, eta: float) -> FakeSettings:
        return FakeSettings(taus, eta, cfg.weighting, cfg.consistency_gamma, cfg.consistency_delta_max,
                            cfg.consistency_two_sample, cfg.consistency_grad)


def teacher_velocity(roles: Roles, x: Tensor, tau: Tensor, batch: Batch, guidance_scale: float) -> Tensor:
    return guided_velocity(roles.teacher, x, tau, batch.cond, batch.uncond, guidance_scale)


def dm_loss(roles: Roles, x_s: Tensor, s: float, batch: Batch, dm: DMSettings,
            generator: torch.Generator) -> LossOutput:
    """DMD on x_s (with gradient) at level s: renoise to tau, compare teacher and fake, map back."""
    if dm.scaling == "fisher":
        return fisher_dm_loss(roles, x_s, s, batch, dm, generator)
    b = x_s.shape[0]
    tau = dm.taus.draw(s, b, generator, x_s.device).to(x_s.dtype)
    x_tau = renoise(x_s.detach(), s, tau, randn(x_s.shape, generator, like=x_s))
    tilt_metrics: dict[str, float] = {}
    with torch.no_grad():
        v_fake = roles.fake.velocity(x_tau, tau, batch.cond)
        if dm.tilt is None:
            v_real = teacher_velocity(roles, x_tau, tau, batch, dm.guidance_scale)
        else:
            v_real, tilt_metrics = tilted_velocity(roles, x_tau, tau, v_fake, batch, dm, generator)
    if dm.scaling == "kl":
        return _with(dmd_surrogate(x_s, dmd_direction_kl(v_real, v_fake, tau, s), reduction="sum"), tilt_metrics)
    if dm.scaling != "normalized":
        raise ValueError(f"dm scaling must be 'normalized', 'kl' or 'fisher', got {dm.scaling!r}")
    z = randn(x_s.shape, generator, like=x_s)  # shared by both maps back to s
    x_real = cps_step(x_tau, v_real, tau, s, eta=dm.eta, noise=z).x_next
    x_fake = cps_step(x_tau, v_fake, tau, s, eta=dm.eta, noise=z).x_next
    # Toward the tilted target the normaliser comes from the fake's map back (tilted_direction_normalized).
    normalized = dmd_direction_normalized if dm.tilt is None else tilted_direction_normalized
    return _with(dmd_surrogate(x_s, normalized(x_s.detach(), x_real, x_fake), reduction=dm.reduction), tilt_metrics)


def _with(out: LossOutput, metrics: dict[str, float]) -> LossOutput:
    return LossOutput(out.loss, {**out.metrics, **metrics}) if metrics else out


def tilted_velocity(roles: Roles, x_tau: Tensor, tau: Tensor, v_fake: Tensor, batch: Batch, dm: DMSettings,
                    generator: torch.Generator) -> tuple[Tensor, dict[str, float]]:
    """The teacher's velocity replaced by the tilted one, v~ = (x_tau - D~) / tau (METHOD.md 5.6).

    linear_shift: exact, one teacher call at x_tau + beta tau^2 a / (1 - tau). split_snis and
    shifted_proposal: v_fake + Delta / tau with Delta the split-SNIS direction over 2 * num_pairs posterior
    draws, whose mean is c (D_fake - D~), c > 0 (so DM's mean direction, not v~ itself, is what is exact).
    """
    tilt = dm.tilt
    assert tilt is not None
    if tilt.estimator == "linear_shift":
        assert tilt.linear_a is not None
        v = shifted_velocity(repeated_teacher(roles, batch, dm.guidance_scale), x_tau, tau, tilt.linear_a, tilt.beta)
        return v, {}
    if tilt.exact_posterior is not None:
        sampler = tilt.exact_posterior(batch.cond)
    else:
        sampler = ReverseSamplerPosterior(repeated_teacher(roles, batch, dm.guidance_scale), tilt.posterior_steps)
    prompts = batch.prompts
    reward = tilt.reward
    assert reward is not None

    def reward_of(x0: Tensor) -> Tensor:  # rows j * B + b are draws of row b (tiltflow.losses.tilted.repeat_rows)
        return reward(x0, prompts * (x0.shape[0] // len(prompts)))

    d_fake = x_tau - bcast(tau, x_tau) * v_fake
    est = tilted_direction(sampler, x_tau, tau, d_fake, reward_of, tilt.beta, tilt.num_pairs, generator,
                           shifted=tilt.estimator == "shifted_proposal")
    return split_snis_velocity(v_fake, est.direction, tau), {"tilt_ess": est.ess.mean(),
                                                             "tilt_ess_min": est.ess.min()}


def repeated_teacher(roles: Roles, batch: Batch, guidance_scale: float) -> Callable[[Tensor, Tensor], Tensor]:
    """The teacher's (guided) velocity as a (x, sigma) callable over num * B rows, row j * B + b with the
    condition of batch row b (the layout of posterior samplers)."""
    rows = len(batch.prompts)

    def velocity(x: Tensor, sigma: Tensor) -> Tensor:
        times = x.shape[0] // rows
        rep = Batch(batch.prompts * times, repeat_rows(batch.cond, times), repeat_rows(batch.uncond, times))
        return teacher_velocity(roles, x, sigma, rep, guidance_scale)

    return velocity


@contextlib.contextmanager
def frozen(params: list[torch.nn.Parameter]) -> Iterator[None]:
    """Parameters that must not collect gradient from a loss that differentiates through their module."""
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, f in zip(params, flags):
            p.requires_grad_(f)


def fisher_dm_loss(roles: Roles, x0: Tensor, s: float, batch: Batch, dm: DMSettings,
                   generator: torch.Generator) -> LossOutput:
    """grad KL(p_theta,a || p_a) with a = taus.tau_min as a tau-integral of Fisher divergences (scaling
    "fisher"): tau is drawn with density p(tau) ~ 1 / tau^2 on [tau_min, tau_max] and weighted by
    (1 - tau) / tau^3 / p(tau) ~ (1 - tau) / tau, which keeps the importance weights within a factor 1 / tau_min.
    Mode masses are informed at large tau, where the scores are easy, instead of through rare samples
    between modes at small tau, which is what makes the single-level "kl" scaling unusable."""
    if s != 0.0:
        raise ValueError("the fisher DM scaling is defined at s = 0 (stage 2's last-step DM term)")
    lo, hi = dm.taus.tau_min, dm.taus.tau_max
    u = to_device(torch.rand(x0.shape[0], generator=generator), x0.device, x0.dtype)
    tau = 1.0 / (1.0 / lo - u * (1.0 / lo - 1.0 / hi))  # inverse CDF of p(tau) = tau^-2 / (1/lo - 1/hi)
    weight = (1 - tau) * (1.0 / lo - 1.0 / hi) / tau
    x_tau = renoise(x0, 0.0, tau, randn(x0.shape, generator, like=x0))
    with frozen(roles.fake_params):
        u_real = x_tau - bcast(tau, x_tau) * teacher_velocity(roles, x_tau, tau, batch, dm.guidance_scale)
        u_fake = x_tau - bcast(tau, x_tau) * roles.fake.velocity(x_tau, tau, batch.cond)
    return fisher_dm_surrogate(x0, u_real, u_fake, weight)


def fake_loss(roles: Roles, x_s: Tensor, s: float, cond: Any, fake: FakeSettings,
              generator: torch.Generator) -> LossOutput:
    """Ambient DSM on x_s (detached) at level s, plus gamma times the consistency regulariser."""
    x_s = x_s.detach()
    b = x_s.shape[0]
    tau = fake.taus.draw(s, b, generator, x_s.device).to(x_s.dtype)
    n = randn(x_s.shape, generator, like=x_s)
    _, sigma_ts = forward_kernel(s, tau)
    x_tau = renoise(x_s, s, tau, n)
    v_pred = roles.fake.velocity(x_tau, tau, cond)
    out = fake_score_loss(v_pred, ambient_target(x_s, s, tau, n), fake_weight(sigma_ts, fake.weighting))
    if fake.gamma <= 0:
        return out
    # Consistency (4.3): two independent CPS transitions tau -> tau' with the fake's detached velocity.
    two_sample = fake.two_sample
    dt = to_device(fake.delta_max * (1.0 - torch.rand(b, generator=generator)), x_s.device, x_s.dtype)
    tau_next = (tau - dt).clamp_min(0.0)
    v0 = v_pred.detach()
    xs_next = [cps_sample(x_tau, v0, tau, tau_next, eta=fake.eta, noise=randn(x_s.shape, generator, like=x_s))
               for _ in range(2 if two_sample else 1)]
    x_cat = torch.cat(xs_next)
    tau_cat = tau_next.repeat(len(xs_next))
    # "anchor": h(x'_i) are stop-gradient targets, so their pass keeps no graph (no backward, no activations).
    with torch.set_grad_enabled(torch.is_grad_enabled() and fake.grad == "both"):
        h_next = x_cat - bcast(tau_cat, x_cat) * roles.fake.velocity(x_cat, tau_cat, repeat_rows(cond, len(xs_next)))
    h0 = x_tau - bcast(tau, x_tau) * v_pred
    hs = h_next.chunk(len(xs_next))
    cons = consistency_loss(h0, hs[0], hs[1] if two_sample else None, two_sample=two_sample)
    return LossOutput(out.loss + fake.gamma * cons.loss, {**out.metrics, **cons.metrics})


class TwoNetworkAlgorithm:
    """What the stages' algorithms (ACDMD, RTDMD) share: their inputs, the step's few-step sigma grid, the
    phase tracker, the finite-value guard, the fake-score update and the checkpointable state (the
    TrainState's). A subclass sets `fake` (FakeSettings)."""

    fake: FakeSettings

    def __init__(self, cfg: Any, sampler: Any, task: Task, roles: Roles, state: TrainState, seed: int, comm: Comm):
        self.cfg, self.sampler, self.task, self.roles, self.state = cfg, sampler, task, roles, state
        self.seed, self.comm = seed, comm
        self.sigmas = few_step_sigmas(sampler.num_steps, sampler.shift)
        self.phase = Phases()
        self.guard = FiniteGuard(comm)  # on_nonfinite: the loop configures it from the run config

    def fake_update(self, x_s: Tensor, s: float, cond: Any, g: torch.Generator, it: int) -> dict[str, Tensor | float]:
        """One fake-score update on samples x_s at level s (stage 2: the rollouts' final samples, s = 0,
        METHOD.md 5.5); returns its metrics."""
        out = fake_loss(self.roles, x_s, s, cond, self.fake, g)
        optimizer_step(self.state.fake_opt, out.loss, self.roles.fake_params, self.cfg.grad_clip, self.guard, it,
                       "fake-score", "fake-score loss")
        return out.metrics

    def _velocity(self, cond: Any) -> Callable[[Tensor, Tensor], Tensor]:
        """The generator's velocity under `cond`, as a sampler's (x, sigma) callable."""
        return lambda x, sig: self.roles.generator.velocity(x, sig, cond)

    def state_dict(self) -> dict:
        return self.state.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.state.load_state_dict(state)
