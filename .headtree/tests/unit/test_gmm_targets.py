"""Exact tilted targets (METHOD.md 3, WORLDS.md 1) against importance weighting of base samples.

For self-normalised importance sampling with weights w_i ∝ exp(beta r(x_i)), the estimate sum_i w_i f_i has
standard error ~ sqrt(sum_i w_i^2 (f_i - estimate)^2) (weights normalised to sum to one). Every Monte Carlo
comparison below was set in advance to pass within 5 such standard errors.
"""

from __future__ import annotations

import math

import pytest
import torch

from tiltflow.rewards.base import Reward, RewardOutput
from tiltflow.worlds.gmm import (
    GaussianMixture,
    HalfspaceReward,
    HalfspaceTiltedTarget,
    LinearReward,
    QuadraticReward,
    Target,
    effective_sample_size,
    expected_reward,
    monte_carlo_reward,
    sir_mode_weights,
    sir_resample,
    tilt_linear,
    tilt_quadratic,
)

F64 = torch.float64
NUM_SE = 5.0


def base_mixture() -> GaussianMixture:
    means = torch.tensor([[-2.0, 0.5], [1.5, 1.5], [0.5, -2.0]], dtype=F64)
    covs = torch.tensor([[[0.8, 0.3], [0.3, 0.5]], [[0.4, -0.1], [-0.1, 0.6]], [[0.3, 0.0], [0.0, 1.0]]], dtype=F64)
    return GaussianMixture(torch.tensor([0.5, 0.3, 0.2], dtype=F64), means, covs)


def base_samples(n: int = 300_000, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    return base_mixture().sample(n, torch.Generator().manual_seed(seed))


def snis(f: torch.Tensor, log_w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Self-normalised IS estimate of E[f] (f of shape (N, ...)) and its delta-method standard error."""
    w = torch.softmax(log_w, 0).view(-1, *([1] * (f.ndim - 1)))
    est = (w * f).sum(0)
    return est, ((w**2) * (f - est) ** 2).sum(0).sqrt()


def assert_close_mc(estimate: torch.Tensor, exact: torch.Tensor, se: torch.Tensor) -> None:
    estimate, exact, se = (torch.as_tensor(t, dtype=F64) for t in (estimate, exact, se))
    err = (estimate - exact).abs()
    # + 1e-12: an entry whose standard error is 0 still carries float64 rounding (a few u times values of at
    # most ~10 here, < 1e-14); 1e-12 is far below any 5-SE band.
    assert bool((err <= NUM_SE * se + 1e-12).all()), f"|error| {err} > {NUM_SE} x SE {se}"


def check_tilt_by_importance_weighting(tilted: GaussianMixture, reward: Reward, beta: float) -> None:
    """Mode weights, per-mode mean and covariance, and E[r] of `tilted` against reweighted base samples."""
    x, idx = base_samples()
    r = reward(x, None).scores
    log_w = beta * r
    onehot = torch.nn.functional.one_hot(idx, tilted.num_components).double()
    est, se = snis(onehot, log_w)
    assert_close_mc(est, tilted.weights, se)
    est, se = snis(r, log_w)
    assert_close_mc(est, expected_reward(tilted, reward), se)
    for k in range(tilted.num_components):
        xk, lwk = x[idx == k], log_w[idx == k]
        mean, mean_se = snis(xk, lwk)
        assert_close_mc(mean, tilted.means[k], mean_se)
        centred = xk - tilted.means[k]
        cov, cov_se = snis(centred[:, :, None] * centred[:, None, :], lwk)
        assert_close_mc(cov, tilted.covs[k], cov_se)


U64 = 2.0**-53  # float64 unit roundoff (eps / 2)


def _log_prob_rounding_bound(mix: Target, x: torch.Tensor) -> float:
    """First-order worst-case float64 rounding of a Gaussian mixture's log_prob on x, any summation order:
    (2d + 4) kappa u Q_max / 2 for the Mahalanobis forms through covariances of condition <= kappa, plus 10u
    |log p| for the logsumexp over components. A halfspace-tilted target is its base's log_prob plus
    beta 1[x in H] - log Z: the base's bound plus 4u (|beta| + |log Z| + |log p_tilde|)."""
    if isinstance(mix, HalfspaceTiltedTarget):
        extra = abs(mix.beta) + abs(float(mix.log_normalizer)) + float(mix.log_prob(x).abs().max())
        return _log_prob_rounding_bound(mix.base, x) + 4 * U64 * extra
    assert isinstance(mix, GaussianMixture)
    evals = torch.linalg.eigvalsh(mix.covs)
    kappa = float((evals[:, -1] / evals[:, 0]).max())
    prec = torch.linalg.inv(mix.covs)
    q_max = max(
        float(torch.einsum("bd,de,be->b", x - mix.means[k], prec[k], x - mix.means[k]).max())
        for k in range(mix.num_components)
    )
    return 0.5 * (2 * mix.dim + 4) * kappa * U64 * q_max + 10 * U64 * float(mix.log_prob(x).abs().max())


def check_normalised(target: Target, reward: Reward, beta: float) -> None:
    """log p_tilde - log p - beta r is one constant (-log Z), and E_p[p_tilde / p] = 1."""
    base = base_mixture()
    x, _ = base_samples(200_000, seed=5)
    offset = target.log_prob(x) - base.log_prob(x) - beta * reward(x, None).scores
    # float64 rounding, any summation order: each log-density is off by <= (2d + 4) kappa u Q / 2 in its
    # Gaussian exponents (Q the largest Mahalanobis form over these samples and components) plus ~ 10u |log p|
    # for logsumexp; beta r by ~ 4u |beta r|. The spread of the offset is at most twice the sum (~ 1e-12 here).
    spread_tol = 2 * (
        _log_prob_rounding_bound(target, x)
        + _log_prob_rounding_bound(base, x)
        + 4 * U64 * float((beta * reward(x, None).scores).abs().max())
    )
    assert float(offset.max() - offset.min()) < spread_tol
    ratio = (target.log_prob(x) - base.log_prob(x)).exp()
    assert_close_mc(ratio.mean(), 1.0, ratio.std() / math.sqrt(x.shape[0]))


# ---- linear and quadratic tilts ---------------------------------------------------------------------------
def test_linear_tilt_matches_importance_weighting():
    reward, beta = LinearReward(torch.tensor([1.0, -0.5], dtype=F64)), 0.7
    tilted = tilt_linear(base_mixture(), reward.a, beta)
    check_tilt_by_importance_weighting(tilted, reward, beta)
    check_normalised(tilted, reward, beta)


@pytest.mark.parametrize("A", [[[1.0, 0.3], [0.3, 0.6]], [[1.0, 1.0], [1.0, 1.0]]], ids=["full", "rank1"])
def test_quadratic_tilt_matches_importance_weighting(A):
    reward, beta = QuadraticReward(torch.tensor(A, dtype=F64), torch.tensor([0.5, 1.0], dtype=F64)), 0.8
    tilted = tilt_quadratic(base_mixture(), reward.A, reward.b, beta)
    check_tilt_by_importance_weighting(tilted, reward, beta)
    check_normalised(tilted, reward, beta)


def test_quadratic_tilt_precision_is_closed_form():
    base, A, beta = base_mixture(), torch.tensor([[1.0, 0.3], [0.3, 0.6]], dtype=F64), 0.8
    tilted = tilt_quadratic(base, A, torch.zeros(2, dtype=F64), beta)
    # three d x d inversions (one inside tilt_quadratic, two here) of matrices of condition <= kappa, each
    # off by <= ~ (2d + 4) kappa u in norm to first order, plus the sum: normwise tolerance, no rtol.
    conds = torch.linalg.cond(torch.cat([base.covs, tilted.covs]))
    want = torch.linalg.inv(base.covs) + beta * A
    tol = (3 * (2 * 2 + 4) * float(conds.max()) + 2) * U64 * float(want.abs().max())
    assert torch.allclose(torch.linalg.inv(tilted.covs), want, rtol=0, atol=tol)


def test_zero_beta_is_the_identity():
    base = base_mixture()
    for tilted in (tilt_linear(base, [1.0, 2.0], 0.0), tilt_quadratic(base, torch.eye(2, dtype=F64), [0.0, 0.0], 0.0)):
        # beta = 0 leaves only inversion round trips (~ 1e-15 here); allclose's default rtol=1e-5 is loose,
        # but a tilt applied at beta = 0 would move the means by O(1)
        assert torch.allclose(tilted.weights, base.weights) and torch.allclose(tilted.means, base.means)
        assert torch.allclose(tilted.covs, base.covs)


def test_quadratic_tilt_rejects_bad_arguments():
    with pytest.raises(ValueError, match="positive semi-definite"):
        tilt_quadratic(base_mixture(), torch.tensor([[1.0, 0.0], [0.0, -1.0]], dtype=F64), [0.0, 0.0], 1.0)
    with pytest.raises(ValueError, match="beta"):
        tilt_quadratic(base_mixture(), torch.eye(2, dtype=F64), [0.0, 0.0], -1.0)


# ---- half-space tilt --------------------------------------------------------------------------------------
def halfspace_target(beta: float = 1.5) -> HalfspaceTiltedTarget:
    return HalfspaceTiltedTarget(base_mixture(), torch.tensor([1.0, 1.0], dtype=F64), 0.5, beta)


def test_halfspace_weights_and_reward_match_importance_weighting():
    target = halfspace_target()
    x, idx = base_samples()
    log_w = target.beta * target.reward(x, None).scores
    onehot = torch.nn.functional.one_hot(idx, 3).double()
    est, se = snis(onehot, log_w)
    assert_close_mc(est, target.mode_weights, se)
    est, se = snis(target.reward(x, None).scores, log_w)
    assert_close_mc(est, target.expected_reward(), se)
    assert expected_reward(target, HalfspaceReward([1.0, 1.0], 0.5)) == target.expected_reward()
    check_normalised(target, target.reward, target.beta)


@pytest.mark.parametrize("beta", [2.0, -1.0])
def test_halfspace_rejection_sampler_is_exact(beta):
    target = halfspace_target(beta)
    n = 100_000
    x, idx = target.sample(n, torch.Generator().manual_seed(2))
    assert x.shape == (n, 2)
    p = target.expected_reward()
    assert_close_mc(target.reward(x, None).scores.mean(), p, math.sqrt(p * (1 - p) / n))
    w = target.mode_weights
    fractions = torch.bincount(idx, minlength=3).double() / n
    assert_close_mc(fractions, w, (w * (1 - w) / n).sqrt())


def test_halfspace_is_exact_for_large_beta_and_limits():
    base = base_mixture()
    target = HalfspaceTiltedTarget(base, [1.0, 1.0], 0.5, 800.0)  # e^800 overflows float64: log space needed
    # at beta = 800 the tilted mass off the halfspace is ~ e^-800 relative: 1 - E[r] underflows to 0 in log
    # space, and the normalised K = 3-term sum rounds by <= 4u ~ 1e-15 (1e-12 keeps a margin)
    assert math.isfinite(target.expected_reward()) and abs(target.expected_reward() - 1.0) < 1e-12
    plain = HalfspaceTiltedTarget(base, [1.0, 1.0], 0.5, 0.0)
    assert torch.allclose(plain.mode_weights, base.weights)
    x, _ = base_samples(1000)
    assert torch.allclose(plain.log_prob(x), base.log_prob(x))
    assert torch.equal(target.assign(x), base.assign(x))


# ---- expected_reward dispatch -----------------------------------------------------------------------------
class ShiftedLinear:
    """A reward expected_reward does not recognise, to exercise the Monte Carlo fallback."""

    name, differentiable = "shifted", True

    def __call__(self, samples: torch.Tensor, prompts) -> RewardOutput:
        return RewardOutput(scores=samples[:, 0] - 2 * samples[:, 1] + 1.0)


def test_closed_form_expected_rewards_match_monte_carlo():
    tilted = tilt_linear(base_mixture(), [1.0, -0.5], 0.7)
    g = torch.Generator().manual_seed(9)
    for reward in (
        LinearReward([0.3, 1.0]),
        QuadraticReward([[1.0, 0.2], [0.2, 0.5]], [0.0, 1.0]),
        HalfspaceReward([1.0, -1.0], 0.2),
    ):
        mc, se = monte_carlo_reward(tilted, reward, 200_000, g)
        assert_close_mc(mc, expected_reward(tilted, reward), se)
    fallback = expected_reward(tilted, ShiftedLinear(), num_samples=200_000, generator=g)
    _, se = monte_carlo_reward(tilted, ShiftedLinear(), 200_000, g)
    assert_close_mc(fallback, expected_reward(tilted, LinearReward([1.0, -2.0])) + 1.0, se)


# ---- rewards ----------------------------------------------------------------------------------------------
def test_rewards_values_gradients_and_names():
    x = torch.tensor([[1.0, 2.0], [-1.0, 0.5]], dtype=F64, requires_grad=True)
    lin = LinearReward([2.0, -1.0])
    quad = QuadraticReward([[2.0, 0.0], [0.0, 1.0]], [1.0, 0.0])
    half = HalfspaceReward([1.0, 0.0], 0.0, name="right")
    assert all(isinstance(r, Reward) for r in (lin, quad, half))
    assert (lin.name, quad.name, half.name) == ("linear", "quadratic", "right")
    assert lin.differentiable and quad.differentiable and not half.differentiable
    # inputs and coefficients are short binary fractions: every value below is exact in float64 on any machine
    assert torch.allclose(lin(x, None).scores, torch.tensor([0.0, -2.5], dtype=F64))
    q = quad(x, None).scores
    assert torch.allclose(q, torch.tensor([-2.0, -(8.0 + 0.25) / 2], dtype=F64))
    (grad,) = torch.autograd.grad(q.sum(), x)
    assert torch.allclose(grad, torch.tensor([[0.0, -2.0], [4.0, -0.5]], dtype=F64))
    h = half(x, None).scores
    assert torch.equal(h, torch.tensor([1.0, 0.0], dtype=F64)) and not h.requires_grad
    with pytest.raises(ValueError, match="expects samples"):
        lin(torch.zeros(3, 3), None)


# ---- SIR reference sampler --------------------------------------------------------------------------------
def test_sir_recovers_the_halfspace_target():
    target = halfspace_target()
    pool, pool_idx = base_samples(200_000, seed=3)
    log_w = target.beta * target.reward(pool, None).scores
    onehot = torch.nn.functional.one_hot(pool_idx, 3).double()
    _, se = snis(onehot, log_w)
    assert_close_mc(sir_mode_weights(pool_idx, log_w, 3), target.mode_weights, se)
    n = 50_000
    samples, picked = sir_resample(pool, log_w, n, torch.Generator().manual_seed(4))
    assert torch.equal(samples, pool[picked])
    p = target.expected_reward()
    # resampling adds multinomial noise on top of the importance-sampling noise
    se = math.sqrt(float(snis(target.reward(pool, None).scores, log_w)[1]) ** 2 + p * (1 - p) / n)
    assert_close_mc(target.reward(samples, None).scores.mean(), p, se)


def test_effective_sample_size_hand_cases():
    # softmax of at most 4 log-weights and two short sums: a few u; pytest's default rel=1e-6 (and the
    # rel=1e-6 below) is loose, but any wrong normalisation is off by > 10%.
    assert effective_sample_size(torch.zeros(10, dtype=F64)) == pytest.approx(10.0)
    assert effective_sample_size(torch.tensor([0.0, 0.0, -math.inf, -math.inf])) == pytest.approx(2.0)
    assert effective_sample_size(torch.tensor([1000.0, 0.0, 0.0])) == pytest.approx(1.0)
    # weights (1, 2, 3): (1 + 2 + 3)^2 / (1 + 4 + 9) = 36 / 14
    assert effective_sample_size(torch.tensor([1.0, 2.0, 3.0]).log()) == pytest.approx(36 / 14, rel=1e-6)
