"""The pseudobulk kernel against a direct dense numpy computation of CTMM's definitions."""
from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from scdist.errors import InputError
from scdist.pseudobulk import kernel as K


def _toy(seed=0, n_cells=700, n_genes=23, n_donors=6, n_celltypes=4):
    rng = np.random.default_rng(seed)
    # Unequal pair sizes so some pairs fall under min_cells, one pair has exactly one cell
    # and one donor lacks a cell type altogether.
    donor = np.sort(rng.integers(0, n_donors, n_cells))
    celltype = rng.choice(n_celltypes, n_cells, p=[0.55, 0.3, 0.13, 0.02])
    celltype[(donor == 2) & (celltype == 3)] = 0
    idx = np.flatnonzero(donor == 2)[0]
    celltype[idx] = 3  # pair (2, 3) has exactly one cell
    mu = rng.gamma(0.6, 3.0, size=(n_celltypes, n_genes))
    lam = mu[celltype] * rng.lognormal(0, 0.5, size=(n_cells, 1))
    counts = rng.poisson(lam).astype(np.int64)
    counts[5] = 0  # a cell with no counts at all
    return sp.csr_matrix(counts), donor, celltype, n_donors, n_celltypes


def _dense_reference(counts, donor, celltype, D, C, min_cells):
    """CTMM Eqs 1-3 written out cell by cell (only for the test: loops over pairs)."""
    x = counts.toarray().astype(float)
    lib = x.sum(1, keepdims=True)
    y = np.log1p(np.divide(1e4 * x, lib, out=np.zeros_like(x), where=lib > 0))
    G = x.shape[1]
    n = np.zeros((D, C), int)
    mean = np.full((D, C, G), np.nan)
    var = np.full((D, C, G), np.nan)
    sig_all = np.zeros((D, C, G))
    raw = np.zeros((D, C, G), np.int64)
    for i in range(D):
        for c in range(C):
            sel = (donor == i) & (celltype == c)
            n[i, c] = sel.sum()
            raw[i, c] = counts.toarray()[sel].sum(0)
            if n[i, c] >= 2:
                sig_all[i, c] = y[sel].var(axis=0, ddof=1)
            if n[i, c] > min_cells and n[i, c] >= 2:
                mean[i, c] = y[sel].mean(0)
                var[i, c] = y[sel].var(axis=0, ddof=1)
    n_i = n.sum(1)
    P = n / n_i[:, None]
    op_mean = np.stack([y[donor == i].mean(0) for i in range(D)])
    op_nu = np.einsum("dc,dcg->dg", n / n_i[:, None] ** 2, sig_all)
    return dict(n=n, mean=mean, var=var, nu=var / n[..., None], raw=raw, P=P,
                op_mean=op_mean, op_nu=op_nu)


def _check(cube, ref, min_cells):
    np.testing.assert_array_equal(cube.n_cells, ref["n"])
    np.testing.assert_array_equal(cube.observed, ref["n"] > min_cells)
    np.testing.assert_array_equal(cube.counts, ref["raw"])
    for name in ("mean", "var", "nu"):
        np.testing.assert_allclose(getattr(cube, name), ref[name], rtol=1e-10, atol=1e-12,
                                   equal_nan=True, err_msg=name)
    np.testing.assert_allclose(cube.P, ref["P"], rtol=1e-12)
    np.testing.assert_allclose(cube.op_mean, ref["op_mean"], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(cube.op_nu, ref["op_nu"], rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("min_cells", [10, 1, 30])
def test_single_chunk_matches_dense(min_cells):
    counts, donor, ct, D, C = _toy()
    cube = K.finalize(K.chunk_stats(counts, donor, ct, C), D, C, min_cells=min_cells)
    ref = _dense_reference(counts, donor, ct, D, C, min_cells)
    assert (~cube.observed).any() and cube.observed.any()
    _check(cube, ref, min_cells)


@pytest.mark.parametrize("bounds", [[0, 7, 8, 300, 301, 700], [0, 350, 700],
                                    [0, 1, 2, 3, 699, 700]])
def test_chunks_splitting_donors_match_dense(bounds):
    counts, donor, ct, D, C = _toy(seed=1)
    parts = [K.chunk_stats(counts[a:b], donor[a:b], ct[a:b], C)
             for a, b in zip(bounds[:-1], bounds[1:])]
    # A lopsided tree and a reversed order must agree with one pass.
    left = K.combine_all(parts)
    right = K.combine_all(parts[::-1])
    ref = _dense_reference(counts, donor, ct, D, C, 10)
    _check(K.finalize(left, D, C), ref, 10)
    _check(K.finalize(right, D, C), ref, 10)


def test_combine_with_empty_is_identity_and_gene_slice():
    counts, donor, ct, D, C = _toy(seed=2)
    p = K.chunk_stats(counts, donor, ct, C)
    q = K.combine(K.empty(counts.shape[1]), p)
    np.testing.assert_array_equal(q.groups, p.groups)
    np.testing.assert_allclose(q.m2, p.m2)
    s = p.gene_slice(3, 9)
    full = K.finalize(p, D, C)
    part = K.finalize(s, D, C)
    np.testing.assert_allclose(part.mean, full.mean[..., 3:9], equal_nan=True)
    np.testing.assert_allclose(part.op_nu, full.op_nu[:, 3:9])


def test_variance_unbiased_and_stable():
    """sigma2_ic averages to the true within-pair variance; large offsets do not cancel."""
    rng = np.random.default_rng(3)
    n_rep, n = 4000, 12
    true_var = 0.7
    vals = rng.normal(1e6, np.sqrt(true_var), size=(n_rep * n, 1))  # offset 1e6
    donor = np.repeat(np.arange(n_rep), n)
    ct = np.zeros(n_rep * n, int)
    # Values passed as a layer so normalisation does not touch them; split in 3 chunks.
    x = sp.csr_matrix(vals)
    counts = sp.csr_matrix(np.ones_like(vals, dtype=np.int64))
    cuts = [0, 5, n_rep * n // 2 + 3, n_rep * n]
    parts = [K.chunk_stats(counts[a:b], donor[a:b], ct[a:b], 1, values=x[a:b])
             for a, b in zip(cuts[:-1], cuts[1:])]
    cube = K.finalize(K.combine_all(parts), n_rep, 1, min_cells=1)
    est = cube.var[:, 0, 0]
    ref = vals.reshape(n_rep, n).var(axis=1, ddof=1)
    np.testing.assert_allclose(est, ref, rtol=1e-7)
    # Mean of unbiased estimates within 4 standard errors of the truth.
    se = true_var * np.sqrt(2 / (n - 1)) / np.sqrt(n_rep)
    assert abs(est.mean() - true_var) < 4 * se


def test_normalizations_and_errors():
    counts = sp.csr_matrix(np.array([[1, 3, 0], [0, 0, 0], [2, 0, 2]]))
    y = K.normalize(counts, "log1p_cp10k").toarray()
    np.testing.assert_allclose(y[0], np.log1p([2500.0, 7500.0, 0.0]))
    np.testing.assert_array_equal(y[1], 0)
    np.testing.assert_allclose(K.normalize(counts, "log1p").toarray(), np.log1p(counts.toarray()))
    np.testing.assert_array_equal(K.normalize(counts, "none").toarray(), counts.toarray())
    with pytest.raises(InputError, match="normalization"):
        K.normalize(counts, "cpm")
    with pytest.raises(InputError, match="obs"):
        K.chunk_stats(counts, np.zeros(2, int), np.zeros(3, int), 1)
