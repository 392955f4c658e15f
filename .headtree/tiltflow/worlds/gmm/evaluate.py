"""Evaluation of the analytic world against the reward-tilted target (WORLDS.md 1, Metrics).

The target is the tilt of the teacher that the student distils:
- teacher: analytic -> the exact p and p_tilde (closed forms, exact samplers);
- teacher: neural   -> a pool of many-step teacher samples (p_T) and its SIR tilt (WORLDS.md 1,
  reference sampler), so the teacher's own error is not charged to the student. The exact analytic
  p_tilde is reported alongside (`*_exact` keys).
Every metric is computed per prompt and averaged over prompts.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from tiltflow.config.gmm import GMMRunConfig
from tiltflow.flow.conventions import few_step_sigmas
from tiltflow.flow.rng import step_generator
from tiltflow.models.base import Backbone
from tiltflow.rewards.base import RewardSet
from tiltflow.sampling import NoisePlan, sample
from tiltflow.worlds.gmm.metrics import energy_distance, kl_estimate, mode_tv
from tiltflow.worlds.gmm.mixture import ConditionalGMM
from tiltflow.worlds.gmm.reference import sir_mode_weights, sir_resample
from tiltflow.worlds.gmm.targets import Target
from tiltflow.worlds.gmm.world import build_rewards, exact_target


@dataclass
class PromptReference:
    base: Tensor  # samples of p (n, d)
    target: Tensor  # samples of p_tilde (n, d)
    target2: Tensor  # an independent set, for the noise floor
    mode_weights: Tensor  # (K,) of p_tilde (SIR-weighted for a neural teacher)
    assign: Callable[[Tensor], Tensor]
    log_p_tilde: Callable[[Tensor], Tensor]  # exact analytic
    log_p: Callable[[Tensor], Tensor]  # exact analytic
    exact_target: Tensor | None = None  # samples of the exact analytic p_tilde (neural teacher only)
    exact_mode_weights: Tensor | None = None


@dataclass
class Reference:
    prompts: list[PromptReference]
    rewards: RewardSet
    beta: float
    summary: dict[str, float] = field(default_factory=dict)


def _sample_prompt(backbone: Backbone, c: int, n: int, sigmas: list[float], eta: float, g: torch.Generator,
                   dim: int) -> Tensor:
    """n samples of prompt c with the stateless sampler (float32), returned in float64."""
    cond = torch.full((n,), c, dtype=torch.long)
    plan = NoisePlan.fresh(n, (dim,), len(sigmas) - 1, g)
    with torch.no_grad():
        return sample(lambda x, s: backbone.velocity(x, s, cond), sigmas, plan, eta=eta).final.double()


def generate(backbone: Backbone, num_prompts: int, n: int, sigmas: list[float], eta: float, seed: int,
             dim: int) -> list[Tensor]:
    """n samples per prompt with the stateless sampler (float32)."""
    return [_sample_prompt(backbone, c, n, sigmas, eta, step_generator(seed, c, "generate"), dim)
            for c in range(num_prompts)]


def _tilt_log_weights(rewards: RewardSet, x: Tensor, c: int, beta: float) -> Tensor:
    return beta * rewards(x.float(), [c] * x.shape[0]).total.double()


def _exact_or_sir(target: Target | None, pool: Tensor, log_w: Tensor, n: int, g: torch.Generator) -> Tensor:
    if target is not None:
        return target.sample(n, g)[0]
    return sir_resample(pool, log_w, n, g)[0]


def _mode_weights(target: Target | None, assign: Callable[[Tensor], Tensor], pool: Tensor, log_w: Tensor,
                  num_components: int) -> Tensor:
    return target.mode_weights if target is not None else sir_mode_weights(assign(pool), log_w, num_components)


def build_reference(cfg: GMMRunConfig, gmm: ConditionalGMM, teacher: Backbone | None, seed: int = 12345) -> Reference:
    """Reference samples of p and p_tilde per prompt (see the module docstring)."""
    n, beta = cfg.eval.num_samples, cfg.stage2.beta
    rewards = build_rewards(cfg.problem)
    neural = cfg.teacher.kind != "analytic" and teacher is not None
    refs = []
    for c in range(gmm.num_prompts):
        g = step_generator(seed, c, "reference")
        base_mix = gmm.mixture(c)
        k = base_mix.num_components
        tgt = exact_target(base_mix, cfg.problem, beta)
        assign = tgt.assign if tgt is not None else base_mix.assign
        if neural:  # p_tilde: the SIR tilt of the teacher's own samples
            pool = generate_for_prompt(teacher, c, cfg.eval.reference_pool, teacher_sigmas(cfg), seed, gmm.dim)
            base, tilt = pool[:n], None
        else:
            pool = base_mix.sample(max(cfg.eval.reference_pool, 2 * n), g)[0]
            base, tilt = base_mix.sample(n, g)[0], tgt
        log_w = _tilt_log_weights(rewards, pool, c, beta)
        t1, t2 = _exact_or_sir(tilt, pool, log_w, n, g), _exact_or_sir(tilt, pool, log_w, n, g)
        weights = _mode_weights(tilt, assign, pool, log_w, k)
        exact_t = exact_w = None
        if neural:  # the exact analytic p_tilde alongside
            exact_pool = base_mix.sample(cfg.eval.reference_pool, g)[0]
            exact_lw = _tilt_log_weights(rewards, exact_pool, c, beta)
            exact_t = _exact_or_sir(tgt, exact_pool, exact_lw, n, g)
            exact_w = _mode_weights(tgt, assign, exact_pool, exact_lw, k)
        log_pt = tgt.log_prob if tgt is not None else base_mix.log_prob
        refs.append(PromptReference(base, t1, t2, weights, assign, log_pt, base_mix.log_prob, exact_t, exact_w))
    ref = Reference(refs, rewards, beta)
    ref.summary = {
        "reward_target": _mean_reward(rewards, [r.target for r in refs]),
        "reward_base": _mean_reward(rewards, [r.base for r in refs]),
        "energy_base": _avg([energy_distance(r.base, r.target) for r in refs]),
        "energy_noise_floor": _avg([energy_distance(r.target2, r.target) for r in refs]),
        "mode_tv_base": _avg([mode_tv(r.assign(r.base), r.mode_weights, len(r.mode_weights)) for r in refs]),
        # Floors: what an exact sampler of the reference p_tilde scores with the same n.
        "mode_tv_noise_floor": _avg([mode_tv(r.assign(r.target2), r.mode_weights, len(r.mode_weights)) for r in refs]),
        # (SIR sets repeat points, which the kNN entropy cannot take: use exact samples when there are some.)
        "kl_noise_floor": _avg([kl_estimate(r.exact_target if r.exact_target is not None else r.target2,
                                            r.log_p_tilde) for r in refs]),
    }
    return ref


def generate_for_prompt(backbone: Backbone, c: int, n: int, sigmas: list[float], seed: int, dim: int,
                        eta: float = 0.0, chunk: int = 50000) -> Tensor:
    return torch.cat([_sample_prompt(backbone, c, min(chunk, n - i), sigmas, eta,
                                     step_generator(seed, c * 1000 + i // chunk, "pool"), dim)
                      for i in range(0, n, chunk)])


def _avg(values: list[float]) -> float:
    return float(sum(values) / len(values))


def _mean_reward(rewards: RewardSet, per_prompt: list[Tensor]) -> float:
    return _avg([float(rewards(x.float(), [c] * x.shape[0]).total.mean()) for c, x in enumerate(per_prompt)])


def evaluate(samples: list[Tensor], ref: Reference, *, with_kl: bool = True) -> dict[str, float]:
    """All metrics of one method's samples (one (n, d) tensor per prompt) against the reference."""
    out = dict(ref.summary)
    out["reward_mean"] = _mean_reward(ref.rewards, samples)
    pairs = list(zip(samples, ref.prompts))
    out["mode_tv"] = _avg([mode_tv(r.assign(x), r.mode_weights, len(r.mode_weights)) for x, r in pairs])
    out["energy_distance"] = _avg([energy_distance(x, r.target) for x, r in pairs])
    out["energy_to_base"] = _avg([energy_distance(x, r.base) for x, r in pairs])
    if ref.prompts[0].exact_target is not None:
        out["energy_distance_exact"] = _avg([energy_distance(x, r.exact_target) for x, r in pairs])
        out["mode_tv_exact"] = _avg([mode_tv(r.assign(x), r.exact_mode_weights, len(r.exact_mode_weights))
                                     for x, r in pairs])
    if with_kl:
        out["kl_estimate"] = _avg([kl_estimate(x, r.log_p_tilde) for x, r in pairs])
        out["kl_base_estimate"] = _avg([kl_estimate(x, r.log_p) for x, r in pairs])
    return out


def teacher_sigmas(cfg: GMMRunConfig) -> list[float]:
    """The many-step teacher sampler's grid: teacher.sample_steps uniform Euler steps from 1 to 0."""
    return few_step_sigmas(cfg.teacher.sample_steps)  # shift 1: the raw grid 1, 1 - 1/n, ..., 1/n, then 0


def few_step_generate(backbone: Backbone, cfg: GMMRunConfig, num_prompts: int, n: int, seed: int = 999) -> list[Tensor]:
    sigmas = few_step_sigmas(cfg.sampler.num_steps, cfg.sampler.shift)
    return generate(backbone, num_prompts, n, sigmas, cfg.sampler.eta, seed, cfg.problem.dim)
