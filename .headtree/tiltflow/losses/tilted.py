"""Tilted denoisers D~_tau(x) = E_p_tilde[x0 | x_tau = x] for DM toward the diffused tilted target (METHOD.md 5.6).

Three estimators: the one-call linear shift (r = a.x), split self-normalised importance sampling over
posterior samples (any reward), and the shifted proposal (differentiable reward). Posterior samples come
from a PosteriorSampler: the exact GMM posterior (tiltflow.worlds.gmm.posterior) or the teacher's
stochastic reverse sampler below. Shapes: x_tau (B, *S), tau a float or (B,), posterior draws (num, B, *S).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from tiltflow.flow.conventions import bcast, eps_from_v, x0_from_v
from tiltflow.sampling.cps import cps_step

VelocityFn = Callable[[Tensor, Tensor], Tensor]  # (x (N, *S), sigma (N,)) -> v (N, *S)
RewardFn = Callable[[Tensor], Tensor]  # x0 (N, *S) -> r (N,)


def _tau_rows(tau: Tensor | float, x: Tensor) -> Tensor:
    """tau as a (B,) tensor in x's dtype and device."""
    t = torch.as_tensor(tau, dtype=x.dtype, device=x.device)
    if t.ndim == 0:
        t = t.expand(x.shape[0])
    if t.shape != (x.shape[0],):
        raise ValueError(f"tau has shape {tuple(t.shape)}, expected a float or ({x.shape[0]},)")
    if bool((t <= 0).any()) or bool((t >= 1).any()):
        raise ValueError("tau must lie in (0, 1) for a tilted denoiser")
    return t


# ---- linear reward r = a.x: one teacher call at a shifted point ------------------------------------------
def linear_shift(x: Tensor, tau: Tensor | float, a: Tensor, beta: float) -> Tensor:
    """delta = beta tau^2 a / (1 - tau), (B, *S): D~_tau(x) = D_tau(x + delta) for r = a.x.

    Completing the square in p(x0) exp(beta a.x0) N(x; (1-tau) x0, tau^2 I) moves x/(1-tau) by
    beta tau^2 a / (1-tau)^2, i.e. moves x by delta. `a` has shape S (or broadcasts to it).
    """
    t = bcast(_tau_rows(tau, x), x)
    return beta * t**2 / (1 - t) * a.to(x)


def shifted_velocity(velocity: VelocityFn, x: Tensor, tau: Tensor | float, a: Tensor, beta: float) -> Tensor:
    """v~_tau(x) = v_tau(x + delta) - beta tau a / (1 - tau) = (x - D~_tau(x)) / tau, (B, *S)."""
    t = _tau_rows(tau, x)
    v = velocity(x + linear_shift(x, t, a, beta), t)
    tb = bcast(t, x)
    return v - beta * tb / (1 - tb) * a.to(x)


def shifted_denoiser(velocity: VelocityFn, x: Tensor, tau: Tensor | float, a: Tensor, beta: float) -> Tensor:
    """D~_tau(x) = D_tau(x + delta) for r = a.x, (B, *S)."""
    t = _tau_rows(tau, x)
    xs = x + linear_shift(x, t, a, beta)
    return x0_from_v(xs, velocity(xs, t), t)


# ---- posterior samplers ---------------------------------------------------------------------------------
@runtime_checkable
class PosteriorSampler(Protocol):
    """Draws of x0 ~ p(x0 | x_tau) under the teacher: sample(...) -> (num, B, *S)."""

    def sample(self, x_tau: Tensor, tau: Tensor | float, num: int, generator: torch.Generator | None) -> Tensor: ...


def ancestral_step(x: Tensor, v: Tensor, sigma: Tensor, sigma_next: Tensor, noise: Tensor | None) -> Tensor:
    """One DDPM ancestral step: a draw from q(x_sigma_next | x_sigma, x0 = x0_hat) of the Markov forward
    process. It is the CPS step with the per-row eta given by cos(eta pi/2) = a sigma_next / sigma,
    a = (1 - sigma)/(1 - sigma_next): eta -> 0 as the step shrinks, which is what makes the chain converge
    to the reverse process (a fixed eta > 0 does not). sigma, sigma_next: (N,)."""
    x0_hat, eps_hat = x0_from_v(x, v, sigma), eps_from_v(x, v, sigma)
    a = (1 - sigma) / (1 - sigma_next)
    c = a * sigma_next / sigma
    std = sigma_next * (1 - c**2).clamp_min(0).sqrt()
    mean = bcast(1 - sigma_next, x) * x0_hat + bcast(sigma_next * c, x) * eps_hat
    if noise is None:
        return mean
    return mean + bcast(std, x) * noise


class ReverseSamplerPosterior:
    """The teacher's stochastic reverse sampler from tau to 0 in num_steps steps on the grid
    sigma_i = tau (1 - i / num_steps); any velocity callable (a neural teacher, CFG applied by the caller).

    eta = "ddpm" (default) uses ancestral_step: as num_steps grows its draws converge to p(x0 | x_tau);
    for a Gaussian teacher their mean is exact at every num_steps, their covariance is too small by
    O(1 / num_steps). A float eta uses cps_step with that eta; eta = 1 (the CPS reverse sampler that
    METHOD.md 5.6 names) does NOT converge: each step replaces x0 by its mean, and as num_steps grows its
    draws forget x_tau and drift to the prior (tests/unit/test_tilted_denoisers.py pins both).

    The velocity sees the num draws flattened into the batch: row j * B + b is draw j of x_tau[b], so a
    conditional teacher needs cond.repeat(num) (see repeat_rows). Cost: num * num_steps teacher calls.
    """

    def __init__(self, velocity: VelocityFn, num_steps: int, eta: float | str = "ddpm"):
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        if not (eta == "ddpm" or (isinstance(eta, (int, float)) and 0.0 <= eta <= 1.0)):
            raise ValueError(f"eta must be 'ddpm' or a float in [0, 1], got {eta!r}")
        self.velocity, self.num_steps, self.eta = velocity, num_steps, eta

    def sample(self, x_tau: Tensor, tau: Tensor | float, num: int, generator: torch.Generator | None) -> Tensor:
        t = _tau_rows(tau, x_tau).repeat(num)  # (num * B,)
        x = repeat_rows(x_tau, num)  # (num * B, *S)
        k = self.num_steps
        for i in range(k):
            sig, sig_next = t * (1 - i / k), t * (1 - (i + 1) / k)
            v = self.velocity(x, sig)
            noise = None
            if i < k - 1:  # the last step, to sigma = 0, is deterministic
                dev = generator.device if generator is not None else x.device
                noise = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=dev).to(x.device)
            if self.eta == "ddpm":
                x = ancestral_step(x, v, sig, sig_next, noise)
            else:
                x = cps_step(x, v, sig, sig_next, eta=float(self.eta), noise=noise).x_next
        return x.view(num, *x_tau.shape)


def repeat_rows(x: Any, num: int) -> Any:
    """(B, ...) -> (num * B, ...), row j * B + b = x[b]: the layout samplers hand to velocity callables.
    Conditions too: a tensor, a dict of them (each repeated), or None (stays None)."""
    if isinstance(x, Tensor):
        return x.repeat(num, *([1] * (x.ndim - 1)))
    if isinstance(x, dict):
        return {k: repeat_rows(v, num) for k, v in x.items()}
    if x is None:
        return None
    raise TypeError(f"cannot repeat a condition of type {type(x).__name__}")


# ---- importance weights and estimators ------------------------------------------------------------------
def reward_log_weights(x0: Tensor, reward: RewardFn, beta: float) -> Tensor:
    """log w = beta r(x0) for posterior draws x0 (num, B, *S): (num, B)."""
    num, rows = x0.shape[:2]
    return beta * reward(x0.reshape(num * rows, *x0.shape[2:])).reshape(num, rows).to(x0)


def _normalised(log_w: Tensor, x0: Tensor) -> Tensor:
    """exp(log_w - max over the draws), (num, B, 1, ..): one common factor per row, so ratios are exact."""
    if log_w.shape != x0.shape[:2]:
        raise ValueError(f"log_w has shape {tuple(log_w.shape)}, expected {tuple(x0.shape[:2])}")
    w = (log_w - log_w.amax(dim=0, keepdim=True)).exp()
    return w.view(*w.shape, *([1] * (x0.ndim - 2)))


def snis_denoiser(x0: Tensor, log_w: Tensor) -> Tensor:
    """Plain self-normalised estimate sum_j w_j x0_j / sum_j w_j of D~, (B, *S). Biased by O(1/num);
    for diagnostics, not for the DM direction."""
    w = _normalised(log_w, x0)
    return (w * x0).sum(0) / w.sum(0)


def split_snis_direction(x0: Tensor, log_w: Tensor, d_fake: Tensor) -> Tensor:
    """Delta = [mean_{S1} w_j (D_fake - x0_j)] / [mean_{S2} w_j], (B, *S), S1/S2 the first/second half.

    The halves are independent, so E[Delta | x_tau] = Z E[1 / mean_{S2} w] (D_fake - D~): a positive
    multiple of the exact DM direction for any num = 2M. The one common max subtracted from log_w
    cancels in the ratio, so the stabilisation keeps that property.
    """
    num = x0.shape[0]
    if num < 2 or num % 2:
        raise ValueError(f"split-SNIS needs an even number (2M >= 2) of posterior draws, got {num}")
    w = _normalised(log_w, x0)
    m = num // 2
    return (w[:m] * (d_fake.unsqueeze(0) - x0[:m])).mean(0) / w[m:].mean(0)


def effective_sample_size(log_w: Tensor) -> Tensor:
    """(sum w)^2 / sum w^2 per row, (B,): how many of the num draws carry the weight."""
    lw = log_w - log_w.amax(dim=0, keepdim=True)
    return (2 * torch.logsumexp(lw, 0) - torch.logsumexp(2 * lw, 0)).exp()


# ---- shifted proposal for differentiable rewards --------------------------------------------------------
def shifted_proposal_start(x_tau: Tensor, tau: Tensor | float, g: Tensor, beta: float) -> Tensor:
    """x_tau + beta tau^2 g / (1 - tau): sampling p(x0 | this point) draws from p(x0 | x_tau) tilted by
    exp(beta g.x0). g (B, *S) is grad r at D_fake, detached."""
    t = bcast(_tau_rows(tau, x_tau), x_tau)
    return x_tau + beta * t**2 / (1 - t) * g.detach()


def shifted_proposal_log_weights(x0: Tensor, rewards: Tensor, g: Tensor, beta: float) -> Tensor:
    """log w = beta (r(x0) - g.x0), (num, B): the importance weights of the shifted proposal."""
    lin = (x0 * g.detach().unsqueeze(0)).flatten(2).sum(-1)
    return beta * (rewards - lin)


@dataclass
class TiltedEstimate:
    direction: Tensor  # split-SNIS Delta, (B, *S): E = c (D_fake - D~), c > 0
    denoiser: Tensor  # plain SNIS D~ over all draws, (B, *S) (diagnostic, biased O(1/num))
    ess: Tensor  # effective sample size of all draws, (B,)


def tilted_direction(sampler: PosteriorSampler, x_tau: Tensor, tau: Tensor | float, d_fake: Tensor, reward: RewardFn,
                     beta: float, num_pairs: int, generator: torch.Generator | None, *,
                     shifted: bool = False) -> TiltedEstimate:
    """The DM direction toward the diffused tilted target from 2 * num_pairs posterior draws.

    shifted=True uses the shifted proposal with g = grad r(d_fake) (the reward must be differentiable).
    """
    if not shifted:
        x0 = sampler.sample(x_tau, tau, 2 * num_pairs, generator)
        log_w = reward_log_weights(x0, reward, beta)
    else:
        with torch.enable_grad():
            d = d_fake.detach().requires_grad_(True)
            (g,) = torch.autograd.grad(reward(d).sum(), d)
        x0 = sampler.sample(shifted_proposal_start(x_tau, tau, g, beta), tau, 2 * num_pairs, generator)
        log_w = shifted_proposal_log_weights(x0, reward_log_weights(x0, reward, 1.0), g, beta)
    return TiltedEstimate(split_snis_direction(x0, log_w, d_fake), snis_denoiser(x0, log_w),
                          effective_sample_size(log_w))


# ---- the DM direction toward the diffused tilted target --------------------------------------------------
def split_snis_velocity(v_fake: Tensor, direction: Tensor, tau: Tensor | float) -> Tensor:
    """v_fake + Delta / tau, (B, *S): the velocity whose denoiser is D_fake - Delta, an unbiased stand-in
    (up to the positive factor c of split_snis_direction) for the tilted velocity v~ = (x - D~) / tau.
    DM is linear in the teacher's velocity, so using it in place of v~ keeps the direction's mean."""
    return v_fake + direction / bcast(_tau_rows(tau, v_fake), v_fake)


def tilted_direction_normalized(x_s: Tensor, x_real: Tensor, x_fake: Tensor, eps: float = 1e-8) -> Tensor:
    """(x_fake - x_real) / mean|x_s - x_fake|, per sample, detached: METHOD.md 4.1's normalised direction
    with the normaliser taken from the fake's map back instead of the teacher's. With a split-SNIS x_real a
    normaliser that depends on the posterior draws would correlate with the direction and move its mean
    (the fixed point); the fake's does not. At the fixed point D_fake = D~, so the two agree there."""
    norm = (x_s - x_fake).abs().flatten(1).mean(1).clamp_min(eps)
    return ((x_fake - x_real) / bcast(norm, x_s)).detach()
