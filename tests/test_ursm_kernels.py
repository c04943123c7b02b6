"""URSM compiled kernels: the binomial sampler and the (B2) allocation draw have exactly the
distributions they claim (chi-square against the closed-form pmf), on both sampler branches."""
from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import binom, chi2, multinomial

from scdist.ursm import kernels


def _chi2_pvalue(obs, expected):
    """Pearson chi-square p-value with cells of expectation < 5 pooled into one."""
    keep = expected >= 5
    o = np.append(obs[keep], obs[~keep].sum())
    e = np.append(expected[keep], expected[~keep].sum())
    if e[-1] < 5:            # too little pooled mass: merge it into the last kept cell
        o[-2] += o[-1]
        e[-2] += e[-1]
        o, e = o[:-1], e[:-1]
    return chi2.sf(((o - e) ** 2 / e).sum(), max(len(e) - 1, 1))


# inversion (n·p < 24), BTRD (n·p ≥ 24) and the p > ½ reflection of each; large n for BTRD's tails
CASES = [(1, 0.3), (7, 0.5), (40, 0.05), (40, 0.2), (70, 0.33), (33, 0.9), (50, 0.5), (60, 0.55),
         (400, 0.73), (5000, 0.01), (100_000, 0.4), (37, 0.999)]


def test_binomial_matches_pmf_on_both_branches():
    rng = np.random.default_rng(3)
    lf = kernels.log_factorials(100_000)
    draws = 200_000
    pvals = []
    for n, p in CASES:
        z = kernels.binomial_many(n, p, draws, rng, lf)
        assert z.min() >= 0 and z.max() <= n
        obs = np.bincount(z, minlength=n + 1).astype(float)
        pvals.append(_chi2_pvalue(obs, binom.pmf(np.arange(n + 1), n, p) * draws))
        sd = np.sqrt(n * p * (1 - p) / draws)
        assert abs(z.mean() - n * p) < 5 * sd + 1e-12, (n, p)
    # 12 independent tests: a correct sampler fails one at 1e-4 with probability ~1e-3
    assert min(pvals) > 1e-4, dict(zip(CASES, np.round(pvals, 5)))


def test_binomial_detects_a_wrong_distribution():
    """Power check: the same test rejects Bin(n, p) draws scored against Bin(n, 1.01 p)."""
    rng = np.random.default_rng(4)
    lf = kernels.log_factorials(1000)
    z = kernels.binomial_many(400, 0.3, 200_000, rng, lf)
    obs = np.bincount(z, minlength=401).astype(float)
    assert _chi2_pvalue(obs, binom.pmf(np.arange(401), 400, 0.303) * 200_000) < 1e-6


def test_allocations_are_multinomial_and_conserve_counts():
    """(B2): for every (i, j), Z̃_ij ~ Mult(X_ij, r_ij·); checked jointly for two entries with small
    and large counts, and Σ_k n_jk = Σ_i X_ij exactly."""
    rng = np.random.default_rng(5)
    K, N, M = 3, 4, 2
    A = rng.dirichlet(np.ones(N), K).T
    W = np.array([[0.2, 0.3, 0.5], [0.7, 0.2, 0.1]])
    X = np.array([[6, 0, 3, 9], [250, 1, 40, 2]], dtype=np.int64)
    lf = kernels.log_factorials(X.max())
    reps = 20_000
    n = np.zeros((M, K))
    zsum = np.zeros((N, K))
    # one gene, `reps` identical samples: n_out[j] is then Z̃ of that (gene, sample) entry
    X1, W1, A1 = np.full((reps, 1), 6), np.repeat(W[:1], reps, axis=0), A[:1].copy()
    n1, sub = np.zeros((reps, K)), np.zeros((1, K))
    kernels.draw_allocations(X1, W1, A1, rng, lf, n1, sub, True, n1, False)
    tot_first = n1.astype(int)
    r = A[0] * W[0] / (A[0] @ W[0])
    keys, counts = np.unique(tot_first, axis=0, return_counts=True)
    assert (keys.sum(axis=1) == 6).all()
    full = {tuple(k): c for k, c in zip(keys, counts)}
    outcomes = [(a, b, 6 - a - b) for a in range(7) for b in range(7 - a)]
    obs = np.array([full.get(o, 0) for o in outcomes], float)
    exp = multinomial.pmf(np.array(outcomes), 6, r) * reps
    assert _chi2_pvalue(obs, exp) > 1e-4
    # large count entry: means and covariance of Z̃ for X = 250
    big = np.zeros((20_000, K))
    kernels.draw_allocations(np.full((20_000, 1), 250), np.repeat(W[1:], 20_000, axis=0), A1, rng, lf, big,
                             sub, False, sub, False)
    r = A[0] * W[1] / (A[0] @ W[1])
    se = np.sqrt(250 * r * (1 - r) / len(big))
    assert np.all(np.abs(big.mean(axis=0) - 250 * r) < 5 * se)
    cov = 250 * (np.diag(r) - np.outer(r, r))
    np.testing.assert_allclose(np.cov(big.T), cov, rtol=0.06, atol=0.5)
    # the full block: per-sample totals are conserved
    cz = np.ones((N, K))
    kernels.draw_allocations(X, W, A, rng, lf, n, zsum, True, cz, True)
    np.testing.assert_array_equal(n.sum(axis=1), X.sum(axis=1))
    np.testing.assert_array_equal(zsum.sum(axis=1), X.sum(axis=0))
    # the Rao-Blackwellised statistic is added to cz: Σ_j X_ij A_ik W_kj / (AW)_ij
    np.testing.assert_allclose(cz - 1.0, A * ((X / (W @ A.T)).T @ W), rtol=1e-12)


def test_same_generator_state_same_draws():
    """The kernels consume the caller's Generator: equal seeds give equal draws, and the Generator's
    state advances (so the numpy draws that follow differ from a fresh stream)."""
    lf = kernels.log_factorials(500)
    a = kernels.binomial_many(300, 0.2, 1000, np.random.default_rng(9), lf)
    b = kernels.binomial_many(300, 0.2, 1000, np.random.default_rng(9), lf)
    np.testing.assert_array_equal(a, b)
    g = np.random.default_rng(9)
    kernels.binomial_many(300, 0.2, 10, g, lf)
    assert g.random() != np.random.default_rng(9).random()


def test_kappa_tau_draw_has_the_S3_conditional():
    """The compiled (S3) draw has mean m_l and covariance P_l⁻¹ of ``kappa_tau_conditional`` (which
    test_ursm_numerics checks against a grid posterior)."""
    from scdist.ursm.gibbs import kappa_tau_conditional
    from scdist.ursm.params import Theta

    rng = np.random.default_rng(6)
    L, N = 3, 12
    a = rng.dirichlet(np.ones(N), L)
    omega = rng.gamma(2.0, 0.1, (L, N))
    S = rng.random((L, N)) < 0.6
    th = Theta(A=np.ones((N, 1)) / N, alpha=np.ones(1), mu_kappa=-0.7, s2_kappa=0.4, mu_tau=15.0, s2_tau=9.0)
    (p11, p12, p22), m = kappa_tau_conditional(omega, S, a, th)
    reps, calls = 4000, 10                      # each call draws every cell `reps` times
    om_r, S_r, a_r = (np.repeat(x, reps, axis=0) for x in (omega, S, a))
    kappa, tau = np.empty(L * reps), np.empty(L * reps)
    draws = np.empty((calls, 2, L, reps))
    for c in range(calls):
        kernels.kappa_tau_draw(om_r, S_r, a_r, th.mu_kappa, 1 / th.s2_kappa, th.mu_tau, 1 / th.s2_tau,
                               kappa, tau, rng, np.zeros(5), False)
        draws[c, 0], draws[c, 1] = kappa.reshape(L, reps), tau.reshape(L, reps)
    draws = draws.transpose(0, 3, 1, 2).reshape(calls * reps, 2, L)
    reps = calls * reps
    for l in range(L):
        cov = np.linalg.inv(np.array([[p11[l], p12[l]], [p12[l], p22[l]]]))
        se = np.sqrt(np.diag(cov) / reps)
        assert np.all(np.abs(draws[:, :, l].mean(axis=0) - m[:, l]) < 5 * se)
        np.testing.assert_allclose(np.cov(draws[:, :, l].T), cov, rtol=0.05, atol=1e-12)
    # the collapsed μ step's statistics: Σ_l m_l and Σ_l P_l⁻¹ of the same conditionals
    ridge = np.zeros(5)
    kernels.kappa_tau_draw(omega, S, a, th.mu_kappa, 1 / th.s2_kappa, th.mu_tau, 1 / th.s2_tau,
                           np.empty(L), np.empty(L), rng, ridge, True)
    Pinv = sum(np.linalg.inv(np.array([[p11[l], p12[l]], [p12[l], p22[l]]])) for l in range(L))
    np.testing.assert_allclose(ridge, [*m.sum(axis=1), Pinv[0, 0], Pinv[0, 1], Pinv[1, 1]], rtol=1e-10)


def test_impossible_allocation_raises_instead_of_looping():
    """Reads of a gene that no type expresses ((AW)_ij = 0, possible only with eps_A = 0) and a NaN
    probability raise, as numpy's sampler did, rather than spinning in the inversion loop."""
    lf = kernels.log_factorials(10)
    A = np.array([[0.0, 0.0], [1.0, 1.0]])
    with pytest.raises(ValueError, match="eps_A"):
        kernels.draw_allocations(np.array([[3, 1]]), np.array([[0.5, 0.5]]), A, np.random.default_rng(0), lf,
                                 np.zeros((1, 2)), np.zeros((2, 2)), False, np.zeros((2, 2)), False)
    with pytest.raises(ValueError, match="NaN"):
        kernels.binomial_many(5, float("nan"), 1, np.random.default_rng(0), lf)


def test_pg_mean_is_the_polya_gamma_mean():
    """E[ω | ψ] used by the Rao-Blackwellised statistics equals tanh(ψ/2)/(2ψ) (1/4 at 0) to 1e-12,
    across the series / exp switch at |ψ| = 1e-3 and for large |ψ|."""
    x = np.concatenate([[0.0, 1e-300, 1e-9, 9.99e-4, 1e-3, 1.001e-3], np.geomspace(1e-6, 800, 4001)])
    x = np.concatenate([x, -x])
    got = np.array([kernels.pg_mean(v) for v in x])
    with np.errstate(invalid="ignore", divide="ignore"):
        ref = np.where(np.abs(x) < 1e-12, 0.25, np.tanh(x / 2) / (2 * x))
    np.testing.assert_allclose(got, ref, rtol=1e-12)


def test_binomial_from_masses_matches_pmf():
    """The allocations' Bin(n, mk / (mk + mo)) draw, with masses on an arbitrary scale, on both
    branches and with mk > mo (the rarer outcome is drawn and reflected)."""
    rng = np.random.default_rng(13)
    lf = kernels.log_factorials(100_000)
    draws = 100_000
    pvals = []
    for n, p in CASES:
        z = kernels.binomial_mass_many(n, 3.7e-3 * p, 3.7e-3 * (1 - p), draws, rng, lf)
        assert z.min() >= 0 and z.max() <= n
        obs = np.bincount(z, minlength=n + 1).astype(float)
        pvals.append(_chi2_pvalue(obs, binom.pmf(np.arange(n + 1), n, p) * draws))
    assert min(pvals) > 1e-4, dict(zip(CASES, np.round(pvals, 5)))
    assert (kernels.binomial_mass_many(9, 0.0, 1.0, 5, rng, lf) == 0).all()
    assert (kernels.binomial_mass_many(9, 2.0, 0.0, 5, rng, lf) == 9).all()


@pytest.mark.parametrize("want", [False, True])
def test_k3_allocation_kernel_draws_what_the_general_kernel_draws(want):
    """K = 3 has its own kernel (masses in registers); from equal Generator states it must give the
    general kernel's draws and statistics bit for bit."""
    rng = np.random.default_rng(14)
    M, N, K = 30, 50, 3
    A = rng.dirichlet(np.ones(N), K).T
    W = rng.dirichlet([1.0, 2.0, 3.0], M)
    X = rng.poisson(rng.gamma(1.0, 30.0, (M, N))).astype(np.int64)
    lf = kernels.log_factorials(X.max())
    out = []
    for kern in (kernels._allocations_k3, kernels._allocations):
        n, zsum, cz = np.zeros((M, K)), np.zeros((N, K)), np.zeros((N, K))
        g = np.random.default_rng(15)
        kern(X, W, A, g, lf, n, zsum, want, cz, want)
        out.append((n, zsum, cz, g.random()))
    for a, b in zip(*out):
        np.testing.assert_array_equal(a, b)


def test_allocations_for_four_types_are_multinomial():
    """The general kernel (K ≠ 3): mean and covariance of Z̃ for one entry with X = 120, K = 4."""
    rng = np.random.default_rng(16)
    K, reps = 4, 20_000
    A = np.array([[0.1, 0.4, 0.2, 0.3]])
    W = np.array([[0.25, 0.1, 0.4, 0.25]])
    n = np.zeros((reps, K))
    sub = np.zeros((1, K))
    lf = kernels.log_factorials(120)
    kernels.draw_allocations(np.full((reps, 1), 120), np.repeat(W, reps, axis=0), A, rng, lf, n, sub, False, sub,
                             False)
    r = A[0] * W[0] / (A[0] @ W[0])
    np.testing.assert_array_equal(n.sum(axis=1), 120)
    se = np.sqrt(120 * r * (1 - r) / reps)
    assert np.all(np.abs(n.mean(axis=0) - 120 * r) < 5 * se)
    np.testing.assert_allclose(np.cov(n.T), 120 * (np.diag(r) - np.outer(r, r)), rtol=0.06, atol=0.5)
