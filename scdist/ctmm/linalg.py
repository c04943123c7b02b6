"""Batched inverses of many small symmetric positive definite matrices.

CTMM's covariance is block diagonal (one C x C block per donor, or one block per group of
donors sharing a blocked random effect), so every likelihood evaluation inverts G x B small
blocks at once. LAPACK called once per 4 x 4 matrix is dominated by call overhead; for small
blocks we run the Cholesky recursion over the matrix entries as vector operations across the
whole batch instead (structure-of-arrays), and fall back to LAPACK for large blocks.
``solve_small`` solves a stack of small general systems (the optimiser's directions) in one
compiled loop for the same reason.
"""
from __future__ import annotations

import numba as nb
import numpy as np

_SMALL = 8  # block sizes up to this use the vectorised entry-wise recursion


def spd_inverse(A: np.ndarray, rcond: float = 0.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Invert a stack of symmetric matrices ``A[..., m, m]``.

    Returns ``(W, logdet, ok)``: ``W = A^{-1}`` and ``logdet = log|A|`` where the block is
    positive definite; ``ok`` is False for blocks that are not (their ``W`` is the identity
    and ``logdet`` 0, so callers can mask them without NaN propagation). With ``rcond > 0``
    blocks whose reciprocal condition proxy (module docstring) is below ``rcond``
    (numerically singular) also count as not positive definite.
    """
    m = A.shape[-1]
    if m <= _SMALL:
        return _spd_inverse_small(A, rcond)
    return _spd_inverse_lapack(A, rcond)


def _spd_inverse_small(A: np.ndarray, rcond: float = 0.0):
    m = A.shape[-1]
    batch = A.shape[:-2]
    a = np.ascontiguousarray(np.moveaxis(A, (-2, -1), (0, 1))).reshape(m, m, -1)
    W, logdet, ok = spd_inverse_soa(a, rcond)
    W = np.moveaxis(W.reshape((m, m) + batch), (0, 1), (-2, -1))
    return W, logdet.reshape(batch), ok.reshape(batch)


def spd_inverse_soa(a: np.ndarray, rcond: float = 0.0, pivots: bool = False):
    """:func:`spd_inverse` on a structure-of-arrays stack ``a[i, j, ...]`` (m, m, *batch).

    Only the lower triangle of ``a`` is read. Returns ``W`` in the same layout (and, with
    ``pivots=True``, the reciprocal condition proxy of each block).
    """
    m = a.shape[0]
    batch = a.shape[2:]
    ok = np.ones(batch, bool)
    L = [[None] * m for _ in range(m)]
    inv_diag = [None] * m
    logdet = np.zeros(batch)
    dmax = np.abs(a[0, 0])
    for j in range(1, m):
        dmax = np.maximum(dmax, np.abs(a[j, j]))
    for j in range(m):
        d = a[j, j].copy()
        for k in range(j):
            d -= L[j][k] * L[j][k]
        good = d > 0
        ok &= good
        d = np.where(good, d, 1.0)
        ljj = np.sqrt(d)
        logdet += np.log(d)
        inv_diag[j] = 1.0 / ljj
        L[j][j] = ljj
        for i in range(j + 1, m):
            v = a[i, j].copy()
            for k in range(j):
                v -= L[i][k] * L[j][k]
            L[i][j] = v * inv_diag[j]
    # M = L^{-1} (lower triangular), forward substitution entry by entry.
    M = [[None] * m for _ in range(m)]
    for i in range(m):
        M[i][i] = inv_diag[i]
        for j in range(i):
            v = L[i][j] * M[j][j]
            for k in range(j + 1, i):
                v = v + L[i][k] * M[k][j]
            M[i][j] = -v * inv_diag[i]
    # W = M^T M (symmetric).
    W = np.empty((m, m) + batch)
    for i in range(m):
        for j in range(i, m):
            k0 = max(i, j)
            v = M[k0][i] * M[k0][j]
            for k in range(k0 + 1, m):
                v = v + M[k][i] * M[k][j]
            W[i, j] = v
            if j != i:
                W[j, i] = v
    trW = W[0, 0].copy()
    for i in range(1, m):
        trW += W[i, i]
    with np.errstate(all="ignore"):
        rc = 1.0 / (trW * dmax)
    if rcond > 0:
        ok &= rc > rcond
    bad = ~ok
    if bad.any():
        W[:, :, bad] = np.eye(m).reshape((m, m) + (1,))
        logdet[bad] = 0.0
    if pivots:
        return W, logdet, ok, rc
    return W, logdet, ok


def _spd_inverse_lapack(A: np.ndarray, rcond: float = 0.0):
    m = A.shape[-1]
    batch = A.shape[:-2]
    flat = A.reshape((-1, m, m))
    try:
        L = np.linalg.cholesky(flat)
        ok = np.ones(flat.shape[0], bool)
    except np.linalg.LinAlgError:
        ok = np.linalg.eigvalsh(flat)[:, 0] > 0
        safe = np.where(ok[:, None, None], flat, np.eye(m))
        L = np.linalg.cholesky(safe)
    if rcond > 0:
        Li = np.linalg.solve(L, np.broadcast_to(np.eye(m), flat.shape))
        trW = (Li ** 2).sum(axis=(-2, -1))
        ok &= 1.0 / (trW * np.abs(np.diagonal(flat, axis1=-2, axis2=-1)).max(-1)) > rcond
    logdet = 2.0 * np.log(np.diagonal(L, axis1=-2, axis2=-1)).sum(-1)
    eye = np.broadcast_to(np.eye(m), flat.shape)
    Linv = np.linalg.solve(L, eye)
    W = np.matmul(np.swapaxes(Linv, -1, -2), Linv)
    W[~ok] = np.eye(m)
    logdet[~ok] = 0.0
    return W.reshape(A.shape), logdet.reshape(batch), ok.reshape(batch)


@nb.njit(cache=True, inline="always")
def _eliminate(M, v, out, r, K):
    """Solve M x = v (K x K, overwritten) by Gaussian elimination with partial pivoting into
    ``out[r]``; NaN there when a pivot column is exactly zero (or NaN)."""
    singular = False
    for c in range(K):
        piv = c
        best = abs(M[c, c])
        for i in range(c + 1, K):
            if abs(M[i, c]) > best:
                best = abs(M[i, c])
                piv = i
        if not best > 0.0:          # zero (or NaN) pivot column
            singular = True
            break
        if piv != c:
            for j in range(K):
                t = M[c, j]
                M[c, j] = M[piv, j]
                M[piv, j] = t
            t = v[c]
            v[c] = v[piv]
            v[piv] = t
        for i in range(c + 1, K):
            f = M[i, c] / M[c, c]
            for j in range(c + 1, K):
                M[i, j] -= f * M[c, j]
            v[i] -= f * v[c]
    if singular:
        for i in range(K):
            out[r, i] = np.nan
        return
    for i in range(K - 1, -1, -1):
        t = v[i]
        for j in range(i + 1, K):
            t -= M[i, j] * out[r, j]
        out[r, i] = t / M[i, i]


@nb.njit(cache=True)
def _solve_rows(A, b, out):
    K = A.shape[1]
    M = np.empty((K, K))
    v = np.empty(K)
    for r in range(A.shape[0]):
        for i in range(K):
            v[i] = b[r, i]
            for j in range(K):
                M[i, j] = A[r, i, j]
        _eliminate(M, v, out, r, K)


@nb.njit(cache=True)
def _ai_step_rows(ai, g, out):
    """:func:`ai_step` row by row (the same floating-point operations in the same order)."""
    R, K = g.shape
    M = np.empty((K, K))
    v = np.empty(K)
    for r in range(R):
        # scale = max(max_k |AI_kk|, 1e-300), NaN when a diagonal entry is NaN (numpy's max)
        s = abs(ai[r, 0, 0])
        nan = s != s
        for k in range(1, K):
            a = abs(ai[r, k, k])
            if a != a:
                nan = True
            elif a > s:
                s = a
        if nan:
            s = np.nan
        elif s < 1e-300:
            s = 1e-300
        reg = 1e-10 * s
        if K == 1:
            out[r, 0] = g[r, 0] / (ai[r, 0, 0] + reg)
        else:
            for i in range(K):
                v[i] = g[r, i]
                for j in range(K):
                    M[i, j] = ai[r, i, j] + reg * (1.0 if i == j else 0.0)
            _eliminate(M, v, out, r, K)
        finite = True
        for i in range(K):
            if not np.isfinite(out[r, i]):
                finite = False
        if not finite:              # a scaled gradient step instead
            for i in range(K):
                out[r, i] = g[r, i] / s


def ai_step(ai: np.ndarray, g: np.ndarray) -> np.ndarray:
    """Newton-type directions ``(AI + 1e-10 s I)^-1 g`` for stacks of information matrices
    (R, K, K) and gradients (R, K), ``s = max_k |AI_kk|`` (at least 1e-300); a row whose
    solve is singular or not finite gets the scaled gradient ``g / s`` instead. One compiled
    loop over the rows; the optimiser's reference in numpy is ``optimize._solve_dir_numpy``."""
    ai = np.ascontiguousarray(ai, dtype=np.float64)
    g = np.ascontiguousarray(g, dtype=np.float64)
    out = np.empty(g.shape)
    _ai_step_rows(ai, g, out)
    return out


def solve_small(A: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Solve ``A[r] x[r] = b[r]`` for a stack of small square systems (R, K, K), (R, K) by
    Gaussian elimination with partial pivoting, one compiled loop over the rows (a batched
    LAPACK solve costs ~0.3 ms of call overhead at the optimiser's batch sizes). Rows with
    an exactly singular (or NaN) pivot column come back as NaN."""
    A = np.ascontiguousarray(A, dtype=np.float64)
    b = np.ascontiguousarray(b, dtype=np.float64)
    out = np.empty(b.shape)
    _solve_rows(A, b, out)
    return out
