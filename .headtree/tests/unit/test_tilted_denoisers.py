"""Tilted denoisers (METHOD.md 5.6) against closed forms of Gaussian mixtures, in float64.

Tolerances are fixed before measuring. Deterministic checks use a float64 rounding budget (derived next to
each). Monte Carlo checks use 5 standard errors, the standard error estimated from the same draws; a check
with a known bias adds a stated allowance for it.
"""

from __future__ import annotations

import math

import pytest
import torch
from scipy.integrate import quad

from tiltflow.losses.tilted import (
    PosteriorSampler,
    ReverseSamplerPosterior,
    effective_sample_size,
    reward_log_weights,
    shifted_denoiser,
    shifted_proposal_log_weights,
    shifted_proposal_start,
    shifted_velocity,
    snis_denoiser,
    split_snis_direction,
    tilted_direction,
)
from tiltflow.worlds.gmm import GaussianMixture, QuadraticReward, tilt_linear, tilt_quadratic
from tiltflow.worlds.gmm.posterior import GMMPosterior

F64 = torch.float64
TAUS = [0.05, 0.2, 0.5, 0.7, 0.9, 0.98]
A = torch.tensor([1.0, -0.5], dtype=F64)


def make_mixture(seed: int = 0) -> GaussianMixture:
    """2-D, 3 anisotropic correlated components, unequal weights."""
    g = torch.Generator().manual_seed(seed)
    means = 2.0 * torch.randn(3, 2, generator=g, dtype=F64)
    root = torch.randn(3, 2, 2, generator=g, dtype=F64) / math.sqrt(2)
    covs = 0.5 * root @ root.transpose(1, 2) + 0.1 * torch.eye(2, dtype=F64)
    return GaussianMixture(torch.tensor([0.5, 0.3, 0.2], dtype=F64), means, covs)


def points(n: int, seed: int = 1) -> torch.Tensor:
    return 1.5 * torch.randn(n, 2, generator=torch.Generator().manual_seed(seed), dtype=F64)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def mean_and_se(samples: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean over dim 0 and its standard error."""
    return samples.mean(0), samples.std(0) / math.sqrt(samples.shape[0])


# ---- the linear shift --------------------------------------------------------------------------------------
def test_linear_shift_equals_exact_tilted_gmm_denoiser():
    mix, beta = make_mixture(), 0.7
    tilted = tilt_linear(mix, A, beta)
    x, tau = points(len(TAUS)), torch.tensor(TAUS, dtype=F64)
    d_shift = shifted_denoiser(mix.velocity, x, tau, A, beta)
    v_shift = shifted_velocity(mix.velocity, x, tau, A, beta)
    # Tolerance: both sides are O(100) float64 operations (eigh, einsum, log-softmax) on numbers of size
    # S <= 50 (|x + delta| <= 10 at tau = 0.98, log-joints <= 50), each with relative error eps = 2.2e-16;
    # the softmax turns a log-weight error e into a denoiser error <= e * (spread of component means <= 10).
    # Error <= 100 * eps * 50 * 10 ~ 1e-11 < 1e-10 on D~. v~ = (x - D~) / tau, so 1e-10 / tau on v~.
    assert (d_shift - tilted.posterior_mean(x, tau)).abs().max() <= 1e-10
    assert ((v_shift - tilted.velocity(x, tau)).abs().amax(1) <= 1e-10 / tau).all()
    # The shift is not a no-op: the untilted denoiser differs by far more than the tolerance.
    assert (d_shift - mix.posterior_mean(x, tau)).abs().max() > 1e-2
    with pytest.raises(ValueError, match="tau"):
        shifted_denoiser(mix.velocity, x, 1.0, A, beta)


# ---- the exact GMM posterior -------------------------------------------------------------------------------
def test_gmm_posterior_moments_match_denoiser_and_its_jacobian():
    mix = make_mixture()
    post = GMMPosterior(mix)
    assert isinstance(post, PosteriorSampler)
    x, tau = points(len(TAUS)), torch.tensor(TAUS, dtype=F64)
    # Same formula as GaussianMixture.posterior_mean, summed in another order: a few eps * 10.
    assert (post.mean(x, tau) - mix.posterior_mean(x, tau)).abs().max() <= 1e-12
    cov = post.covariance(x, tau)
    for i, t in enumerate(TAUS):
        jac = torch.func.jacrev(lambda y, i=i: mix.posterior_mean(y[None], tau[i : i + 1])[0])(x[i])
        # Cov = tau^2/(1-tau) dD/dx. The Jacobian carries the same ~1e-13 rounding as D (see the shift test)
        # times tau^2/(1-tau) <= 48: below 1e-10.
        assert (t**2 / (1 - t) * jac - cov[i]).abs().max() <= 1e-10


def test_gmm_posterior_samples_have_the_exact_moments():
    mix = make_mixture()
    post = GMMPosterior(mix)
    x, tau = points(2, seed=3), torch.tensor([0.5, 0.9], dtype=F64)
    draws = post.sample(x, tau, 40_000, gen(0))  # (N, 2, 2)
    assert draws.shape == (40_000, 2, 2)
    m, se = mean_and_se(draws)
    assert ((m - post.mean(x, tau)).abs() <= 5 * se).all()
    dev = draws - m
    prods = dev[..., :, None] * dev[..., None, :]  # (N, 2, 2, 2): per-draw covariance contributions
    c, c_se = mean_and_se(prods)
    assert ((c - post.covariance(x, tau)).abs() <= 5 * c_se + 1e-12).all()


# ---- split-SNIS and plain SNIS -----------------------------------------------------------------------------
def _posterior_as_mixture(mix: GaussianMixture, x: torch.Tensor, tau: float) -> GaussianMixture:
    """p(x0 | x_tau = x) for one row x (1, d) as a GaussianMixture."""
    log_g, means, evals, evecs = mix.posterior_components(x, tau)
    covs = torch.einsum("kde,ke,kfe->kdf", evecs, evals[0], evecs)
    return GaussianMixture.from_log_weights(log_g[0], means[0], covs)


def test_split_snis_direction_is_a_positive_multiple_of_the_exact_one():
    mix, beta, tau = make_mixture(), 1.0, 0.7
    x = points(1, seed=5)
    d_tilde = tilt_linear(mix, A, beta).posterior_mean(x, tau)[0]
    reps, m = 20_000, 2  # 20k independent estimates, each from 2M = 4 posterior draws
    xr = x.expand(reps, 2)
    x0 = GMMPosterior(mix).sample(xr, tau, 2 * m, gen(1))
    log_w = reward_log_weights(x0, lambda z: z @ A, beta)
    offset = torch.tensor([0.3, 0.2], dtype=F64)
    e = offset / offset.norm()
    perp = torch.tensor([-e[1], e[0]])
    delta = split_snis_direction(x0, log_w, (d_tilde + offset).expand(reps, 2))
    along, se_along = mean_and_se(delta @ e)
    across, se_across = mean_and_se(delta @ perp)
    assert along > 5 * se_along and abs(across) <= 5 * se_across
    # At the fixed point (D_fake = D~) the mean direction is zero.
    zero, se_zero = mean_and_se(split_snis_direction(x0, log_w, d_tilde.expand(reps, 2)))
    assert ((zero).abs() <= 5 * se_zero).all()
    # Plain SNIS from the same 4 draws is measurably off there.
    bias, se_bias = mean_and_se(snis_denoiser(x0, log_w) - d_tilde)
    assert (bias.abs() > 5 * se_bias).any()


def test_plain_snis_bias_is_first_order_in_one_over_m():
    # The expansion below needs N >> kappa = E[w^2]/E[w]^2; beta = 0.3 gives kappa ~ 1.5 at this x_tau
    # (beta = 1 gives ~16, where N = 16 is still pre-asymptotic). The posterior here has three modes.
    mix, beta, tau = make_mixture(), 0.3, 0.7
    x = points(1, seed=5)
    post = _posterior_as_mixture(mix, x, tau)
    d1 = tilt_linear(post, A, beta).mean()
    d2 = tilt_linear(post, A, 2 * beta).mean()

    def log_z(b: float) -> torch.Tensor:  # log E_post[exp(b a.x0)]
        return torch.logsumexp(post.weights.log() + b * post.means @ A + 0.5 * b**2 * (post.covs @ A) @ A, 0)

    kappa = float((log_z(2 * beta) - 2 * log_z(beta)).exp())  # E[w^2] / E[w]^2
    # Delta method for a ratio estimator: E[SNIS_N] - D~ = -(1/N) E[w^2 (x0 - D~)] / Z^2 + O(1/N^2),
    # and E[w^2 (x0 - D~)] / Z^2 = kappa (D~_{2 beta} - D~_beta).
    b1 = -kappa * (d2 - d1)
    for n, reps in [(16, 20_000), (64, 20_000)]:
        assert n >= 8 * kappa  # premise of the allowance (it stays below 50%)
        x0 = GMMPosterior(mix).sample(x.expand(reps, 2), tau, n, gen(n))
        bias, se = mean_and_se(snis_denoiser(x0, reward_log_weights(x0, lambda z: z @ A, beta)) - d1)
        # Allowance for the O(1/N^2) term: its relative size is of order kappa / N; we allow 4 kappa / N.
        tol = 5 * n * se + 4 * kappa / n * b1.abs()
        assert ((n * bias - b1).abs() <= tol).all(), (n, n * bias, b1, tol)
        assert (bias.abs() > 5 * se).any()


# ---- the reverse sampler -----------------------------------------------------------------------------------
def _chain_moments(mix: GaussianMixture, x: torch.Tensor, tau: float, k: int, eta: str | float):
    """Exact mean and covariance of the reverse chain for a one-component (Gaussian) teacher: each step is
    affine, x' = A x + b + std z, with D(x) = mu + J (x - (1 - s) mu), J = (1 - s) S C^{-1}."""
    mu, cov = mix.means[0], mix.covs[0]
    eye = torch.eye(mix.dim, dtype=F64)
    m, sig2 = x[0].clone(), torch.zeros(mix.dim, mix.dim, dtype=F64)
    for i in range(k):
        s, sn = tau * (1 - i / k), tau * (1 - (i + 1) / k)
        jac = (1 - s) * cov @ torch.linalg.inv((1 - s) ** 2 * cov + s**2 * eye)
        c = (1 - s) / (1 - sn) * sn / s if eta == "ddpm" else math.cos(eta * math.pi / 2)
        std = sn * math.sqrt(max(1 - c**2, 0.0)) if eta == "ddpm" else sn * math.sin(eta * math.pi / 2)
        alpha = (1 - sn) - sn * c * (1 - s) / s  # coefficient of D in the mean; sn c / s is that of x
        amat = alpha * jac + sn * c / s * eye
        m = alpha * (mu - (1 - s) * jac @ mu) + amat @ m
        sig2 = amat @ sig2 @ amat.T + std**2 * eye
    return m, sig2


def test_reverse_sampler_gaussian_teacher_closed_form():
    g = GaussianMixture(torch.ones(1, dtype=F64), torch.tensor([[1.0, -0.5]], dtype=F64),
                        torch.tensor([[[0.09, 0.03], [0.03, 0.25]]], dtype=F64))
    post, x, tau = GMMPosterior(g), torch.tensor([[0.2, 0.4]], dtype=F64), 0.5
    exact_m, exact_c = post.mean(x, tau)[0], post.covariance(x, tau)[0]
    # The sampler matches the chain's closed form (5 SE), so the closed form speaks for it below.
    draws = ReverseSamplerPosterior(g.velocity, 4).sample(x, tau, 40_000, gen(2))[:, 0]
    m4, c4 = _chain_moments(g, x, tau, 4, "ddpm")
    m, se = mean_and_se(draws)
    assert ((m - m4).abs() <= 5 * se).all()
    var_se = ((draws - m) ** 2).std(0) / math.sqrt(draws.shape[0])
    assert ((draws.var(0) - c4.diagonal()).abs() <= 5 * var_se).all()
    # DDPM ancestral: mean exact at every k (float64 budget 1e-12), covariance shortfall O(1/k):
    # quadrupling k must cut it by at least 2.5x for k >= 16 (first order predicts 4x).
    errs = {}
    for k in [1, 4, 16, 64, 256]:
        mk, ck = _chain_moments(g, x, tau, k, "ddpm")
        assert (mk - exact_m).abs().max() <= 1e-12
        errs[k] = float(torch.linalg.matrix_norm(ck - exact_c))
    assert errs[1] > errs[4] > errs[16] and errs[64] <= errs[16] / 2.5 and errs[256] <= errs[64] / 2.5
    # CPS with eta = 1 (METHOD.md 5.6's sampler) forgets x_tau: its mean goes to the prior mean, not D.
    m64, _ = _chain_moments(g, x, tau, 64, 1.0)
    assert (m64 - g.means[0]).norm() <= 0.01 * (exact_m - g.means[0]).norm()


def test_reverse_sampler_gmm_teacher_converges_and_cps_eta1_does_not():
    mix = make_mixture()
    post, x, tau = GMMPosterior(mix), torch.tensor([[1.2, 0.3]], dtype=F64), 0.5
    exact_m, exact_tr = post.mean(x, tau)[0], float(post.covariance(x, tau)[0].trace())
    n, shortfall, shortfall_se = 20_000, {}, {}
    for k in [2, 8, 32]:
        draws = ReverseSamplerPosterior(mix.velocity, k).sample(x, tau, n, gen(10 + k))[:, 0]
        m, se = mean_and_se(draws)
        sq = ((draws - m) ** 2).sum(1)
        shortfall[k] = exact_tr - float(sq.mean())
        shortfall_se[k] = float(sq.std()) / math.sqrt(n)
        # The mean is second order in the dispersion error (the ancestral step keeps E[x' | x] exact);
        # allowance: 5 SE plus the trace shortfall itself.
        assert ((m - exact_m).abs() <= 5 * se + max(shortfall[k], 0.0)).all(), (k, m, exact_m)
    # Under-dispersed at every k, and the shortfall at least halves per 4x steps (first order: 4x).
    for k, k4 in [(2, 8), (8, 32)]:
        assert shortfall[k] > 5 * shortfall_se[k]
        assert shortfall[k4] <= shortfall[k] / 2 + 5 * (shortfall_se[k] + shortfall_se[k4])
    draws = ReverseSamplerPosterior(mix.velocity, 32, eta=1.0).sample(x, tau, n, gen(99))[:, 0]
    m, se = mean_and_se(draws)
    assert (m - exact_m).norm() > 20 * se.norm()


# ---- the shifted proposal ----------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["linear", "quadratic"])
def test_shifted_proposal_recovers_the_exact_tilted_denoiser(kind):
    mix, beta, n = make_mixture(), 0.8, 20_000
    x, tau = points(3, seed=7), torch.tensor([0.3, 0.6, 0.9], dtype=F64)
    if kind == "linear":
        def reward(z):
            return z @ A

        d_tilde = tilt_linear(mix, A, beta).posterior_mean(x, tau)
    else:
        quad_a, b = torch.tensor([[1.0, 0.3], [0.3, 0.5]], dtype=F64), torch.tensor([0.5, -1.0], dtype=F64)
        rq = QuadraticReward(quad_a, b)

        def reward(z):
            return rq(z).scores

        d_tilde = tilt_quadratic(mix, quad_a, b, beta).posterior_mean(x, tau)
    d_fake = d_tilde + torch.tensor([0.2, -0.1], dtype=F64)  # g is taken at D_fake, not at the answer
    d = d_fake.detach().requires_grad_(True)
    (g,) = torch.autograd.grad(reward(d).sum(), d)
    x0 = GMMPosterior(mix).sample(shifted_proposal_start(x, tau, g, beta), tau, n, gen(3))  # (N, 3, 2)
    log_w = shifted_proposal_log_weights(x0, reward_log_weights(x0, reward, 1.0), g, beta)
    est = snis_denoiser(x0, log_w)
    w = (log_w - log_w.amax(0)).exp()[..., None]
    se = (w**2 * (x0 - est) ** 2).sum(0).sqrt() / w.sum(0)  # delta-method SE of the SNIS ratio
    # Its O(kappa / N) bias is a factor sqrt(kappa / N) ~ 0.01 below the SE at N = 20000: 5 SE suffices.
    assert ((est - d_tilde).abs() <= 5 * se).all(), (est - d_tilde, se)
    if kind == "linear":  # the proposal is then the tilted posterior itself: all weights equal
        assert (effective_sample_size(log_w) - n).abs().max() <= 1e-9 * n
    # The one-call wrapper does the same thing with the same generator stream.
    out = tilted_direction(GMMPosterior(mix), x, tau, d_fake, reward, beta, n // 2, gen(3), shifted=True)
    assert (out.denoiser - est).abs().max() <= 1e-12


# ---- F = 1: the fixed point of tilted DM is the exact tilt -------------------------------------------------
def test_tilted_dm_fixed_point_is_the_exact_tilt_gaussian():
    s, mu, beta, a = 0.3, 0.4, 1.0, torch.tensor([1.0], dtype=F64)
    p = GaussianMixture(torch.ones(1, dtype=F64), torch.tensor([[mu]], dtype=F64), torch.tensor([[[s**2]]], dtype=F64))
    p_tilde = tilt_linear(p, a, beta)  # N(mu + beta s^2 a, s^2): the generator sits here
    taus = torch.linspace(0.02, 0.98, 49, dtype=F64)
    x = p_tilde.diffuse(0.5).sample(49, gen(4))[0]
    v_tilde = shifted_velocity(p.velocity, x, taus, a, beta)
    v_fake = p_tilde.velocity(x, taus)
    # Score form (1-tau)^2/tau (v~ - v_fake), denoiser form tau (v_fake - v~), DMD2-normalised form: all
    # vanish at p_theta = p_tilde for every tau (float64 budget as in the shift test).
    assert ((1 - taus) ** 2 / taus * (v_tilde - v_fake)[:, 0]).abs().max() <= 1e-10
    assert (taus * (v_fake - v_tilde)[:, 0]).abs().max() <= 1e-10
    # Today's direction, teacher DM (score form) + beta grad r, does not vanish there. Averaged over
    # tau ~ U[0.02, 0.98] its fixed point over-tilts by F; the midpoint rule on 4000 points vs quad.
    t = 0.02 + 0.96 * (torch.arange(4000, dtype=F64) + 0.5) / 4000
    xt = torch.full((4000, 1), 0.1, dtype=F64)
    dm = ((1 - t) ** 2 / t)[:, None] * (p.velocity(xt, t) - p_tilde.velocity(xt, t))
    inv_f = float(dm.mean()) / (beta * float(a))  # E_tau[g_dm] at the exact tilt, in units of beta a
    f_closed = 0.96 / quad(lambda u: (1 - u) ** 2 * s**2 / ((1 - u) ** 2 * s**2 + u**2), 0.02, 0.98)[0]
    assert abs(1 / inv_f - f_closed) <= 1e-4 * f_closed
    assert round(f_closed, 2) == 3.98
