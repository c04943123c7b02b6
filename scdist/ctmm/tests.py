"""Hypothesis tests of CTMM (Chen & Dahl, Methods: "Fitting and testing parameters").

- Free vs Hom LRT: ``2 (l_free - l_hom) ~ chi2_C``; Full vs Free LRT with the difference in
  parameter counts as df.
- Wald tests of ``V_11 = ... = V_CC = 0`` in the Free model: ``F = v' S^{-1} v / C`` against
  ``F(C, N - R)`` with ``R`` the number of Free-model parameters (``2C + 1`` without
  covariates); ``S`` is the inverse Fisher information or the jackknife covariance.
- Mean differentiation ``beta_1 = ... = beta_C``: Wald on the C - 1 contrasts
  ``beta_1 - beta_c`` with the jackknife covariance, ``F(C - 1, N - R)``.
"""
from __future__ import annotations

import numpy as np
from scipy import stats


def lrt(ll_alt: np.ndarray, ll_null: np.ndarray, df: int) -> np.ndarray:
    """Likelihood-ratio p-values; negative statistics (numerical noise) count as 0."""
    stat = np.maximum(2.0 * (np.asarray(ll_alt) - np.asarray(ll_null)), 0.0)
    p = stats.chi2.sf(stat, df)
    return np.where(np.isfinite(ll_alt) & np.isfinite(ll_null), p, np.nan)


def wald_f(est: np.ndarray, cov: np.ndarray, df2) -> np.ndarray:
    """F-test of ``est = 0`` (R, q) with covariance ``cov`` (R, q, q): ``F(q, df2)``."""
    est = np.asarray(est, float)
    q = est.shape[-1]
    out = np.full(est.shape[0], np.nan)
    good = np.isfinite(est).all(axis=1) & np.isfinite(cov).all(axis=(1, 2))
    if good.any():
        with np.errstate(all="ignore"):
            c = cov[good]
            try:
                x = np.linalg.solve(c, est[good][..., None])[..., 0]
            except np.linalg.LinAlgError:
                x = np.stack([np.linalg.pinv(ci) @ ei for ci, ei in zip(c, est[good])])
            stat = np.einsum("rq,rq->r", est[good], x) / q
        p = stats.f.sf(stat, q, df2 if np.isscalar(df2) else np.asarray(df2)[good])
        p = np.where(stat >= 0, p, np.nan)
        out[good] = p
    return out


def mean_contrasts(C: int) -> np.ndarray:
    """(C - 1, C) contrasts ``beta_1 - beta_c``."""
    L = np.zeros((C - 1, C))
    L[:, 0] = 1.0
    L[np.arange(C - 1), np.arange(1, C)] = -1.0
    return L


def jackknife_cov(reps: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """Delete-one jackknife covariance ``(n-1)/n sum_j (t_j - tbar)(t_j - tbar)'``.

    reps (R, N, q): leave-donor-j-out estimates; weight (R, N) bool: donor j is in the data
    (donors without observations for that gene are not resampled). Rows with a missing
    (NaN) replicate of an included donor get a NaN covariance.
    """
    w = weight.astype(float)
    n = w.sum(axis=1)
    mean = np.einsum("rn,rnq->rq", w, reps) / n[:, None]
    d = (reps - mean[:, None]) * w[..., None]
    missing = ~np.where(weight[..., None], np.isfinite(reps), True).all(axis=(1, 2))
    d = np.nan_to_num(d)
    cov = ((n - 1) / n)[:, None, None] * np.einsum("rnq,rns->rqs", d, d)
    cov[missing] = np.nan          # a row without its replicates (not jackknifed) has none
    return cov
