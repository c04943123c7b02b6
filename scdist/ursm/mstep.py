"""M-step of paper Section 3.2 on pooled sufficient statistics, plus the MAP-W step of Section 4.5.

Notation (spec §1.2–1.4): c_ik = Σ_j Ê Z̃_ijk + Σ_{l:G_l=k} Y_il; C1, C2 from the single-cell
chain; ES_il = Ê S_il; R_l cell depth; G_l cell type; ε_A, ε_α floors.
"""
from __future__ import annotations

import numpy as np
from scipy.special import digamma, gammaln

from .simplex import project_floored_simplex, project_floored_simplex_weighted

A_SOLVERS = ("scaled", "euclidean")


def update_dropout_prior(Ek, Ek2, Et, Et2, floor: float = 1e-8):
    """Eq. 3.6: μκ = mean Ê κ_l, σκ² = mean Ê κ_l² − μκ² (likewise τ). Returns (μκ, σκ², μτ, στ²)."""
    mk, mt = float(np.mean(Ek)), float(np.mean(Et))
    return mk, max(float(np.mean(Ek2)) - mk * mk, floor), mt, max(float(np.mean(Et2)) - mt * mt, floor)


def collapsed_prior_mean(sum_m, sum_Pinv, L: int, mu, prec):
    """μ = (μκ, μτ) maximising the M-step objective of the EM whose missing data are (ω, S) only,
    (κ_l, τ_l) integrated out analytically (an ECME step, Liu & Rubin 1994).

    Given ω, S, cell l's augmented likelihood is exp(b_l'x − x'Λ_l x / 2) in x = (κ_l, τ_l), so with
    x ~ N(μ, D⁻¹) (D = ``prec`` = diag(σκ⁻², στ⁻²) of θᵗ) the collapsed objective is quadratic in μ
    with maximiser μ̂ = (Σ_l Ê[P_l⁻¹ Λ_l])⁻¹ Σ_l Ê[P_l⁻¹ b_l], P_l = Λ_l + D the (S3) precision.
    With m_l = P_l⁻¹ (b_l + D μᵗ) the (S3) mean, P⁻¹Λ = I − P⁻¹D and P⁻¹b = m − P⁻¹D μᵗ, so from
    ``sum_m`` = Σ_l Ê m_l and ``sum_Pinv`` = Σ_l Ê P_l⁻¹ (2 × 2) and B = Σ_l Ê P_l⁻¹ D / L (the
    share of the prior in each cell's conditional, i.e. EM's rate along the κ–τ ridge):
    μ̂ = (I − B)⁻¹ (Σ_l Ê m_l / L − B μᵗ), the fixed point that plain EM (μ ← mean Ê m_l)
    would reach by iterating with these draws held fixed. Returns None if I − B is singular."""
    B = np.asarray(sum_Pinv, float) @ np.diag(prec) / L
    I_B = np.eye(2) - B
    if not np.all(np.isfinite(I_B)) or np.linalg.cond(I_B) > 1e12:
        return None
    return np.linalg.solve(I_B, np.asarray(sum_m, float) / L - B @ np.asarray(mu, float))


def update_dropout_prior_collapsed(ridge, Ek, Ek2, Et, Et2, theta, floor: float = 1e-8):
    """(μκ, σκ², μτ, στ²) with the collapsed μ step (``collapsed_prior_mean``; ``ridge`` = averages
    of Σ_l m_l and of Σ_l P_l⁻¹ as (11, 12, 22)) followed by the complete-data σ² step given that μ:
    σκ² = mean_l Ê (κ_l − μκ)² (likewise τ). Falls back to Eq. 3.6 if I − B is singular."""
    L = len(Ek)
    V = np.array([[ridge[2], ridge[3]], [ridge[3], ridge[4]]])
    mu = collapsed_prior_mean(ridge[:2], V, L, [theta.mu_kappa, theta.mu_tau],
                              [1.0 / theta.s2_kappa, 1.0 / theta.s2_tau])
    if mu is None:
        return update_dropout_prior(Ek, Ek2, Et, Et2, floor)
    mk, mt = float(mu[0]), float(mu[1])
    s2k = float(np.mean(Ek2)) - 2.0 * mk * float(np.mean(Ek)) + mk * mk
    s2t = float(np.mean(Et2)) - 2.0 * mt * float(np.mean(Et)) + mt * mt
    return mk, max(s2k, floor), mt, max(s2t, floor)


def alpha_objective(alpha, sum_lnW, M: int) -> float:
    """M[lnΓ(Σα) − Σ lnΓ(α_k)] + Σ_k (α_k − 1) Σ_j Ê ln W_kj."""
    return float(M * (gammaln(alpha.sum()) - gammaln(alpha).sum()) + ((alpha - 1.0) * sum_lnW).sum())


def alpha_gradient(alpha, sum_lnW, M: int) -> np.ndarray:
    """∂_k = M[Ψ(Σα) − Ψ(α_k)] + Σ_j Ê ln W_kj (Eq. 3.9, second line)."""
    return M * (digamma(alpha.sum()) - digamma(alpha)) + sum_lnW


def update_alpha(alpha0, sum_lnW, M: int, eps: float, *, max_iter: int = 500, tol: float = 1e-6):
    """Projected gradient ascent on α ≥ ε_α with backtracking (objective ÷ M)."""
    a = np.maximum(np.asarray(alpha0, float), eps)
    s = np.asarray(sum_lnW, float) / M
    f = alpha_objective(a, s, 1)
    t = 1.0
    for _ in range(max_iter):
        g = alpha_gradient(a, s, 1)
        for _ls in range(60):
            an = np.maximum(a + t * g, eps)
            fn = alpha_objective(an, s, 1)
            d = an - a
            if fn >= f + g @ d - d @ d / (2 * t) - 1e-13 * abs(f):
                break
            t *= 0.5
        step = np.linalg.norm(an - a)
        a, f = an, fn
        t *= 2.0
        if step < tol:
            break
    return a


def _onehot(G, K):
    H = np.zeros((len(G), K))
    H[np.arange(len(G)), G] = 1.0
    return H


def surrogate_F(A, u, c, C1, C2, ES, R, G):
    """Jensen surrogate F_k(a; u) of spec §1.3 for every column (returns (K,)):
    Σ_i c_ik ln a_i − ½ Σ_i C2_ik a_i² + Σ_i C1_ik a_i − Σ_{l:G_l=k} R_l [ln u_l + Σ_i a_i ES_il / u_l − 1]."""
    K = A.shape[1]
    H = _onehot(G, K)
    x = (ES @ A)[np.arange(len(G)), G]
    cell = R * (np.log(u) + x / u - 1.0)
    return (c * np.log(A)).sum(0) - 0.5 * (C2 * A * A).sum(0) + (C1 * A).sum(0) - H.T @ cell


def surrogate_grad(A, u, c, C1, C2, ES, R, G):
    """Eq. 3.9: ∂F_k/∂a_i = c_ik / a_i − C2_ik a_i + C1_ik − Σ_{l:G_l=k} R_l ES_il / u_l."""
    H = _onehot(G, A.shape[1])
    return c / A - C2 * A + C1 - ES.T @ (H * (R / u)[:, None])


class ProfileObjective:
    """G_k(a) = F_k(a; u*(a)) with the optimal u_l = Σ_i a_i ES_il, for all columns at once.

    G_k ≥ F_k(·; u) with equality at u = u*(a) and the same gradient there (Eq. 3.9), so
    projected ascent on G with the Beck–Teboulle test is the spec's iteration "one step, then u ←
    Σ a ES", accepting steps at least as long."""

    def __init__(self, c, C1, C2, ES, R, G):
        keep = R > 0
        self.c, self.C1, self.C2 = c, C1, C2
        self.ES, self.R, self.G = ES[keep], R[keep], G[keep]
        self.H = _onehot(self.G, c.shape[1])
        self.rows = np.arange(len(self.G))

    def value(self, A):
        u = (self.ES @ A)[self.rows, self.G]
        with np.errstate(divide="ignore"):
            f = (self.c * np.log(A)).sum(0) - 0.5 * (self.C2 * A * A).sum(0) + (self.C1 * A).sum(0) \
                - self.H.T @ (self.R * np.log(u))
        return f, u

    def grad(self, A, u):
        return self.c / A - self.C2 * A + self.C1 - self.ES.T @ (self.H * (self.R / u)[:, None])


def update_profile(A0, c, C1, C2, ES, R, G, eps: float, *, max_iter: int = 500, tol: float = 1e-6,
                   t0=None, solver: str = "scaled"):
    """Projected gradient ascent for each column of A on Δ_{ε_A} with backtracking (Eq. 3.7–3.9).

    Columns decouple and are iterated together, each with its own step size t_k. A column without
    cells maximises Σ_i c_ik ln a_i, solved in closed form: Π_{Δε}(c_·k / Σ_i c_ik).

    ``solver='euclidean'`` is the paper's iteration a ← Π(a + t ∇G) in the Euclidean metric.
    ``solver='scaled'`` (default) uses the metric of the diagonal curvature h_i = c_ik / a_i² +
    C2_ik: a ← Π_h(a + t h⁻¹ ∇G), with the same Beck–Teboulle test in that metric. It is still a
    projected gradient ascent with backtracking, but the c ln a term makes the problem badly
    conditioned (curvature spans orders of magnitude across genes), and the scaled step converges
    in a handful of steps where the Euclidean one needs hundreds.
    Returns (A, steps, t) with t the final step sizes (reuse as ``t0`` next EM iteration).
    """
    if solver not in A_SOLVERS:
        raise ValueError(f"solver must be one of {A_SOLVERS}")
    N, K = A0.shape
    A = np.array(A0, dtype=float)
    obj = ProfileObjective(c, C1, C2, ES, R, G)
    has_cells = obj.H.sum(axis=0) > 0
    empty = ~has_cells
    if empty.any():
        tot = c[:, empty].sum(axis=0, keepdims=True)
        A[:, empty] = project_floored_simplex(c[:, empty] / np.where(tot > 0, tot, 1.0), eps)
    f, u = obj.value(A)
    g = obj.grad(A, u)
    scaled = solver == "scaled"
    if scaled:
        t = np.ones(K)
    else:
        t = np.array(t0, float) if t0 is not None else 1e-3 / np.maximum(np.abs(g).max(axis=0), 1e-300)
    active = has_cells.copy()
    steps = 0
    for it in range(max_iter):
        if not active.any():
            break
        steps = it + 1
        if scaled:
            d = 1.0 / (c / (A * A) + C2 + 1e-300)
        else:
            d = np.ones_like(A)
        tk = t.copy()
        for _ls in range(80):
            An = A.copy()
            cols = active
            y = A[:, cols] + tk[cols] * d[:, cols] * g[:, cols]
            An[:, cols] = (project_floored_simplex_weighted(y, d[:, cols], eps) if scaled
                           else project_floored_simplex(y, eps))
            fn, un = obj.value(An)
            D = An - A
            ok = fn >= f + (g * D).sum(0) - (D * D / d).sum(0) / (2 * tk) - 1e-12 * np.abs(f)
            ok |= ~active
            if ok.all():
                break
            tk = np.where(ok, tk, tk * 0.5)
        dA = np.abs(D).sum(axis=0)
        A, f, u = An, fn, un
        g = obj.grad(A, u)
        t = np.where(active, np.minimum(tk * 2.0, 1.0) if scaled else tk * 2.0, t)
        active &= dA >= tol
    return A, steps, t


def map_w_step(X, A, W, alpha):
    """One MAP-W step (paper §4.5, spec §1.4) for all bulk samples (X: M × N, W: M × K):
    W_kj ← W_kj Σ_i X_ij A_ik / (AW)_ij + α_k − 1, then normalise each sample; needs α_k ≥ 1."""
    AW = W @ A.T
    Wn = W * ((X / AW) @ A) + (alpha - 1.0)[None, :]
    Wn = np.maximum(Wn, 0.0)
    return Wn / Wn.sum(axis=1, keepdims=True)


def map_w_objective(X, A, W, alpha) -> float:
    """Σ_ij X_ij ln (AW)_ij + Σ_kj (α_k − 1) ln W_kj, the target of the MAP-W step."""
    with np.errstate(divide="ignore"):
        lw = np.where(alpha[None, :] != 1.0, (alpha - 1.0)[None, :] * np.log(W), 0.0)
    return float((X * np.log(W @ A.T)).sum() + lw.sum())


def map_w_stats(X, A, W):
    """Bulk statistics under MAP-W: Z̃_ijk = X_ij A_ik W_kj / (AW)_ij, Ê ln W = ln W, Ê W = W."""
    AW = W @ A.T
    cZ = A * ((X / AW).T @ W)
    with np.errstate(divide="ignore"):
        return cZ, np.log(W).sum(axis=0), W.copy()


def gaussian_term(Ex, Ex2, mu, s2) -> float:
    """Σ_l Ê ln N(x_l; μ, σ²)."""
    return float(-0.5 * len(Ex) * np.log(2 * np.pi * s2) - ((Ex2 - 2 * mu * Ex + mu * mu) / (2 * s2)).sum())
