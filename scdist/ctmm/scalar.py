"""ML / REML for one scalar observation per donor (overall pseudobulk, OP), in closed form.

Notation (Chen & Dahl, Eq 2): donor i's OP ``y_i`` has the SCALAR variance
``sigma_i^2 = sum_k theta_k k_ik + nu_i`` with ``k_ik = P_i' k_k P_i`` (``kk``: the model's
basis at donor i's cell type proportions; Free: ``hom2 + sum_c P_ic^2 V_c``, Hom: ``hom2``),
so ``Sigma = diag(sigma_i^2)`` and ``W = diag(w_i)``, ``w_i = 1 / sigma_i^2``. The fit is a
heteroscedastic regression with variance linear in theta; with ``x_i`` donor i's fixed-effect
row (``X``), ``H = sum_i w_i x_i x_i'``, ``beta = H^-1 sum_i w_i x_i y_i``,
``r_i = y_i - x_i' beta``, ``s_i = w_i r_i`` and the leverage ``h_i = x_i' H^-1 x_i``::

    ML   l = -1/2 [ n log 2pi + sum_i log sigma_i^2 + sum_i s_i r_i ]
    REML l = ML + 1/2 p log 2pi - 1/2 log|H|
    dl/dtheta_k = -1/2 sum_i k_ik (w_i - s_i^2 - [REML] w_i^2 h_i)
    AI_kl  = 1/2 [ sum_i k_ik k_il w_i s_i^2 - [REML] f_k' H^-1 f_l ],  f_k = sum_i w_i s_i k_ik x_i
    Fisher_kl = 1/2 [ sum_i k_ik k_il w_i^2 (1 - [REML] 2 w_i h_i)
                      + [REML] tr(H^-1 M_k H^-1 M_l) ],  M_k = sum_i w_i^2 k_ik x_i x_i'

(the block formulas of :mod:`scdist.ctmm.likelihood` with 1 x 1 blocks). One compiled
function evaluates a batch of rows (genes, or gene x left-out donor): per row, every sum over
donors is a dot product of a per-row donor vector (w, w s, w s^2, ...) with a row of a
per-donor table built once per problem (x_i x_i', k_ik k_il, k_ik x_i, ...), i.e. contiguous
SIMD loops, O(N (K + p)^2) per row with no C x C block and no per-block branching. A left-out
or missing donor has ``w_i = 0`` (it drops out of every sum).
"""
from __future__ import annotations

import math

import numba as nb
import numpy as np

from .blockkernel import _chol_inv

LOG2PI = float(np.log(2.0 * np.pi))

# OP problems use this kernel unless False (benchmarks compare it with the block kernel in one
# process; read when a problem first asks, see ``Problem.scalar``)
SCALAR_FORM = True


_FM = {"reassoc", "contract"}   # reordered sums: SIMD reductions over donors


class ScalarProblem:
    """Per-problem tables of the scalar form, built once (``Problem.scalar``), donor axis last.

    y, nu, obs (G, N): responses (0 where missing), noise variances (1 where missing),
    observed flags (1.0 / 0.0); kk (K, N) basis values k_ik; XT (p, N) the design x_i;
    XX (p(p+1)/2, N) the upper triangle of x_i x_i'; KK (K(K+1)/2, N) the lower triangle of
    k_ik k_il; KX (K p, N) k_ik x_i; KXX (K p(p+1)/2, N) k_ik x_i x_i' (upper triangles).
    """

    def __init__(self, y, nu, mask, X, Kb):
        B = y.shape[1]
        self.y = np.ascontiguousarray(np.where(mask[..., 0], y[..., 0], 0.0))
        self.nu = np.ascontiguousarray(np.where(mask[..., 0], nu[..., 0], 1.0))
        self.obs = np.ascontiguousarray(mask[..., 0], dtype=np.float64)
        k = np.ascontiguousarray(np.broadcast_to(Kb[:, :, 0, 0], (Kb.shape[0], B)))
        x = np.ascontiguousarray(X[:, 0, :].T)                              # (p, N)
        K, p = k.shape[0], x.shape[0]
        iu, ju = np.triu_indices(p)
        kl, ll = np.tril_indices(K)
        self.K, self.p = K, p
        self.kk, self.XT = k, x
        self.XX = np.ascontiguousarray(x[iu] * x[ju])
        self.KK = np.ascontiguousarray(k[kl] * k[ll])
        self.KX = np.ascontiguousarray((k[:, None] * x[None]).reshape(K * p, B))
        self.KXX = np.ascontiguousarray((k[:, None] * self.XX[None]).reshape(-1, B))


@nb.njit(cache=True, fastmath=_FM, inline="always")
def _dot(a, T, j, n):
    """sum_i a[i] T[j, i] (a table row without a slice: a view costs reference counting)."""
    v = 0.0
    for i in range(n):
        v += a[i] * T[j, i]
    return v


@nb.njit(cache=True, fastmath=_FM)
def _scalar_rows(theta, idx, drop, y, nu, obs, kk, XT, XX, KK, KX, KXX, reml, want_grad,
                 want_ai, want_fisher, ll, ok_out, beta, Hinv_out, grad, ai, fisher):
    R, K = theta.shape
    p, N = XT.shape
    log2pi = math.log(2.0 * math.pi)
    var = np.empty(N)
    w = np.empty(N)
    t = np.empty(N)
    u = np.empty(N)
    H = np.empty((p, p))
    Hinv = np.empty((p, p))
    piv = np.empty(p)
    c = np.empty(p)
    b = np.empty(p)
    f = np.empty((K, p))
    Hf = np.empty((K, p))
    M = np.empty((K, p, p))
    HM = np.empty((K, p, p))
    for row in range(R):
        g = idx[row]
        for i in range(N):
            var[i] = nu[g, i]
        for k in range(K):
            th = theta[row, k]
            for i in range(N):
                var[i] += th * kk[k, i]
        dr = drop[row]
        ok = True
        n_obs = 0.0
        for i in range(N):
            o = obs[g, i] if i != dr else 0.0
            if o > 0.0:
                if not var[i] > 0.0:
                    ok = False
                w[i] = 1.0 / var[i]
            else:
                w[i] = 0.0
            n_obs += o
        logdet = 0.0
        if ok:
            # log|Sigma| = sum_i log sigma_i^2: one log per run of factors kept in range
            prod = 1.0
            for i in range(N):
                if w[i] > 0.0:
                    prod *= var[i]
                    if prod > 1e150 or prod < 1e-150:
                        logdet += math.log(prod)
                        prod = 1.0
            logdet += math.log(prod)
            for i in range(N):
                t[i] = w[i] * y[g, i]
            ij = 0
            for a in range(p):
                c[a] = _dot(t, XT, a, N)
                for bb in range(a, p):
                    H[bb, a] = _dot(w, XX, ij, N)     # lower triangle: _chol_inv reads it
                    ij += 1
            okH, logdetH, _ = _chol_inv(H, p, Hinv, piv, False)
            ok = okH
        ok_out[row] = ok
        if not ok:
            ll[row] = -np.inf
            for a in range(p):
                beta[row, a] = 0.0
                for bb in range(p):
                    Hinv_out[row, a, bb] = 1.0 if a == bb else 0.0
            if want_grad:
                for k in range(K):
                    grad[row, k] = 0.0
            if want_ai:
                for k in range(K):
                    for l in range(K):
                        ai[row, k, l] = 0.0
            if want_fisher:
                for k in range(K):
                    for l in range(K):
                        fisher[row, k, l] = 0.0
            continue
        for a in range(p):
            v = 0.0
            for bb in range(p):
                v += Hinv[a, bb] * c[bb]
                Hinv_out[row, a, bb] = Hinv[a, bb]
            b[a] = v
            beta[row, a] = v
        # residuals r_i (in t), s_i = w_i r_i (in u)
        for i in range(N):
            t[i] = y[g, i]
        for a in range(p):
            ba = b[a]
            for i in range(N):
                t[i] -= ba * XT[a, i]
        quad = 0.0
        for i in range(N):
            u[i] = w[i] * t[i]
            quad += u[i] * t[i]
        n_fix = p if reml else 0
        tot = logdet + quad + (n_obs - n_fix) * log2pi
        if reml:
            tot += logdetH
        ll[row] = -0.5 * tot
        if not (want_grad or want_ai or want_fisher):
            continue
        if reml and (want_grad or want_fisher):
            # w_i^2 h_i with the leverage h_i = x_i' H^-1 x_i (into var: no longer needed)
            for i in range(N):
                var[i] = 0.0
            ij = 0
            for a in range(p):
                for bb in range(a, p):
                    h = Hinv[a, bb] if a == bb else 2.0 * Hinv[a, bb]
                    for i in range(N):
                        var[i] += h * XX[ij, i]
                    ij += 1
            for i in range(N):
                var[i] *= w[i] * w[i]
        if want_grad:
            for i in range(N):
                e = w[i] - u[i] * u[i]
                if reml:
                    e -= var[i]
                t[i] = e
            for k in range(K):
                grad[row, k] = -0.5 * _dot(t, kk, k, N)
        if want_ai:
            for i in range(N):
                t[i] = w[i] * u[i] * u[i]
            kl = 0
            for k in range(K):
                for l in range(k + 1):
                    v = 0.5 * _dot(t, KK, kl, N)
                    ai[row, k, l] = v
                    ai[row, l, k] = v
                    kl += 1
            if reml:    # f_k = sum_i w_i s_i k_ik x_i
                for i in range(N):
                    t[i] = w[i] * u[i]
                for k in range(K):
                    for a in range(p):
                        f[k, a] = _dot(t, KX, k * p + a, N)
                for k in range(K):
                    for a in range(p):
                        v = 0.0
                        for bb in range(p):
                            v += Hinv[a, bb] * f[k, bb]
                        Hf[k, a] = v
                for k in range(K):
                    for l in range(k + 1):
                        v = 0.0
                        for a in range(p):
                            v += f[k, a] * Hf[l, a]
                        ai[row, k, l] -= 0.5 * v
                        if l != k:
                            ai[row, l, k] -= 0.5 * v
        if want_fisher:
            for i in range(N):
                w2 = w[i] * w[i]
                u[i] = w2
                t[i] = w2 - 2.0 * w[i] * var[i] if reml else w2
            kl = 0
            for k in range(K):
                for l in range(k + 1):
                    fisher[row, k, l] = _dot(t, KK, kl, N)
                    kl += 1
            if reml:    # + tr(H^-1 M_k H^-1 M_l), M_k = sum_i w_i^2 k_ik x_i x_i'
                nt = p * (p + 1) // 2
                for k in range(K):
                    ij = 0
                    for a in range(p):
                        for bb in range(a, p):
                            v = _dot(u, KXX, k * nt + ij, N)
                            M[k, a, bb] = v
                            M[k, bb, a] = v
                            ij += 1
                    for a in range(p):
                        for bb in range(p):
                            v = 0.0
                            for q in range(p):
                                v += Hinv[a, q] * M[k, q, bb]
                            HM[k, a, bb] = v
                for k in range(K):
                    for l in range(k + 1):
                        v = 0.0
                        for a in range(p):
                            for bb in range(p):
                                v += HM[k, a, bb] * HM[l, bb, a]
                        fisher[row, k, l] += v
            for k in range(K):
                for l in range(k + 1):
                    v = 0.5 * fisher[row, k, l]
                    fisher[row, k, l] = v
                    fisher[row, l, k] = v


def scalar_eval(sp: ScalarProblem, theta, idx, drop, reml: bool, want_grad: bool,
                want_ai: bool, want_fisher: bool = False) -> dict:
    """Log-likelihood, GLS beta and (X'WX)^-1, and optionally gradient, AI and Fisher matrices
    at ``theta (R, K)`` for data rows ``idx (R,)`` with donor ``drop[r]`` left out (-1: none;
    None: no donor left out); the same dict as
    :func:`scdist.ctmm.blockkernel.evaluate_shared`. Rows where some observed
    ``sigma_i^2 <= 0`` or H is singular are not ok (l = -inf, beta = 0, H^-1 = I, zero
    derivatives). The condition proxy of a 1 x 1 block is 1 (``rcmin``: 1, 0 where not ok)."""
    theta = np.ascontiguousarray(theta, dtype=np.float64)
    R, K = theta.shape
    p = sp.p
    idx = np.ascontiguousarray(idx, dtype=np.int64)
    drop = np.full(R, -1, np.int64) if drop is None else np.ascontiguousarray(drop, np.int64)
    out = dict(ll=np.empty(R), ok=np.empty(R, bool), beta=np.empty((R, p)),
               Hinv=np.empty((R, p, p)),
               grad=np.empty((R, K) if want_grad else (1, K)),
               ai=np.empty((R, K, K) if want_ai else (1, K, K)),
               fisher=np.empty((R, K, K) if want_fisher else (1, K, K)))
    _scalar_rows(theta, idx, drop, sp.y, sp.nu, sp.obs, sp.kk, sp.XT, sp.XX, sp.KK, sp.KX,
                 sp.KXX, bool(reml), bool(want_grad), bool(want_ai), bool(want_fisher),
                 out["ll"], out["ok"], out["beta"], out["Hinv"], out["grad"], out["ai"],
                 out["fisher"])
    out["rcmin"] = np.where(out["ok"], 1.0, 0.0)
    for key, want in (("grad", want_grad), ("ai", want_ai), ("fisher", want_fisher)):
        if not want:
            out[key] = None
    return out
