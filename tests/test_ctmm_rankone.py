"""The closed-form Hom kernel (scdist/ctmm/rankone.py) against the numpy likelihood."""
from __future__ import annotations

import numpy as np
import pytest

from scdist.ctmm import blockkernel
from scdist.ctmm import covariance as cv
from scdist.ctmm import design as ds
from scdist.ctmm import likelihood as lk

N, C, G = 12, 4, 6


def _hom_problem(covariates: bool, op: bool, seed: int = 3):
    rng = np.random.default_rng(seed)
    Y = rng.normal(size=(G, N, C)) + np.arange(C)
    NU = rng.uniform(0.05, 0.6, size=(G, N, C))
    mask = np.ones((G, N, C), bool)
    mask[0, 2, 1] = False
    mask[1, 5, :2] = False
    mask[2, 7, :] = False                       # a donor with nothing observed
    Z = rng.normal(size=(N, 2)) if covariates else None
    P = rng.dirichlet(np.ones(C), size=N) if op else None
    if op:
        Y, NU, mask = Y[..., :1], NU[..., :1], mask[..., :1]
    lay = ds.make_layout(N, 1 if op else C, None)
    K = ds.covariance_basis(lay, cv.basis("hom", C), None, P)
    return ds.Problem(y=lay.to_blocks(Y), nu=lay.to_blocks(NU, 1.0),
                      mask=lay.to_blocks(mask, False), X=ds.fixed_design(lay, Z, P), K=K, n_vc=1)


@pytest.mark.parametrize("covariates,op", [(False, False), (True, False), (False, True),
                                           (True, True)])
def test_rank_one_kernel_equals_numpy(covariates, op):
    """Log-likelihood, gradient, AI, GLS beta and its covariance, condition proxy and the PD
    flag of the closed form equal the numpy kernel's (Cholesky per donor block) to 1e-9, for
    ML and REML, positive and negative sigma_alpha^2 down to (and past) the PD boundary, on
    row subsets, with missing pairs and a donor without data."""
    prob = _hom_problem(covariates, op)
    assert prob.rank_one is not None
    rng = np.random.default_rng(1)
    rows = np.concatenate([np.arange(G), rng.integers(0, G, 14)])
    # the largest admissible negative h is -1 / max_b a_b per row: sample around it too
    a_max = prob.rank_one.a.max(axis=1)[rows]
    h = np.concatenate([rng.uniform(0.0, 2.0, G), -rng.uniform(0.1, 1.3, 14) / a_max[G:]])
    th = h[:, None]
    for method in ("ml", "reml"):
        a = lk.evaluate(prob, th, method, rows=rows)
        b = lk.evaluate(prob.take(rows), th, method, compiled=False)
        np.testing.assert_array_equal(a.ok, b.ok)
        assert a.ok.sum() >= G + 3 and (~a.ok).sum() >= 3       # both sides of the boundary
        ok = a.ok
        for name in ("loglik", "grad", "ai", "beta", "Hinv"):
            np.testing.assert_allclose(getattr(a, name)[ok], getattr(b, name)[ok], rtol=1e-9,
                                       atol=1e-10, err_msg=name)
        # the condition proxy against the general compiled kernel (numpy's per-block-basis
        # path does not compute it)
        y, nu, mask, X, Kb, full = prob.contiguous
        c = blockkernel.evaluate_shared(y, nu, mask, X, Kb, th, rows, None, full,
                                        method == "reml", True, True, lk.RCOND)
        np.testing.assert_array_equal(a.ok, c["ok"])
        for name, key in (("rcmin", "rcmin"), ("loglik", "ll"), ("grad", "grad"), ("ai", "ai")):
            np.testing.assert_allclose(getattr(a, name)[ok], c[key][ok], rtol=1e-9, atol=1e-10,
                                       err_msg=name)
        assert np.all(a.loglik[~ok] == -np.inf)


def test_rank_one_only_where_it_applies():
    """Free, Full, extra random effects and jackknife rows keep the general kernels."""
    prob = _hom_problem(False, False)
    lay = ds.make_layout(N, C, None)
    for model in ("iid", "free", "full"):
        free = ds.Problem(y=prob.y, nu=prob.nu, mask=prob.mask, X=prob.X,
                          K=ds.covariance_basis(lay, cv.basis(model, C), None),
                          n_vc=cv.n_params(model, C))
        assert free.rank_one is None
    loo = ds.Problem(y=prob.y, nu=prob.nu, mask=prob.mask, X=prob.X, K=prob.K, n_vc=1,
                     src=np.repeat(np.arange(G), N), drop=np.tile(np.arange(N), G))
    assert loo.rank_one is None
    codes = np.arange(N) % 3
    lay_re = ds.make_layout(N, C, [codes])
    Y = np.random.default_rng(0).normal(size=(G, N, C))
    re = ds.Problem(y=lay_re.to_blocks(Y), nu=lay_re.to_blocks(np.full((G, N, C), 0.3), 1.0),
                    mask=lay_re.to_blocks(np.ones((G, N, C), bool), False),
                    X=ds.fixed_design(lay_re, None),
                    K=ds.covariance_basis(lay_re, cv.basis("hom", C), [codes]), n_vc=1)
    assert re.rank_one is None
    # a zero noise variance has no D^-1: the general kernel handles it
    nu0 = prob.nu.copy()
    nu0[0, 0, 0] = 0.0
    zero = ds.Problem(y=prob.y, nu=nu0, mask=prob.mask, X=prob.X, K=prob.K, n_vc=1)
    assert zero.rank_one is None and prob.rank_one is not None


@pytest.mark.parametrize("covariates", [False, True])
def test_compiled_fisher_equals_numpy_for_op_free(covariates):
    """The compiled kernel's Fisher information with a basis per donor block (OP: P_i' k P_i)
    equals the numpy trace formula, ML and REML (the CTP case is in test_ctmm_likelihood)."""
    hom = _hom_problem(covariates, op=True)
    rng = np.random.default_rng(4)
    P = rng.dirichlet(np.ones(C), size=N)
    lay = ds.make_layout(N, 1, None)
    K = ds.covariance_basis(lay, cv.basis("free", C), None, P)
    prob = ds.Problem(y=hom.y, nu=hom.nu, mask=hom.mask, X=hom.X, K=K, n_vc=C + 1)
    th = np.abs(rng.normal(size=(G, C + 1))) * 0.3
    for method in ("ml", "reml"):
        a = lk.fisher_at(prob, th, method)
        st = lk.evaluate(prob, th, method, grad=False, ai=False, compiled=False)
        np.testing.assert_allclose(a, lk.fisher(prob, st, method), rtol=1e-9, atol=1e-12)
