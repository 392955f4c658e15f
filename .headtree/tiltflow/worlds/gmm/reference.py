"""Sampling-importance-resampling: the reference sampler for tilted targets without a closed form
(WORLDS.md section 1, "Reference sampler"). A pool of teacher samples is reweighted by exp(beta r).
"""

from __future__ import annotations

import torch
from torch import Tensor


def _normalised_weights(log_weights: Tensor) -> Tensor:
    if log_weights.ndim != 1 or log_weights.shape[0] == 0:
        raise ValueError(f"log_weights must be a non-empty (N,) tensor, got shape {tuple(log_weights.shape)}")
    lw = log_weights.detach().double()
    if bool(torch.isnan(lw).any()) or not bool(torch.isfinite(lw).any()):
        raise ValueError("log_weights must have no NaN and at least one finite entry")
    return torch.softmax(lw, dim=0)


def sir_resample(pool: Tensor, log_weights: Tensor, n: int,
                 generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Draw n samples from the pool (N, d) with replacement, P(i) ∝ exp(log_weights[i]).

    Returns the samples (n, d) and their pool indices (n,).
    """
    if pool.shape[0] != log_weights.shape[0]:
        raise ValueError(f"pool has {pool.shape[0]} rows but log_weights has {log_weights.shape[0]}")
    probs = _normalised_weights(log_weights).to(pool.device)
    idx = torch.multinomial(probs, n, replacement=True, generator=generator)
    return pool[idx], idx


def sir_mode_weights(pool_assign: Tensor, log_weights: Tensor, num_modes: int) -> Tensor:
    """Self-normalised importance weights summed per mode: an estimate (K,) of the target's mode weights."""
    if pool_assign.shape != log_weights.shape:
        raise ValueError(f"pool_assign {tuple(pool_assign.shape)} and log_weights {tuple(log_weights.shape)} differ")
    w = _normalised_weights(log_weights).to(pool_assign.device)
    return torch.zeros(num_modes, dtype=w.dtype, device=w.device).index_add_(0, pool_assign.long(), w)


def effective_sample_size(log_weights: Tensor) -> float:
    """Kish's ESS = (sum w)^2 / sum w^2, computed in log space: N for equal weights, 1 for a single one."""
    lw = log_weights.detach().double()
    _normalised_weights(lw)  # validation
    return float(torch.exp(2 * torch.logsumexp(lw, 0) - torch.logsumexp(2 * lw, 0)))
