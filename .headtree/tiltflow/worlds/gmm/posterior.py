"""The exact posterior p(x0 | x_tau) of the analytic GMM teacher: a posterior sampler (METHOD.md 5.6).

Under x_tau = (1 - tau) x0 + tau eps a Gaussian-mixture prior has a Gaussian-mixture posterior with
closed-form weights, means and covariances (GaussianMixture.posterior_components). This module samples it
and gives its moments, so the split-SNIS estimator of the tilted denoiser can run without a reverse
sampler, and the reverse sampler can be checked against it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from tiltflow.worlds.gmm.mixture import ConditionalGMM, GaussianMixture


def _check(x_tau: Tensor, tau: Tensor | float, dim: int) -> None:
    if x_tau.ndim != 2 or x_tau.shape[1] != dim:
        raise ValueError(f"x_tau has shape {tuple(x_tau.shape)}, expected (B, {dim})")
    if isinstance(tau, Tensor) and tau.ndim == 1 and tau.shape[0] != x_tau.shape[0]:
        raise ValueError(f"tau has shape {tuple(tau.shape)}, expected a float or ({x_tau.shape[0]},)")


class GMMPosterior:
    """Exact posterior sampler of a GaussianMixture, or of a ConditionalGMM with one prompt per row.

    Satisfies tiltflow.losses.tilted.PosteriorSampler: sample(x_tau, tau, num, generator) returns
    (num, B, d) draws of x0 ~ p(x0 | x_tau[b], cond[b]).
    """

    def __init__(self, teacher: GaussianMixture | ConditionalGMM, cond: Tensor | None = None):
        if isinstance(teacher, ConditionalGMM):
            if cond is None:
                raise ValueError("GMMPosterior of a ConditionalGMM needs cond (B,), one prompt per row of x_tau")
            cond = teacher._check_cond(cond, None)
        elif cond is not None:
            raise ValueError("cond is only meaningful for a ConditionalGMM teacher")
        self.teacher, self.cond = teacher, cond

    @property
    def dim(self) -> int:
        return self.teacher.dim

    def _groups(self, x_tau: Tensor, tau: Tensor | float) -> list[tuple[Tensor, GaussianMixture, Tensor | float]]:
        """(row mask, mixture, tau of those rows) for each prompt present; one group for a plain mixture."""
        _check(x_tau, tau, self.dim)
        if self.cond is None:
            assert isinstance(self.teacher, GaussianMixture)
            return [(torch.ones(x_tau.shape[0], dtype=torch.bool, device=x_tau.device), self.teacher, tau)]
        if self.cond.shape[0] != x_tau.shape[0]:
            raise ValueError(f"cond has {self.cond.shape[0]} rows but x_tau has {x_tau.shape[0]}")
        assert isinstance(self.teacher, ConditionalGMM)
        return self.teacher.groups(self.cond, tau)

    def mean(self, x_tau: Tensor, tau: Tensor | float) -> Tensor:
        """E[x0 | x_tau], (B, d): the teacher's exact denoiser."""
        out = x_tau.new_empty(x_tau.shape)
        for mask, mix, t in self._groups(x_tau, tau):
            out[mask] = mix.posterior_mean(x_tau[mask], t).to(out)
        return out

    def covariance(self, x_tau: Tensor, tau: Tensor | float) -> Tensor:
        """Cov[x0 | x_tau], (B, d, d): within-component covariances plus the spread of component means."""
        out = x_tau.new_empty((*x_tau.shape, x_tau.shape[1]))
        for mask, mix, t in self._groups(x_tau, tau):
            log_g, means, evals, evecs = mix.posterior_components(x_tau[mask], t)
            g = log_g.exp()
            within = torch.einsum("kde,bke,kfe->bkdf", evecs, evals, evecs)  # U diag(ev) U^T per (b, k)
            m = torch.einsum("bk,bkd->bd", g, means)
            dev = means - m[:, None, :]
            cov = torch.einsum("bk,bkdf->bdf", g, within + dev[:, :, :, None] * dev[:, :, None, :])
            out[mask] = cov.to(out)
        return out

    def sample(self, x_tau: Tensor, tau: Tensor | float, num: int, generator: torch.Generator | None) -> Tensor:
        """num exact posterior draws per row: (num, B, d)."""
        if num < 1:
            raise ValueError(f"num must be >= 1, got {num}")
        out = x_tau.new_empty((num, *x_tau.shape))
        for mask, mix, t in self._groups(x_tau, tau):
            log_g, means, evals, evecs = mix.posterior_components(x_tau[mask], t)
            rows = means.shape[0]
            idx = torch.multinomial(log_g.exp(), num, replacement=True, generator=generator).T  # (num, rows)
            z = torch.randn((num, rows, mix.dim), generator=generator, dtype=mix.dtype).to(means.device)
            b = torch.arange(rows, device=means.device).expand(num, rows)
            # x0 = m_{b,k} + U_k diag(sqrt(ev_{b,k})) z
            x0 = means[b, idx] + torch.einsum("nbde,nbe->nbd", evecs[idx], evals[b, idx].sqrt() * z)
            out[:, mask] = x0.to(out)
        return out
