"""Stage 1, AC-DMD (METHOD.md 4): subinterval-wise DMD for the generator, ambient DSM + consistency for
the fake score, n_fake fake updates per generator update, generator EMA.

DMD2-style (METHOD.md 6) is the same code with eta = 1, subinterval = false (DMD at s = 0 on the
step's clean prediction) and no consistency term.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from tiltflow.algorithms.common import Roles, Task, TrainState, check_finite, optimizer_step, step_generator
from tiltflow.algorithms.terms import TauRange, dm_term, fake_loss
from tiltflow.config.schema import SamplerConfig, Stage1Config
from tiltflow.flow.conventions import few_step_sigmas
from tiltflow.models.ema import EMA
from tiltflow.sampling import NoisePlan, sample


class ACDMD:
    def __init__(self, cfg: Stage1Config, sampler: SamplerConfig, task: Task, roles: Roles, seed: int):
        self.cfg, self.sampler, self.task, self.roles, self.seed = cfg, sampler, task, roles, seed
        self.sigmas = few_step_sigmas(sampler.num_steps, sampler.shift)
        self.state = TrainState(torch.optim.AdamW(roles.generator_params, lr=cfg.lr, weight_decay=0.0),
                                torch.optim.AdamW(roles.fake_params, lr=cfg.fake.lr, weight_decay=0.0),
                                EMA(roles.generator_params, cfg.ema_decay))
        self.ema = self.state.ema
        self.taus = TauRange(cfg.delta, cfg.tau_min, cfg.tau_max)

    def _rollout(self, k: int, cond: Any, n: int, g: torch.Generator, with_grad: bool) -> tuple[Tensor, float]:
        """Roll out steps 0..k (step k with gradient if asked); return (x_s, s) per the stage's variant."""
        plan = NoisePlan.fresh(n, self.task.sample_shape, self.sampler.num_steps, g, device=self.task.device)
        traj = sample(lambda x, sig: self.roles.generator.velocity(x, sig, cond), self.sigmas, plan,
                      eta=self.sampler.eta, stop=k + 1, grad_from=k if with_grad else None)
        if self.cfg.subinterval:
            return traj.final, self.sigmas[k + 1]
        return traj.x0_hats[-1], 0.0  # DMD2: the step's clean prediction, matched at s = 0

    def _batch(self, g: torch.Generator) -> tuple[Any, Any, int]:
        prompts = self.task.sample_prompts(self.cfg.batch_size, g)
        cond = self.task.encode(prompts)
        uncond = self.task.encode_uncond(len(prompts)) if self.task.cfg_scale != 1.0 else None
        return cond, uncond, len(prompts)

    def step(self, it: int) -> dict[str, float]:
        cfg, fake_cfg = self.cfg, self.cfg.fake
        g = step_generator(self.seed, it, "stage1")
        metrics: dict[str, float] = {}
        # Two time scales: n_fake fake-score updates, then one generator update.
        for _ in range(cfg.n_fake):
            cond, _, n = self._batch(g)
            k = int(torch.randint(self.sampler.num_steps, (1,), generator=g))
            with torch.no_grad():
                x_s, s = self._rollout(k, cond, n, g, with_grad=False)
            out = fake_loss(self.roles, x_s, s, cond, taus=self.taus, eta=self.sampler.eta,
                            weighting=fake_cfg.weighting, gamma=fake_cfg.consistency_gamma,
                            delta_max=fake_cfg.consistency_delta_max, two_sample=fake_cfg.consistency_two_sample,
                            generator=g)
            check_finite("fake-score loss", out.loss, it)
            optimizer_step(self.state.fake_opt, out.loss, self.roles.fake_params, cfg.grad_clip)
            metrics.update(out.metrics)
        cond, uncond, n = self._batch(g)
        k = int(torch.randint(self.sampler.num_steps, (1,), generator=g))  # random stop, whole batch
        x_s, s = self._rollout(k, cond, n, g, with_grad=True)
        out = dm_term(self.task, self.roles, x_s, s, cond, uncond, taus=self.taus, eta=self.sampler.eta,
                      scaling="normalized", generator=g)
        check_finite("generator DM loss", out.loss, it)
        metrics["gen_grad_norm"] = optimizer_step(self.state.gen_opt, out.loss, self.roles.generator_params,
                                                  cfg.grad_clip)
        self.ema.update()
        metrics.update(out.metrics)
        metrics["gen_dm_loss"] = float(out.loss.detach())
        return metrics

    def state_dict(self) -> dict:
        return self.state.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.state.load_state_dict(state)
