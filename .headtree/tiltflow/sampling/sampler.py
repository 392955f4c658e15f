"""A stateless few-step sampler: the same code serves rollouts, evaluation and inference.

Steps k = 0 .. K-1 map x_k at sigmas[k] to x_{k+1} at sigmas[k+1]; sigmas[K] = 0 makes the last step
deterministic. Noise comes from a NoisePlan, so callers control it per step, sample and group.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from tiltflow.sampling.cps import cps_step
from tiltflow.sampling.noise import NoisePlan

VelocityFn = Callable[[Tensor, Tensor], Tensor]  # (x, sigma (B,)) -> v


@dataclass
class Trajectory:
    sigmas: list[float]
    xs: list[Tensor] = field(default_factory=list)  # x_start .. x_stop (stop - start + 1 states)
    log_probs: list[Tensor] = field(default_factory=list)
    x0_hats: list[Tensor] = field(default_factory=list)
    start: int = 0

    @property
    def final(self) -> Tensor:
        return self.xs[-1]


def sample(
    velocity: VelocityFn,
    sigmas: Sequence[float],
    noise: NoisePlan,
    *,
    eta: float,
    start: int = 0,
    stop: int | None = None,
    grad_from: int | None = None,
    x_start: Tensor | None = None,
    reduction: str = "sum",
) -> Trajectory:
    """Run steps start .. stop-1 from x_start (default: noise.init, which lives at sigmas[0]).

    Steps k >= grad_from are recorded with autograd (when it is enabled); earlier steps run under
    no_grad and their outputs are detached. grad_from=None means no step gets gradient.
    """
    num_steps = len(sigmas) - 1
    stop = num_steps if stop is None else stop
    if not 0 <= start < stop <= num_steps:
        raise ValueError(f"need 0 <= start < stop <= {num_steps}, got start={start}, stop={stop}")
    grad_from = num_steps if grad_from is None else grad_from
    x = noise.init if x_start is None else x_start
    traj = Trajectory(sigmas=list(sigmas), start=start)
    traj.xs.append(x)
    for k in range(start, stop):
        ctx = contextlib.nullcontext() if k >= grad_from else torch.no_grad()
        with ctx:
            if k < grad_from:
                x = x.detach()
            sig = torch.full((x.shape[0],), float(sigmas[k]), dtype=x.dtype, device=x.device)
            v = velocity(x, sig)
            out = cps_step(x, v, float(sigmas[k]), float(sigmas[k + 1]), eta=eta, noise=noise.steps[k],
                           reduction=reduction)
        x = out.x_next
        traj.xs.append(x)
        traj.log_probs.append(out.log_prob)
        traj.x0_hats.append(out.x0_hat)
    return traj
