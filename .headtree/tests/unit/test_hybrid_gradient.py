"""The hybrid estimator of METHOD.md 5.1, through the real RTDMD loss code, is unbiased for grad E[r].

A 1-D, 3-step chain whose velocity is affine in x per step (v = w_k x + b_k) keeps every state Gaussian, so
E[r] and its exact gradient follow from propagating the mean and variance (float64, autograd). The RTDMD
exact-mode loss with w_dm = 0 and beta = 1 has expected gradient -grad E[r]; we average it over many
independent iterations and compare within 5 standard errors (set before looking at the result).
"""

import math

import pytest
import torch
from torch import nn

from tiltflow.algorithms.rtdmd import RTDMD
from tiltflow.config.loader import from_dict
from tiltflow.config.schema import STAGE_PRESETS, SamplerConfig, Stage2Config
from tiltflow.flow import few_step_sigmas
from tiltflow.flow.rng import Streams
from tiltflow.models.roles import Roles
from tiltflow.rewards import RewardSet
from tiltflow.training.spine import build_train_state
from tiltflow.worlds.gmm.rewards import LinearReward, QuadraticReward
from tiltflow.worlds.gmm.world import GMMTask

K = 3
ETA = 0.9


class AffineVelocity(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.tensor([0.3, -0.2, 0.5], dtype=torch.float64))
        self.b = nn.Parameter(torch.tensor([0.1, 0.4, -0.3], dtype=torch.float64))

    def velocity(self, x, sigma, cond):
        idx = torch.round((1 - sigma) * K).long()
        return self.w[idx][:, None] * x + self.b[idx][:, None]


def exact_reward_gradient(model: AffineVelocity, reward: str) -> torch.Tensor:
    sig = few_step_sigmas(K)
    m, var = torch.zeros((), dtype=torch.float64), torch.ones((), dtype=torch.float64)
    for k in range(K):
        s, sn = sig[k], sig[k + 1]
        w, b = model.w[k], model.b[k]
        # x0_hat = (1 - s w) x - s b; eps_hat = (1 + (1 - s) w) x + (1 - s) b; mean = A x + B
        c = sn * math.cos(ETA * math.pi / 2)
        A = (1 - sn) * (1 - s * w) + c * (1 + (1 - s) * w)
        B = (1 - sn) * (-s * b) + c * (1 - s) * b
        std = sn * math.sin(ETA * math.pi / 2)
        m, var = A * m + B, A**2 * var + std**2
    er = 1.5 * m if reward == "linear" else -(var + (m - 0.5) ** 2) / 2
    return torch.cat(torch.autograd.grad(er, [model.w, model.b]))


@pytest.mark.slow
@pytest.mark.parametrize("reward", ["linear", "quadratic"])
def test_hybrid_estimator_is_unbiased(reward):
    torch.manual_seed(0)
    gen = AffineVelocity()
    r = LinearReward([1.5]) if reward == "linear" else QuadraticReward([[1.0]], [0.5])
    task = GMMTask(num_prompts=1, dim=1, rewards=RewardSet([r]))
    tree = {**STAGE_PRESETS["rtdmd_fullchain"]["stage2"], "beta": 1.0, "w_dm": 0.0, "num_prompts": 64,
            "group_size": 8, "num_trained_steps": K - 1, "n_fake": 0}
    cfg = from_dict(Stage2Config, tree)
    fake = AffineVelocity()
    roles = Roles(gen, gen, fake, list(gen.parameters()), list(fake.parameters()))
    algo = RTDMD(cfg, SamplerConfig(num_steps=K, eta=ETA), task, roles, build_train_state(cfg, roles), seed=0)
    task.rewards = RewardSet([_Float64(r)])
    grads = []
    for it in range(300):
        g = torch.Generator().manual_seed(1000 + it)
        ro = algo.rollout(it, Streams(g, g))
        terms = algo.generator_terms(ro, task.rewards(ro.traj.final, ro.batch.prompts), g)
        loss = sum(w * t.loss for w, t in terms.values())
        grads.append(torch.cat(torch.autograd.grad(loss, [gen.w, gen.b])))
    g = torch.stack(grads)
    est, se = -g.mean(0), g.std(0) / math.sqrt(len(g))
    want = exact_reward_gradient(gen, reward)
    assert torch.all((est - want).abs() <= 5 * se + 1e-6), (est, want, se)
    # The estimator is informative: the standard errors are small against the gradient itself.
    assert float(se.max()) < 0.2 * float(want.abs().max())


class _Float64:
    """The chain runs in float64 here; the gmm rewards follow their input's dtype."""

    def __init__(self, inner):
        self.inner, self.name, self.differentiable = inner, inner.name, inner.differentiable

    def __call__(self, samples, prompts):
        return self.inner(samples, prompts)
