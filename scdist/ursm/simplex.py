"""Euclidean projection onto the floored simplex Δ_ε = {a : a_i ≥ ε, Σ_i a_i = 1}.

Used by the M-step for each column of the profile matrix A (paper Eq. 3.7–3.8,
constraint A_ik ≥ ε_A, Σ_i A_ik = 1).
"""
from __future__ import annotations

import numpy as np


def project_floored_simplex(y: np.ndarray, eps: float = 0.0) -> np.ndarray:
    """Project each column of ``y`` (N × K, or a vector of length N) onto Δ_ε.

    The solution is x = max(y + λ, ε) with λ the root of Σ_i max(y_i + λ, ε) = 1; it is found by
    projecting y − ε onto the simplex of mass 1 − Nε (sort-based, Wang & Carreira-Perpiñán 2013)
    and adding ε back, for all columns at once. Needs N·ε ≤ 1.
    """
    y = np.asarray(y, dtype=float)
    vec = y.ndim == 1
    Y = y[:, None] if vec else y
    n = Y.shape[0]
    mass = 1.0 - n * eps
    if mass < -1e-12:
        raise ValueError(f"floor eps={eps} too large for N={n}: need N*eps <= 1")
    if mass <= 1e-15:
        out = np.full_like(Y, eps)
        return out[:, 0] if vec else out
    z = Y - eps
    s = -np.sort(-z, axis=0)                      # descending per column
    css = np.cumsum(s, axis=0) - mass
    r = np.arange(1, n + 1, dtype=float)[:, None]
    cond = s - css / r > 0
    rho = n - 1 - np.argmax(cond[::-1], axis=0)   # last index where cond holds
    lam = css[rho, np.arange(Y.shape[1])] / (rho + 1.0)
    out = np.maximum(z - lam, 0.0) + eps
    return out[:, 0] if vec else out


def project_floored_simplex_weighted(y: np.ndarray, d: np.ndarray, eps: float = 0.0) -> np.ndarray:
    """Projection onto Δ_ε in the metric Σ_i (x_i − y_i)² / d_i (d > 0), columnwise for N × K input.

    The solution is x = max(y + λ d, ε) with λ the root of Σ_i max(y_i + λ d_i, ε) = 1, found
    exactly from the sorted breakpoints b_i = (ε − y_i) / d_i. With d ≡ 1 this is
    :func:`project_floored_simplex`.
    """
    y = np.asarray(y, float)
    d = np.broadcast_to(np.asarray(d, float), y.shape)
    n, k = y.shape
    if 1.0 - n * eps <= 1e-15:
        return np.full_like(y, eps)
    b = (eps - y) / d
    order = np.argsort(b, axis=0)
    bs = np.take_along_axis(b, order, axis=0)
    cy = np.cumsum(np.take_along_axis(y, order, axis=0), axis=0)
    cd = np.cumsum(np.take_along_axis(d, order, axis=0), axis=0)
    r = np.arange(1, n + 1)[:, None]
    lam = (1.0 - (n - r) * eps - cy) / cd          # λ if exactly the first r terms are free
    upper = np.vstack([bs[1:], np.full((1, k), np.inf)])
    ok = (lam >= bs) & (lam <= upper)
    idx = np.argmax(ok, axis=0)
    lam_star = lam[idx, np.arange(k)]
    return np.maximum(y + lam_star * d, eps)
