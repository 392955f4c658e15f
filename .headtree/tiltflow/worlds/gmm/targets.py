"""Exact reward-tilted targets p_tilde = p exp(beta r) / Z of a Gaussian mixture (METHOD.md 3, WORLDS.md 1).

Linear and quadratic rewards keep the mixture Gaussian (closed-form components and weights); the half-space
indicator gives a mixture of two-piece densities whose normaliser, mode weights and expected reward are
exact through the normal CDF of a.x, sampled exactly by rejection from the base. The bounded r = tanh(a.x - c)
also depends on x only through a.x, so its normaliser and mode weights are one-dimensional Gaussian integrals
(Gauss-Hermite quadrature, exact to float64 rounding for the widths used here), sampled exactly by rejection.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from tiltflow.rewards.base import Reward
from tiltflow.worlds.gmm.mixture import GaussianMixture
from tiltflow.worlds.gmm.rewards import HalfspaceReward, LinearReward, QuadraticReward, TanhReward


@runtime_checkable
class Target(Protocol):
    """What the metrics need from a (tilted) target with K modes."""

    @property
    def dim(self) -> int: ...

    @property
    def num_components(self) -> int: ...

    @property
    def mode_weights(self) -> Tensor: ...  # (K,), sums to one

    def sample(self, n: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]: ...

    def log_prob(self, x: Tensor) -> Tensor: ...  # exact, normalised, (B,)

    def assign(self, x: Tensor) -> Tensor: ...  # mode index (B,)


def tilt_linear(mix: GaussianMixture, a: Tensor | Sequence[float], beta: float) -> GaussianMixture:
    """Exact tilt by r = a.x: component k -> N(mu_k + beta S_k a, S_k), weight ∝ w_k exp(beta a.mu_k +
    beta^2 a.S_k a / 2) (WORLDS.md 1)."""
    a = torch.as_tensor(a).to(mix.means)
    s_a = mix.covs @ a  # (K, d)
    log_w = mix.weights.log() + beta * (mix.means @ a) + 0.5 * beta**2 * (s_a @ a)
    return GaussianMixture.from_log_weights(log_w, mix.means + beta * s_a, mix.covs)


def tilt_quadratic(mix: GaussianMixture, A: Tensor, b: Tensor | Sequence[float], beta: float) -> GaussianMixture:
    """Exact tilt by r = -(x - b).A(x - b)/2, A symmetric PSD (possibly singular), beta >= 0.

    With M = beta A and delta_k = mu_k - b, completing the square gives
      precision  S_k^{-1} + M, i.e. S'_k = (I + S_k M)^{-1} S_k,
      mean       mu'_k = mu_k - S'_k M delta_k,
      log-weight log w_k - log det(I + S_k M)/2 - delta_k.M (I + S_k M)^{-1} delta_k / 2,
    the last being log E_{N(mu_k, S_k)}[exp(beta r)]; no inverse of S_k or A is needed.
    """
    if beta < 0:
        raise ValueError(f"beta must be >= 0 for a quadratic tilt, got {beta}")
    A = torch.as_tensor(A).to(mix.means)
    b = torch.as_tensor(b).to(mix.means)
    d = mix.dim
    if A.shape != (d, d) or b.shape != (d,):
        raise ValueError(f"A must be ({d}, {d}) and b ({d},), got {tuple(A.shape)} and {tuple(b.shape)}")
    evals = torch.linalg.eigvalsh(0.5 * (A + A.T))
    if float(evals[0]) < -1e-10 * max(1.0, float(evals.abs().max())):
        raise ValueError(f"A must be positive semi-definite, smallest eigenvalue {float(evals[0]):.3g}")
    M = beta * A
    eye = torch.eye(d, dtype=mix.dtype, device=mix.means.device)
    I_SM = eye + mix.covs @ M  # (K, d, d)
    new_covs = torch.linalg.solve(I_SM, mix.covs)
    new_covs = 0.5 * (new_covs + new_covs.transpose(1, 2))
    delta = mix.means - b
    new_means = mix.means - torch.einsum("kde,ke->kd", new_covs @ M, delta)
    quad = (delta @ M * torch.linalg.solve(I_SM, delta[:, :, None])[:, :, 0]).sum(-1)
    log_w = mix.weights.log() - 0.5 * torch.linalg.slogdet(I_SM)[1] - 0.5 * quad
    return GaussianMixture.from_log_weights(log_w, new_means, new_covs)


class _TiltAlongA:
    """What the tilts by a reward of a.x share: under component k, a.x ~ N(a.mu_k, a.S_k a); the mode weights
    come from the unnormalised log mode masses `_log_mass` (K,) and the normaliser log Z that a subclass sets,
    and the exact sampler rejects from the base with the largest value `_max_log_tilt` of beta r."""

    _log_mass: Tensor
    log_normalizer: Tensor
    _max_log_tilt: float

    def __init__(self, base: GaussianMixture, reward: HalfspaceReward | TanhReward, beta: float):
        self.base, self.reward = base, reward
        self.a, self.c, self.beta = reward.a, reward.c, float(beta)
        if self.a.shape != (base.dim,):
            raise ValueError(f"a must have shape ({base.dim},), got {tuple(self.a.shape)}")
        self._a_mean = base.means @ self.a  # (K,)
        self._a_std = torch.einsum("d,kde,e->k", self.a, base.covs, self.a).sqrt()  # (K,)

    @property
    def dim(self) -> int:
        return self.base.dim

    @property
    def num_components(self) -> int:
        return self.base.num_components

    @property
    def mode_weights(self) -> Tensor:
        return torch.softmax(self._log_mass, dim=0)

    def log_prob(self, x: Tensor) -> Tensor:
        return self.base.log_prob(x) + self.beta * self.reward(x).scores.to(x.dtype) - self.log_normalizer

    def assign(self, x: Tensor) -> Tensor:
        """The base mixture's most responsible component (the tilt multiplies every component by the same
        function of x, so the responsibilities do not change)."""
        return self.base.assign(x)

    def sample(self, n: int, generator: torch.Generator | None = None, *,
               max_proposals: int = 50_000_000) -> tuple[Tensor, Tensor]:
        """Exact rejection sampling from the base: accept with probability exp(beta r - max beta r).

        Returns x (n, d) and the base component each sample was drawn from.
        """
        bound = self._max_log_tilt
        return _rejection_sample(self.base, lambda x: self.beta * self.reward(x).scores - bound,
                                 float(self.log_normalizer) - bound, n, generator, max_proposals)


class HalfspaceTiltedTarget(_TiltAlongA):
    """p_tilde(x) = p(x) exp(beta 1[a.x >= c]) / Z with Z = 1 + (e^beta - 1) P(a.x >= c), any real beta.

    Under component k, a.x ~ N(a.mu_k, a.S_k a), so Phi_k = P_k(a.x >= c) is a normal CDF and the tilted
    mixture has modes k with weights w_k (1 + (e^beta - 1) Phi_k) / Z. Everything is in log space, so large
    beta does not overflow.
    """

    def __init__(self, base: GaussianMixture, a: Tensor | Sequence[float], c: float, beta: float):
        super().__init__(base, HalfspaceReward(torch.as_tensor(a).to(base.means), c), beta)
        self._max_log_tilt = max(self.beta, 0.0)
        z = (self._a_mean - self.c) / self._a_std
        self.log_component_probs = torch.special.log_ndtr(z)  # log Phi_k, (K,)
        log_w = base.weights.log()
        # unnormalised log mode mass: log w_k + log((1 - Phi_k) + e^beta Phi_k)
        self._log_mass = log_w + torch.logaddexp(torch.special.log_ndtr(-z), self.beta + self.log_component_probs)
        self.log_normalizer = torch.logsumexp(self._log_mass, dim=0)  # log Z
        self.log_halfspace_prob = torch.logsumexp(log_w + self.log_component_probs, dim=0)  # log P under p

    def expected_reward(self) -> float:
        """E_tilde[1[a.x >= c]] = e^beta P / Z."""
        return float(torch.exp(self.beta + self.log_halfspace_prob - self.log_normalizer))


def _rejection_sample(base: GaussianMixture, log_accept: Any, log_rate: float, n: int,
                      generator: torch.Generator | None, max_proposals: int) -> tuple[Tensor, Tensor]:
    """Exact rejection sampling from the base: keep x with probability exp(log_accept(x)) (<= 1); log_rate
    is the log acceptance probability (sets how many to propose). Returns x (n, d) and base components."""
    xs, idxs, kept, proposed = [], [], 0, 0
    while kept < n:
        m = min(int(math.ceil(1.2 * (n - kept) * math.exp(-log_rate))) + 64, 4_000_000)
        proposed += m
        if proposed > max_proposals:
            raise RuntimeError(f"rejection sampling needs more than {max_proposals} proposals (acceptance "
                               f"rate {math.exp(log_rate):.3g}); use the SIR reference sampler instead")
        x, idx = base.sample(m, generator)
        u = torch.rand(m, generator=generator, dtype=x.dtype, device=x.device)
        keep = u < log_accept(x).exp()
        xs.append(x[keep])
        idxs.append(idx[keep])
        kept += int(keep.sum())
    return torch.cat(xs)[:n], torch.cat(idxs)[:n]


class TanhTiltedTarget(_TiltAlongA):
    """p_tilde(x) = p(x) exp(beta tanh(a.x - c)) / Z, any real beta.

    Under component k, u = a.x ~ N(m_k, s_k^2) with m_k = a.mu_k, s_k^2 = a.S_k a, so the component's mass
    Z_k = E_k[exp(beta tanh(u - c))] and E_k[r exp(beta r)] are 1-D Gaussian integrals, computed by
    probabilists' Gauss-Hermite quadrature with `nodes` nodes. The integrand is analytic in a strip of
    half-width pi/2 around the real axis (the poles of tanh), so the error falls geometrically with the
    number of nodes (checked against Monte Carlo in tests/unit/test_tilted_bounded.py). Rejection sampling
    accepts with probability exp(beta r - |beta|) (|r| < 1).
    """

    def __init__(self, base: GaussianMixture, a: Tensor | Sequence[float], c: float, beta: float, nodes: int = 160):
        import numpy as np

        super().__init__(base, TanhReward(torch.as_tensor(a).to(base.means), c), beta)
        self._max_log_tilt = abs(self.beta)
        z, w = np.polynomial.hermite_e.hermegauss(nodes)  # weight exp(-z^2/2), sum w = sqrt(2 pi)
        z = torch.as_tensor(z, dtype=base.dtype)
        logw = torch.as_tensor(np.log(w / w.sum()), dtype=base.dtype)
        m, s = self._a_mean, self._a_std  # (K,)
        r = torch.tanh(m[:, None] + s[:, None] * z[None, :] - self.c)  # (K, nodes)
        log_zk = torch.logsumexp(logw + self.beta * r, dim=1)  # log E_k[exp(beta r)]
        self._log_mass = base.weights.log() + log_zk
        self.log_normalizer = torch.logsumexp(self._log_mass, dim=0)
        # E_tilde[r] = sum_k w_k E_k[r e^{beta r}] / Z
        ek = (torch.softmax(logw + self.beta * r, dim=1) * r).sum(1)  # E_k[r e^{beta r}] / Z_k
        self._expected_reward = float((self.mode_weights * ek).sum())

    def expected_reward(self) -> float:
        return self._expected_reward


def monte_carlo_reward(target: Target, reward: Reward, num_samples: int, generator: torch.Generator | None = None,
                       prompts: Sequence[Any] | None = None) -> tuple[float, float]:
    """(mean, standard error) of the reward over num_samples target samples."""
    x, _ = target.sample(num_samples, generator)
    scores = reward(x, [None] * num_samples if prompts is None else prompts).scores.detach().double()
    return float(scores.mean()), float(scores.std() / math.sqrt(num_samples))


def expected_reward(target: Target, reward: Reward, *, num_samples: int = 200_000,
                    generator: torch.Generator | None = None) -> float:
    """E_target[r]: closed form where one exists, else Monte Carlo with num_samples samples.

    Closed forms: Gaussian mixture with linear (a.E[x]), quadratic (-sum_k w_k (tr(A S_k) +
    (mu_k - b).A(mu_k - b)) / 2) or half-space (sum_k w_k Phi_k) reward; half-space tilted target with its
    own half-space reward (e^beta P / Z).
    """
    if isinstance(target, GaussianMixture):
        if isinstance(reward, LinearReward):
            return float(reward.a.to(target.means) @ target.mean())
        if isinstance(reward, QuadraticReward):
            A, b = reward.A.to(target.means), reward.b.to(target.means)
            delta = target.means - b
            per_k = torch.einsum("de,ked->k", A, target.covs) + ((delta @ A) * delta).sum(-1)
            return float(-0.5 * (target.weights @ per_k))
        if isinstance(reward, HalfspaceReward):
            return HalfspaceTiltedTarget(target, reward.a, reward.c, 0.0).expected_reward()
    if isinstance(target, _TiltAlongA) and isinstance(reward, type(target.reward)):  # the target's own reward
        if reward.c == target.c and torch.equal(reward.a.to(target.a), target.a):
            return target.expected_reward()  # type: ignore[attr-defined]
    return monte_carlo_reward(target, reward, num_samples, generator)[0]
