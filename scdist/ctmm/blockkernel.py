"""Compiled (numba) ML / REML likelihood, gradient and AI matrix for a shared block basis.

Same quantities as :func:`scdist.ctmm.likelihood.evaluate` (see its docstring for the
notation: ``Sigma_b = sum_k theta_k K_k + diag(nu_b)`` per donor block b, ``W_b = Sigma_b^{-1}``,
``H = sum_b X_b' W_b X_b``, ``beta = H^{-1} sum_b X_b' W_b y_b``, ``s_b = W_b (y_b - X_b beta)``),
for the common case where every block has the same small basis ``K_k`` (m x m, m <= 8: CTP
without extra random effects). The numpy version streams every intermediate through
(rows x blocks) arrays, i.e. memory; here one row's blocks are processed in two passes with
W_b and F_b = W_b X_b kept in an L1-sized scratch buffer:

- pass 1 (per block): Cholesky of Sigma_b, W_b, log|Sigma_b|, the condition proxy
  ``1 / (tr(W_b) max diag Sigma_b)``, and the sums H, X'Wy, sum_b W_b;
- then beta = H^{-1} X'Wy;
- pass 2 (per block): s_b, r_b' W_b r_b, sum_b s_b s_b', sum_b F_b H^{-1} F_b' (REML),
  u_bk = K_k s_b, sum_b u_bk' W_b u_bl and sum_b F_b' u_bk.

    grad_k = -1/2 sum_xy K_k[x,y] (sum_b W_b - sum_b s_b s_b' - [REML] sum_b F_b H^-1 F_b')[x,y]
    AI_kl  =  1/2 [ sum_b u_bk' W_b u_bl - [REML] (sum_b F_b'u_bk)' H^-1 (sum_b F_b'u_bl) ]

Masked entries (missing pairs, a left-out donor) get a unit row/column in Sigma_b and a zero
row/column in W_b, so they drop out of every sum; blocks with nothing observed are skipped.
Rows are independent; ``idx`` selects which rows of y / nu / mask each theta row uses, so the
optimiser's active sets need no copies of the data.
"""
from __future__ import annotations

import math
import os

import numba as nb
import numpy as np


@nb.njit(cache=True, inline="always")
def _chol_inv(A, n, W, piv, one_log):
    """Cholesky inverse of the n x n SPD matrix in A's lower triangle: W = A^{-1} (full,
    exactly symmetric); A is overwritten (its lower triangle by the Cholesky factor L), ``piv``
    (>= n) is scratch for 1 / L_jj. Returns (ok, log|A|, tr(W)); ok is False when a pivot is
    not positive (the other outputs are then meaningless).

    The one small SPD inverse of both compiled kernels (covariance blocks Sigma_b here, X'WX in
    both). log|A| is the sum of the pivots' logarithms, which cannot overflow for any n and
    scale; ``one_log`` (a constant at each call site) takes one logarithm of the pivots'
    product instead, for the covariance blocks only: m <= 8 moderate pivots cannot overflow,
    and n - 1 fewer logarithms per donor block are ~15 % of a Free evaluation."""
    ok = True
    det = 1.0
    logdet = 0.0
    for j in range(n):
        d = A[j, j]
        for k in range(j):
            d -= A[j, k] * A[j, k]
        if not d > 0.0:
            ok = False
            d = 1.0
        ljj = math.sqrt(d)
        if one_log:
            det *= d
        else:
            logdet += 2.0 * math.log(ljj)
        A[j, j] = ljj
        inv = 1.0 / ljj
        piv[j] = inv
        for i in range(j + 1, n):
            v = A[i, j]
            for k in range(j):
                v -= A[i, k] * A[j, k]
            A[i, j] = v * inv
    # M = L^{-1} (lower triangular) into W's lower triangle
    for i in range(n):
        W[i, i] = piv[i]
        for j in range(i):
            v = A[i, j] * W[j, j]
            for k in range(j + 1, i):
                v += A[i, k] * W[k, j]
            W[i, j] = -v * piv[i]
    # A^{-1} = M' M into A's upper triangle (row i, column j >= i), then W
    trW = 0.0
    for i in range(n):
        for j in range(i, n):
            v = 0.0
            for k in range(j, n):
                v += W[k, i] * W[k, j]
            A[i, j] = v
    for i in range(n):
        for j in range(i, n):
            W[i, j] = A[i, j]
            W[j, i] = A[i, j]
        trW += W[i, i]
    if one_log:
        logdet = math.log(det)
    return ok, logdet, trW


@nb.njit(cache=True, inline="always")
def _fail_row(row, p, Kc, ll, beta, Hinv_out, grad, ai, fisher, want_grad, want_ai, want_fisher):
    """Outputs of a row whose covariance (or X'WX) is not positive definite: l = -inf,
    beta = 0, (X'WX)^{-1} = I, zero gradient / AI / Fisher rows (those asked for)."""
    ll[row] = -np.inf
    for i in range(p):
        beta[row, i] = 0.0
        for j in range(p):
            Hinv_out[row, i, j] = 1.0 if i == j else 0.0
    if want_grad:
        for k in range(Kc):
            grad[row, k] = 0.0
    if want_ai:
        for k in range(Kc):
            for l in range(Kc):
                ai[row, k, l] = 0.0
    if want_fisher:
        for k in range(Kc):
            for l in range(Kc):
                fisher[row, k, l] = 0.0


@nb.njit(cache=True, inline="always")
def _row_sums(A, n, out):
    """out[i] = sum_t A[i, t] over the leading n x n block; returns the sum of all of them."""
    total = 0.0
    for i in range(n):
        v = 0.0
        for t in range(n):
            v += A[i, t]
        out[i] = v
        total += v
    return total


@nb.njit(cache=True, inline="always")
def _rowdot(A, i, B, j, n):
    """sum_t A[i, t] B[j, t] over t < n: row i of A times row j of B (with a symmetric B, the
    (i, j) entry of A B)."""
    v = 0.0
    for t in range(n):
        v += A[i, t] * B[j, t]
    return v


# not inlined: it runs only when the Fisher information is asked for, and inlining it into
# shared_eval made the cold compile ~4 CPU-s longer
@nb.njit(cache=True)
def _fisher_block(Kb, kb, W, F, FH, m, p, Kc, reml, Qf, Rf, Ef, KF, Mf, FI):
    """Add block b's terms of the Fisher information (see :func:`shared_eval`) to FI and M."""
    if reml:
        for x in range(m):
            for z in range(m):
                Ef[x, z] = _rowdot(FH, x, F, z, p)
    for k in range(Kc):
        for x in range(m):
            for z in range(m):
                v = 0.0
                w = 0.0
                for t in range(m):
                    v += W[x, t] * Kb[k, kb, t, z]
                    if reml:
                        w += Ef[x, t] * Kb[k, kb, t, z]
                Qf[k, x, z] = v
                Rf[k, x, z] = w
        if reml:    # M_k += F' (K_kb F): the m x p product once, not once per (i, j)
            for x in range(m):
                for j in range(p):
                    kf = 0.0
                    for z in range(m):
                        kf += Kb[k, kb, x, z] * F[z, j]
                    KF[x, j] = kf
            for i in range(p):
                for j in range(p):
                    v = 0.0
                    for x in range(m):
                        v += F[x, i] * KF[x, j]
                    Mf[k, i, j] += v
    for k in range(Kc):
        for l in range(k + 1):
            v = 0.0
            for x in range(m):
                for z in range(m):
                    v += Qf[k, x, z] * Qf[l, z, x]
                    if reml:
                        v -= Qf[l, x, z] * Rf[k, z, x] + Qf[k, x, z] * Rf[l, z, x]
            FI[k, l] += v


# not inlined, like _fisher_block: inlining measured ~10 % faster Fisher rows (few: Wald tests,
# exact Newton steps) for ~8 CPU-s more cold compile
@nb.njit(cache=True)
def _fisher_block_free(W, F, FH, m, p, reml, Ef, fv, Mf, FI):
    """:func:`_fisher_block` for the Free basis ``K_0 = J`` (all ones), ``K_c = e_c e_c'``
    (c = 1..m), in closed form: with w = W_b 1, e = E_b 1 and E_b = F_b H^-1 F_b',

        tr(Q_0 Q_0) = (1'w)^2,  tr(Q_c Q_0) = w_c^2,  tr(Q_c Q_d) = W_cd^2,
        tr(Q_0 E K_0) = (1'w)(1'e),  tr(Q_0 E K_c) = tr(Q_c E K_0) = w_c e_c,
        tr(Q_d E K_c) = W_cd E_cd,
        M_0 += (F_b'1)(F_b'1)',  M_c += F_b[c]' F_b[c]   (F_b[c]: row c),

    O(m^2 + m p^2) per block instead of O(K m^3 + K m^2 p)."""
    w = fv[0]
    e = fv[1]
    gcol = fv[2]
    a = _row_sums(W, m, w)
    eps = 0.0
    if reml:
        for x in range(m):
            for z in range(x, m):
                v = _rowdot(FH, x, F, z, p)
                Ef[x, z] = v
                Ef[z, x] = v
        eps = _row_sums(Ef, m, e)
        for i in range(p):
            v = 0.0
            for x in range(m):
                v += F[x, i]
            gcol[i] = v
        for i in range(p):
            for j in range(p):
                Mf[0, i, j] += gcol[i] * gcol[j]
                for c in range(m):
                    Mf[c + 1, i, j] += F[c, i] * F[c, j]
    FI[0, 0] += a * a - 2.0 * a * eps if reml else a * a
    for c in range(m):
        if reml:
            FI[c + 1, 0] += w[c] * w[c] - 2.0 * w[c] * e[c]
            for d in range(c + 1):
                FI[c + 1, d + 1] += W[c, d] * W[c, d] - 2.0 * W[c, d] * Ef[c, d]
        else:
            FI[c + 1, 0] += w[c] * w[c]
            for d in range(c + 1):
                FI[c + 1, d + 1] += W[c, d] * W[c, d]


@nb.njit(cache=True)
def shared_eval(mt, pt, kt, ident, free, theta, idx, drop, full, Kb, y, nu, mask, X, reml, want_grad, want_ai,
                want_fisher, rcond, ll, ok_out, beta, Hinv_out, grad, ai, fisher, rcmin):
    """Fill ``ll, ok_out, beta, Hinv_out, grad, ai, fisher, rcmin`` for every row of ``theta``.

    Fisher information (``want_fisher``), from the same pass 2: with Q_kb = W_b K_kb,
    E_b = F_b H^-1 F_b' and M_k = sum_b F_b' K_kb F_b,
    ``2 Fisher_kl = sum_b tr(Q_kb Q_lb) - [REML] (sum_b tr(Q_lb E_b K_kb) + tr(Q_kb E_b K_lb)
    - tr(H^-1 M_k H^-1 M_l))``, i.e. 1/2 tr(P K_k P K_l) (W for ML) without forming P.

    ``free``: the basis is Free's (``Kb[0] = J``, ``Kb[c] = e_c e_c'``, shared by all blocks):
    the AI terms and the Fisher block terms in closed form (the AI terms bit-identical to
    the generic loops: only products with the basis' zeros are skipped).

    theta (R, Kc); idx (R,) row of y/nu/mask; drop (R,) block left out (-1: none); full: no
    entry of ``mask`` is False (skips the per-entry checks); y, nu (G, B, m) float;
    mask (G, B, m) bool; X (B, m, p); Kb (Kc, Bk, m, m) with Bk = 1 (shared) or B. Outputs are preallocated with leading dim R."""
    R = theta.shape[0]
    Kc = len(kt)
    B = X.shape[0]
    # m, p, Kc from the lengths of ``mt, pt, kt``: with tuples the lengths are part of the
    # type, so the specialised code has constant trip counts (see SPECIALISE_MIN)
    m = len(mt)      # tuples: compile-time constants; arrays: run-time sizes
    p = len(pt)
    log2pi = math.log(2.0 * math.pi)
    A = np.empty((m, m))
    S = np.empty((m, m))
    Wb = np.empty((B, m, m))
    Fb = np.empty((B, m, p))
    piv = np.empty(max(m, p))
    Wsum = np.empty((m, m))
    Ssum = np.empty((m, m))
    Esum = np.empty((m, m))
    H = np.empty((p, p))
    Hinv = np.empty((p, p))
    c = np.empty(p)
    b = np.empty(p)
    r = np.empty(m)
    s = np.empty(m)
    u = np.empty((Kc, m))
    Wu = np.empty((Kc, m))
    Fu = np.empty((Kc, p))
    HFu = np.empty((Kc, p))
    FH = np.empty((m, p))
    AIl = np.empty((Kc, Kc))
    has = np.empty(B, np.bool_)
    base = np.empty((m, m))
    Eb = np.empty((m, m))
    gacc = np.empty(Kc)
    Qf = np.empty((Kc, m, m))
    Rf = np.empty((Kc, m, m))
    Ef = np.empty((m, m))
    Mf = np.empty((Kc, p, p))
    KF = np.empty((m, p))
    HMf = np.empty((Kc, p, p))
    FI = np.empty((Kc, Kc))
    fv = np.empty((3, max(m, p)))
    dinv = np.empty(m)
    perblock = Kb.shape[1] > 1      # a basis per block (OP: P_i' k P_i per donor)
    for row in range(R):
        g = idx[row]
        # model part of Sigma_b (once per row when the basis is shared by all blocks)
        if not perblock:
            for x in range(m):
                for z in range(m):
                    v = 0.0
                    for k in range(Kc):
                        v += theta[row, k] * Kb[k, 0, x, z]
                    base[x, z] = v
        for k in range(Kc):
            gacc[k] = 0.0
        ok = True
        logdet = 0.0
        rc_min = np.inf
        n_obs = 0
        for x in range(m):
            for z in range(m):
                Wsum[x, z] = 0.0
        for i in range(p):
            c[i] = 0.0
            for j in range(p):
                H[i, j] = 0.0
        dr = drop[row]
        for bb in range(B):
            if full:
                nob = m
            else:
                nob = 0
                for x in range(m):
                    if mask[g, bb, x]:
                        nob += 1
            if bb == dr:
                nob = 0
            has[bb] = nob > 0
            if nob == 0:
                rc_min = min(rc_min, 1.0 / m)
                continue
            n_obs += nob
            if perblock:
                for x in range(m):
                    for z in range(m):
                        v = 0.0
                        for k in range(Kc):
                            v += theta[row, k] * Kb[k, bb, x, z]
                        base[x, z] = v
            sm = False
            if free:
                # Free: Sigma_b = h J + diag(d), d_x = V_x + nu_bx (observed x); when every
                # d_x is positive and not tiny against h, the inverse by Sherman-Morrison
                # (O(m^2), no Cholesky): W = D^-1 - h / (1 + h 1'D^-1 1) D^-1 1 1' D^-1,
                # |Sigma_b| = |D| (1 + h 1'D^-1 1); otherwise (near the edge) the Cholesky path
                h = theta[row, 0]
                sinv = 0.0
                dprod = 1.0
                dmax = 0.0
                sm = True
                for x in range(m):
                    if full or mask[g, bb, x]:
                        dx = theta[row, x + 1] + nu[g, bb, x]
                        if not dx > SM_MIN * abs(h):
                            sm = False
                            break
                        di = 1.0 / dx
                        dinv[x] = di
                        sinv += di
                        dprod *= dx
                        ax = abs(h + dx)
                    else:
                        dinv[x] = 0.0
                        ax = 1.0
                    if ax > dmax:
                        dmax = ax
                den = 1.0 + h * sinv
                if sm and den > 0.0:
                    coef = h / den
                    trW = 0.0
                    for x in range(m):
                        if full or mask[g, bb, x]:
                            for z in range(x):
                                v = -coef * dinv[x] * dinv[z]
                                S[x, z] = v
                                S[z, x] = v
                            S[x, x] = dinv[x] - coef * dinv[x] * dinv[x]
                        else:
                            for z in range(x):
                                S[x, z] = 0.0
                                S[z, x] = 0.0
                            S[x, x] = 1.0
                        trW += S[x, x]
                    okb = True
                    ld = math.log(dprod * den)
                else:
                    sm = False
            if not sm:
                dmax = 0.0
                for x in range(m):
                    ox = full or mask[g, bb, x]
                    for z in range(x + 1):
                        if ox and (full or mask[g, bb, z]):
                            v = base[x, z]
                            if x == z:
                                v += nu[g, bb, x]
                        elif x == z:
                            v = 1.0
                        else:
                            v = 0.0
                        A[x, z] = v
                    if abs(A[x, x]) > dmax:
                        dmax = abs(A[x, x])
                okb, ld, trW = _chol_inv(A, m, S, piv, True)
            rc = 1.0 / (trW * dmax) if trW * dmax > 0 else 0.0
            if rcond > 0 and not rc > rcond:
                okb = False
            if rc < rc_min:
                rc_min = rc
            if not okb:
                ok = False
                break
            logdet += ld
            W = Wb[bb]
            for x in range(m):
                ox = full or mask[g, bb, x]
                for z in range(m):
                    W[x, z] = S[x, z] if (ox and (full or mask[g, bb, z])) else 0.0
                    Wsum[x, z] += W[x, z]
            if ident:       # X_b = I: F_b = W_b, H += W_b
                F = W
                for i in range(p):
                    for j in range(i, p):
                        H[i, j] += W[i, j]
            else:
                F = Fb[bb]
                for x in range(m):
                    for q in range(p):
                        v = 0.0
                        for z in range(m):
                            v += W[x, z] * X[bb, z, q]
                        F[x, q] = v
                for i in range(p):
                    for j in range(i, p):
                        v = 0.0
                        for x in range(m):
                            v += X[bb, x, i] * F[x, j]
                        H[i, j] += v
            for i in range(p):
                v = 0.0
                for x in range(m):
                    if full or mask[g, bb, x]:
                        v += F[x, i] * y[g, bb, x]
                c[i] += v
        if ok:
            for i in range(p):
                for j in range(i):
                    H[i, j] = H[j, i]
            okH, logdetH, _ = _chol_inv(H, p, Hinv, piv, False)
            ok = okH
        ok_out[row] = ok
        rcmin[row] = rc_min if ok else 0.0
        if not ok:
            _fail_row(row, p, Kc, ll, beta, Hinv_out, grad, ai, fisher, want_grad, want_ai,
                      want_fisher)
            continue
        for i in range(p):
            v = 0.0
            for j in range(p):
                v += Hinv[i, j] * c[j]
                Hinv_out[row, i, j] = Hinv[i, j]
            b[i] = v
            beta[row, i] = v
        # pass 2
        quad = 0.0
        for x in range(m):
            for z in range(m):
                Ssum[x, z] = 0.0
                Esum[x, z] = 0.0
        for k in range(Kc):
            for q in range(p):
                Fu[k, q] = 0.0
            for l in range(Kc):
                AIl[k, l] = 0.0
                FI[k, l] = 0.0
            for i in range(p):
                for j in range(p):
                    Mf[k, i, j] = 0.0
        for bb in range(B):
            if not has[bb]:
                continue
            W = Wb[bb]
            F = W if ident else Fb[bb]
            for x in range(m):
                if full or mask[g, bb, x]:
                    v = y[g, bb, x]
                    for q in range(p):
                        v -= X[bb, x, q] * b[q]
                    r[x] = v
                else:
                    r[x] = 0.0
            for x in range(m):
                v = 0.0
                for z in range(m):
                    v += W[x, z] * r[z]
                s[x] = v
                quad += v * r[x]
            kb = bb if perblock else 0
            if (want_grad or want_fisher) and reml:    # FH = F_b H^-1 (H^-1 is symmetric)
                for x in range(m):
                    for q in range(p):
                        FH[x, q] = _rowdot(F, x, Hinv, q, p)
            if want_fisher:
                if free:
                    _fisher_block_free(W, F, FH, m, p, reml, Ef, fv, Mf, FI)
                else:
                    _fisher_block(Kb, kb, W, F, FH, m, p, Kc, reml, Qf, Rf, Ef, KF, Mf, FI)
            if want_grad:
                if perblock:
                    # per-block basis: tr(K_kb (W_b - s_b s_b' - E_b)) block by block
                    for x in range(m):
                        for z in range(m):
                            e = W[x, z] - s[x] * s[z]
                            if reml:
                                e -= _rowdot(FH, x, F, z, p)
                            Eb[x, z] = e
                    for k in range(Kc):
                        v = 0.0
                        for x in range(m):
                            for z in range(m):
                                v += Kb[k, bb, x, z] * Eb[x, z]
                        gacc[k] += v
                else:
                    for x in range(m):
                        for z in range(m):
                            Ssum[x, z] += s[x] * s[z]
                    if reml:
                        for x in range(m):
                            for z in range(x, m):
                                Esum[x, z] += _rowdot(FH, x, F, z, p)
            if want_ai and free:
                # u_0 = J s = (1's) 1, u_c = s_c e_c: the generic loops below without their
                # products with zeros (same operations, same order: bit-identical sums)
                ssum = 0.0
                for z in range(m):
                    ssum += s[z]
                for x in range(m):
                    v = 0.0
                    for z in range(m):
                        v += W[x, z] * ssum
                    Wu[0, x] = v
                for q in range(p):
                    v = 0.0
                    for x in range(m):
                        v += F[x, q] * ssum
                    Fu[0, q] += v
                    for ct in range(m):
                        Fu[ct + 1, q] += F[ct, q] * s[ct]
                v = 0.0
                for x in range(m):
                    v += ssum * Wu[0, x]
                AIl[0, 0] += v
                for ct in range(m):
                    AIl[ct + 1, 0] += s[ct] * Wu[0, ct]
                    for d in range(ct + 1):
                        AIl[ct + 1, d + 1] += s[ct] * (W[ct, d] * s[d])
            elif want_ai:
                for k in range(Kc):
                    for x in range(m):
                        v = 0.0
                        for z in range(m):
                            v += Kb[k, kb, x, z] * s[z]
                        u[k, x] = v
                    for x in range(m):
                        v = 0.0
                        for z in range(m):
                            v += W[x, z] * u[k, z]
                        Wu[k, x] = v
                    for q in range(p):
                        v = 0.0
                        for x in range(m):
                            v += F[x, q] * u[k, x]
                        Fu[k, q] += v
                for k in range(Kc):
                    for l in range(k + 1):
                        v = 0.0
                        for x in range(m):
                            v += u[k, x] * Wu[l, x]
                        AIl[k, l] += v
        n_fix = p if reml else 0
        tot = logdet + quad + (n_obs - n_fix) * log2pi
        if reml:
            tot += logdetH
        ll[row] = -0.5 * tot
        if want_grad:
            if reml:
                for x in range(m):
                    for z in range(x):
                        Esum[x, z] = Esum[z, x]
            for k in range(Kc):
                v = gacc[k]
                if not perblock:
                    for x in range(m):
                        for z in range(m):
                            e = Wsum[x, z] - Ssum[x, z]
                            if reml:
                                e -= Esum[x, z]
                            v += Kb[k, 0, x, z] * e
                grad[row, k] = -0.5 * v
        if want_fisher:
            if reml:    # tr(H^-1 M_k H^-1 M_l)
                for k in range(Kc):
                    for i in range(p):
                        for j in range(p):
                            v = 0.0
                            for t in range(p):
                                v += Hinv[i, t] * Mf[k, t, j]
                            HMf[k, i, j] = v
            for k in range(Kc):
                for l in range(k + 1):
                    v = FI[k, l]
                    if reml:
                        for i in range(p):
                            for j in range(p):
                                v += HMf[k, i, j] * HMf[l, j, i]
                    fisher[row, k, l] = 0.5 * v
                    fisher[row, l, k] = 0.5 * v
        if want_ai:
            if reml:    # HFu = Fu H^-1
                for k in range(Kc):
                    for q in range(p):
                        HFu[k, q] = _rowdot(Fu, k, Hinv, q, p)
            for k in range(Kc):
                for l in range(k + 1):
                    v = AIl[k, l]
                    if reml:
                        for q in range(p):
                            v -= Fu[k, q] * HFu[l, q]
                    ai[row, k, l] = 0.5 * v
                    ai[row, l, k] = 0.5 * v


# Calls with at least this many (row x block) pairs run a version of the kernel compiled for
# their exact sizes (m, p, K as tuple lengths: constant trip counts, fully unrolled, ~2.5x
# faster); smaller calls share one version with run-time sizes. Each compiled version costs
# ~10 CPU-s once (numba caches it on disk), which only large batches repay. The environment
# variable SCDIST_CTMM_SPECIALISE_MIN overrides the threshold (the test suite raises it so that
# one compiled version serves every test size).
SPECIALISE_MIN = int(os.environ.get("SCDIST_CTMM_SPECIALISE_MIN", "20000"))


# (m, p, K) sizes whose specialised version this process has already compiled or loaded
_SPECIALISED: set = set()
# per (m, p, K): the size arguments of the specialised / run-time-size versions; per K: the
# placeholders of outputs not asked for (see evaluate_shared)
_SIZES: dict = {}
_RUNTIME_SIZES: dict = {}
_SPARE: dict = {}
# a row's left-out block: -1 (none) for calls without one (grown as needed, read-only)
_NO_DROP = np.full(1024, -1, np.int64)


def _no_drop(R: int) -> np.ndarray:
    global _NO_DROP
    if _NO_DROP.size < R:
        _NO_DROP = np.full(2 * R, -1, np.int64)
    return _NO_DROP


# Sherman-Morrison inverse of a Free block only when every d_x = V_x + nu_bx exceeds this times
# |sigma_alpha^2| (W_xx = 1/d_x - O(h / d_x^2) cancels when d_x << h; the Cholesky path then)
SM_MIN = 1e-2

# Free's basis gets the closed forms of shared_eval unless this is False (benchmarks compare
# the two paths in one process)
FREE_CLOSED_FORM = True


def is_free_basis(Kb: np.ndarray) -> bool:
    """``Kb`` (Kc, Bk, m, m) is the Free model's basis shared by all blocks: ``J`` (all ones)
    then the unit diagonals ``e_c e_c'`` for c = 1..m (CTP without extra random effects)."""
    Kc, Bk, m, _ = Kb.shape
    if Bk != 1 or Kc != m + 1:
        return False
    unit = np.zeros((m, m, m))
    unit[np.arange(m), np.arange(m), np.arange(m)] = 1.0
    return bool((Kb[0, 0] == 1.0).all() and np.array_equal(Kb[1:, 0], unit))


def evaluate_shared(y, nu, mask, X, Kb, theta, idx, drop, full: bool, reml: bool, want_grad: bool,
                    want_ai: bool, rcond: float, want_fisher: bool = False,
                    problem_rows: int = 0, free: bool | None = None,
                    ident: bool | None = None):
    """Allocate the outputs and run :func:`shared_eval`; returns a dict of arrays.

    ``free``: use the Free basis' closed forms (None: when :func:`is_free_basis`; False: the
    generic loops, kept as their reference). ``ident``: X_b = I in every block (None: checked
    here; callers with a problem pass its cached answers).

    The version compiled for the exact sizes runs when the call, or the whole problem it is
    part of (``problem_rows`` rows: an optimiser's later iterations and restarts evaluate a few
    rows of a large gene block), has at least ``SPECIALISE_MIN`` (row x block) pairs, or when
    this process already has that version (its compile cost is then paid)."""
    theta = np.ascontiguousarray(theta, dtype=np.float64)
    R, Kc = theta.shape
    p = X.shape[-1]
    m = X.shape[1]
    # outputs not asked for get shared 1-row placeholders (never written: the kernel writes
    # gradient / AI / Fisher rows only when asked)
    spare = _SPARE.get(Kc)
    if spare is None:
        spare = _SPARE[Kc] = (np.empty((1, Kc)), np.empty((1, Kc, Kc)), np.empty((1, Kc, Kc)))
    out = dict(ll=np.empty(R), ok=np.empty(R, bool), beta=np.empty((R, p)),
               Hinv=np.empty((R, p, p)), rcmin=np.empty(R),
               grad=np.empty((R, Kc)) if want_grad else spare[0],
               ai=np.empty((R, Kc, Kc)) if want_ai else spare[1],
               fisher=np.empty((R, Kc, Kc)) if want_fisher else spare[2])
    if ident is None:
        ident = p == m and np.array_equal(X, np.broadcast_to(np.eye(m), X.shape))
    idx = np.ascontiguousarray(idx, dtype=np.int64)
    drop = _no_drop(R) if drop is None else np.ascontiguousarray(drop, np.int64)
    key = (m, p, Kc)
    if key in _SPECIALISED or max(R, problem_rows) * X.shape[0] >= SPECIALISE_MIN:
        _SPECIALISED.add(key)
        sizes = _SIZES.get(key)
        if sizes is None:      # compile-time sizes: unrolled loops
            sizes = _SIZES[key] = ((0,) * m, (0,) * p, (0,) * Kc)
    else:
        sizes = _RUNTIME_SIZES.get(key)
        if sizes is None:
            sizes = _RUNTIME_SIZES[key] = (np.zeros(m, np.int64), np.zeros(p, np.int64),
                                           np.zeros(Kc, np.int64))
    if free is None:
        free = FREE_CLOSED_FORM and is_free_basis(Kb)
    elif free and (Kb.shape[1] != 1 or Kc != m + 1):    # shapes only: callers pass a checked basis
        raise ValueError("free=True needs the Free model's basis (J, e_1 e_1', ..., e_m e_m')")
    shared_eval(*sizes, bool(ident), bool(free), theta, idx, drop, bool(full), Kb, y, nu, mask, X,
                bool(reml), bool(want_grad), bool(want_ai), bool(want_fisher), float(rcond),
                out["ll"], out["ok"], out["beta"], out["Hinv"], out["grad"], out["ai"],
                out["fisher"], out["rcmin"])
    if not want_grad:
        out["grad"] = None
    if not want_ai:
        out["ai"] = None
    if not want_fisher:
        out["fisher"] = None
    return out
