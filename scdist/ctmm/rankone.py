"""Compiled ML / REML likelihood of a one-parameter rank-one model (Hom), in closed form.

Chen & Dahl's Hom model (V = 0) gives donor block b the covariance
``Sigma_b = D_b + h u_b u_b'`` with ``h = sigma_alpha^2`` (``theta[:, 0]``), ``D_b = diag(nu_b)``
and ``u_b = 1_C`` for CTP (``h J_C``, Eq 3) or ``u_b = |1' P_i|`` for OP (a scalar block, Eq 2).
With ``a_b = u_b' D_b^-1 u_b`` and ``d_b = 1 + h a_b``, Sherman-Morrison and the matrix
determinant lemma give

    W_b = D_b^-1 - (h / d_b) D_b^-1 u_b u_b' D_b^-1,      log|Sigma_b| = log|D_b| + log d_b,

so everything the likelihood needs is a sum over donors of per-donor statistics that do not
depend on h, computed once per problem (:func:`rank_one_stats`):
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
def _donor_sums(y, nu, mask, full, X, ub, w, wy, sw, swy, sw2, hi, lo, k, q0, ldD, v, M, tv):
    """Per donor block: w = 1/nu and w y (0 where masked), their sums, sum w^2, the largest /
    smallest observed nu and the count; v_b = u_b X_b' w_b, the upper triangle of v_b v_b' and
    t_b v_b (t_b = u_b sum w y); per row y'D^-1 y and log|D| (one log per block)."""
    G, B, m = y.shape
    p = X.shape[2]
    for g in range(G):
        q = 0.0
        ld = 0.0
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
            sw[g, b] = s
            sw2[g, b] = s2
            swy[g, b] = sy
            for i in range(p):
                vi = 0.0
                for x in range(m):
                    vi += w[g, b, x] * X[b, x, i]
                v[g, i, b] = vi * ub[b]
            hi[g, b] = h
            lo[g, b] = lo_
            k[g, b] = kk
        q0[g] = q
        ldD[g] = ld
        # donor-contiguous products (vectorised)
        for i in range(p):
            for b in range(B):
                tv[g, i, b] = swy[g, b] * ub[b] * v[g, i, b]
        n = 0
        for i in range(p):
            for j in range(i, p):
                for b in range(B):
                    M[g, n, b] = v[g, i, b] * v[g, j, b]
                n += 1


class RankOneStats:
    """Per-donor statistics of :func:`rank_one_eval` for every data row of a problem, donor
    axis last: a, t (G, B); v, tv = t v (G, p, B); M (G, p(p+1)/2, B) the upper triangle of
    v v'; tt = t^2; H0 (G, p, p), c0 (G, p), q0, ldD = log|D|, nobs (G,); and for the condition
    proxy trw = tr(D^-1) (+1 per masked entry), bsq = u^2 sum 1/nu^2, dhi / dlo the largest /
    smallest observed nu, dfl = 1 where an entry is masked (its unit diagonal), u2 = u_b^2
    (0 without data)."""

    def __init__(self, y, nu, mask, X, u):
        G, B, m = y.shape
        p = X.shape[2]
        self.m = m
        ub = np.ascontiguousarray(np.broadcast_to(u[:, 0], (B,)))   # constant within a block
        u2 = ub * ub
        w, wy = np.empty((G, B, m)), np.empty((G, B, m))
        sw, swy, sw2, dhi, dlo = (np.empty((G, B)) for _ in range(5))
        k = np.empty((G, B), np.int64)
        self.q0, self.ldD = np.empty(G), np.empty(G)
        self.v, self.tv = np.empty((G, p, B)), np.empty((G, p, B))
        self.M = np.empty((G, p * (p + 1) // 2, B))
        _donor_sums(y, nu, mask, bool(mask.all()), X, ub, w, wy, sw, swy, sw2, dhi, dlo, k,
                    self.q0, self.ldD, self.v, self.M, self.tv)
        has = k > 0
        self.a = sw * u2
        self.t = swy * ub
        self.tt = self.t * self.t
        self.nobs = k.sum(axis=1)
        # H0 = X' D^-1 X, c0 = X' D^-1 y by BLAS
        XX = (X[:, :, :, None] * X[:, :, None, :]).reshape(B * m, p * p)
        self.H0 = (w.reshape(G, B * m) @ XX).reshape(G, p, p)
        self.c0 = wy.reshape(G, B * m) @ X.reshape(B * m, p)
        self.u2 = np.where(has, u2, 0.0)
        # blocks without data: the general kernel's proxy of an identity block, 1 / m
        self.trw = np.where(has, sw + (m - k), m)
        self.bsq = np.where(has, sw2 * u2, 0.0)
        self.dhi = np.where(has, dhi, 1.0)
        self.dlo = np.where(has, dlo, 1.0)
        self.dfl = np.where(k < m, 1.0, 0.0)


@nb.njit(cache=True, inline="always")
def _spd_inv(H, p, Hinv, L):
    """Cholesky inverse of the p x p SPD matrix H into Hinv; returns (ok, log|H|)."""
    logdet = 0.0
    for j in range(p):
        d = H[j, j]
        for k in range(j):
            d -= L[j, k] * L[j, k]
        if not d > 0.0:
            return False, 0.0
        ljj = math.sqrt(d)
        logdet += 2.0 * math.log(ljj)
        L[j, j] = ljj
        for i in range(j + 1, p):
            s = H[i, j]
            for k in range(j):
                s -= L[i, k] * L[j, k]
            L[i, j] = s / ljj
    # Hinv = L^-T L^-1: invert L in place (lower triangle), then multiply
    for i in range(p):
        L[i, i] = 1.0 / L[i, i]
        for j in range(i):
            s = 0.0
            for k in range(j, i):
                s += L[i, k] * L[k, j]
            L[i, j] = -s * L[i, i]
    for i in range(p):
        for j in range(i + 1):
            s = 0.0
            for k in range(i, p):
                s += L[k, i] * L[k, j]
            Hinv[i, j] = s
            Hinv[j, i] = s
    return True, logdet


@nb.njit(cache=True, fastmath=_FM)
def _dot(w, x):
    s = 0.0
    for b in range(w.shape[0]):
        s += w[b] * x[b]
    return s


@nb.njit(cache=True, fastmath=_FM)
def _eval(theta, idx, a, t, v, M, tv, tt, trw, bsq, dhi, dlo, dfl, H0, c0, q0, ldD, nobs, u2,
          m, reml, want_grad, want_ai, rcond, ll, ok_out, beta, Hinv_out, grad, ai, rcmin):
    R = theta.shape[0]
    B = a.shape[1]
    p = H0.shape[1]
    log2pi = math.log(2.0 * math.pi)
    H = np.empty((p, p))
    Hinv = np.empty((p, p))
    L = np.empty((p, p))
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
        ag = a[g]
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
            trg, bsg, hig, log_, dfg, u2b = trw[g], bsq[g], dhi[g], dlo[g], dfl[g], u2[g]
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
                c[i] = c0[g, i] - _dot(f, tv[g, i])
                for j in range(i, p):
                    H[i, j] = H0[g, i, j] - _dot(f, M[g, ij])
                    H[j, i] = H[i, j]
                    ij += 1
            q = q0[g] - _dot(f, tt[g])
            okH, logdetH = _spd_inv(H, p, Hinv, L)
            ok = okH
        ok_out[row] = ok
        rcmin[row] = rc_min if ok else 0.0
        if not ok:
            ll[row] = -np.inf
            for i in range(p):
                beta[row, i] = 0.0
                for j in range(p):
                    Hinv_out[row, i, j] = 1.0 if i == j else 0.0
            if want_grad:
                grad[row, 0] = 0.0
            if want_ai:
                ai[row, 0, 0] = 0.0
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
        tot = ldD[g] + _logsum(d, B) + quad + (nobs[g] - n_fix) * log2pi
        if reml:
            tot += logdetH
        ll[row] = -0.5 * tot
        if not (want_grad or want_ai):
            continue
        tg = t[g]
        for b in range(B):
            e[b] = tg[b]
        for i in range(p):
            bi = bvec[i]
            vi = v[g, i]
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
                gv[i] = _dot(e, v[g, i])
                for j in range(i, p):
                    s = _dot(f, M[g, ij])
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
    p = st.H0.shape[1]
    out = dict(ll=np.empty(R), ok=np.empty(R, bool), beta=np.empty((R, p)),
               Hinv=np.empty((R, p, p)), rcmin=np.empty(R),
               grad=np.empty((R, 1) if want_grad else (1, 1)),
               ai=np.empty((R, 1, 1) if want_ai else (1, 1, 1)))
    idx = np.ascontiguousarray(idx, dtype=np.int64)
    _eval(theta, idx, st.a, st.t, st.v, st.M, st.tv, st.tt, st.trw, st.bsq, st.dhi, st.dlo,
          st.dfl, st.H0, st.c0, st.q0, st.ldD, st.nobs, st.u2, st.m, bool(reml),
          bool(want_grad), bool(want_ai), float(rcond), out["ll"], out["ok"], out["beta"],
          out["Hinv"], out["grad"], out["ai"], out["rcmin"])
    if not want_grad:
        out["grad"] = None
    if not want_ai:
        out["ai"] = None
    return out
