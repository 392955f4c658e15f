"""Stage 2, RTDMD (METHOD.md 5): minimise KL(p_theta || p exp(beta r)) = DM - beta E[r] with the hybrid
policy gradient: PPO/GRPO on a subset S of the stochastic steps (SubGRPO, group-shared noise on the
others), reward back-propagation through the deterministic last step, the DM term on the final sample
(back-propagated through the last `dm_depth` steps), and fake-score updates on the rollout's samples.

GRPO-only, BP-only and DM+BP are this code with some of w_dm, w_pg, w_bp at zero (METHOD.md 6).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from tiltflow.algorithms.common import Roles, Task, TrainState, check_finite, optimizer_step, step_generator
from tiltflow.algorithms.terms import TauRange, dm_term, fake_loss
from tiltflow.config.schema import SamplerConfig, Stage2Config
from tiltflow.flow.conventions import few_step_sigmas
from tiltflow.losses import group_advantages, ppo_clip_loss, reward_bp_loss, subgrpo_steps
from tiltflow.losses.advantages import group_index
from tiltflow.models.ema import EMA
from tiltflow.sampling import NoisePlan, Trajectory, gaussian_log_prob, sample
from tiltflow.sampling.cps import cps_step


class RTDMD:
    def __init__(self, cfg: Stage2Config, sampler: SamplerConfig, task: Task, roles: Roles, seed: int):
        self.cfg, self.sampler, self.task, self.roles, self.seed = cfg, sampler, task, roles, seed
        self.sigmas = few_step_sigmas(sampler.num_steps, sampler.shift)
        self.num_steps = sampler.num_steps
        self.state = TrainState(
            torch.optim.AdamW(roles.generator_params, lr=cfg.lr, weight_decay=cfg.weight_decay),
            torch.optim.AdamW(roles.fake_params, lr=cfg.fake.lr, weight_decay=0.0),
            EMA(roles.generator_params, cfg.ema_decay))
        self.ema = self.state.ema
        self.taus = TauRange(0.0, cfg.dm_tau_min, cfg.dm_tau_max)
        self.w_dm, self.w_pg, self.w_bp = cfg.weights()
        if cfg.dm_depth > self.num_steps:
            raise ValueError(f"stage2.dm_depth = {cfg.dm_depth} exceeds sampler.num_steps = {self.num_steps}")
        self.dm_depth = cfg.dm_depth or self.num_steps
        self.num_trained = cfg.num_trained_steps or self.num_steps - 1

    def _velocity(self, cond: Any):
        return lambda x, sig: self.roles.generator.velocity(x, sig, cond)

    def _rollout(self, it: int, g: torch.Generator) -> tuple[list, Any, Any, Tensor, NoisePlan, Trajectory, list[int]]:
        cfg = self.cfg
        prompts = self.task.sample_prompts(cfg.num_prompts, g)
        prompts_g = [p for p in prompts for _ in range(cfg.group_size)]  # (P*G,) each prompt G times
        group = group_index(len(prompts), cfg.group_size, self.task.device)
        cond = self.task.encode(prompts_g)
        uncond = self.task.encode_uncond(len(prompts_g)) if self.task.cfg_scale != 1.0 else None
        trained = subgrpo_steps(self.num_steps - 1, self.num_trained, g)
        # Group keys: the position of the group, so two groups that drew the same prompt stay independent.
        keys = [int(i) for i in group.tolist()]
        plan = NoisePlan.subgrpo(keys, self.task.sample_shape, self.num_steps, set(trained), g,
                                 seed=int(torch.randint(2**62, (1,), generator=g)), iteration=it,
                                 device=self.task.device)
        with torch.no_grad():
            traj = sample(self._velocity(cond), self.sigmas, plan, eta=self.sampler.eta,
                          reduction=cfg.logprob_reduction)
        return prompts_g, cond, uncond, group, plan, traj, trained

    def _policy_loss(self, traj: Trajectory, trained: list[int], cond: Any, adv: Tensor) -> tuple[Tensor, dict]:
        """PPO-clip summed over the trained steps: each term's gradient is A grad log pi(x_{k+1} | x_k)."""
        total, metrics = None, {"pg_ratio_max_dev": 0.0, "pg_clip_frac": 0.0}
        for k in trained:
            x_k, x_next = traj.xs[k], traj.xs[k + 1]
            sig = torch.full((x_k.shape[0],), self.sigmas[k], dtype=x_k.dtype, device=x_k.device)
            out = cps_step(x_k, self.roles.generator.velocity(x_k, sig, cond), self.sigmas[k], self.sigmas[k + 1],
                           eta=self.sampler.eta, noise=torch.zeros_like(x_k))
            logp = gaussian_log_prob(x_next, out.mean, out.std, self.cfg.logprob_reduction)
            lo = ppo_clip_loss(logp, traj.log_probs[k], adv, self.cfg.ppo_clip)
            total = lo.loss if total is None else total + lo.loss
            # Worst case over the trained steps: any ratio != 1 on-policy is a log-prob mismatch.
            metrics["pg_ratio_max_dev"] = max(metrics["pg_ratio_max_dev"], lo.metrics["ratio_max_dev"])
            metrics["pg_clip_frac"] = max(metrics["pg_clip_frac"], lo.metrics["clip_frac"])
        assert total is not None
        return total, metrics

    def _last_step(self, traj: Trajectory, cond: Any) -> Tensor:
        """x0_hat = x_K - sigma_K v_theta(x_K) with x_K from the rollout held fixed."""
        k = self.num_steps - 1
        x_k = traj.xs[k]
        sig = torch.full((x_k.shape[0],), self.sigmas[k], dtype=x_k.dtype, device=x_k.device)
        return x_k - self.sigmas[k] * self.roles.generator.velocity(x_k, sig, cond)

    def _fake_updates(self, x0: Tensor, cond: Any, g: torch.Generator, it: int) -> dict[str, float]:
        fc = self.cfg.fake
        metrics: dict[str, float] = {}
        for _ in range(self.cfg.n_fake):
            out = fake_loss(self.roles, x0, 0.0, cond, taus=self.taus, eta=self.sampler.eta, weighting=fc.weighting,
                            gamma=fc.consistency_gamma, delta_max=fc.consistency_delta_max,
                            two_sample=fc.consistency_two_sample, generator=g)
            check_finite("fake-score loss", out.loss, it)
            optimizer_step(self.state.fake_opt, out.loss, self.roles.fake_params, self.cfg.grad_clip)
            metrics.update(out.metrics)
        return metrics

    def _generator_loss(self, it: int, g: torch.Generator) -> tuple[Tensor, dict[str, float]]:
        cfg = self.cfg
        prompts, cond, uncond, group, plan, traj, trained = self._rollout(it, g)
        final = traj.final
        scores = self.task.rewards(self.task.decode(final), prompts)
        weights = dict(zip(self.task.rewards.names, self.task.rewards.weights))
        metrics = {f"reward_{k}": float(v.mean()) for k, v in scores.per_reward.items()}
        metrics["reward_total"] = float(scores.total.mean())
        metrics.update(self._fake_updates(final, cond, g, it))  # fake first, as in the reference
        loss = torch.zeros((), device=final.device)
        if self.w_pg > 0:
            adv = group_advantages(scores.per_reward, weights, group, mode=cfg.advantage, clip=cfg.adv_clip)
            pg, pg_metrics = self._policy_loss(traj, trained, cond, adv)
            check_finite("policy-gradient loss", pg, it)
            loss = loss + self.w_pg * pg
            metrics.update(pg_metrics, pg_loss=float(pg.detach()))
        x0_last = self._last_step(traj, cond) if (self.w_bp > 0 or self.dm_depth == 1) else None
        if self.w_bp > 0 and self.task.rewards.differentiable:
            r = self.task.rewards(self.task.decode(x0_last), prompts, only_differentiable=True).differentiable_total
            bp = reward_bp_loss(r, kind=cfg.bp_loss, margin=cfg.bp_margin)
            check_finite("reward back-propagation loss", bp.loss, it)
            loss = loss + self.w_bp * bp.loss
            metrics.update(bp.metrics, bp_loss=float(bp.loss.detach()))
        if self.w_dm > 0:
            if self.dm_depth == 1:
                x_dm = x0_last
            else:  # recompute the last dm_depth steps with gradient, same noises (METHOD.md 5.6)
                start = self.num_steps - self.dm_depth
                x_dm = sample(self._velocity(cond), self.sigmas, plan, eta=self.sampler.eta, start=start,
                              x_start=traj.xs[start], grad_from=start).final
            dm = dm_term(self.task, self.roles, x_dm, 0.0, cond, uncond, taus=self.taus, eta=self.sampler.eta,
                         scaling=cfg.dm_scaling, generator=g, reduction=cfg.dm_reduction)
            check_finite("distribution-matching loss", dm.loss, it)
            loss = loss + self.w_dm * dm.loss
            metrics.update(dm.metrics, dm_loss=float(dm.loss.detach()))
        return loss, metrics

    def step(self, it: int) -> dict[str, float]:
        g = step_generator(self.seed, it, "stage2")
        self.state.gen_opt.zero_grad(set_to_none=True)
        metrics: dict[str, float] = {}
        for _ in range(self.cfg.accumulation):
            loss, metrics = self._generator_loss(it, g)
            check_finite("stage-2 generator loss", loss, it)
            if loss.requires_grad:
                (loss / self.cfg.accumulation).backward()
        metrics["gen_grad_norm"] = float(torch.nn.utils.clip_grad_norm_(self.roles.generator_params,
                                                                        self.cfg.grad_clip))
        self.state.gen_opt.step()
        if (it + 1) % self.cfg.ema_every == 0:
            self.ema.update()
        return metrics

    def state_dict(self) -> dict:
        return self.state.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.state.load_state_dict(state)
