"""Haseman-Elston (method of moments) fit of CTMM, closed form and batched.

With ``M = I - X (X'X)^{-1} X'`` the OLS residual maker on the observed entries and
``e = M y``, HE regresses ``vec(e e' - M D M)`` on ``vec(M K_k M)`` (Chen & Dahl, Supplementary
Note). The normal equations are

    sum_l tr(M K_k M K_l) theta_l = e' K_k e - tr(K_k M D M),

i.e. the REML information formula with ``W`` replaced by the diagonal observed-entry mask,
so the same block code computes them in O(B m^3) per gene.
"""
from __future__ import annotations

import numpy as np

from .design import Problem
from .likelihood import trace_pkpk
from .linalg import spd_inverse


def he_fit(prob: Problem) -> tuple[np.ndarray, np.ndarray]:
    """HE estimates ``theta`` (R, K) and OLS fixed effects (R, p) for every row."""
    mask = prob.mask
    R, B, m = mask.shape
    mf = mask.astype(float)
    X = prob.X
    p = X.shape[-1]
    idx = np.arange(m)
    W0 = np.zeros((R, B, m, m))
    W0[..., idx, idx] = mf
    F0 = mf[..., None] * X                                     # (R, B, m, p)
    X2 = X.reshape(B * m, p)
    G0 = X2.T @ F0.reshape(R, B * m, p)
    G0inv, _, ok = spd_inverse(G0)
    y = np.where(mask, prob.y, 0.0)
    b_ols = np.einsum("rpq,rq->rp", G0inv, y.reshape(R, B * m) @ X2)
    e = (y - (b_ols @ X2.T).reshape(R, B, m)) * mf
    A = trace_pkpk(prob.K, W0, F0, G0inv, reml=True)
    nu = np.where(mask, prob.nu, 0.0)
    # diagonal blocks of M D M = D - Pi D - D Pi + Pi D Pi, Pi = F0 G0^{-1} F0'
    FG = F0 @ G0inv[:, None]                                   # (R, B, m, p)
    Pi = FG @ F0.transpose(0, 1, 3, 2)                         # (R, B, m, m)
    XDX = np.einsum("rbxp,rbx,rbxq->rpq", F0, nu, F0)
    MDM = -Pi * nu[..., None, :] - Pi * nu[..., :, None]
    MDM[..., idx, idx] += nu
    MDM += FG @ XDX[:, None] @ FG.transpose(0, 1, 3, 2)
    T = e[..., :, None] * e[..., None, :] - MDM
    Kc, Bk = prob.K.shape[:2]
    if Bk == 1:
        b = T.sum(axis=1).reshape(R, m * m) @ prob.K.reshape(Kc, m * m).T
    else:
        b = np.einsum("rbxy,kbxy->rk", T, prob.K)
    with np.errstate(all="ignore"):
        try:
            theta = np.linalg.solve(A, b[..., None])[..., 0]
        except np.linalg.LinAlgError:
            theta = np.stack([np.linalg.lstsq(a, v, rcond=None)[0] for a, v in zip(A, b)])
    theta[~ok] = np.nan
    return theta, b_ols
