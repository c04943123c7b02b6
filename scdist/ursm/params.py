"""Model parameters θ = (A, α, μκ, σκ², μτ, στ²) and their initial values."""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from .simplex import project_floored_simplex


@dataclass
class Theta:
    """URSM parameters (paper Section 3).

    A (N × K): profile matrix, columns in Δ_{ε_A}; alpha (K,): Dirichlet parameter of the bulk
    proportions W_·j; mu_kappa / s2_kappa and mu_tau / s2_tau: Gaussian prior of the per-cell
    dropout-curve intercept κ_l and slope τ_l (π_il = σ(κ_l + τ_l A_{i,G_l}), Eq. 2.1).
    """

    A: np.ndarray
    alpha: np.ndarray
    mu_kappa: float
    s2_kappa: float
    mu_tau: float
    s2_tau: float

    def copy(self) -> "Theta":
        return replace(self, A=self.A.copy(), alpha=self.alpha.copy())


def naive_profile(Y: np.ndarray, G: np.ndarray, K: int) -> np.ndarray:
    """Naive estimator of Eq. 4.2: Â_ik = mean over type-k cells of Y_il / R_l (cells with R_l = 0 skipped).

    Returns N × K; columns with no cells are NaN.
    """
    R = Y.sum(axis=1)
    ok = R > 0
    frac = Y[ok] / R[ok, None]
    H = np.zeros((ok.sum(), K))
    H[np.arange(ok.sum()), G[ok]] = 1.0
    n = H.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (frac.T @ H) / n


def initial_profile(Y, G, X, K: int, markers: dict, eps: float) -> np.ndarray:
    """A⁰: naive estimate for types with cells, the bulk mean profile for the others; marker genes of
    type k are set to zero in every other column (paper Section 4.5, following ssNMF), then each column
    is floored at ε_A and projected onto Δ_ε."""
    N = (Y if Y is not None else X).shape[1]
    A = np.full((N, K), np.nan)
    if Y is not None:
        A = naive_profile(Y, G, K)
    missing = ~np.isfinite(A).all(axis=0)
    if missing.any():
        base = X.sum(axis=0) / max(X.sum(), 1) if X is not None else np.full(N, 1.0 / N)
        A[:, missing] = base[:, None]
    for k, genes in markers.items():
        others = [kk for kk in range(K) if kk != k]
        A[np.ix_(genes, others)] = 0.0
        # a marker must be expressed in its own type; give it at least the mean level
        A[genes, k] = np.maximum(A[genes, k], 1.0 / N)
    A = np.maximum(A, eps)
    return project_floored_simplex(A / A.sum(axis=0, keepdims=True), eps)


def initial_theta(Y, G, X, K: int, markers: dict, *, eps_A: float, init_dropout: str = "wide",
                  alpha0: float = 1.0) -> Theta:
    """θ⁰. ``init_dropout``: 'wide' (default) starts κ ~ N(0, 1), τ ~ N(N, N²), a prior that lets the
    first E-step move τ to where the data put it; 'pinned' starts τ's prior at N with sd N/20, which
    mimics the slow behaviour of the authors' code (τ held near N for many EM iterations)."""
    N = (Y if Y is not None else X).shape[1]
    A = initial_profile(Y, G, X, K, markers, eps_A)
    if init_dropout == "wide":
        s2_tau = float(N) ** 2
    elif init_dropout == "pinned":
        s2_tau = (N / 20.0) ** 2
    else:
        raise ValueError(init_dropout)
    return Theta(A=A, alpha=np.full(K, float(alpha0)), mu_kappa=0.0, s2_kappa=1.0,
                 mu_tau=float(N), s2_tau=s2_tau)
