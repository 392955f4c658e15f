"""The bounded problem of issue 10 (r = tanh(a.x - c)): its exact tilt (quadrature normaliser, mode weights,
E[r]; rejection sampler) and the effective beta that locates where a method settles. float64.

Tolerances fixed before measuring: Monte Carlo checks at 5 standard errors (estimated from the same draws);
quadrature against scipy's adaptive quadrature (an independent method, asked for 1e-13) at 1e-11 relative
(the Gauss-Hermite integrand is analytic in a strip of half-width pi/2, so 160 nodes converge to rounding for
the widths s_k <= 1 used here; 1e-11 leaves room for quad's own error estimate).
"""

from __future__ import annotations

import math

import torch
from scipy.integrate import quad

from tiltflow.config.gmm import ProblemSpec, PromptSpec, RewardSpec
from tiltflow.worlds.gmm.effective_beta import effective_beta, exact_reward
from tiltflow.worlds.gmm.reference import sir_mode_weights
from tiltflow.worlds.gmm.rewards import TanhReward
from tiltflow.worlds.gmm.targets import TanhTiltedTarget
from tiltflow.worlds.gmm.world import build_gmm, build_rewards, exact_target

F64 = torch.float64
A, C = [0.5, 0.25], 0.1


def problem() -> ProblemSpec:
    cov = [[0.09, 0.0], [0.0, 0.09]]
    return ProblemSpec(dim=2, prompts=[PromptSpec([0.25, 0.25, 0.25, 0.25],
                                                  [[2.0, 2.0], [-2.0, 2.0], [2.0, -2.0], [-2.0, -2.0]], [cov] * 4),
                                       PromptSpec([0.6, 0.4], [[0.0, 2.5], [2.2, -1.2]],
                                                  [[[0.16, 0.0], [0.0, 0.04]], [[0.06, 0.04], [0.04, 0.06]]])],
                       rewards=[RewardSpec(type="tanh", a=A, c=C)])


def test_tanh_reward_is_bounded_and_differentiable():
    r = TanhReward(A, C)
    x = torch.randn(64, 2, dtype=F64, requires_grad=True) * 10
    s = r(x).scores
    assert (s.abs() < 1).all() and r.differentiable
    (g,) = torch.autograd.grad(s.sum(), x)
    expected = (1 - torch.tanh(x.detach() @ torch.tensor(A, dtype=F64) - C) ** 2)[:, None] * torch.tensor(A, dtype=F64)
    # Both sides compute u = a.x (2 products, 1 sum: a few ulps of |x||a|, |x| up to ~40 here, possibly summed in
    # another order or with an FMA) and then (1 - tanh(u)^2) a, whose slope in u is at most 0.77: a bound of
    # 16 ulps of (|x|_max |a|_1 + 1) holds on any CPU; the values themselves are <= 0.5.
    tol = 16 * torch.finfo(F64).eps * float(x.detach().abs().max() * torch.tensor(A, dtype=F64).abs().sum() + 1)
    assert (g - expected).abs().max() <= tol


def test_quadrature_is_converged_and_matches_monte_carlo():
    mix = build_gmm(problem()).mixture(0)
    t = TanhTiltedTarget(mix, A, C, 1.3)
    a = torch.tensor(A, dtype=F64)
    zk, rk = [], []
    for k in range(mix.num_components):
        m, s = float(mix.means[k] @ a), float(a @ mix.covs[k] @ a) ** 0.5

        def dens(u, m=m, s=s):
            return math.exp(-0.5 * ((u - m) / s) ** 2) / (s * math.sqrt(2 * math.pi))

        lo, hi = m - 40 * s, m + 40 * s
        zk.append(quad(lambda u, d=dens: d(u) * math.exp(1.3 * math.tanh(u - C)), lo, hi, epsabs=0, epsrel=1e-13)[0])
        rk.append(quad(lambda u, d=dens: d(u) * math.tanh(u - C) * math.exp(1.3 * math.tanh(u - C)), lo, hi,
                       epsabs=1e-14, epsrel=1e-13)[0])
    zk_t, rk_t = torch.tensor(zk, dtype=F64), torch.tensor(rk, dtype=F64)
    z_ref = float(mix.weights @ zk_t)
    assert abs(float(t.log_normalizer) - math.log(z_ref)) <= 1e-11
    assert (t.mode_weights - mix.weights * zk_t / z_ref).abs().max() <= 1e-11
    assert abs(t.expected_reward() - float(mix.weights @ rk_t) / z_ref) <= 1e-11
    # Against plain Monte Carlo over the base: Z = E_p[e^{beta r}], E_tilde[r] = E_p[r e^{beta r}] / Z.
    x, comp = mix.sample(400_000, torch.Generator().manual_seed(0))
    r = TanhReward(A, C)(x).scores
    w = (1.3 * r).exp()
    z, z_se = w.mean(), w.std() / math.sqrt(len(w))
    assert abs(float(z.log() - t.log_normalizer)) <= 5 * float(z_se / z)
    mode = torch.zeros(4, dtype=F64).index_add_(0, comp, w) / w.sum()
    mode_se = torch.stack([(w * (comp == k) - mode[k] * w).std() for k in range(4)]) / math.sqrt(len(w)) / z
    assert ((mode - t.mode_weights).abs() <= 5 * mode_se).all()


def test_exact_sampler_matches_closed_forms_and_importance_resampling():
    mix = build_gmm(problem()).mixture(1)
    t = TanhTiltedTarget(mix, A, C, 2.0)
    x, comp = t.sample(100_000, torch.Generator().manual_seed(1))
    r = TanhReward(A, C)(x).scores
    assert abs(float(r.mean()) - t.expected_reward()) <= 5 * float(r.std()) / math.sqrt(len(r))
    freq = torch.bincount(comp, minlength=2).to(F64) / len(comp)
    se = (freq * (1 - freq) / len(comp)).sqrt()
    assert ((freq - t.mode_weights).abs() <= 5 * se).all()
    # log_prob is normalised: E_base[exp(log p_tilde - log p)] = 1.
    xb = mix.sample(200_000, torch.Generator().manual_seed(2))[0]
    ratio = (t.log_prob(xb) - mix.log_prob(xb)).exp()
    assert abs(float(ratio.mean()) - 1) <= 5 * float(ratio.std()) / math.sqrt(len(ratio))
    # Importance resampling's mode weights (the reference sampler for a neural teacher) agree too.
    log_w = 2.0 * TanhReward(A, C)(xb).scores
    sir = sir_mode_weights(mix.assign(xb), log_w, 2)
    assert (sir - t.mode_weights).abs().max() <= 0.01  # 200k draws: SE ~ 1e-3; assignment overlap is < 1e-6


def test_world_builds_the_tanh_reward_and_its_exact_target():
    spec = problem()
    rs = build_rewards(spec)
    assert rs.names == ["tanh"] and rs.differentiable
    assert isinstance(exact_target(build_gmm(spec).mixture(0), spec, 0.7), TanhTiltedTarget)


def test_effective_beta_recovers_the_beta_of_exact_samples():
    """Samples of the exact tilt at beta = 1.5 must be located at 1.5: the energy reading on the grid
    (step 0.1 there; allowance one grid step either side for the sampling noise of 3000 samples) and the
    reward reading to 5 standard errors of the mean reward, carried through the slope dE[r]/dbeta."""
    spec = problem()
    gmm = build_gmm(spec)
    beta = 1.5
    xs = [exact_target(gmm.mixture(c), spec, beta).sample(3000, torch.Generator().manual_seed(10 + c))[0]
          for c in range(gmm.num_prompts)]
    rewards = build_rewards(spec)
    per = [rewards(x, [c] * len(x)).total for c, x in enumerate(xs)]
    mean = sum(float(p.mean()) for p in per) / len(per)
    se = math.sqrt(sum(float(p.var()) / len(p) for p in per)) / len(per)
    out = effective_beta(xs, gmm, spec, mean, grid=[round(0.1 * i, 2) for i in range(31)])
    assert abs(out["beta_energy"] - beta) <= 0.1 + 1e-9, out["energy_curve"]
    slope = (exact_reward(gmm, spec, beta + 0.01) - exact_reward(gmm, spec, beta - 0.01)) / 0.02
    assert abs(out["beta_reward"] - beta) <= 5 * se / slope
