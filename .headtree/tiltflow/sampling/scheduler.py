"""A diffusers scheduler running tiltflow's CPS step (METHOD.md section 2), for users who sample through
stock pipelines: `pipe.scheduler = CPSScheduler.from_config(pipe.scheduler.config, eta=0.9)`.

Same step as tiltflow.sampling.cps_step: from x at sigma with the model's velocity to sigma_next,
mean = (1 - sigma_next) x0_hat + sigma_next cos(eta pi/2) eps_hat, std = sigma_next sin(eta pi/2).
The grid is the few-step one: raw sigmas [1, 1 - 1/K, ..., 1/K] (or the pipeline's own `sigmas=`),
shifted statically (`shift`, SD3) or dynamically (`mu`, FLUX families), then 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from tiltflow.sampling.cps import cps_step


@dataclass
class CPSSchedulerOutput(BaseOutput):
    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor


class CPSScheduler(SchedulerMixin, ConfigMixin):
    """Flow-matching scheduler (sigma = 1 noise, sigma = 0 data, model predicts eps - x0) with the CPS step.

    eta = 0 reproduces FlowMatchEulerDiscreteScheduler's Euler step on the same grid; eta = 0.9 is the
    reference for the distilled few-step generators. The config keys of FlowMatchEulerDiscreteScheduler
    that pipelines read (shift, use_dynamic_shifting, base/max shift and sequence lengths,
    time_shift_type) keep their meaning, so `from_config(pipe.scheduler.config)` carries them over.
    """

    _compatibles: list = []
    order = 1

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, shift: float = 1.0, use_dynamic_shifting: bool = False,
                 base_shift: float = 0.5, max_shift: float = 1.15, base_image_seq_len: int = 256,
                 max_image_seq_len: int = 4096, time_shift_type: str = "exponential", eta: float = 0.9,
                 num_few_steps: int = 4):
        if not 0.0 <= eta <= 1.0:
            raise ValueError(f"CPSScheduler: eta must lie in [0, 1], got {eta}")
        if time_shift_type not in ("exponential", "linear"):
            raise ValueError(f"CPSScheduler: time_shift_type must be 'exponential' or 'linear', "
                             f"got {time_shift_type!r}")
        self._step_index: int | None = None
        self._begin_index: int | None = None
        self.num_inference_steps = num_few_steps
        if use_dynamic_shifting:  # mu comes with set_timesteps; until then the unshifted grid
            raw = torch.from_numpy(self._raw_grid(num_few_steps)).to(torch.float32)
            self.sigmas, self.timesteps = torch.cat([raw, torch.zeros(1)]), raw * num_train_timesteps
        else:
            self._set_grid(self._raw_grid(num_few_steps), mu=None)

    # ---- the grid ---------------------------------------------------------------------------------
    @staticmethod
    def _raw_grid(num_steps: int) -> np.ndarray:
        return np.array([1.0 - i / num_steps for i in range(num_steps)], dtype=np.float64)

    def _shifted(self, raw: np.ndarray, mu: float | None) -> np.ndarray:
        cfg = self.config
        if cfg.use_dynamic_shifting:
            if mu is None:
                raise ValueError("CPSScheduler: use_dynamic_shifting is set, so set_timesteps needs `mu`")
            k = math.exp(mu) if cfg.time_shift_type == "exponential" else mu
        else:
            k = cfg.shift
        return k * raw / (1 + (k - 1) * raw)

    def _set_grid(self, raw: np.ndarray, mu: float | None, device: str | torch.device | None = None) -> None:
        sig = torch.from_numpy(self._shifted(raw, mu)).to(torch.float32)
        self.sigmas = torch.cat([sig, torch.zeros(1)]).to(device)
        self.timesteps = (sig * self.config.num_train_timesteps).to(device)

    def set_timesteps(self, num_inference_steps: int | None = None, device: str | torch.device | None = None,
                      sigmas: list[float] | np.ndarray | None = None, mu: float | None = None,
                      timesteps: list[float] | None = None) -> None:
        """Pipelines call this with num_inference_steps (SD3) or with their raw sigmas and mu (FLUX)."""
        if timesteps is not None:
            raise ValueError("CPSScheduler takes num_inference_steps or sigmas, not explicit timesteps")
        if sigmas is None:
            if num_inference_steps is None:
                raise ValueError("CPSScheduler.set_timesteps needs num_inference_steps or sigmas")
            raw = self._raw_grid(num_inference_steps)
        else:
            raw = np.asarray(sigmas, dtype=np.float64)
        self.num_inference_steps = len(raw)
        self._set_grid(raw, mu, device)
        self._step_index = None
        self._begin_index = None

    # ---- state that pipelines use --------------------------------------------------------------------
    @property
    def step_index(self) -> int | None:
        return self._step_index

    @property
    def begin_index(self) -> int | None:
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        self._begin_index = begin_index

    def index_for_timestep(self, timestep: float | torch.Tensor) -> int:
        t = torch.as_tensor(timestep, dtype=torch.float32).to(self.timesteps.device)
        hits = (self.timesteps - t).abs() < 1e-4 * self.config.num_train_timesteps
        idx = hits.nonzero()
        if len(idx) == 0:
            raise ValueError(f"CPSScheduler: timestep {float(t)} is not on the grid {self.timesteps.tolist()}")
        return int(idx[0])

    def scale_noise(self, sample: torch.Tensor, timestep: float | torch.Tensor,
                    noise: torch.Tensor) -> torch.Tensor:
        """The forward process x_sigma = (1 - sigma) x0 + sigma eps at the grid point of `timestep` (img2img)."""
        ts = torch.as_tensor(timestep).reshape(-1)
        sig = torch.stack([self.sigmas[self.index_for_timestep(t)] for t in ts]).to(sample.device, sample.dtype)
        sig = sig.reshape(-1, *([1] * (sample.ndim - 1)))
        return sig * noise + (1.0 - sig) * sample

    # ---- the step ------------------------------------------------------------------------------------
    def step(self, model_output: torch.Tensor, timestep: float | torch.Tensor, sample: torch.Tensor,
             generator: torch.Generator | None = None, noise: torch.Tensor | None = None,
             return_dict: bool = True) -> CPSSchedulerOutput | tuple:
        """One CPS step from the current grid point; `noise` (or `generator`) feeds stochastic steps."""
        if self._step_index is None:
            self._step_index = self._begin_index if self._begin_index is not None else \
                self.index_for_timestep(timestep)
        i = self._step_index
        sigma, sigma_next = float(self.sigmas[i]), float(self.sigmas[i + 1])
        x = sample.to(torch.float32)
        stochastic = sigma_next > 0 and self.config.eta > 0
        if stochastic and noise is None:
            noise = randn_tensor(x.shape, generator=generator, device=x.device, dtype=torch.float32)
        out = cps_step(x, model_output.to(torch.float32), sigma, sigma_next, eta=self.config.eta,
                       noise=noise.to(torch.float32) if stochastic else None)
        self._step_index = i + 1
        prev = out.x_next.to(model_output.dtype)
        if not return_dict:
            return (prev,)
        return CPSSchedulerOutput(prev_sample=prev, pred_original_sample=out.x0_hat.to(model_output.dtype))

    def __len__(self) -> int:
        return self.config.num_train_timesteps
