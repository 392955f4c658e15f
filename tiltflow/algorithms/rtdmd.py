"""Stage 2, RTDMD (METHOD.md 5): minimise KL(p_theta || p exp(beta r)) = DM - beta E[r] with the hybrid
policy gradient: PPO/GRPO on a subset S of the stochastic steps (SubGRPO, group-shared noise on the
others), reward back-propagation through the deterministic last step, the DM term on the final sample
(back-propagated through the last `dm_depth` steps), and fake-score updates on the rollouts' samples.

GRPO-only, BP-only and DM+BP are this code with some of w_dm, w_pg, w_bp at zero (METHOD.md 6).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from tiltflow.algorithms.common import (
    Batch,
    GradSync,
    MeanMetrics,
    Task,
    TrainState,
    always_sync,
)
from tiltflow.algorithms.dm import DMSettings, FakeSettings, TauRange, TiltSettings, TwoNetworkAlgorithm, dm_loss
from tiltflow.config.schema import SamplerConfig, Stage2Config, resolve_tilt_estimator
from tiltflow.distributed import LOCAL, Comm
from tiltflow.flow.rng import Streams, streams
from tiltflow.losses import LossOutput, group_advantages, ppo_clip_loss, reward_bp_loss, subgrpo_steps
from tiltflow.losses.advantages import group_index
from tiltflow.models.roles import Roles
from tiltflow.rewards.base import RewardSetOutput
from tiltflow.sampling import NoisePlan, Trajectory, gaussian_log_prob, sample
from tiltflow.sampling.cps import cps_step


@dataclass
class Rollout:
    """One rollout batch: P prompts x G samples, their SubGRPO noise plan and trajectory (no gradient)."""

    batch: Batch  # prompts repeated G times, (P*G,)
    group: Tensor  # (P*G,) group index of each sample, global over ranks
    plan: NoisePlan
    traj: Trajectory
    trained: list[int]  # the stochastic steps S that get a policy-gradient term


TERM_NAMES = {"pg": "policy-gradient loss", "bp": "reward back-propagation loss", "dm": "distribution-matching loss"}


def _watch(watched: dict[str, list[Tensor]], values: dict[str, Tensor]) -> None:
    """Collect an update's values (detached, flattened) for its one finite check."""
    for name, v in values.items():
        watched.setdefault(name, []).append(v.detach().reshape(-1))


def fake_updates_in(microbatch: int, n_fake: int, accumulation: int) -> int:
    """n_fake updates per generator update spread over the micro-batches: n_fake // A each, one more for
    the first n_fake % A."""
    return n_fake // accumulation + (1 if microbatch < n_fake % accumulation else 0)


def tilt_settings(cfg: Stage2Config, task: Task, roles: Roles) -> TiltSettings:
    """DM toward the diffused tilted target (stage2.dm_target: tilted, METHOD.md 5.6) from what the task and
    the teacher offer: the task's linear reward vector (optional Task.linear_reward) for linear_shift, its
    reward set for the importance-sampling estimators, and the teacher's exact posterior (optional
    posterior_sampler(cond) of the teacher backbone) when it has one and no CFG changes its distribution."""
    if cfg.w_pg != 0 or cfg.w_bp != 0:  # config load already refuses this (RunConfig.validate)
        raise ValueError("stage2.dm_target = 'tilted' puts the reward in the DM term: w_pg and w_bp must be 0")
    linear = getattr(task, "linear_reward", None)
    a = linear() if linear is not None else None
    differentiable = all(r.differentiable for r in task.rewards.rewards)
    estimator = resolve_tilt_estimator(cfg.tilt_estimator, linear=a is not None, differentiable=differentiable,
                                       rewards=f"the rewards {task.rewards.names}")
    exact = getattr(roles.teacher, "posterior_sampler", None)

    def reward(x0: Tensor, prompts: list[Any]) -> Tensor:
        return task.rewards(task.decode(x0), prompts).total

    return TiltSettings(estimator, cfg.beta, cfg.tilt_num_pairs, cfg.tilt_posterior_steps, reward, a,
                        exact if task.guidance_scale == 1.0 else None)


class RTDMD(TwoNetworkAlgorithm):
    def __init__(self, cfg: Stage2Config, sampler: SamplerConfig, task: Task, roles: Roles, state: TrainState,
                 *, seed: int, comm: Comm = LOCAL, grad_sync: GradSync = always_sync):
        super().__init__(cfg, sampler, task, roles, state, seed, comm)
        self.grad_sync = grad_sync
        self.num_steps = K = sampler.num_steps
        taus = TauRange(0.0, cfg.dm_tau_min, cfg.dm_tau_max)
        self.dm = DMSettings(taus, sampler.eta, task.guidance_scale, cfg.dm_scaling, cfg.dm_reduction,
                             tilt_settings(cfg, task, roles) if cfg.dm_target == "tilted" else None)
        self.fake = FakeSettings.of(cfg.fake, taus, sampler.eta)
        self.w_dm, self.w_pg, self.w_bp = cfg.weights()
        if cfg.dm_depth > K:
            raise ValueError(f"stage2.dm_depth = {cfg.dm_depth} exceeds sampler.num_steps = {K}")
        if self.w_bp > 0 and not task.rewards.differentiable:
            raise ValueError(f"stage2.w_bp = {self.w_bp} > 0 but none of the rewards {task.rewards.names} is "
                             "differentiable; set stage2.w_bp=0 or add a differentiable reward")
        self.dm_depth = cfg.dm_depth or K
        self.num_trained = cfg.num_trained_steps or K - 1
        if cfg.grad_norms_by_term and comm.world_size > 1:
            raise ValueError(f"stage2.grad_norms_by_term needs one process, got {comm.world_size}: it runs a "
                             "backward per term through one forward, which sharded parameters (FSDP2 reshards "
                             "after each backward) do not allow; measure it with one process")

    def step(self, it: int) -> dict[str, float]:
        cfg, A = self.cfg, self.cfg.accumulation
        rng = streams(self.seed, it, "stage2", self.comm.rank, self.comm.world_size)
        metrics = MeanMetrics()
        self.state.gen_opt.zero_grad(set_to_none=True)
        watched: dict[str, list[Tensor]] = {}  # loss terms and rewards of every micro-batch, checked once
        by_term: dict[str, list[Tensor]] = {}  # grad_norms_by_term: each term's gradient, summed over micro-batches
        for m in range(A):
            with self.phase("rollout"):
                ro = self.rollout(it, rng)
                scores = self.task.rewards(self.task.decode(ro.traj.final), ro.batch.prompts)
            metrics.add({f"reward_{k}": v.detach().mean() for k, v in scores.per_reward.items()})
            metrics.add({"reward_total": scores.total.detach().mean()})
            for _ in range(fake_updates_in(m, cfg.n_fake, A)):  # fake first, as in the reference
                with self.phase("fake update"):
                    metrics.add(self.fake_update(ro.traj.final, 0.0, ro.batch.cond, rng.local, it))
            with self.phase("generator update"), self.grad_sync(m == A - 1):  # sync on the last micro-batch
                terms = self.generator_terms(ro, scores, rng.local)
                _watch(watched, {TERM_NAMES[name]: t.loss for name, (_, t) in terms.items()})
                _watch(watched, {f"reward {k} scores": v for k, v in scores.per_reward.items()})
                if cfg.grad_norms_by_term:
                    self.backward_by_term(terms, A, by_term)
                else:
                    loss = sum(w * t.loss for w, t in terms.values())
                    if isinstance(loss, Tensor) and loss.requires_grad:
                        (loss / A).backward()
            for name, (_, t) in terms.items():
                metrics.add({**t.metrics, f"{name}_loss": t.loss.detach()})
        with self.phase("generator update"):
            grad_norm = torch.nn.utils.clip_grad_norm_(self.roles.generator_params, cfg.grad_clip)
            checked = {k: torch.cat(v) for k, v in watched.items()}
            if self.guard.ok(it, "generator update", {**checked, "generator gradient norm": grad_norm},
                             self.roles.generator_params):
                self.state.gen_opt.step()
                if (it + 1) % cfg.ema_every == 0:
                    self.state.ema.update()
        metrics.add({"gen_grad_norm": grad_norm, **self.guard.metrics()})
        metrics.add({f"grad_norm_{name}": torch.stack([g.double().square().sum() for g in grads]).sum().sqrt()
                     for name, grads in by_term.items()})
        self.guard.flush()  # nonfinite_check = step: the step's one read of its updates' values
        return metrics.result()

    def backward_by_term(self, terms: dict[str, tuple[float, LossOutput]], A: int,
                         by_term: dict[str, list[Tensor]]) -> None:
        """The weighted terms back-propagated one at a time (the gradients accumulate in .grad as one
        backward of their sum would), each term's own gradient added to by_term[name]."""
        params = [p for p in self.roles.generator_params if p.requires_grad]
        live = [(name, w * t.loss) for name, (w, t) in terms.items() if t.loss.requires_grad]
        for i, (name, loss) in enumerate(live):
            before = [torch.zeros_like(p) if p.grad is None else p.grad.detach().clone() for p in params]
            (loss / A).backward(retain_graph=i < len(live) - 1)  # the terms share the last step's forward
            own = [torch.zeros_like(p) if p.grad is None else p.grad.detach() - b for p, b in zip(params, before)]
            by_term[name] = own if name not in by_term else [a + b for a, b in zip(by_term[name], own)]

    def rollout(self, it: int, rng: Streams) -> Rollout:
        """P prompts x G samples (METHOD.md 5.2): trained steps S and the group-noise seed from the shared
        stream, prompts and fresh noise from this rank's."""
        cfg = self.cfg
        prompts = self.task.sample_prompts(cfg.num_prompts, rng.local)
        batch = Batch.of(self.task, [p for p in prompts for _ in range(cfg.group_size)])
        trained = subgrpo_steps(self.num_steps - 1, self.num_trained, rng.shared)
        # Group keys are global group positions, so two groups that drew the same prompt stay independent.
        group = group_index(len(prompts), cfg.group_size, self.task.device) + self.comm.rank * len(prompts)
        plan = NoisePlan.subgrpo(group.tolist(), self.task.sample_shape, self.num_steps, set(trained), rng.local,
                                 seed=int(torch.randint(2**62, (1,), generator=rng.shared)), iteration=it,
                                 device=self.task.device)
        with torch.no_grad():
            traj = sample(self._velocity(batch.cond), self.sigmas, plan, eta=self.sampler.eta,
                          reduction=cfg.logprob_reduction)
        return Rollout(batch, group, plan, traj, trained)

    def generator_terms(self, ro: Rollout, scores: RewardSetOutput, g: torch.Generator
                        ) -> dict[str, tuple[float, LossOutput]]:
        """The weighted terms of L = w_dm L_dm + w_pg L_pg + w_bp L_bp (METHOD.md 5.6); a term whose
        weight is 0 costs nothing."""
        terms: dict[str, tuple[float, LossOutput]] = {}
        if self.w_pg > 0:
            terms["pg"] = (self.w_pg, self.policy_loss(ro, self.advantages(ro, scores)))
        x0_last = self.last_step(ro) if (self.w_bp > 0 or (self.w_dm > 0 and self.dm_depth == 1)) else None
        if self.w_bp > 0:
            terms["bp"] = (self.w_bp, self.reward_bp_term(x0_last, ro.batch.prompts))
        if self.w_dm > 0:
            x_dm = x0_last if self.dm_depth == 1 else self.rerun_last_steps(ro)
            terms["dm"] = (self.w_dm, dm_loss(self.roles, x_dm, 0.0, ro.batch, self.dm, g))
        return terms

    def reward_bp_term(self, x0: Tensor, prompts: list[Any]) -> LossOutput:
        """L_bp on the decoded x0 (METHOD.md 5.5). With stage2.bp_chunk = c (0 < c < batch) the decode and the
        differentiable rewards run c samples at a time on a detached copy of x0, each chunk's graph back-
        propagated to that copy at once and freed; the term is then value + (x0 . dL/dx0 - its value): the
        whole batch's loss value, and the same gradient to the generator through x0 alone. Only c samples'
        decoder activations are held at a time."""
        kind, margin, c = self.cfg.bp_loss, self.cfg.bp_margin, self.cfg.bp_chunk
        n = x0.shape[0]
        if c <= 0 or c >= n:
            r = self.task.rewards(self.task.decode(x0), prompts, only_differentiable=True)
            return reward_bp_loss(r.differentiable_total, kind=kind, margin=margin)
        leaf = x0.detach().requires_grad_()
        scores = []
        for s in range(0, n, c):
            part = leaf[s:s + c]
            r = self.task.rewards(self.task.decode(part), prompts[s:s + c], only_differentiable=True)
            # The loss is a mean over the batch: each chunk's mean counts with its share of the batch.
            loss = reward_bp_loss(r.differentiable_total, kind=kind, margin=margin).loss * (part.shape[0] / n)
            if loss.requires_grad:  # (a reward that ignores its input leaves nothing to back-propagate)
                loss.backward()
            scores.append(r.differentiable_total.detach())
        whole = reward_bp_loss(torch.cat(scores), kind=kind, margin=margin)
        if leaf.grad is None:
            return whole
        surrogate = (x0 * leaf.grad).sum()
        return LossOutput(whole.loss + (surrogate - surrogate.detach()), whole.metrics)

    def advantages(self, ro: Rollout, scores: RewardSetOutput) -> Tensor:
        """Group-relative advantages over the GLOBAL batch (every rank's samples), then this rank's slice,
        so one rank and several give the same advantages for the same samples."""
        cfg, n = self.cfg, ro.group.shape[0]
        per_reward = {k: self.comm.all_gather(v.detach()) for k, v in scores.per_reward.items()}
        weights = dict(zip(self.task.rewards.names, self.task.rewards.weights))
        adv = group_advantages(per_reward, weights, self.comm.all_gather(ro.group), mode=cfg.advantage,
                               clip=cfg.adv_clip)
        return adv[self.comm.rank * n:(self.comm.rank + 1) * n]

    def policy_loss(self, ro: Rollout, adv: Tensor) -> LossOutput:
        """PPO-clip summed over the trained steps: each term's gradient is A grad log pi(x_{k+1} | x_k)."""
        total, metrics = None, {"pg_ratio_max_dev": [], "pg_clip_frac": []}
        for k in ro.trained:
            x_k, x_next = ro.traj.xs[k], ro.traj.xs[k + 1]
            sig = torch.full((x_k.shape[0],), self.sigmas[k], dtype=x_k.dtype, device=x_k.device)
            out = cps_step(x_k, self.roles.generator.velocity(x_k, sig, ro.batch.cond), self.sigmas[k],
                           self.sigmas[k + 1], eta=self.sampler.eta, noise=torch.zeros_like(x_k))
            logp = gaussian_log_prob(x_next, out.mean, out.std, self.cfg.logprob_reduction)
            lo = ppo_clip_loss(logp, ro.traj.log_probs[k], adv, self.cfg.ppo_clip)
            total = lo.loss if total is None else total + lo.loss
            # Worst case over the trained steps: any ratio != 1 on-policy is a log-prob mismatch.
            metrics["pg_ratio_max_dev"].append(lo.metrics["ratio_max_dev"])
            metrics["pg_clip_frac"].append(lo.metrics["clip_frac"])
        assert total is not None
        return LossOutput(total, {k: torch.stack(vs).max() for k, vs in metrics.items()})

    def last_step(self, ro: Rollout) -> Tensor:
        """x0_hat = x_K - sigma_K v_theta(x_K) with x_K from the rollout held fixed (METHOD.md 5.5)."""
        k = self.num_steps - 1
        x_k = ro.traj.xs[k]
        sig = torch.full((x_k.shape[0],), self.sigmas[k], dtype=x_k.dtype, device=x_k.device)
        return x_k - self.sigmas[k] * self.roles.generator.velocity(x_k, sig, ro.batch.cond)

    def rerun_last_steps(self, ro: Rollout) -> Tensor:
        """The last dm_depth steps again, with gradient and the rollout's noises (METHOD.md 5.6)."""
        start = self.num_steps - self.dm_depth
        return sample(self._velocity(ro.batch.cond), self.sigmas, ro.plan, eta=self.sampler.eta, start=start,
                      x_start=ro.traj.xs[start], grad_from=start).final
