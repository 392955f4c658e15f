"""The CPS step (METHOD.md section 2) and its Gaussian transition log-probability.

One step from x at sigma with velocity v to sigma_next:
  mean = (1 - sigma_next) x0_hat + sigma_next cos(eta pi / 2) eps_hat,  std = sigma_next sin(eta pi / 2).
eta = 0 is the Euler step; eta = 1 re-noises x0_hat with fresh noise; sigma_next = 0 is deterministic.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from tiltflow.flow.conventions import bcast, eps_from_v, x0_from_v

REDUCTIONS = ("sum", "mean")


@dataclass
class StepOutput:
    x_next: Tensor
    mean: Tensor
    std: Tensor  # per sample, shape (B,)
    log_prob: Tensor  # per sample, shape (B,); zeros for a deterministic step
    x0_hat: Tensor


def cps_coefficients(sigma_next: Tensor | float, eta: float) -> tuple[Tensor | float, Tensor | float]:
    """(coefficient of eps_hat in the mean, std) of the CPS step to sigma_next."""
    return sigma_next * math.cos(eta * math.pi / 2), sigma_next * math.sin(eta * math.pi / 2)


def gaussian_log_prob(x: Tensor, mean: Tensor, std: Tensor | float, reduction: str = "sum") -> Tensor:
    """log N(x; mean, std^2 I) per sample.

    reduction = "sum" is the exact log-density (sum over dimensions). reduction = "mean" divides it by
    the number of dimensions: the per-dimension average that Flow-GRPO-style code uses, which the
    reference PPO clip range (1e-5) assumes. Ratios exp(logp - logp_old) differ between the two by the
    power 1 / D, so clip ranges are not interchangeable.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"log-prob reduction must be one of {REDUCTIONS}, got {reduction!r}")
    std_t = bcast(torch.as_tensor(std, dtype=x.dtype, device=x.device), x)
    per_dim = -((x - mean) ** 2) / (2 * std_t**2) - torch.log(std_t) - 0.5 * math.log(2 * math.pi)
    per_dim = per_dim.flatten(1)
    return per_dim.sum(1) if reduction == "sum" else per_dim.mean(1)


def cps_step(x: Tensor, v: Tensor, sigma: Tensor | float, sigma_next: Tensor | float, *, eta: float,
             noise: Tensor | None, reduction: str = "sum") -> StepOutput:
    """One CPS step. `noise` (same shape as x) is required unless the step is deterministic."""
    x0_hat, mean, std = _mean(x, v, sigma, sigma_next, eta)
    if isinstance(std, Tensor):  # per-sample levels: whether any step is stochastic is read from the device
        std_b = std.to(x.device, x.dtype).expand(x.shape[0]).clone()
        stochastic = bool((std_b > 0).any())
    else:  # a float (the sampler's grid): decided on the host, with no copy to the device and no read back
        std_b = torch.full((x.shape[0],), std, dtype=x.dtype, device=x.device)
        stochastic = std > 0
    if stochastic:
        if noise is None:
            raise ValueError("cps_step: a stochastic step (eta > 0, sigma_next > 0) needs `noise`")
        x_next = mean + bcast(std_b, x) * noise
        log_prob = gaussian_log_prob(x_next.detach(), mean, std_b, reduction)
    else:
        x_next = mean
        log_prob = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
    return StepOutput(x_next=x_next, mean=mean, std=std_b, log_prob=log_prob, x0_hat=x0_hat)


def cps_sample(x: Tensor, v: Tensor, sigma: Tensor | float, sigma_next: Tensor | float, *, eta: float,
               noise: Tensor) -> Tensor:
    """cps_step's x_next alone, for transitions that need no log-probability (the consistency term's): the
    noise is added with the step's std even where that std is zero, which adds nothing, so whether a step
    is stochastic is never read back from the device."""
    _, mean, std = _mean(x, v, sigma, sigma_next, eta)
    return mean + bcast(std, x) * noise


def _mean(x: Tensor, v: Tensor, sigma: Tensor | float, sigma_next: Tensor | float,
          eta: float) -> tuple[Tensor, Tensor, Tensor | float]:
    """(x0_hat, mean, std) of the CPS step."""
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta must lie in [0, 1], got {eta}")
    x0_hat = x0_from_v(x, v, sigma)
    c_eps, std = cps_coefficients(sigma_next, eta)
    mean = (1 - bcast(sigma_next, x)) * x0_hat + bcast(c_eps, x) * eps_from_v(x, v, sigma)
    return x0_hat, mean, std
