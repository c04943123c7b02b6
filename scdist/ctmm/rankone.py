"""Compiled ML / REML likelihood of a one-parameter rank-one model (Hom), in closed form.

Chen & Dahl's Hom model (V = 0) gives donor block b the covariance
``Sigma_b = D_b + h u_b u_b'`` with ``h = sigma_alpha^2`` (``theta[:, 0]``), ``D_b = diag(nu_b)``
and ``u_b = 1_C`` for CTP (``h J_C``, Eq 3) or ``u_b = |1' P_i|`` for OP (a scalar block, Eq 2).
With ``a_b = u_b' D_b^-1 u_b`` and ``d_b = 1 + h a_b``, Sherman-Morrison and the matrix
determinant lemma give

    W_b = D_b^-1 - (h / d_b) D_b^-1 u_b u_b' D_b^-1,      log|Sigma_b| = log|D_b| + log d_b,

so everything the likelihood needs is a sum over donors of per-donor statistics that do not
depend on h, computed once per problem (:class:`RankOneStats`):
``t_b = u_b' D_b^-1 y_b``, ``v_b = X_b' D_b^-1 u_b`` (p), and the row totals
``H0 = X' D^-1 X``, ``c0 = X' D^-1 y``, ``q0 = y' D^-1 y``, ``log|D|``. Per evaluation, with
``f_b = h / d_b``:

    H = X'WX = H0 - sum_b f_b v_b v_b'      X'Wy = c0 - sum_b f_b t_b v_b
    y'Wy = q0 - sum_b f_b t_b^2             beta = H^-1 X'Wy,   r'Wr = y'Wy - beta' X'Wy
    e_b = u_b' W_b r_b = (t_b - v_b' beta) / d_b
    grad = -1/2 [ sum_b a_b / d_b - [REML] sum_b (v_b/d_b)' H^-1 (v_b/d_b) - sum_b e_b^2 ]
    AI   =  1/2 [ sum_b e_b^2 a_b / d_b - [REML] g' H^-1 g ],   g = sum_b e_b v_b / d_b

i.e. O(N p^2) per row instead of a C x C Cholesky per donor (same values as
:mod:`scdist.ctmm.blockkernel`, tested to 1e-9). Sigma_b is positive definite iff d_b > 0; the
condition proxy ``1 / (tr(W_b) max_x Sigma_b[x, x])`` of the general kernel uses
``tr(W_b) = sum_x 1/nu_x - f_b sum_x u_x^2 / nu_x^2``. Masked entries drop out of every sum
(except the proxy, where like there they count as unit rows / columns).
"""
from __future__ import annotations

import math

import numba as nb
import numpy as np

from .blockkernel import _chol_inv, _fail_row


def rank_one_vectors(Kb: np.ndarray) -> np.ndarray | None:
    """``u (Bk, m)`` with ``Kb[0, b] = u_b u_b'`` for a one-matrix basis ``Kb (1, Bk, m, m)``
    whose blocks are a non-negative multiple of ``J_m`` (Hom on CTP: ``J_C``; on OP the scalar
    ``(1'P_i)^2``); None otherwise."""
    if Kb.shape[0] != 1:
        return None
    K0 = Kb[0]
    m = K0.shape[-1]
    k = K0[:, :1, :1]
    if (k < 0).any() or not np.array_equal(K0, np.broadcast_to(k, K0.shape)):
        return None
    return np.ascontiguousarray(np.broadcast_to(np.sqrt(k[:, 0]), (K0.shape[0], m)))


# Donor statistics are stored donor-last, (G, k, B), so that every per-row sum over donors is a
# contiguous dot product the compiler vectorises ('reassoc' lets it reorder the sums; the
# results agree with the sequential order to rounding, see the tests).
_FM = {"reassoc", "contract"}
_CHUNK = 16   # donors per product of d_b before a logarithm (bounded magnitude, see _logsum)


@nb.njit(cache=True)
def _logsum(d, B):
    """sum_b log d[b] (d > 0) with one log per _CHUNK factors (a log costs ~20 ns)."""
    tot = 0.0
    for s in range(0, B, _CHUNK):
        pr = 1.0
        e = min(B, s + _CHUNK)
        for b in range(s, e):
            pr *= d[b]
        if pr > 1e-300 and pr < 1e300:
            tot += math.log(pr)
        else:
            for b in range(s, e):
                tot += math.log(d[b])
    return tot


@nb.njit(cache=True)
def _donor_sums(y, nu, mask, full, ident, X, ub, w, wy, D, S):
    """Fill D (G, 9 + 2p + p(p+1)/2, B) and S (G, 3 + p + p^2) (layout: RankOneStats) from the
    data; w = 1/nu and w y (0 where masked) are kept for the BLAS X'D^-1X of general designs."""
    G, B, m = y.shape
    p = X.shape[2]
    V0 = 9
    TV0 = 9 + p
    M0 = 9 + 2 * p
    H00 = 3 + p
    for g in range(G):
        q = 0.0
        ld = 0.0
        n = 0
        for i in range(p + p * p):
            S[g, 3 + i] = 0.0
        for b in range(B):
            s = 0.0
            s2 = 0.0
            sy = 0.0
            h = -np.inf
            lo_ = np.inf
            kk = 0
            pr = 1.0
            for x in range(m):
                if full or mask[g, b, x]:
                    n_ = nu[g, b, x]
                    wx = 1.0 / n_
                    wyx = wx * y[g, b, x]
                    w[g, b, x] = wx
                    wy[g, b, x] = wyx
                    s += wx
                    s2 += wx * wx
                    sy += wyx
                    q += wyx * y[g, b, x]
                    pr *= n_
                    h = max(h, n_)
                    lo_ = min(lo_, n_)
                    kk += 1
                else:
                    w[g, b, x] = 0.0
                    wy[g, b, x] = 0.0
            if kk:
                if pr > 1e-300 and pr < 1e300:
                    ld += math.log(pr)
                else:                   # extreme nu: one log per entry
                    for x in range(m):
                        if full or mask[g, b, x]:
                            ld += math.log(nu[g, b, x])
            u_ = ub[b]
            u2 = u_ * u_
            D[g, 0, b] = s * u2                          # a_b
            D[g, 1, b] = sy * u_                         # t_b
            D[g, 2, b] = sy * u_ * sy * u_               # t_b^2
            if kk:
                # masked entries count as unit rows / columns of Sigma_b in the general
                # kernel's condition proxy: the same definition here
                D[g, 3, b] = s + (m - kk)
                D[g, 4, b] = s2 * u2
                D[g, 5, b] = h
                D[g, 6, b] = lo_
                D[g, 8, b] = u2
            else:
                # no data: the general kernel's proxy of an identity block, 1 / m
                D[g, 3, b], D[g, 4, b], D[g, 5, b], D[g, 6, b], D[g, 8, b] = m, 0.0, 1.0, 1.0, 0.0
            D[g, 7, b] = 1.0 if kk < m else 0.0
            for i in range(p):
                vi = 0.0
                for x in range(m):
                    vi += w[g, b, x] * X[b, x, i]
                D[g, V0 + i, b] = vi * u_
            if ident:
                for i in range(p):
                    S[g, 3 + i] += wy[g, b, i]
                    S[g, H00 + i * p + i] += w[g, b, i]
            n += kk
        S[g, 0] = q
        S[g, 1] = ld
        S[g, 2] = n
        # donor-contiguous products (vectorised)
        for i in range(p):
            for b in range(B):
                D[g, TV0 + i, b] = D[g, 1, b] * D[g, V0 + i, b]
        k = 0
        for i in range(p):
            for j in range(i, p):
                for b in range(B):
                    D[g, M0 + k, b] = D[g, V0 + i, b] * D[g, V0 + j, b]
                k += 1


class RankOneStats:
    """Per-donor statistics of :func:`rank_one_eval` for every data row of a problem, packed
    in two arrays (few kernel arguments: each costs dispatch time per call).

    ``D (G, 9 + 2p + p(p+1)/2, B)``, donor axis last: a, t, tt = t^2, and for the condition
    proxy trw = tr(D^-1) (+1 per masked entry), bsq = u^2 sum 1/nu^2, dhi / dlo the largest /
    smallest observed nu, dfl = 1 where an entry is masked (its unit diagonal), u2 = u_b^2
    (0 without data); then v (p rows), tv = t v (p rows), M (the upper triangle of v v').
    ``S (G, 3 + p + p^2)``: q0 = y'D^-1y, ldD = log|D|, nobs, c0 = X'D^-1y, H0 = X'D^-1X.
    """

    def __init__(self, y, nu, mask, X, u):
        G, B, m = y.shape
        p = X.shape[2]
        self.m, self.p = m, p
        ub = np.ascontiguousarray(np.broadcast_to(u[:, 0], (B,)))   # constant within a block
        w, wy = np.empty((G, B, m)), np.empty((G, B, m))
        self.D = np.empty((G, 9 + 2 * p + p * (p + 1) // 2, B))
        self.S = np.empty((G, 3 + p + p * p))
        ident = p == m and np.array_equal(X, np.broadcast_to(np.eye(m), X.shape))
        _donor_sums(y, nu, mask, bool(mask.all()), ident, X, ub, w, wy, self.D, self.S)
        if not ident:       # H0 = X' D^-1 X, c0 = X' D^-1 y by BLAS
            XX = (X[:, :, :, None] * X[:, :, None, :]).reshape(B * m, p * p)
            self.S[:, 3 + p:] = w.reshape(G, B * m) @ XX
            self.S[:, 3:3 + p] = wy.reshape(G, B * m) @ X.reshape(B * m, p)

    @property
    def a(self) -> np.ndarray:
        """(G, B) a_b = u_b' D_b^-1 u_b."""
        return self.D[:, 0]


@nb.njit(cache=True, fastmath=_FM)
def _dot(w, x):
    s = 0.0
    for b in range(w.shape[0]):
        s += w[b] * x[b]
    return s


@nb.njit(cache=True, fastmath=_FM)
def _eval(theta, idx, D, S, p, m, reml, want_grad, want_ai, rcond, ll, ok_out, beta, Hinv_out,
          grad, ai, rcmin):
    """D (G, 9 + 2p + p(p+1)/2, B): a, t, tt, trw, bsq, dhi, dlo, dfl, u2, v, tv, M;
    S (G, 3 + p + p^2): q0, ldD, nobs, c0, H0 (see RankOneStats)."""
    R = theta.shape[0]
    B = D.shape[2]
    V0 = 9
    TV0 = 9 + p
    M0 = 9 + 2 * p
    H00 = 3 + p
    log2pi = math.log(2.0 * math.pi)
    H = np.empty((p, p))
    Hinv = np.empty((p, p))
    piv = np.empty(p)
    c = np.empty(p)
    bvec = np.empty(p)
    gv = np.empty(p)
    d = np.empty(B)
    f = np.empty(B)
    w1 = np.empty(B)
    e = np.empty(B)
    for row in range(R):
        g = idx[row]
        h = theta[row, 0]
        ag = D[g, 0]
        dmin = np.inf
        for b in range(B):
            db = 1.0 + h * ag[b]
            d[b] = db
            dmin = min(dmin, db)
        ok = dmin > 0.0
        rc_min = np.inf
        if ok:
            for b in range(B):
                w1[b] = 1.0 / d[b]
                f[b] = h * w1[b]
            # condition proxy 1 / (tr(W_b) max_x Sigma_b[x, x]) of every block
            trg, bsg, hig, log_, dfg, u2b = D[g, 3], D[g, 4], D[g, 5], D[g, 6], D[g, 7], D[g, 8]
            for b in range(B):
                hu = h * u2b[b]
                dm = max(abs(hu + hig[b]), abs(hu + log_[b]), dfg[b])
                pr = (trg[b] - f[b] * bsg[b]) * dm
                rc = 1.0 / pr if pr > 0 else 0.0
                rc_min = min(rc_min, rc)
            if rcond > 0 and not rc_min > rcond:
                ok = False
        if ok:
            ij = 0
            for i in range(p):
                c[i] = S[g, 3 + i] - _dot(f, D[g, TV0 + i])
                for j in range(i, p):
                    H[i, j] = S[g, H00 + i * p + j] - _dot(f, D[g, M0 + ij])
                    H[j, i] = H[i, j]
                    ij += 1
            q = S[g, 0] - _dot(f, D[g, 2])
            okH, logdetH, _ = _chol_inv(H, p, Hinv, piv, False)
            ok = okH
        ok_out[row] = ok
        rcmin[row] = rc_min if ok else 0.0
        if not ok:     # (no Fisher output here: ``ai`` stands in for it, untouched)
            _fail_row(row, p, 1, ll, beta, Hinv_out, grad, ai, ai, want_grad, want_ai, False)
            continue
        cb = 0.0
        for i in range(p):
            s = 0.0
            for j in range(p):
                s += Hinv[i, j] * c[j]
                Hinv_out[row, i, j] = Hinv[i, j]
            bvec[i] = s
            beta[row, i] = s
            cb += s * c[i]
        quad = q - cb
        n_fix = p if reml else 0
        tot = S[g, 1] + _logsum(d, B) + quad + (S[g, 2] - n_fix) * log2pi
        if reml:
            tot += logdetH
        ll[row] = -0.5 * tot
        if not (want_grad or want_ai):
            continue
        tg = D[g, 1]
        for b in range(B):
            e[b] = tg[b]
        for i in range(p):
            bi = bvec[i]
            vi = D[g, V0 + i]
            for b in range(B):
                e[b] -= vi[b] * bi
        see = 0.0
        seea = 0.0
        sad = 0.0
        for b in range(B):
            eb = e[b] * w1[b]
            e[b] = eb
            see += eb * eb
            aw = ag[b] * w1[b]
            seea += eb * eb * aw
            sad += aw
        tr = 0.0
        if reml:
            # tr(H^-1 sum_b v_b v_b' / d_b^2) and g = sum_b e_b v_b / d_b
            for b in range(B):
                f[b] = w1[b] * w1[b]
                e[b] *= w1[b]
            ij = 0
            for i in range(p):
                gv[i] = _dot(e, D[g, V0 + i])
                for j in range(i, p):
                    s = _dot(f, D[g, M0 + ij])
                    tr += Hinv[i, j] * s if i == j else 2.0 * Hinv[i, j] * s
                    ij += 1
        if want_grad:
            grad[row, 0] = -0.5 * (sad - tr - see)
        if want_ai:
            s = seea
            if reml:
                for i in range(p):
                    s2 = 0.0
                    for j in range(p):
                        s2 += Hinv[i, j] * gv[j]
                    s -= gv[i] * s2
            ai[row, 0, 0] = 0.5 * s


def rank_one_eval(st: RankOneStats, theta, idx, reml: bool, want_grad: bool, want_ai: bool,
                  rcond: float) -> dict:
    """Log-likelihood (and gradient / AI) at ``theta (R, 1)`` for data rows ``idx``; the same
    dict as :func:`scdist.ctmm.blockkernel.evaluate_shared`."""
    theta = np.ascontiguousarray(theta, dtype=np.float64)
    R = theta.shape[0]
    p = st.p
    out = dict(ll=np.empty(R), ok=np.empty(R, bool), beta=np.empty((R, p)),
               Hinv=np.empty((R, p, p)), rcmin=np.empty(R),
               grad=np.empty((R, 1) if want_grad else (1, 1)),
               ai=np.empty((R, 1, 1) if want_ai else (1, 1, 1)))
    idx = np.ascontiguousarray(idx, dtype=np.int64)
    _eval(theta, idx, st.D, st.S, p, st.m, bool(reml), bool(want_grad), bool(want_ai),
          float(rcond), out["ll"], out["ok"], out["beta"], out["Hinv"], out["grad"], out["ai"],
          out["rcmin"])
    if not want_grad:
        out["grad"] = None
    if not want_ai:
        out["ai"] = None
    return out
