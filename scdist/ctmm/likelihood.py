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
from . import blockkernel
from .blockkernel import evaluate_shared
from .rankone import rank_one_eval
from .scalar import scalar_eval
from .linalg import _SMALL, spd_inverse, spd_inverse_soa

LOG2PI = float(np.log(2.0 * np.pi))
# Covariance blocks closer to singular than this (Cholesky pivot / largest variance) count as
# outside the parameter space, like the reference implementation's condition-number guard:
# otherwise a donor whose residual is ~0 along one direction creates a likelihood spike at
# the positive-definiteness boundary once variance components may be negative.
RCOND = 1e-6
# An optimum with a block closer to singular than this is such a spike (not a regular maximum):
# the optimizer restarts those fits (see optimize.py).
EDGE = 1e-4


@dataclass
class State:
    """Everything a fit needs at one ``theta`` for a batch of rows."""

    theta: np.ndarray     # (R, K)
    ok: np.ndarray        # (R,) Sigma positive definite (and H invertible)
    loglik: np.ndarray    # (R,) -inf where not ok
    beta: np.ndarray      # (R, p) GLS fixed effects
    Hinv: np.ndarray      # (R, p, p) (X' W X)^{-1}, the GLS covariance of beta
    W: np.ndarray | None  # (R, B, m, m)
    F: np.ndarray | None  # (R, B, m, p)  W X
    s: np.ndarray         # (R, B, m)     P y = W r
    grad: np.ndarray | None = None   # (R, K)
    ai: np.ndarray | None = None     # (R, K, K)
    edge: np.ndarray | None = None   # (R,) some block nearly singular (pivot ratio < EDGE)
    rcmin: np.ndarray | None = None  # (R,) smallest reciprocal condition proxy over blocks
    Ws: np.ndarray | None = None     # (m, m, R, B) same W, structure-of-arrays (fast path)
    Fs: np.ndarray | None = None     # (R, m, B, p) same F (fast path)
    fisher: np.ndarray | None = None  # (R, K, K) expected information (compiled kernel)

    def aos(self) -> "State":
        """Fill ``W``/``F`` in the (R, B, m, m) layout from the fast path's arrays."""
        if self.W is None and self.Ws is not None:
            self.W = np.ascontiguousarray(self.Ws.transpose(2, 3, 0, 1))
            self.F = np.ascontiguousarray(self.Fs.transpose(0, 2, 1, 3))
        return self


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


def _evaluate_shared(prob: Problem, theta: np.ndarray, reml: bool, want_grad: bool,
                     want_ai: bool) -> State:
    """:func:`evaluate` when every block shares the basis (no extra random effects) and blocks
    are small: every per-block quantity is kept as m x m separate (R, B) arrays, so the work
    is elementwise numpy over all genes and donors plus BLAS reductions over donors, instead
    of many tiny matrix products."""
    R = theta.shape[0]
    B, m, p = prob.X.shape
    Ws, logdet, okb, piv = _inverse_shared(prob, theta)
    full = prob.all_observed
    if not full:
        mf = np.moveaxis(prob.mask, 2, 0).astype(float)           # (m, R, B)
        for x in range(m):
            Ws[x, x] -= 1.0 - mf[x]
    ok = okb.all(axis=1)
    X = prob.X
    ys = np.moveaxis(prob.y, 2, 0)                                # (m, R, B)
    if not full:
        ys = ys * mf
    # F[r, x, b, :] = sum_y W[x, y] X[b, y, :]
    Fs = np.zeros((R, m, B, p))
    if prob.identity_design:
        for x in range(m):
            for y in range(m):
                Fs[:, x, :, y] = Ws[x, y]
    else:
        Fs = np.einsum("xyrb,byp->rxbp", Ws, X)
    H = np.zeros((R, p, p))
    for x in range(m):
        H += X[:, x, :].T @ Fs[:, x]
    # entry-wise products over the (R, B) planes: einsum runs them in one C loop without the
    # temporaries of a Python-level sum (2x faster for 4 x 4 blocks)
    Wy = np.einsum("xyrb,yrb->xrb", Ws, ys)                       # (m, R, B)
    c = Wy.transpose(1, 0, 2).reshape(R, m * B) @ X.transpose(1, 0, 2).reshape(m * B, p)
    Hinv, logdetH, okH = spd_inverse(H)
    ok &= okH
    beta = np.einsum("rpq,rq->rp", Hinv, c)
    rs = np.stack([ys[x] - beta @ X[:, x, :].T for x in range(m)])  # (m, R, B)
    if not full:
        rs *= mf
    ss = np.einsum("xyrb,yrb->xrb", Ws, rs)
    quad = np.einsum("xrb,xrb->r", ss, rs)
    n = prob.mask.sum(axis=(1, 2))
    logdet_sum = logdet.sum(axis=1)
    if reml:
        ll = -0.5 * ((n - p) * LOG2PI + logdet_sum + logdetH + quad)
    else:
        ll = -0.5 * (n * LOG2PI + logdet_sum + quad)
    ll = np.where(ok, ll, -np.inf)
    st = State(theta=theta, ok=ok, loglik=ll, beta=beta, Hinv=Hinv, W=None, F=None,
               s=np.moveaxis(ss, 0, 2), Ws=Ws, Fs=Fs, edge=(piv.min(axis=1) < EDGE) & ok,
               rcmin=np.where(ok, piv.min(axis=1), 0.0))
    if not (want_grad or want_ai):
        return st
    K = prob.K[:, 0]                                              # (Kc, m, m)
    Kc = K.shape[0]
    if want_grad:
        s_rmb = np.ascontiguousarray(ss.transpose(1, 0, 2))       # (R, m, B)
        Sm = Ws.sum(axis=-1).transpose(2, 0, 1) - s_rmb @ s_rmb.transpose(0, 2, 1)
        if reml:
            FH = (Fs.reshape(R, m * B, p) @ Hinv).reshape(R, m, B * p)
            Sm = Sm - FH @ Fs.reshape(R, m, B * p).transpose(0, 2, 1)
        g = -0.5 * (Sm.reshape(R, m * m) @ K.reshape(Kc, m * m).T)
        st.grad = np.where(ok[:, None], g, 0.0)
    if want_ai:
        u = (K.reshape(Kc * m, m) @ ss.reshape(m, R * B)).reshape(Kc, m, R, B)
        Wu = np.einsum("xyrb,kyrb->kxrb", Ws, u)
        u2 = np.ascontiguousarray(u.transpose(2, 0, 1, 3)).reshape(R, Kc, m * B)
        Wu2 = np.ascontiguousarray(Wu.transpose(2, 1, 3, 0)).reshape(R, m * B, Kc)
        A = u2 @ Wu2
        if reml:
            Fu = u2 @ Fs.reshape(R, m * B, p)
            A = A - Fu @ Hinv @ Fu.transpose(0, 2, 1)
        st.ai = 0.5 * A
    return st


def _inverse_shared(prob: Problem, theta: np.ndarray):
    """W = Sigma^{-1} for a basis shared by all blocks, built and inverted entry-wise
    (structure of arrays) without materialising Sigma in the (R, B, m, m) layout."""
    K = prob.K
    Kc, _, m, _ = K.shape
    A = theta @ K.reshape(Kc, m * m)                  # (R, m*m)
    R, B = prob.nu.shape[:2]
    a = np.empty((m, m, R, B))
    full = prob.all_observed
    mf = None if full else prob.mask.astype(float)
    for i in range(m):
        for j in range(i + 1):
            v = np.broadcast_to(A[:, i * m + j, None], (R, B))
            if i == j:
                v = v + prob.nu[:, :, i]
            if not full:
                v = v * (mf[:, :, i] * mf[:, :, j])
                if i == j:
                    v = v + (1.0 - mf[:, :, i])
            a[i, j] = v
    return spd_inverse_soa(a, RCOND, pivots=True)


def _compiled_ok(prob: Problem) -> bool:
    """The compiled kernel covers small blocks without extra random effects: a basis shared by
    all blocks (CTP) or one per donor block (OP, ``P_i' k P_i``)."""
    return prob.K.shape[-1] <= _SMALL and (prob.K.shape[1] == 1 or prob.K.shape[0] == prob.n_vc)


def _evaluate_compiled(prob: Problem, theta: np.ndarray, reml: bool, want_grad: bool,
                       want_ai: bool, rows, want_fisher: bool = False) -> State:
    idx = np.arange(theta.shape[0]) if rows is None else np.asarray(rows)
    ro = None if want_fisher else prob.rank_one
    if ro is not None:    # Hom: closed form per donor (Sherman-Morrison)
        o = rank_one_eval(ro, theta, idx, reml, want_grad, want_ai, RCOND)
    elif prob.scalar is not None:    # OP: one scalar variance per donor
        drop = None
        if prob.src is not None:
            idx, drop = prob.src[idx], prob.drop[idx]
        o = scalar_eval(prob.scalar, theta, idx, drop, reml, want_grad, want_ai, want_fisher)
    else:
        y, nu, mask, X, Kb, full = prob.contiguous
        drop = None
        if prob.src is not None:
            idx, drop = prob.src[idx], prob.drop[idx]
        o = evaluate_shared(y, nu, mask, X, Kb, theta, idx, drop, full, reml, want_grad,
                            want_ai, RCOND, want_fisher, problem_rows=prob.rows,
                            free=(blockkernel.FREE_CLOSED_FORM and prob.free_basis),
                            ident=prob.identity_design)
    ok = o["ok"]
    return State(theta=theta, ok=ok, loglik=o["ll"], beta=o["beta"], Hinv=o["Hinv"], W=None,
                 F=None, s=None, grad=o["grad"], ai=o["ai"], edge=(o["rcmin"] < EDGE) & ok,
                 rcmin=o["rcmin"], fisher=o.get("fisher"))


def evaluate(prob: Problem, theta: np.ndarray, method: str = "reml", *, grad: bool = True,
             ai: bool = True, rows=None, compiled: bool = True) -> State:
    """Log-likelihood (and gradient / AI matrix) of ``method`` ("ml" or "reml") at ``theta``.

    ``rows`` (optional, one per row of ``theta``) picks the problem's rows to evaluate,
    i.e. ``evaluate(prob.take(rows), theta)`` without copying the data. With small blocks and
    no extra random effects a compiled kernel runs unless ``compiled=False`` (the numpy
    version, kept as their reference): the closed form of :mod:`scdist.ctmm.rankone` for Hom,
    :mod:`scdist.ctmm.blockkernel` otherwise. Their State carries no W / F (:func:`fisher`
    gets the information from the compiled kernel)."""
    theta = np.asarray(theta, float)
    if compiled and _compiled_ok(prob):
        return _evaluate_compiled(prob, theta, method == "reml", grad, ai, rows)
    shared = prob.K.shape[1] == 1 and prob.K.shape[-1] <= _SMALL
    if rows is not None:
        prob = prob.take(rows)
    prob = prob.dense()
    if shared:
        return _evaluate_shared(prob, theta, method == "reml", grad, ai)
    R = theta.shape[0]
    reml = method == "reml"
    mask = prob.mask
    W, logdet, okb = spd_inverse(covariance(prob, theta), RCOND)
    if not prob.all_observed:
        idx = np.arange(W.shape[-1])
        W[..., idx, idx] -= ~mask                     # drop the identity placed on masked entries
    ok = okb.all(axis=1)
    B, m, p = prob.X.shape
    X2 = prob.X.reshape(B * m, p)
    F = W.copy() if prob.identity_design else W @ prob.X   # (R, B, m, p)
    H = X2.T @ F.reshape(R, B * m, p)                 # (R, p, p)
    y = prob.y if prob.all_observed else np.where(mask, prob.y, 0.0)
    Wy = np.einsum("rbxy,rby->rbx", W, y)
    c = (Wy.reshape(R, B * m) @ X2)                   # (R, p)
    Hinv, logdetH, okH = spd_inverse(H)
    ok &= okH
    beta = np.einsum("rpq,rq->rp", Hinv, c)
    r = y - (beta @ X2.T).reshape(R, B, m)
    if not prob.all_observed:
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


def fisher_at(prob: Problem, theta: np.ndarray, method: str = "reml", rows=None) -> np.ndarray:
    """Expected information (see :func:`fisher`) at ``theta``, one row per problem row (or per
    entry of ``rows``, as in :func:`evaluate`): the compiled kernel where it applies (the
    optimiser's exact Newton steps and the Wald tests), else the numpy version."""
    theta = np.asarray(theta, float)
    if _compiled_ok(prob):
        return _evaluate_compiled(prob, theta, method == "reml", False, False, rows,
                                  want_fisher=True).fisher
    if rows is not None:
        prob = prob.take(rows)
    st = evaluate(prob, theta, method, grad=False, ai=False)
    return fisher(prob, st, method)


def fisher(prob: Problem, st: State, method: str = "reml") -> np.ndarray:
    """Expected information ``1/2 tr(P K_k P K_l)`` (REML) or ``1/2 tr(W K_k W K_l)`` (ML)."""
    if st.fisher is not None:
        return st.fisher
    if st.W is None and st.Ws is None:      # compiled kernel's state: W / F not kept
        if _compiled_ok(prob):
            return fisher_at(prob, st.theta, method)
        st = evaluate(prob.dense(), st.theta, method, grad=False, ai=False, compiled=False)
    prob = prob.dense()
    st.aos()
    return 0.5 * trace_pkpk(prob.K, st.W, st.F, st.Hinv, reml=(method == "reml"))


def trace_pkpk(K: np.ndarray, W: np.ndarray, F: np.ndarray, Hinv: np.ndarray, reml: bool) -> np.ndarray:
    """``tr(P K_k P K_l)`` for ``P = W - F H^{-1} F'`` with block-diagonal W (R, K, K)."""
    Kc, Bk, m, _ = K.shape
    R = W.shape[0]
    Q = np.einsum("rbxy,kbyz->rkbxz", W, K)                           # W K_k
    # tr sums over (b, x, y) as batched matrix products with the transposed blocks
    Qt = np.ascontiguousarray(Q.swapaxes(-1, -2)).reshape(R, Kc, -1).transpose(0, 2, 1)
    T = Q.reshape(R, Kc, -1) @ Qt
    if not reml:
        return T
    st = State(theta=None, ok=None, loglik=None, beta=None, Hinv=Hinv, W=W, F=F, s=None)
    E = _E_blocks(st, 2)                                               # per block
    Rm = np.einsum("rbxy,kbyz->rkbxz", E, K)                          # E K_k
    T2 = Rm.reshape(R, Kc, -1) @ Qt
    KF = np.einsum("kbxy,rbyp->rkbxp", K, F)
    M = np.einsum("rbxp,rkbxq->rkpq", F, KF)                          # F' K_k F summed over blocks
    HM = Hinv[:, None] @ M
    T3 = np.einsum("rkpq,rlqp->rkl", HM, HM)
    return T - T2 - T2.transpose(0, 2, 1) + T3
