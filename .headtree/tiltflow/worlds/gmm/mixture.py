"""Gaussian mixtures with exact diffused marginals and velocities (WORLDS.md section 1, "Teacher").

A component N(mu, S) noised to level sigma is N((1 - sigma) mu, C), C = (1 - sigma)^2 S + sigma^2 I
(conventions of METHOD.md section 1). Each S is stored as U diag(lam) U^T, so C = U diag((1 - sigma)^2 lam
+ sigma^2) U^T is diagonal in the same basis and a per-sample sigma costs no extra matrix factorisation.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor


def _sigma_view(sigma: Tensor | float, batch: int, like: Tensor) -> Tensor:
    """sigma as a tensor that broadcasts against (B, K, d): a 0-d tensor or a (B, 1, 1) one."""
    s = torch.as_tensor(sigma, dtype=like.dtype, device=like.device)
    if s.ndim > 1 or (s.ndim == 1 and s.shape[0] != batch):
        raise ValueError(f"sigma has shape {tuple(s.shape)}, expected a float or ({batch},)")
    if s.ndim == 1:
        s = s.view(-1, 1, 1)
    if bool((s < 0).any()) or bool((s > 1).any()):
        raise ValueError("sigma must lie in [0, 1]")
    return s


class GaussianMixture:
    """p(x) = sum_k w_k N(x; mu_k, S_k) in R^d.

    Works in the dtype of its tensors (float64 for closed-form checks, float32 next to networks); inputs
    are cast to that dtype and results come back in the promotion of the input's and the mixture's dtype.
    Positive weights are normalised to sum to one.
    """

    def __init__(self, weights: Tensor, means: Tensor, covs: Tensor):
        weights, means, covs = torch.as_tensor(weights), torch.as_tensor(means), torch.as_tensor(covs)
        if not means.is_floating_point():
            raise ValueError(f"means must be a floating-point tensor, got {means.dtype}")
        weights, covs = weights.to(means), covs.to(means)
        if means.ndim != 2 or weights.shape != means.shape[:1] or covs.shape != means.shape + means.shape[-1:]:
            raise ValueError(f"expected weights (K,), means (K, d), covs (K, d, d); got {tuple(weights.shape)}, "
                             f"{tuple(means.shape)}, {tuple(covs.shape)}")
        bad = (~torch.isfinite(weights)) | (weights <= 0)
        if bool(bad.any()):
            k = int(bad.nonzero()[0])
            raise ValueError(f"weights[{k}] = {float(weights[k])}: mixture weights must be positive and finite")
        self.weights = weights / weights.sum()
        self.means = means
        self.covs = covs
        self._evals, self._evecs = _validated_eigh(covs)

    @classmethod
    def from_log_weights(cls, log_weights: Tensor, means: Tensor, covs: Tensor) -> GaussianMixture:
        """Build from unnormalised log-weights (softmax is taken first, so large values cannot overflow)."""
        return cls(torch.softmax(torch.as_tensor(log_weights).to(means), dim=0), means, covs)

    # ---- basic properties -------------------------------------------------------------------------------
    @property
    def dim(self) -> int:
        return int(self.means.shape[1])

    @property
    def num_components(self) -> int:
        return int(self.means.shape[0])

    @property
    def dtype(self) -> torch.dtype:
        return self.means.dtype

    @property
    def mode_weights(self) -> Tensor:
        """The component weights (K,): the Target protocol's name for them."""
        return self.weights

    def to(self, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> GaussianMixture:
        """A copy in another dtype and/or on another device."""
        return GaussianMixture(self.weights.to(device=device, dtype=dtype), self.means.to(device=device, dtype=dtype),
                               self.covs.to(device=device, dtype=dtype))

    def mean(self) -> Tensor:
        """E[x] = sum_k w_k mu_k, shape (d,)."""
        return self.weights @ self.means

    def covariance(self) -> Tensor:
        """Cov[x] = sum_k w_k (S_k + mu_k mu_k^T) - E[x] E[x]^T, shape (d, d)."""
        second = torch.einsum("k,kde->de", self.weights, self.covs + self.means[:, :, None] * self.means[:, None, :])
        m = self.mean()
        return second - m[:, None] * m[None, :]

    def marginal(self, dims: Sequence[int]) -> GaussianMixture:
        """The exact marginal mixture of the coordinates `dims` (e.g. [0, 1] for plots of d > 2)."""
        idx = torch.as_tensor(list(dims), dtype=torch.long, device=self.means.device)
        return GaussianMixture(self.weights, self.means[:, idx], self.covs[:, idx][:, :, idx])

    def diffuse(self, sigma: float) -> GaussianMixture:
        """The marginal of x_sigma = (1 - sigma) x0 + sigma eps: components N((1-s) mu, (1-s)^2 S + s^2 I)."""
        if not 0.0 <= float(sigma) <= 1.0:
            raise ValueError(f"sigma must lie in [0, 1], got {sigma}")
        a = 1.0 - float(sigma)
        eye = torch.eye(self.dim, dtype=self.dtype, device=self.means.device)
        return GaussianMixture(self.weights, a * self.means, a**2 * self.covs + float(sigma) ** 2 * eye)

    # ---- sampling and densities --------------------------------------------------------------------------
    def sample(self, n: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """n i.i.d. samples (n, d) and the index (n,) of the component each was drawn from."""
        idx = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, generator=generator, dtype=self.dtype, device=self.means.device)
        # x = mu_k + U_k diag(sqrt(lam_k)) z
        x = self.means[idx] + torch.einsum("nde,ne->nd", self._evecs[idx], self._evals[idx].sqrt() * z)
        return x, idx

    def log_prob(self, x: Tensor) -> Tensor:
        """log p(x), shape (B,)."""
        xc, out_dtype = self._prepare(x)
        log_joint, _, _, _ = self._terms(xc, 0.0)
        return torch.logsumexp(log_joint, dim=1).to(out_dtype)

    def responsibilities(self, x: Tensor) -> Tensor:
        """gamma_k(x) = P(component k | x), shape (B, K)."""
        xc, out_dtype = self._prepare(x)
        log_joint, _, _, _ = self._terms(xc, 0.0)
        return torch.softmax(log_joint, dim=1).to(out_dtype)

    def assign(self, x: Tensor) -> Tensor:
        """The most responsible component of each sample, shape (B,) long."""
        return self.responsibilities(x).argmax(dim=1)

    def score(self, x: Tensor) -> Tensor:
        """grad_x log p(x) = -sum_k gamma_k(x) S_k^{-1} (x - mu_k), shape (B, d)."""
        return self._mixed(x, 0.0, lambda y, c, s: -self._from_basis(y / c))

    # ---- exact denoiser and velocity ---------------------------------------------------------------------
    def posterior_mean(self, x: Tensor, sigma: Tensor | float) -> Tensor:
        """E[x0 | x_sigma = x] = sum_k gamma_k(x) (mu_k + (1-s) S_k C_k^{-1} (x - (1-s) mu_k)) (WORLDS.md 1).

        sigma is a float or a (B,) tensor. At sigma = 0 this is x; at sigma = 1 it is sum_k w_k mu_k.
        """
        return self._mixed(x, sigma, lambda y, c, s: self.means + self._from_basis((1 - s) * self._evals * y / c))

    def velocity(self, x: Tensor, sigma: Tensor | float) -> Tensor:
        """v(x, sigma) = (x - E[x0 | x]) / sigma = E[eps - x0 | x_sigma = x], finite at sigma = 0.

        With C_k - (1-s) S_k = s (s I - (1-s) S_k), the division by sigma cancels exactly:
        v_k = (s I - (1-s) S_k) C_k^{-1} (x - (1-s) mu_k) - mu_k, and v = sum_k gamma_k v_k (v = -x at s = 0).
        """
        return self._mixed(x, sigma, lambda y, c, s: self._from_basis((s - (1 - s) * self._evals) * y / c) - self.means)

    def posterior_components(self, x: Tensor, sigma: Tensor | float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The posterior p(x0 | x_sigma = x), itself a Gaussian mixture for each x (METHOD.md 5.6).

        Component k: weight gamma_k(x), mean mu_k + (1-s) S_k C_k^{-1} (x - (1-s) mu_k), covariance
        U_k diag(lam_k s^2 / c_k) U_k^T with c_k = (1-s)^2 lam_k + s^2 (prior precision plus (1-s)^2/s^2 I).
        Returns (log_gamma (B, K), means (B, K, d), cov_evals (B, K, d), evecs (K, d, d)), in the
        mixture's dtype. sigma = 0 gives zero covariances (the posterior is a point mass at x).
        """
        xc, _ = self._prepare(x)
        log_joint, y, c, s = self._terms(xc, sigma)
        log_gamma = torch.log_softmax(log_joint, dim=1)
        means = self.means + self._from_basis((1 - s) * self._evals * y / c)
        cov_evals = (self._evals * s**2 / c).expand_as(y)
        return log_gamma, means, cov_evals, self._evecs

    # ---- internals ---------------------------------------------------------------------------------------
    def _mixed(self, x: Tensor, sigma: Tensor | float, component: Callable[[Tensor, Tensor, Tensor], Tensor]) -> Tensor:
        """sum_k gamma_k(x) f_k, (B, d), with f_k = component(y, c, s) (B, K, d) from _terms' y, c and s."""
        xc, out_dtype = self._prepare(x)
        log_joint, y, c, s = self._terms(xc, sigma)
        gamma = torch.softmax(log_joint, dim=1)
        return (gamma[:, :, None] * component(y, c, s)).sum(1).to(out_dtype)

    def _from_basis(self, z: Tensor) -> Tensor:
        """U_k z_bk, (B, K, d): coordinates in each component's eigenbasis back in x-space."""
        return torch.einsum("kdj,bkj->bkd", self._evecs, z)

    def _prepare(self, x: Tensor) -> tuple[Tensor, torch.dtype]:
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"x has shape {tuple(x.shape)}, expected (B, {self.dim})")
        return x.to(self.dtype), torch.promote_types(x.dtype, self.dtype)

    def _terms(self, x: Tensor, sigma: Tensor | float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """log w_k + log N(x; (1-s) mu_k, C_k) (B, K); y = U_k^T (x - (1-s) mu_k) (B, K, d); C_k's
        eigenvalues c (B or 1, K, d); and s broadcastable to (B, K, d)."""
        s = _sigma_view(sigma, x.shape[0], x)
        y = torch.einsum("kdj,bkd->bkj", self._evecs, x[:, None, :] - (1 - s) * self.means)
        c = (1 - s) ** 2 * self._evals + s**2
        if c.ndim == 2:
            c = c[None]
        log_norm = (y**2 / c).sum(-1) + c.log().sum(-1) + self.dim * math.log(2 * math.pi)
        return self.weights.log() - 0.5 * log_norm, y, c, s


def _validated_eigh(covs: Tensor) -> tuple[Tensor, Tensor]:
    """Eigen-decomposition of each covariance; ValueError naming the first non-SPD component."""
    eps = torch.finfo(covs.dtype).eps
    scale = covs.abs().amax(dim=(1, 2)).clamp_min(1.0)
    asym = (covs - covs.transpose(1, 2)).abs().amax(dim=(1, 2))
    for k in range(covs.shape[0]):
        if not bool(torch.isfinite(covs[k]).all()):
            raise ValueError(f"covs[{k}] has non-finite entries")
        if float(asym[k]) > 100 * eps * float(scale[k]):
            raise ValueError(f"covs[{k}] is not symmetric (max |S - S^T| = {float(asym[k]):.3g})")
    evals, evecs = torch.linalg.eigh(0.5 * (covs + covs.transpose(1, 2)))
    for k in range(covs.shape[0]):
        if float(evals[k, 0]) <= covs.shape[1] * eps * float(evals[k, -1].abs()) or float(evals[k, 0]) <= 0:
            raise ValueError(f"covs[{k}] is not positive definite (eigenvalues in "
                             f"[{float(evals[k, 0]):.3g}, {float(evals[k, -1]):.3g}])")
    return evals, evecs


class ConditionalGMM:
    """p(x | c) for prompts c = 0..C-1 plus the unconditional p(x) = (1/C) sum_c p(x | c) at index C.

    `velocity(x, sigma, cond)` makes it an exact analytic backbone (models/base.py's Backbone protocol).
    """

    def __init__(self, mixtures: Sequence[GaussianMixture]):
        mixtures = list(mixtures)
        if not mixtures:
            raise ValueError("ConditionalGMM needs at least one mixture")
        dims = {m.dim for m in mixtures}
        dtypes = {m.dtype for m in mixtures}
        if len(dims) != 1 or len(dtypes) != 1:
            raise ValueError(f"all mixtures must share dim and dtype, got dims {dims}, dtypes {dtypes}")
        self.mixtures = mixtures
        num = len(mixtures)
        self.unconditional = GaussianMixture(torch.cat([m.weights / num for m in mixtures]),
                                             torch.cat([m.means for m in mixtures]),
                                             torch.cat([m.covs for m in mixtures]))

    @property
    def num_prompts(self) -> int:
        return len(self.mixtures)

    @property
    def dim(self) -> int:
        return self.mixtures[0].dim

    def mixture(self, c: int) -> GaussianMixture:
        """The mixture of prompt c; c == num_prompts is the unconditional one."""
        if not 0 <= c <= self.num_prompts:
            raise ValueError(f"prompt index {c} out of range [0, {self.num_prompts}]")
        return self.unconditional if c == self.num_prompts else self.mixtures[c]

    def to(self, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> ConditionalGMM:
        return ConditionalGMM([m.to(dtype=dtype, device=device) for m in self.mixtures])

    def velocity(self, x: Tensor, sigma: Tensor | float, cond: Tensor) -> Tensor:
        """Exact v(x, sigma | cond), shape (B, d); sigma a float or (B,)."""
        return self._per_prompt(x, sigma, cond, lambda m, xs, ss: m.velocity(xs, ss))

    def log_prob(self, x: Tensor, cond: Tensor) -> Tensor:
        """log p(x | cond), shape (B,)."""
        return self._per_prompt(x, 0.0, cond, lambda m, xs, ss: m.log_prob(xs))

    def sample(self, cond: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """One sample per entry of cond: x (B, d) and its component index within that prompt's mixture."""
        cond = self._check_cond(cond, None)
        x = torch.empty(cond.shape[0], self.dim, dtype=self.mixtures[0].dtype, device=cond.device)
        idx = torch.empty(cond.shape[0], dtype=torch.long, device=cond.device)
        for mask, mix, _ in self.groups(cond):
            x[mask], idx[mask] = mix.sample(int(mask.sum()), generator)
        return x, idx

    def groups(self, cond: Tensor, sigma: Tensor | float = 0.0) -> list[tuple[Tensor, GaussianMixture, Tensor | float]]:
        """(row mask, mixture, sigma of those rows) for each prompt in cond, in sorted order (so that a
        generator used group by group is consumed deterministically); sigma a float or one per row."""
        per_row = isinstance(sigma, Tensor) and sigma.ndim == 1
        return [(cond == c, self.mixture(int(c)), sigma[cond == c] if per_row else sigma)  # type: ignore[index]
                for c in torch.unique(cond).tolist()]

    def _check_cond(self, cond: Tensor, batch: int | None) -> Tensor:
        if cond.dtype != torch.long or cond.ndim != 1 or (batch is not None and cond.shape[0] != batch):
            want = "B" if batch is None else batch
            raise ValueError(f"cond must be a LongTensor of shape ({want},), got {cond.dtype} {tuple(cond.shape)}")
        if bool((cond < 0).any()) or bool((cond > self.num_prompts).any()):
            raise ValueError(f"cond values must lie in [0, {self.num_prompts}] ({self.num_prompts} = unconditional)")
        return cond

    def _per_prompt(self, x: Tensor, sigma: Tensor | float, cond: Tensor,
                    fn: Callable[[GaussianMixture, Tensor, Tensor | float], Tensor]) -> Tensor:
        cond = self._check_cond(cond, x.shape[0])
        pieces = [(mask, fn(mix, x[mask], s)) for mask, mix, s in self.groups(cond, sigma)]
        first = pieces[0][1]
        out = first.new_empty((x.shape[0],) + tuple(first.shape[1:]))
        for mask, piece in pieces:
            out[mask] = piece
        return out
