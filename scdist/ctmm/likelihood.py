"""Batched ML / REML log-likelihood, analytic gradient, AI and Fisher information.

Notation (Chen & Dahl, Eq 3): for one gene, ``y`` stacks the CTP ``y_ic`` of all donors,
``Sigma(theta) = sum_k theta_k K_k + D`` with ``D = diag(nu_ic)`` and ``K_k`` the block
diagonal basis of :mod:`scdist.ctmm.covariance` (plus extra random effects), ``X`` the
fixed-effect design and ``W = Sigma^{-1}``. With ``H = X' W X``, ``beta = H^{-1} X' W y`` (GLS),
``r = y - X beta`` and ``P = W - W X H^{-1} X' W``::

    ML   l = -1/2 [ n log 2pi + log|Sigma| + r' W r ]
    REML l = -1/2 [ (n - p) log 2pi + log|Sigma| + log|H| + y' P y ]
    dl/dtheta_k = -1/2 [ tr(P K_k) - y' P K_k P y ]                (W instead of P for ML)
    AI_kl       =  1/2 y' P K_k P K_l P y                          (average information)
    Fisher_kl   =  1/2 tr(P K_k P K_l)                             (W instead of P for ML)

Everything is evaluated block by block over arrays with a leading row axis (genes, or
gene x left-out donor), so the cost is O(rows * B * m^3) instead of O((N C)^3) per gene.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .design import Problem
from .linalg import spd_inverse

LOG2PI = float(np.log(2.0 * np.pi))
# Covariance blocks closer to singular than this (Cholesky pivot / largest variance) count as
# outside the parameter space, like the reference implementation's condition-number guard:
# otherwise a donor whose residual is ~0 along one direction creates a likelihood spike at
# the positive-definiteness boundary once variance components may be negative.
RCOND = 1e-6


@dataclass
class State:
    """Everything a fit needs at one ``theta`` for a batch of rows."""

    theta: np.ndarray     # (R, K)
    ok: np.ndarray        # (R,) Sigma positive definite (and H invertible)
    loglik: np.ndarray    # (R,) -inf where not ok
    beta: np.ndarray      # (R, p) GLS fixed effects
    Hinv: np.ndarray      # (R, p, p) (X' W X)^{-1}, the GLS covariance of beta
    W: np.ndarray         # (R, B, m, m)
    F: np.ndarray         # (R, B, m, p)  W X
    s: np.ndarray         # (R, B, m)     P y = W r
    grad: np.ndarray | None = None   # (R, K)
    ai: np.ndarray | None = None     # (R, K, K)


def _mask2(mask: np.ndarray) -> np.ndarray:
    mf = mask.astype(float)
    return mf[..., :, None] * mf[..., None, :]


def covariance(prob: Problem, theta: np.ndarray) -> np.ndarray:
    """Sigma blocks (R, B, m, m); masked entries become identity rows/columns."""
    K = prob.K
    R = theta.shape[0]
    Kc, Bk, m, _ = K.shape
    if Bk == 1:
        A = (theta @ K.reshape(Kc, m * m)).reshape(R, 1, m, m)
    else:
        A = (theta @ K.reshape(Kc, Bk * m * m)).reshape(R, Bk, m, m)
    mm = _mask2(prob.mask)
    S = A * mm
    idx = np.arange(m)
    S[..., idx, idx] += np.where(prob.mask, prob.nu, 1.0)
    return S


def evaluate(prob: Problem, theta: np.ndarray, method: str = "reml", *, grad: bool = True,
             ai: bool = True) -> State:
    """Log-likelihood (and gradient / AI matrix) of ``method`` ("ml" or "reml") at ``theta``."""
    theta = np.asarray(theta, float)
    R = theta.shape[0]
    reml = method == "reml"
    mask = prob.mask
    S = covariance(prob, theta)
    W, logdet, okb = spd_inverse(S, RCOND)
    idx = np.arange(W.shape[-1])
    W[..., idx, idx] -= ~mask                         # drop the identity placed on masked entries
    ok = okb.all(axis=1)
    B, m, p = prob.X.shape
    X2 = prob.X.reshape(B * m, p)
    F = W @ prob.X                                    # (R, B, m, p)
    H = X2.T @ F.reshape(R, B * m, p)                 # (R, p, p)
    y = np.where(mask, prob.y, 0.0)
    Wy = np.einsum("rbxy,rby->rbx", W, y)
    c = (Wy.reshape(R, B * m) @ X2)                   # (R, p)
    Hinv, logdetH, okH = spd_inverse(H)
    ok &= okH
    beta = np.einsum("rpq,rq->rp", Hinv, c)
    r = y - (beta @ X2.T).reshape(R, B, m)
    r = np.where(mask, r, 0.0)
    s = np.einsum("rbxy,rby->rbx", W, r)
    quad = np.einsum("rbx,rbx->r", s, r)
    n = mask.sum(axis=(1, 2))
    logdet_sum = logdet.sum(axis=1)
    if reml:
        ll = -0.5 * ((n - p) * LOG2PI + logdet_sum + logdetH + quad)
    else:
        ll = -0.5 * (n * LOG2PI + logdet_sum + quad)
    ll = np.where(ok, ll, -np.inf)
    st = State(theta=theta, ok=ok, loglik=ll, beta=beta, Hinv=Hinv, W=W, F=F, s=s)
    if grad or ai:
        _derivatives(prob, st, reml, grad, ai)
    return st


def _block_sum_or_keep(M: np.ndarray, Bk: int) -> np.ndarray:
    """Sum (R, B, ...) over blocks when the basis is shared by all blocks."""
    return M.sum(axis=1, keepdims=True) if Bk == 1 else M


def _E_blocks(st: State, Bk: int) -> np.ndarray:
    """Diagonal blocks of W X H^{-1} X' W, i.e. F_b H^{-1} F_b' (summed over b if Bk == 1)."""
    F = st.F
    R, B, m, p = F.shape
    FH = F @ st.Hinv[:, None]
    if Bk == 1:
        a = FH.transpose(0, 2, 1, 3).reshape(R, m, B * p)
        b = F.transpose(0, 1, 3, 2).reshape(R, B * p, m)
        return (a @ b)[:, None]
    return FH @ F.transpose(0, 1, 3, 2)


def _derivatives(prob: Problem, st: State, reml: bool, want_grad: bool, want_ai: bool) -> None:
    K = prob.K
    Kc, Bk, m, _ = K.shape
    R = st.theta.shape[0]
    s = st.s
    if want_grad:
        Sm = _block_sum_or_keep(st.W, Bk) - _block_sum_or_keep(s[..., :, None] * s[..., None, :], Bk)
        if reml:
            Sm = Sm - _E_blocks(st, Bk)
        g = -0.5 * (Sm.reshape(R, -1) @ K.reshape(Kc, -1).T)
        st.grad = np.where(st.ok[:, None], g, 0.0)
    if want_ai:
        B = s.shape[1]
        if Bk == 1:
            u = s[:, None] @ K[:, 0][None]                             # (R, K, B, m)
        else:
            u = np.einsum("kbxy,rby->rkbx", K, s)
        Wu = np.einsum("rbxy,rkby->rkbx", st.W, u)
        u2 = u.reshape(R, Kc, B * m)
        A = u2 @ Wu.reshape(R, Kc, B * m).transpose(0, 2, 1)
        if reml:
            Fu = u2 @ st.F.reshape(R, B * m, -1)                      # (R, K, p)
            A = A - Fu @ st.Hinv @ Fu.transpose(0, 2, 1)
        st.ai = 0.5 * A


def fisher(prob: Problem, st: State, method: str = "reml") -> np.ndarray:
    """Expected information ``1/2 tr(P K_k P K_l)`` (REML) or ``1/2 tr(W K_k W K_l)`` (ML)."""
    return 0.5 * trace_pkpk(prob.K, st.W, st.F, st.Hinv, reml=(method == "reml"))


def trace_pkpk(K: np.ndarray, W: np.ndarray, F: np.ndarray, Hinv: np.ndarray, reml: bool) -> np.ndarray:
    """``tr(P K_k P K_l)`` for ``P = W - F H^{-1} F'`` with block-diagonal W (R, K, K)."""
    Kc, Bk, m, _ = K.shape
    R = W.shape[0]
    Q = np.einsum("rbxy,kbyz->rkbxz", W, K)                           # W K_k
    T = np.einsum("rkbxy,rlbyx->rkl", Q, Q)
    if not reml:
        return T
    st = State(theta=None, ok=None, loglik=None, beta=None, Hinv=Hinv, W=W, F=F, s=None)
    E = _E_blocks(st, 2)                                               # per block
    Rm = np.einsum("rbxy,kbyz->rkbxz", E, K)                          # E K_k
    T2 = np.einsum("rlbxy,rkbyx->rkl", Q, Rm)
    KF = np.einsum("kbxy,rbyp->rkbxp", K, F)
    M = np.einsum("rbxp,rkbxq->rkpq", F, KF)                          # F' K_k F summed over blocks
    HM = Hinv[:, None] @ M
    T3 = np.einsum("rkpq,rlqp->rkl", HM, HM)
    return T - T2 - T2.transpose(0, 2, 1) + T3
