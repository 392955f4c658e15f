"""Stage 1, AC-DMD (METHOD.md 4): subinterval-wise DMD for the generator, ambient DSM + consistency for
the fake score, n_fake fake updates per generator update, generator EMA.

DMD2-style (METHOD.md 6) is the same code with eta = 1, subinterval = false (DMD at s = 0 on the
step's clean prediction) and no consistency term.
"""

from __future__ import annotations

import torch
from torch import Tensor

from tiltflow.algorithms.common import Batch, MeanMetrics, Task, TrainState, optimizer_step
from tiltflow.algorithms.dm import DMSettings, FakeSettings, TauRange, TwoNetworkAlgorithm, dm_loss
from tiltflow.config.schema import SamplerConfig, Stage1Config
from tiltflow.distributed import LOCAL, Comm
from tiltflow.flow.rng import Streams, streams
from tiltflow.models.roles import Roles
from tiltflow.sampling import NoisePlan, sample


class ACDMD(TwoNetworkAlgorithm):
    def __init__(self, cfg: Stage1Config, sampler: SamplerConfig, task: Task, roles: Roles, state: TrainState,
                 *, seed: int, comm: Comm = LOCAL):
        super().__init__(cfg, sampler, task, roles, state, seed, comm)
        taus = TauRange(cfg.delta, cfg.tau_min, cfg.tau_max)
        self.dm = DMSettings(taus, sampler.eta, task.guidance_scale)
        self.fake = FakeSettings.of(cfg.fake, taus, sampler.eta)

    def rollout(self, rng: Streams, with_grad: bool) -> tuple[Batch, Tensor, float]:
        """A fresh batch (this rank's stream) rolled out through steps 0..k, step k with gradient if asked;
        returns (batch, x_s, s) per the stage's variant."""
        g = rng.local
        batch = Batch.draw(self.task, self.cfg.batch_size, g)
        # Random stop, whole batch, the same on every rank (sharded passes must match in number).
        k = int(torch.randint(self.sampler.num_steps, (1,), generator=rng.shared))
        plan = NoisePlan.fresh(len(batch.prompts), self.task.sample_shape, self.sampler.num_steps, g,
                               device=self.task.device)
        traj = sample(self._velocity(batch.cond), self.sigmas, plan,
                      eta=self.sampler.eta, stop=k + 1, grad_from=k if with_grad else None)
        if self.cfg.subinterval:
            return batch, traj.final, self.sigmas[k + 1]
        return batch, traj.x0_hats[-1], 0.0  # DMD2: the step's clean prediction, matched at s = 0

    def step(self, it: int) -> dict[str, float]:
        cfg = self.cfg
        rng = streams(self.seed, it, "stage1", self.comm.rank, self.comm.world_size)
        g = rng.local
        metrics = MeanMetrics()
        # Two time scales (METHOD.md 4.4): n_fake fake-score updates, then one generator update.
        for _ in range(cfg.n_fake):
            with self.phase("fake update"):
                with torch.no_grad():
                    batch, x_s, s = self.rollout(rng, with_grad=False)
                metrics.add(self.fake_update(x_s, s, batch.cond, g, it))
        with self.phase("generator update"):
            batch, x_s, s = self.rollout(rng, with_grad=True)
            out = dm_loss(self.roles, x_s, s, batch, self.dm, g)
            grad_norm, stepped = optimizer_step(self.state.gen_opt, out.loss, self.roles.generator_params,
                                                cfg.grad_clip, self.guard, it, "generator", "generator DM loss")
            if stepped:
                self.state.ema.update()
        metrics.add({**out.metrics, "gen_dm_loss": out.loss.detach(), "gen_grad_norm": grad_norm,
                     **self.guard.metrics()})
        self.guard.flush()  # nonfinite_check = step: the step's one read of its updates' values
        return metrics.result()
