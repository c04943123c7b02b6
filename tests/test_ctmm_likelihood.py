"""CTMM likelihood kernels against a dense N*C x N*C oracle written here."""
from __future__ import annotations

import numpy as np
import pytest

from scdist.ctmm import covariance as cv
from scdist.ctmm import design as ds
from scdist.ctmm import likelihood as lk
from scdist.ctmm.he import he_fit
from scdist.ctmm.linalg import spd_inverse

N, C, G = 10, 3, 4


def _data(seed=1, with_re=False):
    rng = np.random.default_rng(seed)
    Y = rng.normal(size=(G, N, C))
    NU = rng.uniform(0.1, 0.5, size=(G, N, C))
    mask = np.ones((G, N, C), bool)
    mask[0, 2, 1] = False
    mask[1, 5, :2] = False
    mask[2, 7, :] = False          # a donor with nothing observed
    Z = rng.normal(size=(N, 2))
    batch = rng.integers(0, 3, N) if with_re else None
    return Y, NU, mask, Z, batch


def _problem(model, Y, NU, mask, Z, batch):
    factors = [batch] if batch is not None else None
    lay = ds.make_layout(N, C, factors)
    k = cv.basis(model, C)
    K = ds.covariance_basis(lay, k, factors)
    return ds.Problem(y=lay.to_blocks(Y), nu=lay.to_blocks(NU, 1.0), mask=lay.to_blocks(mask, False),
                      X=ds.fixed_design(lay, Z), K=K, n_vc=len(k))


class Dense:
    """Brute-force CTMM for one gene: the full N*C covariance, observed entries only."""

    def __init__(self, model, y, nu, obs, Z, batch):
        self.model, self.obs = model, obs.ravel()
        self.N, self.C = n, c = y.shape
        self.X = np.concatenate([np.tile(np.eye(c), (n, 1)), np.repeat(Z, c, axis=0)], 1)[self.obs]
        self.y = y.ravel()[self.obs]
        self.nu = nu.ravel()
        self.batch = batch
        self.nk = cv.n_params(model, c)

    def sigma(self, t):
        n, c = self.N, self.C
        hom2, V = cv.unpack(self.model, t[:self.nk], c)
        S = np.kron(np.eye(n), hom2 * np.ones((c, c)) + V) + np.diag(self.nu)
        if self.batch is not None:
            S = S + t[-1] * np.kron((self.batch[:, None] == self.batch[None]).astype(float), np.ones((c, c)))
        return S[np.ix_(self.obs, self.obs)]

    def loglik(self, t, method):
        S = self.sigma(t)
        W = np.linalg.inv(S)
        H = self.X.T @ W @ self.X
        n, p = len(self.y), self.X.shape[1]
        b = np.linalg.solve(H, self.X.T @ W @ self.y)
        r = self.y - self.X @ b
        if method == "reml":
            return -0.5 * ((n - p) * np.log(2 * np.pi) + np.linalg.slogdet(S)[1]
                           + np.linalg.slogdet(H)[1] + r @ W @ r)
        return -0.5 * (n * np.log(2 * np.pi) + np.linalg.slogdet(S)[1] + r @ W @ r)

    def basis(self, K):
        return [self.sigma(np.eye(K)[j]) - self.sigma(np.zeros(K)) for j in range(K)]

    def P(self, t, method):
        W = np.linalg.inv(self.sigma(t))
        if method == "ml":
            return W
        return W - W @ self.X @ np.linalg.solve(self.X.T @ W @ self.X, self.X.T @ W)


@pytest.mark.parametrize("with_re", [False, True])
@pytest.mark.parametrize("model", ["hom", "iid", "free", "full"])
def test_loglik_gradient_ai_fisher_match_dense_oracle(model, with_re):
    Y, NU, mask, Z, batch = _data(with_re=with_re)
    prob = _problem(model, Y, NU, mask, Z, batch)
    K = prob.K.shape[0]
    rng = np.random.default_rng(3)
    th = np.abs(rng.normal(size=(G, K))) * 0.3
    if model == "full":
        r, c = np.tril_indices(C)
        th[:, :len(r)] = np.where(r == c, 0.5, 0.1)
    for method in ("ml", "reml"):
        st = lk.evaluate(prob, th, method)
        F = lk.fisher(prob, st, method)
        for g in range(G):
            d = Dense(model, Y[g], NU[g], mask[g], Z, batch)
            t = th[g]
            assert st.loglik[g] == pytest.approx(d.loglik(t, method), abs=1e-9)
            eps = 1e-6
            fd = [(d.loglik(t + eps * e, method) - d.loglik(t - eps * e, method)) / (2 * eps)
                  for e in np.eye(K)]
            np.testing.assert_allclose(st.grad[g], fd, atol=1e-5, rtol=1e-6)
            Ks = d.basis(K)
            P = d.P(t, method)
            Fd = 0.5 * np.array([[np.trace(P @ a @ P @ b) for b in Ks] for a in Ks])
            np.testing.assert_allclose(F[g], Fd, atol=1e-9)
            Py = d.P(t, "reml") @ d.y if method == "reml" else np.linalg.inv(d.sigma(t)) @ (
                d.y - d.X @ np.linalg.solve(d.X.T @ np.linalg.solve(d.sigma(t), d.X),
                                            d.X.T @ np.linalg.solve(d.sigma(t), d.y)))
            AId = 0.5 * np.array([[Py @ a @ P @ b @ Py for b in Ks] for a in Ks])
            np.testing.assert_allclose(st.ai[g], AId, atol=1e-9)


def test_ml_reml_relation_and_shared_gls_beta():
    """l_REML = l_ML - 1/2 log|X'S^-1 X| + p/2 log 2pi at the same theta; same GLS beta."""
    Y, NU, mask, Z, _ = _data(seed=4)
    prob = _problem("free", Y, NU, mask, Z, None)
    th = np.full((G, C + 1), 0.2)
    ml = lk.evaluate(prob, th, "ml")
    reml = lk.evaluate(prob, th, "reml")
    p = prob.X.shape[-1]
    logdetH = -np.linalg.slogdet(ml.Hinv)[1]
    np.testing.assert_allclose(reml.loglik, ml.loglik - 0.5 * logdetH + 0.5 * p * np.log(2 * np.pi))
    np.testing.assert_allclose(reml.beta, ml.beta)


def test_not_positive_definite_is_infeasible_not_nan():
    Y, NU, mask, Z, _ = _data()
    prob = _problem("free", Y, NU, mask, Z, None)
    th = np.full((G, C + 1), 0.2)
    th[1, 1] = -5.0                     # V_11 far below -nu: Sigma not PD
    st = lk.evaluate(prob, th, "reml")
    assert not st.ok[1] and st.loglik[1] == -np.inf
    assert st.ok[[0, 2, 3]].all() and np.isfinite(st.loglik[[0, 2, 3]]).all()


@pytest.mark.parametrize("m", [3, 4, 12])
def test_spd_inverse_matches_numpy_and_flags_indefinite(m):
    rng = np.random.default_rng(m)
    A = rng.normal(size=(7, 5, m, m))
    A = A @ np.swapaxes(A, -1, -2) + np.eye(m)
    A[2, 3] = -np.eye(m)
    W, logdet, ok = spd_inverse(A)
    assert ok.sum() == 34 and not ok[2, 3]
    np.testing.assert_allclose(W[ok], np.linalg.inv(A[ok]), atol=1e-10)
    np.testing.assert_allclose(logdet[ok], np.linalg.slogdet(A[ok])[1], atol=1e-10)


@pytest.mark.parametrize("model", ["hom", "free", "full"])
def test_he_equals_dense_moment_regression(model):
    """HE = OLS of vec(e e' - M D M) on vec(M K_k M), M the OLS residual maker (observed)."""
    Y, NU, mask, Z, _ = _data(seed=7)
    prob = _problem(model, Y, NU, mask, Z, None)
    theta, _ = he_fit(prob)
    K = prob.K.shape[0]
    for g in range(G):
        d = Dense(model, Y[g], NU[g], mask[g], Z, None)
        X = d.X
        M = np.eye(len(d.y)) - X @ np.linalg.solve(X.T @ X, X.T)
        e = M @ d.y
        D = np.diag(d.nu[d.obs])
        Ks = d.basis(K)
        A = np.stack([(M @ k @ M).ravel() for k in Ks], axis=1)
        t = (np.outer(e, e) - M @ D @ M).ravel()
        np.testing.assert_allclose(theta[g], np.linalg.lstsq(A, t, rcond=None)[0], atol=1e-8)


@pytest.mark.parametrize("model,specialised", [("hom", False), ("free", False), ("full", False),
                                              ("free", True)])
def test_compiled_kernel_equals_numpy_on_selected_and_leave_one_out_rows(model, specialised,
                                                                          monkeypatch):
    """The compiled kernel (default for a shared basis; run-time sizes, or compiled for the
    exact sizes for large calls) against the numpy version it replaced, on row subsets
    (``rows=``) and on rows that share data with a donor left out (the jackknife's
    ``src``/``drop`` rows) against their materialised masked copies."""
    from scdist.ctmm import blockkernel

    monkeypatch.setattr(blockkernel, "SPECIALISE_MIN", 0 if specialised else 10 ** 12)
    # sizes this process already has a specialised version of would run it anyway
    monkeypatch.setattr(blockkernel, "_SPECIALISED", set())
    Y, NU, mask, Z, _ = _data(seed=11)
    prob = _problem(model, Y, NU, mask, Z, None)
    K = prob.K.shape[0]
    rng = np.random.default_rng(5)
    loo = ds.Problem(y=prob.y, nu=prob.nu, mask=prob.mask, X=prob.X, K=prob.K, n_vc=prob.n_vc,
                     src=np.repeat(np.arange(G), N), drop=np.tile(np.arange(N), G))
    th = np.abs(rng.normal(size=(G * N, K))) * 0.3
    if model == "full":
        r, c = np.tril_indices(C)
        th[:, :len(r)] = np.where(r == c, 0.5, 0.1) * rng.uniform(0.5, 1.5, (G * N, 1))
    rows = rng.choice(G * N, 25, replace=False)
    for method in ("ml", "reml"):
        a = lk.evaluate(loo, th[rows], method, rows=rows)
        b = lk.evaluate(loo.dense().take(rows), th[rows], method, compiled=False)
        for name in ("loglik", "grad", "ai", "beta", "Hinv", "rcmin"):
            np.testing.assert_allclose(getattr(a, name), getattr(b, name), rtol=1e-9, atol=1e-10)
        np.testing.assert_array_equal(a.ok, b.ok)
        np.testing.assert_allclose(lk.fisher(loo.take(rows), a, method),
                                   lk.fisher(loo.dense().take(rows), b, method), rtol=1e-9)


@pytest.mark.parametrize("covariates", [False, True])
def test_free_closed_forms_equal_the_generic_compiled_loops(covariates):
    """Free's closed forms (Sherman-Morrison block inverse, AI and Fisher terms of J and
    e_c e_c') against the generic compiled loops on the same rows, ML and REML, with missing
    pairs, a donor with nothing observed, leave-one-out rows, with and without donor
    covariates (X_b = I or not), and rows whose blocks are near the edge (the Cholesky
    fallback): equal to rounding, the same rows positive definite."""
    from scdist.ctmm import blockkernel as bk

    Y, NU, mask, Z, _ = _data(seed=13)
    prob = _problem("free", Y, NU, mask, Z if covariates else None, None)
    assert bk.is_free_basis(prob.K)
    for model in ("hom", "iid", "full"):
        assert not bk.is_free_basis(_problem(model, Y, NU, mask, None, None).K)
    rng = np.random.default_rng(2)
    th = np.abs(rng.normal(size=(G * N, C + 1))) * 0.3
    th[::3, 1] = -0.02              # negative V entries, total still positive definite
    th[1::5, 2] = -0.1              # d = V + nu close to 0 for some donors: Cholesky fallback
    th[2::7, 0] = -0.05             # negative sigma_alpha^2
    y, nu, mk, X, Kb, full = prob.contiguous
    src, drop = np.repeat(np.arange(G), N), np.tile(np.arange(N), G)
    drop[::4] = -1
    d = np.where(mk[src], th[:, None, 1:] + nu[src], np.inf).min(axis=2)     # (rows, blocks)
    small = d <= bk.SM_MIN * np.abs(th[:, :1])
    assert small.any() and (~small).any()            # both inverse paths run
    for reml in (False, True):
        a, b = (bk.evaluate_shared(y, nu, mk, X, Kb, th, src, drop, full, reml, True, True, lk.RCOND,
                                   want_fisher=True, free=f) for f in (True, False))
        assert a["ok"].sum() > 0.9 * len(th)
        np.testing.assert_array_equal(a["ok"], b["ok"])
        for name in ("ll", "beta", "Hinv", "rcmin", "ai", "fisher"):
            np.testing.assert_allclose(a[name], b[name], rtol=1e-10, atol=1e-12, err_msg=name)
        scale = np.abs(b["grad"]).max(axis=1, keepdims=True) + 1e-300
        np.testing.assert_allclose(a["grad"] / scale, b["grad"] / scale, atol=1e-10)
    with pytest.raises(ValueError, match="Free"):
        hom = _problem("hom", Y, NU, mask, None, None)
        bk.evaluate_shared(y, nu, mk, X, np.ascontiguousarray(hom.K), th[:, :1], src, drop, full,
                           True, True, True, lk.RCOND, free=True)


def _op_problem(model, seed=4):
    """OP (one scalar per donor, Eq 2) problem with donor covariates and missing donors."""
    rng = np.random.default_rng(seed)
    P = rng.dirichlet(np.full(C, 2.0), size=N)
    Y = rng.normal(size=(G, N, 1))
    NU = rng.uniform(0.05, 0.3, size=(G, N, 1))
    mask = np.ones((G, N, 1), bool)
    mask[0, 3] = False
    mask[2, [1, 6]] = False
    Z = rng.normal(size=(N, 1))
    lay = ds.make_layout(N, 1, None)
    k = cv.basis(model, C)
    return ds.Problem(y=lay.to_blocks(np.where(mask, Y, 0.0)), nu=lay.to_blocks(np.where(mask, NU, 1.0)),
                      mask=lay.to_blocks(mask, False), X=ds.fixed_design(lay, Z, P),
                      K=ds.covariance_basis(lay, k, None, P), n_vc=len(k)), P


@pytest.mark.parametrize("model", ["hom", "free", "full"])
def test_op_scalar_kernel_equals_numpy_with_left_out_donors(model):
    """OP's scalar-variance kernel (sigma_i^2 = sum_k theta_k P_i' k_k P_i + nu_i) against the
    numpy block formulas on leave-one-out rows (``src``/``drop``) with missing donors and a
    covariate, ML and REML: log-likelihood, GLS beta, (X'WX)^-1, gradient (also against
    finite differences), AI and Fisher; rows with a non-positive variance at an observed
    donor are infeasible in both (one at a left-out donor is not)."""
    prob, P = _op_problem(model)
    assert prob.scalar is not None
    K = prob.K.shape[0]
    loo = ds.Problem(y=prob.y, nu=prob.nu, mask=prob.mask, X=prob.X, K=prob.K, n_vc=prob.n_vc,
                     src=np.repeat(np.arange(G), N), drop=np.tile(np.arange(N), G))
    rng = np.random.default_rng(8)
    th = np.abs(rng.normal(size=(G * N, K))) * 0.3
    if model == "full":
        r, c = np.tril_indices(C)
        th[:, :len(r)] = np.where(r == c, 0.4, 0.05) * rng.uniform(0.5, 1.5, (G * N, 1))
    # a variance component so negative that some donors' sigma_i^2 < 0: infeasible, unless
    # the only such donor is the one left out
    kk = prob.K[:, :, 0, 0]                                      # (K, N)
    th[5] = -1.0 / kk[-1].max() * np.eye(K)[-1] * 10 + th[5]
    var5 = th[5] @ kk + prob.nu[0, :, 0]
    assert (var5 <= 0).any()
    rows = np.concatenate([[5], rng.choice(G * N, 30, replace=False)])
    for method in ("ml", "reml"):
        a = lk.evaluate(loo, th[rows], method, rows=rows)
        b = lk.evaluate(loo.dense().take(rows), th[rows], method, compiled=False)
        np.testing.assert_array_equal(a.ok, b.ok)
        assert not a.ok[0] and a.ok.sum() >= 25
        assert a.loglik[0] == b.loglik[0] == -np.inf
        ok = a.ok
        for name in ("loglik", "grad", "ai", "beta", "Hinv"):
            np.testing.assert_allclose(getattr(a, name)[ok], getattr(b, name)[ok], rtol=1e-9,
                                       atol=1e-10, err_msg=name)
        np.testing.assert_allclose(lk.fisher_at(loo, th[rows], method, rows=rows)[ok],
                                   lk.fisher(loo.dense().take(rows), b, method)[ok], rtol=1e-9,
                                   atol=1e-10)
        okr = np.flatnonzero(a.ok)[:5]
        eps = 1e-6
        for j in range(K):
            e = eps * np.eye(K)[j]
            up = lk.evaluate(loo, th[rows[okr]] + e, method, rows=rows[okr], grad=False, ai=False)
            dn = lk.evaluate(loo, th[rows[okr]] - e, method, rows=rows[okr], grad=False, ai=False)
            np.testing.assert_allclose(a.grad[okr, j], (up.loglik - dn.loglik) / (2 * eps),
                                       rtol=1e-5, atol=1e-6)


def test_ols_beta_equals_he_fits_ols_beta_on_leave_one_out_rows():
    """``he.ols_beta`` (the HE GLS-beta fallback's OLS beta, one X'D_mX per row) equals the
    OLS beta of the full :func:`he_fit` on leave-one-out rows with missing pairs, a covariate
    and a row whose X'D_mX is singular (a cell type never observed)."""
    from scdist.ctmm.he import ols_beta

    Y, NU, mask, Z, _ = _data(seed=6)
    mask[3, :, 0] = False
    prob = _problem("free", Y, NU, mask, Z, None)
    loo = ds.Problem(y=prob.y, nu=prob.nu, mask=prob.mask, X=prob.X, K=prob.K, n_vc=prob.n_vc,
                     src=np.repeat(np.arange(G), N), drop=np.tile(np.arange(N), G))
    theta, b_he = he_fit(loo)
    assert np.isnan(theta[3 * N:4 * N]).all() and np.isfinite(theta[:3 * N]).all()
    np.testing.assert_allclose(ols_beta(loo), b_he, rtol=1e-10, atol=1e-12)
