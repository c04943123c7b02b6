"""The loader's fast paths (log x! from a table, small counts partitioned without a sort) give
exactly what the direct computation gives, including the fallbacks (non-integer, huge counts)."""
import numpy as np
import pytest
import scipy.sparse as sp
from scipy.special import gammaln

from scdist.vae import data as D


@pytest.mark.parametrize("case", ["integer", "heavy", "non_integer", "beyond_table"])
def test_batch_nonzero_list_and_log_factorial_match_direct(case):
    rng = np.random.default_rng(3)
    X = sp.random(200, 300, density=0.3, random_state=4, format="csr", dtype=np.float32)
    X.data = np.floor(rng.gamma(0.5, 30.0 if case == "heavy" else 3.0, X.nnz)).astype(np.float32)
    if case == "non_integer":
        X.data[::5] += 0.5
    if case == "beyond_table":
        X.data[0] = D._LOG_FACT_MAX + 10
    Y = X.copy()
    Y.eliminate_zeros()
    rows = np.repeat(np.arange(Y.shape[0]), np.diff(Y.indptr))
    vals = Y.data.astype(np.float32)
    order = np.argsort(vals > D.SMALL_COUNT, kind="stable")
    cats = {n: D.Categorical.constant(X.shape[0]) for n in D.COVARIATES}
    loader = D.CellLoader(D.MatrixSource(X), cats, batch_size=X.shape[0], split="all", shuffle=False)
    b = loader._batch(X, np.arange(X.shape[0]))
    ref = np.bincount(rows, gammaln(vals.astype(np.float64) + 1.0), minlength=X.shape[0]).astype(np.float32)
    np.testing.assert_array_equal(b["log_xfact"].numpy(), ref)
    np.testing.assert_array_equal(b["nz_rows"].numpy(), rows[order])
    np.testing.assert_array_equal(b["nz_cols"].numpy(), Y.indices[order])
    np.testing.assert_array_equal(b["nz_vals"].numpy(), vals[order])
    assert int(b["nz_nsmall"][0]) == int((vals <= D.SMALL_COUNT).sum())
    if case == "heavy":
        assert 0 < int(b["nz_nsmall"][0]) < len(vals)  # both parts present: the partition is exercised
