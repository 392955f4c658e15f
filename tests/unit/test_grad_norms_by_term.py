"""stage2.grad_norms_by_term: each weighted term's generator-gradient norm, without changing the update.

A 1-D, 3-step chain with an affine velocity per step (float64), the reference RTDMD weights and a
differentiable linear reward, so all three terms (policy gradient, reward back-propagation, DM) are live.
The per-term norms must equal the whole gradient norm of runs that keep only that term (same seed, same
rollout), and the parameters after the step must equal those of a run without the diagnostic.
"""

import pytest
import torch
from torch import nn

from tiltflow.algorithms.rtdmd import RTDMD
from tiltflow.config.loader import from_dict
from tiltflow.config.schema import SamplerConfig, Stage2Config
from tiltflow.models.roles import Roles
from tiltflow.rewards import RewardSet
from tiltflow.training.spine import build_train_state
from tiltflow.worlds.gmm.rewards import LinearReward
from tiltflow.worlds.gmm.world import GMMTask

K = 3


class AffineVelocity(nn.Module):
    def __init__(self, w, b):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(w, dtype=torch.float64))
        self.b = nn.Parameter(torch.tensor(b, dtype=torch.float64))

    def velocity(self, x, sigma, cond):
        idx = torch.round((1 - sigma) * K).long().clamp(0, K - 1)
        return self.w[idx][:, None] * x + self.b[idx][:, None]


class _Float64:
    """The chain runs in float64 here; the gmm rewards follow their input's dtype."""

    def __init__(self, inner):
        self.inner, self.name, self.differentiable = inner, inner.name, inner.differentiable

    def __call__(self, samples, prompts):
        return self.inner(samples, prompts)


def one_step(by_term: bool, bp_chunk: int = 0, **weights):
    """One RTDMD step from a fixed initial state: (metrics, generator parameters after the step)."""
    torch.manual_seed(0)
    gen = AffineVelocity([0.3, -0.2, 0.5], [0.1, 0.4, -0.3])
    teacher = AffineVelocity([0.25, -0.1, 0.4], [0.0, 0.3, -0.2])
    fake = AffineVelocity([0.3, -0.2, 0.5], [0.1, 0.4, -0.3])
    teacher.requires_grad_(False)
    task = GMMTask(num_prompts=1, dim=1, rewards=RewardSet([LinearReward([1.5])]))
    task.rewards = RewardSet([_Float64(LinearReward([1.5]))])
    tree = {"num_prompts": 8, "group_size": 4, "n_fake": 1, "grad_norms_by_term": by_term, "lr": 1e-2,
            "fake": {"consistency_gamma": 0.0}, "bp_chunk": bp_chunk, **weights}
    cfg = from_dict(Stage2Config, tree)
    roles = Roles(teacher, gen, fake, list(gen.parameters()), list(fake.parameters()))
    algo = RTDMD(cfg, SamplerConfig(num_steps=K, eta=0.9), task, roles, build_train_state(cfg, roles), seed=3)
    metrics = algo.step(0)
    return metrics, torch.cat([gen.w.detach(), gen.b.detach()])


REFERENCE = {"w_dm": 1e-3, "w_pg": 1.0, "w_bp": 1e-4}


def test_each_term_norm_is_the_gradient_norm_of_that_term_alone():
    metrics, _ = one_step(True, **REFERENCE)
    assert {"grad_norm_pg", "grad_norm_bp", "grad_norm_dm"} <= set(metrics)
    for term, weight in (("pg", "w_pg"), ("bp", "w_bp"), ("dm", "w_dm")):
        alone = one_step(False, **{k: (v if k == weight else 0.0) for k, v in REFERENCE.items()})[0]
        # Same rollout and fake update; the two gradients differ only by float64 rounding in a few hundred
        # operations (~1e-13 relative), so 1e-9 leaves room on any CPU and still catches a wrong term (the weights
        # differ by 10^3 to 10^4, a leaked term by far more than 1e-9).
        assert metrics[f"grad_norm_{term}"] == pytest.approx(alone["gen_grad_norm"], rel=1e-9), term
        assert metrics[f"grad_norm_{term}"] > 0
    # The terms are not parallel, so their norms do not add up to the total, but they bound it.
    total = metrics["grad_norm_pg"] + metrics["grad_norm_bp"] + metrics["grad_norm_dm"]
    assert metrics["gen_grad_norm"] <= total * (1 + 1e-12)


def test_the_diagnostic_leaves_the_update_unchanged():
    plain_metrics, plain = one_step(False, **REFERENCE)
    diag_metrics, diag = one_step(True, **REFERENCE)
    assert not any(k.startswith("grad_norm_") for k in plain_metrics)
    # Only the order of summation differs (per-term backwards accumulate in .grad): float64 rounding, ~1e-15
    # relative in the gradients; Adam's first step (lr 1e-2, every parameter with a gradient far above its eps)
    # passes it on unamplified, so 1e-12 is a margin of 10^3 on any CPU.
    torch.testing.assert_close(diag, plain, rtol=1e-12, atol=1e-14)
    assert diag_metrics["gen_grad_norm"] == pytest.approx(plain_metrics["gen_grad_norm"], rel=1e-12)
    assert not torch.equal(plain, torch.tensor([0.3, -0.2, 0.5, 0.1, 0.4, -0.3], dtype=torch.float64))


def test_refused_with_several_processes():
    class TwoRanks:
        rank, world_size = 0, 2

    gen = AffineVelocity([0.3, -0.2, 0.5], [0.1, 0.4, -0.3])
    fake = AffineVelocity([0.3, -0.2, 0.5], [0.1, 0.4, -0.3])
    task = GMMTask(num_prompts=1, dim=1, rewards=RewardSet([LinearReward([1.5])]))
    cfg = from_dict(Stage2Config, {"grad_norms_by_term": True})
    roles = Roles(gen, gen, fake, list(gen.parameters()), list(fake.parameters()))  # (teacher = generator)
    with pytest.raises(ValueError, match="grad_norms_by_term needs one process, got 2"):
        RTDMD(cfg, SamplerConfig(num_steps=K, eta=0.9), task, roles, build_train_state(cfg, roles), seed=0,
              comm=TwoRanks())


@pytest.mark.parametrize("chunk", [1, 5, 31])
def test_chunked_reward_back_propagation_gives_the_same_step(chunk):
    """stage2.bp_chunk decodes and scores the 32 samples c at a time (5: uneven chunks) and reaches the generator
    through its output alone; the loss, the metrics and the parameters after the step equal the whole-batch
    term's up to float64 rounding. Tolerance from the arithmetic: the chunked path re-orders sums of at most 32
    terms (each off by at most 32 u, u = 2^-53 ~ 1.1e-16, so ~4e-15) in a chain of about a hundred dependent
    operations (~1e-12), and a gradient component that sums terms of both signs may lose up to its condition
    number on top: rel 1e-7 allows a condition number of 1e5 on any CPU's summation order. A chunk weighted
    wrongly moves bp_loss and the BP gradient norm by 1/32 (3%) at least, five orders of magnitude above it.
    The per-term diagnostic sees the same BP gradient too."""
    rel = 1e-7
    whole_m, whole_p = one_step(False, **REFERENCE)
    m, p = one_step(False, bp_chunk=chunk, **REFERENCE)
    torch.testing.assert_close(p, whole_p, rtol=rel, atol=0)
    assert m["bp_loss"] == pytest.approx(whole_m["bp_loss"], rel=rel)
    assert m["gen_grad_norm"] == pytest.approx(whole_m["gen_grad_norm"], rel=rel)
    by_term_whole, by_term = one_step(True, **REFERENCE)[0], one_step(True, bp_chunk=chunk, **REFERENCE)[0]
    assert by_term["grad_norm_bp"] == pytest.approx(by_term_whole["grad_norm_bp"], rel=rel)
    assert p.ne(one_step(False, **{**REFERENCE, "w_bp": 0.0})[1]).any()  # the BP term does move the step
