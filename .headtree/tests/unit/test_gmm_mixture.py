"""GaussianMixture / ConditionalGMM against closed forms and Monte Carlo (WORLDS.md section 1, "Teacher").

Monte Carlo tolerances are fixed in advance at 5 standard errors, the standard error estimated from the
same samples.
"""

from __future__ import annotations

import math

import pytest
import torch
from scipy.stats import multivariate_normal

from tiltflow.worlds.gmm import ConditionalGMM, GaussianMixture

F64 = torch.float64
U64 = 2.0**-53  # float64 unit roundoff (eps / 2)
SIGMAS = [0.02, 0.2, 0.5, 0.8, 0.97]


def make_mixture(seed: int = 0, d: int = 2, k: int = 3) -> GaussianMixture:
    """A mixture with anisotropic, correlated covariances and unequal weights."""
    g = torch.Generator().manual_seed(seed)
    means = 2.5 * torch.randn(k, d, generator=g, dtype=F64)
    root = torch.randn(k, d, d, generator=g, dtype=F64) / math.sqrt(d)
    covs = root @ root.transpose(1, 2) * 0.6 + 0.15 * torch.eye(d, dtype=F64)
    weights = torch.rand(k, generator=g, dtype=F64) + 0.3
    return GaussianMixture(weights, means, covs)


def points(n: int, d: int = 2, seed: int = 1) -> torch.Tensor:
    return 2.0 * torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=F64)


def within_se(estimate: torch.Tensor, exact: torch.Tensor, se: torch.Tensor, num_se: float = 5.0) -> None:
    err = (estimate - exact).abs()
    # + 1e-12: entries whose standard error is 0 (e.g. a weight that is exactly 1) still carry float64
    # rounding, a few u times values of at most ~10 here, i.e. < 1e-14; 1e-12 is far below any 5-SE band.
    assert bool((err <= num_se * se + 1e-12).all()), f"error {err} exceeds {num_se} standard errors {se}"


# ---- validation -------------------------------------------------------------------------------------------
def test_invalid_inputs_raise_and_name_the_problem():
    w, mu = torch.ones(2, dtype=F64), torch.zeros(2, 2, dtype=F64)
    good = torch.eye(2, dtype=F64)
    asym = torch.tensor([[1.0, 0.5], [0.0, 1.0]], dtype=F64)
    indefinite = torch.tensor([[1.0, 2.0], [2.0, 1.0]], dtype=F64)
    with pytest.raises(ValueError, match=r"covs\[1\] is not symmetric"):
        GaussianMixture(w, mu, torch.stack([good, asym]))
    with pytest.raises(ValueError, match=r"covs\[1\] is not positive definite"):
        GaussianMixture(w, mu, torch.stack([good, indefinite]))
    with pytest.raises(ValueError, match=r"covs\[0\] is not positive definite"):
        GaussianMixture(w, mu, torch.stack([torch.zeros(2, 2, dtype=F64), good]))
    with pytest.raises(ValueError, match=r"weights\[1\]"):
        GaussianMixture(torch.tensor([1.0, 0.0], dtype=F64), mu, torch.stack([good, good]))
    with pytest.raises(ValueError, match=r"weights\[0\]"):
        GaussianMixture(torch.tensor([-1.0, 1.0], dtype=F64), mu, torch.stack([good, good]))
    with pytest.raises(ValueError, match="expected weights"):
        GaussianMixture(w, mu, good)
    m = GaussianMixture(w, mu, torch.stack([good, good]))
    with pytest.raises(ValueError, match="sigma"):
        m.velocity(points(3), 1.5)
    with pytest.raises(ValueError, match="expected"):
        m.velocity(points(3, d=3), 0.5)


# ---- densities --------------------------------------------------------------------------------------------
def test_log_prob_matches_scipy_and_score_matches_autograd():
    m = make_mixture()
    x = points(50)
    ref = sum(
        float(w) * multivariate_normal(mu.numpy(), s.numpy()).pdf(x.numpy())
        for w, mu, s in zip(m.weights, m.means, m.covs)
    )
    # Two float64 evaluations of the same log-density (ours: eigh + logsumexp; scipy: its own factorisation +
    # a sum of pdfs). To first order each is off by (2d + 4) kappa u Q / 2 in the Gaussian exponents (the
    # Mahalanobis form Q, a d-term product through a matrix of condition kappa) plus ~ 10u |log p| for
    # logsumexp / log of a K-term sum: tolerance = twice that, from this data (~ 3e-12; seen ~ 1e-14).
    d = x.shape[1]
    evals = torch.linalg.eigvalsh(m.covs)
    kappa = float((evals[:, -1] / evals[:, 0]).max())
    diff = x[:, None, :] - m.means[None]
    maha = torch.einsum("bkd,kde,bke->bk", diff, torch.linalg.inv(m.covs), diff)
    lp_tol = 2 * (0.5 * (2 * d + 4) * kappa * U64 * float(maha.max()) + 10 * U64 * float(m.log_prob(x).abs().max()))
    assert torch.allclose(m.log_prob(x), torch.as_tensor(ref).log(), rtol=0, atol=lp_tol)
    xg = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(m.log_prob(xg).sum(), xg)
    # score = sum_k gamma_k S_k^{-1} (x - mu_k), by formula and by autograd: each of the K terms is off by
    # (2d + 4) kappa u |S_k^{-1} (x - mu_k)| to first order, the K-term weighted sum adds K u of the same
    # scale; twice that for two evaluations (~ 1e-12 here; seen ~ 4e-14).
    comp = torch.linalg.solve(m.covs[None], diff[..., None]).squeeze(-1).norm(dim=-1)
    score_tol = 2 * ((2 * d + 4) * kappa + m.num_components) * U64 * m.num_components * float(comp.max())
    assert torch.allclose(m.score(x), grad, rtol=0, atol=score_tol)
    r = m.responsibilities(x)
    assert torch.allclose(r.sum(1), torch.ones(50, dtype=F64))
    assert torch.equal(m.assign(x), r.argmax(1))


def test_marginal_is_the_sub_block():
    m = make_mixture(d=4)
    marg = m.marginal([0, 2])
    assert torch.allclose(marg.covs, m.covs[:, [0, 2]][:, :, [0, 2]])
    assert torch.allclose(marg.means, m.means[:, [0, 2]])
    assert torch.allclose(marg.weights, m.weights)


# ---- exact velocity ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("d", [2, 5])
@pytest.mark.parametrize("sigma", SIGMAS)
def test_velocity_matches_finite_difference_of_diffused_log_density(sigma, d):
    """Tweedie: score of p_sigma = -(x + (1 - sigma) v) / sigma, score by central differences of log p_sigma."""
    m = make_mixture(seed=3, d=d, k=4)
    diffused = m.diffuse(sigma)
    x = (1 - sigma) * points(20, d=d, seed=4) + sigma * points(20, d=d, seed=5)
    h = 1e-5
    eye = torch.eye(d, dtype=F64)
    fd = torch.stack(
        [(diffused.log_prob(x + h * eye[i]) - diffused.log_prob(x - h * eye[i])) / (2 * h) for i in range(d)], dim=1
    )
    v = m.velocity(x, sigma)
    score_from_v = -(x + (1 - sigma) * v) / sigma
    # Central differences: truncation h^2 / 6 |d^3 log p| (h^2 = 1e-10, third derivatives here <= ~1e3 at the
    # smallest sigma) plus rounding ~ u |log p| / h (|log p| <= ~1e3: ~ 1e-8); 1e-6 bounds both by design.
    assert torch.allclose(score_from_v, fd, rtol=1e-6, atol=1e-6)
    assert torch.allclose(diffused.score(x), fd, rtol=1e-6, atol=1e-6)
    # the spec's form v = (x - E[x0 | x]) / sigma agrees with the cancelled form used by velocity(): the spec
    # form divides E[x0 | x]'s rounding (_denoiser_rounding_bound) by sigma, plus 2u (|x| + |E|) / sigma for
    # the subtraction and division; v itself carries the bound once more.
    post = m.posterior_mean(x, sigma)
    bound = _denoiser_rounding_bound(m, x, sigma)
    tol = bound * (1 + 1 / sigma) + 2 * U64 * float((x.abs() + post.abs()).max()) / sigma
    assert torch.allclose(v, (x - post) / sigma, rtol=0, atol=tol)


def _denoiser_rounding_bound(m: GaussianMixture, x: torch.Tensor, sigma: float) -> float:
    """First-order worst-case float64 rounding of velocity / posterior_mean at (x, sigma), any summation order.

    Both are sum_k gamma_k comp_k with comp_k affine in C_k^{-1} r_k, r_k = x - (1 - s) mu_k, over the
    diffused components N((1 - s) mu_k, C_k). A relative error e in r_k's d-term products moves the Gaussian
    exponent Q_k / 2 by ~ e Q_k, hence gamma_k by ~ gamma_k e Q_k; with e = (2d + 4) kappa(C_k) u that moves
    the sum by <= 2 sum_k gamma_k (2d + 4) kappa_k u Q_k max|comp|. The K-term softmax and sum and the
    (2d + 4)-op comp_k add (2K + 2d + 4) kappa u max|comp|. |comp_k| <= |mu_k| + max(1, lam_max) |C_k^{-1} r_k|.
    """
    s, d, k = float(sigma), m.dim, m.num_components
    diffused = m.diffuse(s)
    evals = torch.linalg.eigvalsh(diffused.covs)
    kappa = (evals[:, -1] / evals[:, 0])[None]  # (1, K)
    r = x[:, None, :] - diffused.means[None]  # (B, K, d)
    sol = torch.linalg.solve(diffused.covs[None], r[..., None]).squeeze(-1)
    maha = (r * sol).sum(-1)
    lam = torch.linalg.eigvalsh(m.covs)[:, -1].clamp(min=1.0)[None]
    comp = float((m.means.norm(dim=1)[None] + lam * sol.norm(dim=-1)).max())
    gamma = diffused.responsibilities(x)
    shift = float((2 * gamma * (2 * d + 4) * kappa * maha).sum(1).max())
    return (shift + (2 * k + 2 * d + 4) * float(kappa.max())) * U64 * comp


def test_per_sample_sigma_matches_scalar_sigma():
    m = make_mixture(seed=5, k=4)
    x = points(len(SIGMAS))
    sig = torch.tensor(SIGMAS, dtype=F64)
    # one batch vs one row at a time: the same formula, but the reductions may run in another order or
    # kernel for another shape, so allow twice the worst-case rounding of one evaluation (no rtol).
    tol = 2 * max(_denoiser_rounding_bound(m, x[i : i + 1], s) for i, s in enumerate(SIGMAS))
    rows = torch.stack([m.velocity(x[i : i + 1], s)[0] for i, s in enumerate(SIGMAS)])
    assert torch.allclose(m.velocity(x, sig), rows, rtol=0, atol=tol)
    rows = torch.stack([m.posterior_mean(x[i : i + 1], s)[0] for i, s in enumerate(SIGMAS)])
    assert torch.allclose(m.posterior_mean(x, sig), rows, rtol=0, atol=tol)


def test_endpoints_have_no_nan():
    m = make_mixture()
    x = points(10)
    at_one = m.posterior_mean(x, 1.0)
    # closed-form endpoints, each within twice the worst-case rounding of one evaluation (~ 3e-12 at
    # sigma = 1, ~ 1.5e-10 at sigma = 0 where the bound is loose: all comp_k equal x there)
    tol_one, tol_zero = 2 * _denoiser_rounding_bound(m, x, 1.0), 2 * _denoiser_rounding_bound(m, x, 0.0)
    assert torch.allclose(at_one, m.mean().expand_as(x), rtol=0, atol=tol_one)
    assert torch.allclose(m.velocity(x, 1.0), x - m.mean(), rtol=0, atol=tol_one)
    assert torch.allclose(m.posterior_mean(x, 0.0), x, rtol=0, atol=tol_zero)
    assert torch.allclose(m.velocity(x, 0.0), -x, rtol=0, atol=tol_zero)  # E[eps - x0 | x0 = x] = -x
    # a limit, not rounding: v(x, s) + x = O(s |S_k^{-1}| |x|) ~ 1e-11 at s = 1e-12, plus the rounding above
    assert torch.allclose(m.velocity(x, 1e-12), -x, atol=1e-6)
    sig = torch.tensor([0.0, 1e-12, 1e-6, 0.5, 1 - 1e-9, 1.0] * 2, dtype=F64)
    assert bool(torch.isfinite(m.velocity(points(12), sig)).all())
    assert bool(torch.isfinite(m.to(torch.float32).velocity(points(12).float(), sig.float())).all())


def test_float32_follows_float64():
    m64 = make_mixture(seed=7, k=4)
    m32 = m64.to(torch.float32)
    x = points(64)
    sig = torch.linspace(0, 1, 64, dtype=F64)
    v32 = m32.velocity(x.float(), sig.float())
    assert v32.dtype == torch.float32
    # float32 rounding, per row: _denoiser_rounding_bound's first-order worst case with u = 2^-24 instead of
    # 2^-53 (the float64 reference's own rounding is 2^29 times smaller). Rounding x and sigma to float32
    # perturbs r_k and c_k by ~ u relative, which the bound's (2d + 4) kappa u Q_k term covers. The bound is
    # worst case (<= ~0.04 here, typical errors ~ 1e-5); a float32 cancellation or a wrong formula exceeds it.
    tol = torch.tensor([2.0**29 * _denoiser_rounding_bound(m64, x[i : i + 1], float(s)) for i, s in enumerate(sig)])
    assert bool(((v32.double() - m64.velocity(x, sig)).abs() <= tol[:, None]).all())
    assert m32.log_prob(x.float()).dtype == torch.float32
    assert m32.log_prob(x).dtype == F64  # promotion: a float64 input is not silently truncated in the result


# ---- Monte Carlo moments ----------------------------------------------------------------------------------
def _moments_match(x: torch.Tensor, mean: torch.Tensor, cov: torch.Tensor) -> None:
    """Sample mean and covariance within 5 standard errors of the exact ones."""
    n = x.shape[0]
    within_se(x.mean(0), mean, x.std(0) / math.sqrt(n))
    centred = x - mean
    prod = centred[:, :, None] * centred[:, None, :]  # (n, d, d): unbiased for cov given the exact mean
    within_se(prod.mean(0), cov, prod.std(0) / math.sqrt(n))


@pytest.mark.parametrize("sigma", [0.0, 0.3, 0.9])
def test_diffuse_matches_monte_carlo_of_the_interpolant(sigma):
    m = make_mixture(seed=2)
    g = torch.Generator().manual_seed(11)
    n = 60_000
    x0, idx = m.sample(n, g)
    eps = torch.randn(x0.shape, generator=g, dtype=F64)
    x = (1 - sigma) * x0 + sigma * eps
    diffused = m.diffuse(sigma)
    counts = torch.bincount(idx, minlength=m.num_components).double() / n
    within_se(counts, m.weights, (m.weights * (1 - m.weights) / n).sqrt())
    for k in range(m.num_components):
        _moments_match(x[idx == k], diffused.means[k], diffused.covs[k])
    _moments_match(x, diffused.mean(), diffused.covariance())


def test_posterior_mean_is_a_conditional_expectation():
    """E[x0 f(x)] = E[E[x0 | x] f(x)] for test functions f: a Monte Carlo check independent of Tweedie."""
    m = make_mixture(seed=8)
    g = torch.Generator().manual_seed(12)
    n, sigma = 80_000, 0.45
    x0, _ = m.sample(n, g)
    x = (1 - sigma) * x0 + sigma * torch.randn(x0.shape, generator=g, dtype=F64)
    post = m.posterior_mean(x, sigma)
    for f in (torch.ones(n, dtype=F64), torch.tanh(x[:, 0]), torch.sigmoid(x[:, 1] - x[:, 0])):
        diff = (x0 - post) * f[:, None]  # zero-mean if post is the conditional expectation
        within_se(diff.mean(0), torch.zeros(2, dtype=F64), diff.std(0) / math.sqrt(n))


# ---- conditional mixture ----------------------------------------------------------------------------------
def test_conditional_gmm_dispatches_per_prompt_and_builds_the_uniform_mixture():
    mixes = [make_mixture(seed=s, k=k) for s, k in [(0, 3), (1, 2), (2, 4)]]
    cg = ConditionalGMM(mixes)
    assert cg.num_prompts == 3 and cg.unconditional.num_components == 9
    x = points(12)
    cond = torch.tensor([0, 1, 2, 3] * 3)
    sig = torch.linspace(0.05, 0.95, 12, dtype=F64)
    v = cg.velocity(x, sig, cond)
    for i in range(12):
        ref = cg.mixture(int(cond[i])).velocity(x[i : i + 1], sig[i : i + 1])[0]
        # batch vs one row: twice the worst-case rounding of one evaluation (see _denoiser_rounding_bound)
        tol = 2 * _denoiser_rounding_bound(cg.mixture(int(cond[i])), x[i : i + 1], float(sig[i]))
        assert torch.allclose(v[i], ref, rtol=0, atol=tol)
    uncond_lp = torch.logsumexp(torch.stack([mm.log_prob(x) for mm in mixes]), 0) - math.log(3)
    # one 9-component logsumexp vs three 3-component ones: as in the scipy check above, each side is off by
    # (2d + 4) kappa u Q / 2 in the exponents plus ~ 10u |log p|; tolerance = twice that, from this data.
    uncond = cg.unconditional
    evals = torch.linalg.eigvalsh(uncond.covs)
    diff = x[:, None, :] - uncond.means[None]
    maha = torch.einsum("bkd,kde,bke->bk", diff, torch.linalg.inv(uncond.covs), diff)
    kappa = float((evals[:, -1] / evals[:, 0]).max())
    lp_tol = 2 * (0.5 * (2 * 2 + 4) * kappa * U64 * float(maha.max()) + 10 * U64 * float(uncond_lp.abs().max()))
    assert torch.allclose(cg.log_prob(x, torch.full((12,), 3)), uncond_lp, rtol=0, atol=lp_tol)
    # default allclose (rtol 1e-5): loose next to the ~1e-12 bound above, but any wrong dispatch is off by O(1)
    assert torch.allclose(
        cg.velocity(x, 0.4, cond)[:4], torch.stack([cg.mixture(c).velocity(x[c : c + 1], 0.4)[0] for c in range(4)])
    )
    with pytest.raises(ValueError, match="cond values"):
        cg.velocity(x, 0.5, torch.full((12,), 4))
    with pytest.raises(ValueError, match="LongTensor"):
        cg.velocity(x, 0.5, torch.zeros(12))


def test_conditional_sample_uses_each_prompts_mixture():
    mixes = [make_mixture(seed=0), make_mixture(seed=1)]
    cg = ConditionalGMM(mixes)
    cond = torch.tensor([0, 1] * 20_000)
    x, idx = cg.sample(cond, torch.Generator().manual_seed(3))
    assert x.shape == (40_000, 2) and x.dtype == F64
    for c in range(2):
        xc = x[cond == c]
        within_se(xc.mean(0), mixes[c].mean(), xc.std(0) / math.sqrt(xc.shape[0]))
    x_again, _ = cg.sample(cond, torch.Generator().manual_seed(3))
    assert torch.equal(x, x_again)
