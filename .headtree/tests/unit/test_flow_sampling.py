"""Closed-form checks of the conventions and the CPS step (METHOD.md 1-2), in float64."""

import math

import pytest
import torch

from tiltflow.flow import eps_from_v, few_step_sigmas, forward_kernel, interpolate, time_shift, x0_from_v
from tiltflow.sampling import NoisePlan, cps_step, gaussian_log_prob, group_noise, sample

# float64 closed forms of a few elementwise operations (rounding ~ 10u ~ 1e-15, no long reductions): the
# default tolerances (torch rtol 1e-5, pytest rel 1e-6) are loose next to that, and independent of the CPU.
pytestmark = pytest.mark.usefixtures("float64_default")


def test_prediction_conversions_invert_the_interpolant():
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(5, 3, generator=g), torch.randn(5, 3, generator=g)
    sigma = torch.rand(5, generator=g)
    x = interpolate(x0, eps, sigma)
    v = eps - x0
    assert torch.allclose(x0_from_v(x, v, sigma), x0)
    assert torch.allclose(eps_from_v(x, v, sigma), eps)


def test_sd3_shift_grid():
    assert few_step_sigmas(4, shift=3.0) == pytest.approx([1.0, 0.9, 0.75, 0.5, 0.0])
    assert few_step_sigmas(4) == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0])
    assert time_shift(0.5, 1.0) == 0.5


def test_cps_eta0_is_euler():
    g = torch.Generator().manual_seed(1)
    x, v = torch.randn(4, 2, generator=g), torch.randn(4, 2, generator=g)
    out = cps_step(x, v, 0.8, 0.5, eta=0.0, noise=torch.randn(4, 2, generator=g))
    assert torch.allclose(out.x_next, x + (0.5 - 0.8) * v)
    assert torch.all(out.std == 0)


def test_cps_to_zero_is_deterministic_x0_hat():
    x, v = torch.randn(3, 2), torch.randn(3, 2)
    out = cps_step(x, v, 0.25, 0.0, eta=0.9, noise=None)
    assert torch.allclose(out.x_next, x - 0.25 * v)
    assert torch.all(out.log_prob == 0)


def test_cps_eta1_renoises_x0_hat():
    g = torch.Generator().manual_seed(2)
    x, v, z = (torch.randn(3, 2, generator=g) for _ in range(3))
    out = cps_step(x, v, 0.7, 0.4, eta=1.0, noise=z)
    assert torch.allclose(out.x_next, 0.6 * (x - 0.7 * v) + 0.4 * z)


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_log_prob_matches_torch_normal(reduction):
    g = torch.Generator().manual_seed(4)
    x, mean = torch.randn(6, 2, 3, generator=g), torch.randn(6, 2, 3, generator=g)
    std = torch.rand(6, generator=g) + 0.1
    ref = torch.distributions.Normal(mean, std.view(-1, 1, 1)).log_prob(x).flatten(1)
    want = ref.sum(1) if reduction == "sum" else ref.mean(1)
    assert torch.allclose(gaussian_log_prob(x, mean, std, reduction), want)


def test_cps_log_prob_is_the_transition_density():
    g = torch.Generator().manual_seed(5)
    x, v, z = (torch.randn(4, 2, generator=g) for _ in range(3))
    out = cps_step(x, v, 0.75, 0.5, eta=0.9, noise=z)
    std = 0.5 * math.sin(0.9 * math.pi / 2)
    ref = torch.distributions.Normal(out.mean, std).log_prob(out.x_next).sum(1)
    assert torch.allclose(out.log_prob, ref)


def test_forward_kernel_composes_to_the_data_marginal():
    """x_s = (1-s) x0 + s e1, then x_tau = a x_s + sigma_ts n  ==  (1-tau) x0 + tau e in law."""
    for s, tau in [(0.0, 0.3), (0.25, 0.6), (0.5, 0.51), (0.75, 0.98)]:
        a, sigma_ts = forward_kernel(s, tau)
        assert a * (1 - s) == pytest.approx(1 - tau)
        assert a**2 * s**2 + sigma_ts**2 == pytest.approx(tau**2)


def test_sampler_is_stateless_and_noise_controlled():
    sig = few_step_sigmas(4)
    plan = NoisePlan.fresh(8, (2,), 4, torch.Generator().manual_seed(0), dtype=torch.float64)

    def vel(x, s):
        return 0.3 * x + s[:, None]

    a = sample(vel, sig, plan, eta=0.9)
    b = sample(vel, sig, plan, eta=0.9)
    # bitwise equality is sound here: one process, same machine and code path, so the same rounding; it
    # claims nothing across CPUs or BLAS builds
    assert torch.equal(a.final, b.final)
    assert len(a.xs) == 5 and len(a.log_probs) == 4
    assert torch.all(a.log_probs[-1] == 0)  # last step is deterministic
    # Resuming from an intermediate state with the same plan reproduces the tail.
    c = sample(vel, sig, plan, eta=0.9, start=2, x_start=a.xs[2])
    assert torch.equal(c.final, a.final)


def test_group_noise_is_shared_within_groups_only():
    keys = [0, 0, 1, 1, 1]
    z = group_noise((3,), keys, seed=7, step=1, iteration=4, dtype=torch.float64)
    assert torch.equal(z[0], z[1]) and torch.equal(z[2], z[4])
    assert not torch.equal(z[0], z[2])
    z2 = group_noise((3,), keys, seed=7, step=2, iteration=4, dtype=torch.float64)
    assert not torch.equal(z[0], z2[0])


def test_subgrpo_plan_shares_untrained_steps():
    plan = NoisePlan.subgrpo([0, 0, 1, 1], (2,), 4, {1}, torch.Generator().manual_seed(0), seed=3, iteration=0,
                             dtype=torch.float64)
    assert torch.equal(plan.init[0], plan.init[1])
    assert torch.equal(plan.steps[0][0], plan.steps[0][1]) and torch.equal(plan.steps[2][0], plan.steps[2][1])
    assert not torch.equal(plan.steps[1][0], plan.steps[1][1])
    assert plan.steps[3] is None


@pytest.mark.parametrize("eta", [0.0, 0.7, 1.0])
def test_cps_sample_is_cps_step_x_next(eta):
    """cps_sample (no log-probability, no host decision) gives cps_step's next state: per-sample levels with
    a zero among them (a transition clamped at sigma = 0), and a float level. float64, so equal bitwise."""
    from tiltflow.sampling.cps import cps_sample

    g = torch.Generator().manual_seed(3)
    x, v, noise = (torch.randn(4, 3, 2, generator=g, dtype=torch.float64) for _ in range(3))
    sigma = torch.tensor([0.9, 0.5, 0.3, 0.2], dtype=torch.float64)
    for sigma_next in (torch.tensor([0.6, 0.0, 0.1, 0.0], dtype=torch.float64), 0.25):
        expected = cps_step(x, v, sigma, sigma_next, eta=eta, noise=noise).x_next
        assert torch.equal(cps_sample(x, v, sigma, sigma_next, eta=eta, noise=noise), expected)
