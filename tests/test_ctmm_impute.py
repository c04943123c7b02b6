"""softImpute of missing donor x cell type pseudobulk (scdist.ctmm.impute)."""
from __future__ import annotations

import numpy as np
import pytest

from scdist.ctmm.impute import fix_negative_nu, op_nu, soft_impute, soft_impute_ctp
from scdist.errors import InputError


def _pair_mask(rng, N, C, G, frac=0.1):
    """Missing (donor, celltype) pairs, the same for every gene (as when a pair has too few
    cells); every cell type keeps most donors."""
    pairs = rng.random((N, C)) < frac
    return np.broadcast_to(pairs[:, :, None], (N, C, G)).copy()


def test_recovers_low_rank_per_gene():
    rng = np.random.default_rng(1)
    G, N, C = 40, 60, 4
    X = rng.normal(size=(G, N, 1)) @ rng.normal(2.0, 1.0, size=(G, 1, C)) + 5.0
    X += 0.02 * rng.normal(size=X.shape)
    miss = rng.random(X.shape) < 0.12
    M = np.where(miss, np.nan, X)
    Z, lam = soft_impute(M, n_folds=5, seed=3)
    assert lam.shape == (G,) and np.all(lam > 0)
    np.testing.assert_array_equal(Z[~miss], X[~miss])          # observed entries untouched
    err = np.sqrt(np.mean((Z - X)[miss] ** 2))
    colmean = np.where(miss, np.nanmean(M, axis=1, keepdims=True), X)
    base = np.sqrt(np.mean((colmean - X)[miss] ** 2))
    assert err < 0.15 * base, (err, base)


def test_recovers_low_rank_transcriptome_wide():
    rng = np.random.default_rng(2)
    N, C, G = 50, 4, 60
    # rank-3 structure shared across genes: donor factors x (celltype, gene) loadings
    A = rng.normal(size=(N, 3))
    Bm = rng.normal(size=(3, C, G))
    mean = np.einsum("ik,kcg->icg", A, Bm) + 0.05 * rng.normal(size=(N, C, G))
    nu = np.exp(0.3 * np.einsum("ik,kcg->icg", A[:, :1], Bm[:1])) * 0.1
    miss = _pair_mask(rng, N, C, G)
    res = soft_impute_ctp(np.where(miss, np.nan, mean), np.where(miss, np.nan, nu),
                          scope="transcriptome", n_folds=5, seed=0)
    assert res.mean.shape == mean.shape and res.lambda_mean.shape == ()
    np.testing.assert_array_equal(res.mean[~miss], mean[~miss])
    err = np.sqrt(np.mean((res.mean - mean)[miss] ** 2))
    base = np.sqrt(np.mean((mean - np.nanmean(np.where(miss, np.nan, mean), 0))[miss] ** 2))
    assert err < 0.2 * base, (err, base)
    # per-gene scope cannot borrow donor structure across genes as well, but must still beat
    # the column mean on this data
    res_g = soft_impute_ctp(np.where(miss, np.nan, mean), np.where(miss, np.nan, nu),
                            scope="gene", n_folds=5, seed=0)
    assert res_g.lambda_mean.shape == (G,)
    err_g = np.sqrt(np.mean((res_g.mean - mean)[miss] ** 2))
    assert err < err_g < base


def test_pure_noise_imputes_close_to_column_means():
    """With no low-rank signal, cross-validation must pick a large lambda: the imputed values
    are then (nearly) the observed column means, not overfitted noise."""
    rng = np.random.default_rng(3)
    X = rng.normal(size=(30, 80, 4)) + np.array([1.0, 2.0, 3.0, 4.0])
    miss = rng.random(X.shape) < 0.1
    M = np.where(miss, np.nan, X)
    Z, _ = soft_impute(M, n_folds=5)
    colmean = np.broadcast_to(np.nanmean(M, axis=1, keepdims=True), X.shape)
    assert np.sqrt(np.mean((Z - colmean)[miss] ** 2)) < 0.35
    # and it does no worse than the column mean on the truth
    assert np.mean((Z - X)[miss] ** 2) < 1.1 * np.mean((colmean - X)[miss] ** 2)


def test_negative_nu_rules_ctp_and_op():
    raw = np.array([[[0.2, 0.5], [0.1, np.nan]],
                    [[np.nan, 0.4], [0.3, 0.7]],
                    [[0.6, np.nan], [np.nan, 0.2]]])          # (donor=3, celltype=2, gene=2)
    imputed = np.where(np.isnan(raw), -0.05, raw)
    imputed[1, 0, 0] = 0.25                                  # a positive imputed value stays
    ctp = fix_negative_nu(imputed, raw, target="ctp")
    op = fix_negative_nu(imputed, raw, target="op")
    # CTP: negative -> largest raw nu of that gene and cell type
    assert ctp[1, 0, 0] == 0.25
    assert ctp[0, 1, 1] == 0.7          # celltype 1, gene 1: raw {nan, 0.7, 0.2}
    assert ctp[2, 0, 1] == 0.5          # celltype 0, gene 1: raw {0.5, 0.4, nan}
    assert ctp[2, 1, 0] == 0.3          # celltype 1, gene 0: raw {0.1, 0.3, nan}
    # OP: negative -> 0
    assert op[0, 1, 1] == 0 and op[2, 0, 1] == 0 and op[2, 1, 0] == 0 and op[1, 0, 0] == 0.25
    np.testing.assert_array_equal(ctp[~np.isnan(raw)], raw[~np.isnan(raw)])
    P = np.array([[0.5, 0.5], [0.25, 0.75], [0.9, 0.1]])
    np.testing.assert_allclose(op_nu(op, P)[:, 0],
                               (P ** 2 * op[:, :, 0]).sum(1))


def test_soft_impute_ctp_applies_rules_to_imputed_nu():
    """nu = |rank-1 signal| near zero: the linear low-rank fit extrapolates some missing pairs
    below zero (what the paper's rules are for)."""
    rng = np.random.default_rng(5)
    N, C, G = 40, 3, 25
    z, w = rng.normal(size=(N, 1, G)), rng.normal(size=(1, C, G))
    nu = 0.01 * np.abs(1 + 1.5 * z * w) + 1e-4
    mean = rng.normal(size=(N, C, G))
    miss = _pair_mask(rng, N, C, G, frac=0.15)
    nu_raw = np.where(miss, np.nan, nu)
    res = soft_impute_ctp(np.where(miss, np.nan, mean), nu_raw, scope="gene", n_folds=3)
    raw_max = np.nanmax(nu_raw, axis=0)
    assert (res.nu >= 0).all() and (res.nu_op >= 0).all()
    zeroed = miss & (res.nu_op == 0)
    assert zeroed.any()                     # the case this test is about did occur
    # wherever OP set a negative to 0, CTP used that gene x cell type's largest raw value
    np.testing.assert_array_equal(res.nu[zeroed],
                                  np.broadcast_to(raw_max, nu.shape)[zeroed])
    np.testing.assert_array_equal(res.nu[~miss], nu[~miss])


def test_bad_input_names_the_field():
    X = np.ones((5, 3, 2))
    X[:, 1, 0] = np.nan                                        # a cell type never observed
    with pytest.raises(InputError, match=r"\[mean/nu\]"):
        soft_impute_ctp(X, np.abs(X))
    with pytest.raises(InputError, match=r"\[nu\]"):
        soft_impute_ctp(np.ones((5, 3, 2)), np.ones((5, 3, 3)))
    with pytest.raises(InputError, match=r"\[scope\]"):
        soft_impute_ctp(np.ones((5, 3, 2)), np.ones((5, 3, 2)), scope="genes")
    with pytest.raises(InputError, match=r"\[nu\]"):
        soft_impute_ctp(np.ones((5, 3, 2)), -np.ones((5, 3, 2)))
