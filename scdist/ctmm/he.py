"""Haseman-Elston (method of moments) fit of CTMM, closed form and batched.

With ``M = I - X (X'X)^{-1} X'`` the OLS residual maker on the observed entries and
``e = M y``, HE regresses ``vec(e e' - M D M)`` on ``vec(M K_k M)`` (Chen & Dahl, Supplementary
Note). The normal equations are

    sum_l tr(M K_k M K_l) theta_l = e' K_k e - sum_e nu_e (M K_k M)_ee,

The left side and ``diag(M K_k M)`` depend only on which entries are observed, not on the
gene, so they are computed once per distinct mask pattern (one for a fully observed cube,
N + 1 for a leave-one-donor-out jackknife) with the REML information formula where ``W`` is
the diagonal observed-entry mask; per gene only residuals and dot products remain.
"""
from __future__ import annotations

import numpy as np

from .design import Problem
from .likelihood import trace_pkpk
from .linalg import spd_inverse


def _pattern_terms(mask: np.ndarray, X: np.ndarray, K: np.ndarray):
    """For U mask patterns (U, B, m): A = tr(M K_k M K_l) (U, K, K), diag(M K_k M)
    (U, K, B, m), (X' Dm X)^{-1} (U, p, p) and its positive-definiteness flag."""
    U, B, m = mask.shape
    mf = mask.astype(float)
    idx = np.arange(m)
    W0 = np.zeros((U, B, m, m))
    W0[..., idx, idx] = mf
    F0 = mf[..., None] * X                                         # (U, B, m, p)
    p = X.shape[-1]
    G0 = X.reshape(B * m, p).T @ F0.reshape(U, B * m, p)
    G0inv, _, ok = spd_inverse(G0)
    A = trace_pkpk(K, W0, F0, G0inv, reml=True)
    Kb = np.broadcast_to(K, (K.shape[0], B, m, m))
    Pi = F0 @ G0inv[:, None] @ F0.transpose(0, 1, 3, 2)            # (U, B, m, m)
    if K.shape[1] == 1:     # basis shared by every block: K_k F_b, then one product per u, k
        KF = np.einsum("kxy,ubyp->ukbxp", K[:, 0], F0).reshape(U, K.shape[0], B * m, p)
        Nk = F0.reshape(U, 1, B * m, p).transpose(0, 1, 3, 2) @ KF
    else:
        Nk = np.einsum("ubxp,kbxy,ubyq->ukpq", F0, Kb, F0)
    GNG = G0inv[:, None] @ Nk @ G0inv[:, None]                     # (U, K, p, p)
    diag = (np.einsum("kbxx->kbx", Kb)[None] * mf[:, None]
            - 2.0 * np.einsum("ubxy,kbyx->ukbx", Pi, Kb)
            + np.einsum("ubxp,ukpq,ubxq->ukbx", F0, GNG, F0))
    return A, diag * mf[:, None], G0inv, ok


def he_fit(prob: Problem) -> tuple[np.ndarray, np.ndarray]:
    """HE estimates ``theta`` (R, K) and OLS fixed effects (R, p) for every row."""
    prob = prob.dense()
    R, B, m = prob.mask.shape
    pats, inv = np.unique(prob.mask.reshape(R, B * m), axis=0, return_inverse=True)
    terms = _pattern_terms(pats.reshape(-1, B, m), prob.X, prob.K)
    return he_rows(prob, terms, inv.ravel())


def ols_beta(prob: Problem) -> np.ndarray:
    """OLS fixed effects (R, p) of every row on its observed entries: :func:`he_fit`'s
    ``b_ols`` without HE's per-pattern trace terms (one (X' D_m X) per row, D_m the
    observed-entry mask; its inverse is the identity where it is singular, as there)."""
    prob = prob.dense()
    R, B, m = prob.mask.shape
    p = prob.X.shape[-1]
    X2 = prob.X.reshape(B * m, p)
    mf = prob.mask.reshape(R, B * m).astype(float)
    G0 = (mf @ (X2[:, :, None] * X2[:, None, :]).reshape(B * m, p * p)).reshape(R, p, p)
    G0inv, _, _ = spd_inverse(G0)
    y = np.where(prob.mask, prob.y, 0.0).reshape(R, B * m)
    return np.einsum("rpq,rq->rp", G0inv, y @ X2)


def he_rows(prob: Problem, terms, inv: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """:func:`he_fit` with the mask-pattern terms given: ``terms`` from :func:`_pattern_terms`
    on U patterns and ``inv (R,)`` the pattern of each row (the jackknife computes the
    leave-one-out patterns once for all genes instead of per chunk of rows)."""
    A, diag, G0inv, okp = terms
    mask = prob.mask
    R, B, m = mask.shape
    X = prob.X
    p = X.shape[-1]
    mf = mask.astype(float)
    y = np.where(mask, prob.y, 0.0)
    X2 = X.reshape(B * m, p)
    b_ols = np.einsum("rpq,rq->rp", G0inv[inv], y.reshape(R, B * m) @ X2)
    e = (y - (b_ols @ X2.T).reshape(R, B, m)) * mf
    Kc, Bk = prob.K.shape[:2]
    if Bk == 1:
        ee = np.einsum("rbx,rby->rxy", e, e)
        eKe = ee.reshape(R, m * m) @ prob.K.reshape(Kc, m * m).T
    else:
        eKe = np.einsum("rbx,kbxy,rby->rk", e, prob.K, e)
    nu = np.where(mask, prob.nu, 0.0)
    b = eKe - np.einsum("rbx,rkbx->rk", nu, diag[inv])
    with np.errstate(all="ignore"):
        try:
            theta = np.linalg.solve(A[inv], b[..., None])[..., 0]
        except np.linalg.LinAlgError:
            theta = np.stack([np.linalg.lstsq(a, v, rcond=None)[0] for a, v in zip(A[inv], b)])
    theta[~okp[inv]] = np.nan
    return theta, b_ols
