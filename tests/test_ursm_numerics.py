"""URSM deterministic checks (spec §3): projection, gradient, MAP-W, (S3) conditional, PG sampler."""
from __future__ import annotations

import numpy as np
import pytest
from scipy.optimize import minimize

from scdist.ursm import mstep
from scdist.ursm.gibbs import kappa_tau_conditional
from scdist.ursm.params import Theta
from scdist.ursm.simplex import project_floored_simplex, project_floored_simplex_weighted


def _bisect_projection(y, eps, d=None):
    d = np.ones_like(y) if d is None else d
    lo, hi = -1e3, 1e3
    for _ in range(300):
        lam = 0.5 * (lo + hi)
        if np.maximum(y + lam * d, eps).sum() > 1:
            hi = lam
        else:
            lo = lam
    return np.maximum(y + 0.5 * (lo + hi) * d, eps)


@pytest.mark.parametrize("eps", [0.0, 1e-3, 0.01])
def test_projection_feasible_idempotent_and_exact(eps):
    rng = np.random.default_rng(0)
    N, K = 50, 4
    Y = rng.normal(0, 0.2, size=(N, K))
    X = project_floored_simplex(Y, eps)
    assert np.allclose(X.sum(0), 1.0, atol=1e-12)
    assert (X >= eps - 1e-15).all()
    assert np.allclose(project_floored_simplex(X, eps), X, atol=1e-14)
    for k in range(K):
        assert np.abs(X[:, k] - _bisect_projection(Y[:, k], eps)).max() < 1e-12
    # KKT optimality: no feasible direction improves the distance (compare to random feasible points)
    Z = project_floored_simplex(rng.normal(0, 0.2, size=(N, 200)), eps)
    for k in range(K):
        assert (np.linalg.norm(Z - Y[:, [k]], axis=0) >= np.linalg.norm(X[:, k] - Y[:, k]) - 1e-12).all()


def test_projection_edge_cases():
    y = np.array([0.3, -0.2, 5.0, 0.1])
    assert np.allclose(project_floored_simplex(y, 0.25), 0.25)         # N·ε = 1
    x = project_floored_simplex(y, 0.0)
    assert np.allclose(x, [0, 0, 1, 0])
    v = np.array([0.1, 0.2, 0.7])
    assert np.allclose(project_floored_simplex(v, 0.0), v)            # already on the simplex
    with pytest.raises(ValueError):
        project_floored_simplex(y, 0.3)


def test_weighted_projection_matches_bisection_and_reduces_to_euclidean():
    rng = np.random.default_rng(1)
    Y = rng.normal(0, 0.1, size=(30, 3))
    D = rng.uniform(0.1, 3.0, size=(30, 3))
    X = project_floored_simplex_weighted(Y, D, 1e-3)
    for k in range(3):
        assert np.abs(X[:, k] - _bisect_projection(Y[:, k], 1e-3, D[:, k])).max() < 1e-12
    assert np.allclose(project_floored_simplex_weighted(Y, np.ones_like(Y), 1e-3),
                       project_floored_simplex(Y, 1e-3), atol=1e-13)


def _random_mstep_stats(rng, N=12, K=3, L=20):
    A = project_floored_simplex(rng.uniform(0.2, 1, size=(N, K)) / N, 1e-4)
    c = rng.uniform(0, 50, size=(N, K))
    C1 = rng.normal(0, 30, size=(N, K))
    C2 = rng.uniform(0, 500, size=(N, K))
    ES = rng.uniform(0.1, 1, size=(L, N))
    R = rng.integers(10, 200, size=L).astype(float)
    G = rng.integers(0, K, size=L)
    return A, c, C1, C2, ES, R, G


def test_gradient_matches_finite_differences():
    rng = np.random.default_rng(2)
    A, c, C1, C2, ES, R, G = _random_mstep_stats(rng)
    u = (ES @ A)[np.arange(len(G)), G] * rng.uniform(0.8, 1.2, size=len(G))   # any u > 0
    g = mstep.surrogate_grad(A, u, c, C1, C2, ES, R, G)
    h = 1e-7
    fd = np.zeros_like(A)
    for i in range(A.shape[0]):
        E = np.zeros_like(A)
        E[i] = h
        fd[i] = (mstep.surrogate_F(A + E, u, c, C1, C2, ES, R, G)
                 - mstep.surrogate_F(A - E, u, c, C1, C2, ES, R, G)) / (2 * h)
    assert np.allclose(g, fd, rtol=1e-6, atol=1e-6 * np.abs(g).max())


def test_solver_gradient_is_eq_3_9_and_matches_finite_differences():
    """The A solver ascends G_k(a) = F_k(a; u*(a)) (``ProfileObjective``), not ``surrogate_F``:
    its gradient must be Eq. 3.9 at u = u*(a) and the central differences of its own value."""
    rng = np.random.default_rng(12)
    A, c, C1, C2, ES, R, G = _random_mstep_stats(rng)
    obj = mstep.ProfileObjective(c, C1, C2, ES, R, G)
    f, u = obj.value(A)
    g = obj.grad(A, u)
    np.testing.assert_allclose(g, mstep.surrogate_grad(A, u, c, C1, C2, ES, R, G), rtol=1e-12)
    h = 1e-7
    fd = np.zeros_like(A)
    for i in range(A.shape[0]):
        E = np.zeros_like(A)
        E[i] = h
        fd[i] = (obj.value(A + E)[0] - obj.value(A - E)[0]) / (2 * h)
    assert np.allclose(g, fd, rtol=1e-6, atol=1e-6 * np.abs(g).max())


def test_dropout_prior_update_is_eq_3_6_and_maximises_the_expected_gaussian_term():
    rng = np.random.default_rng(13)
    x = rng.normal(-1.0, 0.6, size=(40, 200))        # 200 kept draws of 40 cells' κ
    Ek, Ek2 = x.mean(1), (x * x).mean(1)
    y = rng.normal(300.0, 45.0, size=(40, 200))
    Et, Et2 = y.mean(1), (y * y).mean(1)
    mk, s2k, mt, s2t = mstep.update_dropout_prior(Ek, Ek2, Et, Et2)
    assert np.isclose(mk, x.mean()) and np.isclose(s2k, (x * x).mean() - x.mean() ** 2)
    assert np.isclose(mt, y.mean()) and np.isclose(s2t, (y * y).mean() - y.mean() ** 2)
    best = mstep.gaussian_term(Ek, Ek2, mk, s2k)
    for dm, ds in [(1e-3, 1.0), (-1e-3, 1.0), (0.0, 1.001), (0.0, 0.999)]:
        assert mstep.gaussian_term(Ek, Ek2, mk + dm, s2k * ds) < best


def test_profile_column_without_cells_is_the_projected_bulk_fraction():
    """Spec §1.3: a column with no cells (bulk-only type) is Π_Δε(c_·k / Σ_i c_ik)."""
    rng = np.random.default_rng(14)
    A0, c, C1, C2, ES, R, G = _random_mstep_stats(rng)
    G = np.where(G == 2, 0, G)                        # type 2 has no cells
    c[:3, 2] = 0.0                                    # and three genes without reads of it
    A, _, _ = mstep.update_profile(A0, c, C1, C2, ES, R, G, 1e-3)
    np.testing.assert_allclose(A[:, 2], project_floored_simplex(c[:, 2] / c[:, 2].sum(), 1e-3), rtol=1e-12)
    assert np.allclose(A[:3, 2], 1e-3)


@pytest.mark.parametrize("solver", ["scaled", "euclidean"])
def test_profile_update_reaches_constrained_maximum(solver):
    rng = np.random.default_rng(3)
    A0, c, C1, C2, ES, R, G = _random_mstep_stats(rng)
    A, steps, _ = mstep.update_profile(A0, c, C1, C2, ES, R, G, 1e-4, max_iter=5000, tol=1e-10, solver=solver)
    obj = mstep.ProfileObjective(c, C1, C2, ES, R, G)
    f = obj.value(A)[0]
    assert np.allclose(A.sum(0), 1) and (A >= 1e-4 - 1e-15).all()
    # no random feasible perturbation improves any column
    for _ in range(200):
        B = project_floored_simplex(A + rng.normal(0, 1e-3, size=A.shape), 1e-4)
        assert (obj.value(B)[0] <= f + 1e-8 * np.abs(f)).all()
    # and the surrogate with the optimal u equals the exact objective
    u = (ES @ A)[np.arange(len(G)), G]
    assert np.allclose(mstep.surrogate_F(A, u, c, C1, C2, ES, R, G), f)


def test_alpha_update_matches_scipy():
    rng = np.random.default_rng(4)
    M, true = 200, np.array([1.0, 2.0, 3.0])
    W = rng.dirichlet(true, size=M)
    s = np.log(W).sum(0)
    a = mstep.update_alpha(np.ones(3), s, M, 1e-3, max_iter=5000, tol=1e-10)
    ref = minimize(lambda x: -mstep.alpha_objective(x, s, M), np.ones(3),
                   jac=lambda x: -mstep.alpha_gradient(x, s, M), bounds=[(1e-3, None)] * 3, method="L-BFGS-B",
                   options={"ftol": 1e-15, "gtol": 1e-10})
    assert np.allclose(a, ref.x, rtol=1e-4)
    # the floor binds when asked
    a1 = mstep.update_alpha(np.ones(3), s, M, 2.5)
    assert (a1 >= 2.5).all() and np.isclose(a1[0], 2.5)


def test_map_w_step_ascends_and_converges_to_constrained_max():
    rng = np.random.default_rng(5)
    N, K, M = 30, 3, 4
    A = rng.dirichlet(np.ones(N), size=K).T
    alpha = np.array([1.0, 1.5, 3.0])
    X = rng.multinomial(2000, (rng.dirichlet(alpha, size=M) @ A.T)).astype(float)
    W = np.full((M, K), 1.0 / K)
    f = mstep.map_w_objective(X, A, W, alpha)
    for _ in range(3000):
        W2 = mstep.map_w_step(X, A, W, alpha)
        f2 = mstep.map_w_objective(X, A, W2, alpha)
        assert f2 >= f - 1e-8 * abs(f)
        W, f = W2, f2
    for j in range(M):
        obj = lambda z: -(X[j] @ np.log(A @ z) + ((alpha - 1) * np.log(z)).sum())
        ref = minimize(obj, np.full(K, 1 / K), method="SLSQP", bounds=[(1e-9, 1)] * K,
                       constraints=[{"type": "eq", "fun": lambda z: z.sum() - 1}], options={"ftol": 1e-14})
        assert np.allclose(W[j], ref.x, atol=2e-4)


def test_kappa_tau_conditional_matches_grid_posterior():
    rng = np.random.default_rng(6)
    N = 15
    a = rng.dirichlet(np.ones(N))[None, :]
    omega = rng.uniform(0.05, 0.3, size=(1, N))
    S = (rng.random((1, N)) < 0.6).astype(float)
    th = Theta(A=a.T, alpha=np.ones(1), mu_kappa=-0.5, s2_kappa=0.7, mu_tau=20.0, s2_tau=150.0)
    (p11, p12, p22), m = kappa_tau_conditional(omega, S, a, th)
    cov = np.linalg.inv(np.array([[p11[0], p12[0]], [p12[0], p22[0]]]))
    k = np.linspace(m[0, 0] - 8 * np.sqrt(cov[0, 0]), m[0, 0] + 8 * np.sqrt(cov[0, 0]), 601)
    t = np.linspace(m[1, 0] - 8 * np.sqrt(cov[1, 1]), m[1, 0] + 8 * np.sqrt(cov[1, 1]), 601)
    K_, T_ = np.meshgrid(k, t, indexing="ij")
    psi = K_[..., None] + T_[..., None] * a[0]
    lp = ((S[0] - 0.5) * psi - omega[0] * psi ** 2 / 2).sum(-1) \
        - (K_ - th.mu_kappa) ** 2 / (2 * th.s2_kappa) - (T_ - th.mu_tau) ** 2 / (2 * th.s2_tau)
    p = np.exp(lp - lp.max())
    p /= p.sum()
    mk, mt = (p * K_).sum(), (p * T_).sum()
    ck = (p * (K_ - mk) ** 2).sum(), (p * (K_ - mk) * (T_ - mt)).sum(), (p * (T_ - mt) ** 2).sum()
    assert np.allclose([mk, mt], m[:, 0], rtol=1e-6, atol=1e-8)
    assert np.allclose(ck, [cov[0, 0], cov[0, 1], cov[1, 1]], rtol=1e-4)


@pytest.mark.parametrize("z", [0.0, 0.5, 5.0, 20.0])
def test_polyagamma_draws_mean_and_variance(z):
    from polyagamma import random_polyagamma

    rng = np.random.default_rng(7)
    n = 200_000
    w = random_polyagamma(1.0, np.full(n, z), method="devroye", random_state=rng)   # as gibbs.py draws
    if z == 0:
        mean, var = 0.25, 1.0 / 24.0
    else:
        mean = np.tanh(z / 2) / (2 * z)
        var = (np.sinh(z) - z) / (4 * z ** 3 * np.cosh(z / 2) ** 2)
    assert abs(w.mean() - mean) < 4 * np.sqrt(var / n)
    # variance of the sample variance ≈ (μ4 − σ⁴)/n; a loose 6 % band is many SEs here
    assert abs(w.var() / var - 1) < 0.06


def test_polyagamma_devroye_method_is_the_default_for_h1():
    """The sweep names method='devroye' (skips the package's per-draw dispatch); for h = 1 the
    package's default (hybrid) method must give the same draws bit for bit."""
    from polyagamma import random_polyagamma

    psi = np.random.default_rng(1).normal(0.0, 6.0, size=(40, 50))
    a = random_polyagamma(1.0, psi, random_state=np.random.default_rng(2))
    b = np.empty_like(psi)
    random_polyagamma(1.0, psi, out=b, method="devroye", disable_checks=True, random_state=np.random.default_rng(2))
    assert np.array_equal(a, b)


@pytest.mark.parametrize("psi", [0.3, 3.0, 12.0, 40.0, 85.0])
def test_polyagamma_devroye_matches_the_package_cdf(psi):
    """KS test of the draws the sweep uses against the package's own series CDF of PG(1, psi), over
    the range of psi met in the simulations (99 % below ~12, largest ~85 at N = 1,000)."""
    from polyagamma import polyagamma_cdf, random_polyagamma
    from scipy.stats import kstest

    w = random_polyagamma(1.0, np.full(40_000, psi), method="devroye", random_state=np.random.default_rng(3))
    assert kstest(w, lambda x: polyagamma_cdf(x, h=1.0, z=psi)).pvalue > 1e-3
    # power: the same test rejects draws with a 3 % scale error
    assert kstest(1.03 * w, lambda x: polyagamma_cdf(x, h=1.0, z=psi)).pvalue < 1e-5


def test_split_rhat_calibrated_and_detects_disagreement():
    """Split R-hat (BDA3 §11.4) from per-half moments: ≈ 1 for independent draws of one target,
    equal to the textbook formula on explicit traces, and large when chains sit at different
    places or drift within a chain (what splitting each chain in two is for)."""
    from scdist.ursm.diagnostics import split_rhat_from_moments, split_rhat_traces

    rng = np.random.default_rng(11)
    same = rng.normal(size=(4, 2000))
    assert abs(split_rhat_traces(same) - 1.0) < 0.01
    # textbook: 2C sequences of n draws, W = mean within-sequence variance, B = n var(means)
    seqs = np.concatenate([same[:, :1000], same[:, 1000:]])
    n = 1000
    Wv, B = seqs.var(axis=1, ddof=1).mean(), n * seqs.mean(axis=1).var(ddof=1)
    assert np.isclose(split_rhat_traces(same), np.sqrt(((n - 1) / n * Wv + B / n) / Wv), rtol=1e-12)
    apart = same + np.array([0.0, 0.0, 0.0, 2.0])[:, None]     # one chain 2 sd away
    assert split_rhat_traces(apart) > 1.2
    drift = rng.normal(size=(4, 2000)) + np.linspace(0, 4, 2000)[None, :]   # all chains drift alike
    assert split_rhat_traces(drift) > 1.2
    # elementwise form used for κ, τ, W: one column per parameter
    x = np.stack([same, apart], axis=-1)                       # (chains, T, 2)
    h = np.concatenate([x[:, :1000], x[:, 1000:]])             # (2C, n, 2)
    r = split_rhat_from_moments(h.sum(1), (h * h).sum(1), n)
    np.testing.assert_allclose(r, [split_rhat_traces(same), split_rhat_traces(apart)], rtol=1e-10)


def _cells_augmented(rng, L=30):
    """Per-cell (Λ_l, b_l) of the PG-augmented likelihood exp(b'x − x'Λx/2), x = (κ_l, τ_l)."""
    N = 40
    a = rng.dirichlet(np.ones(N), size=L)
    om = rng.gamma(2.0, 0.1, size=(L, N))
    S = rng.random((L, N)) < 0.6
    Lam = np.stack([[(om).sum(1), (om * a).sum(1)], [(om * a).sum(1), (om * a * a).sum(1)]]).transpose(2, 0, 1)
    b = np.stack([S.sum(1) - N / 2, (S * a).sum(1) - 0.5], axis=1)
    return Lam, b


def test_collapsed_prior_mean_maximises_the_marginal_and_is_the_em_fixed_point():
    """``collapsed_prior_mean`` from Σ m_l and Σ P_l⁻¹ (what the sweep accumulates) equals (a) the
    limit of plain EM's μ ← mean_l m_l(μ) with ω, S held fixed and (b) the maximiser of
    Σ_l ln ∫ exp(b_l'x − x'Λ_l x/2) N(x; μ, D⁻¹) dx, whose μ-dependence is checked on a 2-D grid."""
    rng = np.random.default_rng(15)
    Lam, b = _cells_augmented(rng)
    D = np.diag([1 / 0.5, 1 / 40.0 ** 2])
    mu_t = np.array([0.3, 20.0])
    P = Lam + D
    Pinv = np.linalg.inv(P)
    m = np.einsum("lij,lj->li", Pinv, b + D @ mu_t)
    mu = mstep.collapsed_prior_mean(m.sum(0), Pinv.sum(0), len(b), mu_t, np.diag(D))
    x = mu_t.copy()
    for _ in range(5000):
        x = np.einsum("lij,lj->li", Pinv, b + D @ x).mean(0)
    np.testing.assert_allclose(mu, x, rtol=1e-9)

    def collapsed(mv):          # Σ_l [½ (b + Dμ)'P⁻¹(b + Dμ) − ½ μ'Dμ], up to μ-free terms
        r = b + D @ mv
        return 0.5 * np.einsum("li,lij,lj->", r, Pinv, r) - 0.5 * len(b) * mv @ D @ mv

    for dv in ([1e-3, 0], [0, 1e-2], [-1e-3, 5e-3]):
        assert collapsed(mu + np.array(dv)) < collapsed(mu)
    # the closed form is the Gaussian integral: compare one cell's change between two μ on a grid
    l = 0
    mus = [mu_t, mu_t + np.array([-0.4, 7.0])]
    k = np.linspace(-6, 6, 801)
    t = np.linspace(-150, 200, 801)
    K_, T_ = np.meshgrid(k, t, indexing="ij")
    lik = b[l, 0] * K_ + b[l, 1] * T_ - 0.5 * (Lam[l, 0, 0] * K_ ** 2 + 2 * Lam[l, 0, 1] * K_ * T_
                                               + Lam[l, 1, 1] * T_ ** 2)
    grid = []
    for mv in mus:
        prior = -0.5 * (D[0, 0] * (K_ - mv[0]) ** 2 + D[1, 1] * (T_ - mv[1]) ** 2)
        z = lik + prior
        grid.append(np.log(np.exp(z - z.max()).sum()) + z.max())

    def one(mv):
        r = b[l] + D @ mv
        return 0.5 * r @ Pinv[l] @ r - 0.5 * mv @ D @ mv

    assert np.isclose(grid[1] - grid[0], one(mus[1]) - one(mus[0]), rtol=1e-6, atol=1e-8)
