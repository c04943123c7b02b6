"""softImpute for missing donor x cell type pseudobulk (CTMM Methods, "Impute pseudobulk data").

Donor x cell type pairs with too few cells have no pseudobulk mean y_ic nor noise variance nu_ic.
Chen & Dahl impute both with softImpute (Mazumder, Hastie & Tibshirani 2010, JMLR 11:2287): the
completed matrix Z minimises 0.5 ||P_Omega(X - Z)||_F^2 + lambda ||Z||_*, found by iterating

    Z <- S_lambda( P_Omega(X) + P_Omega_perp(Z) ),   S_lambda(W) = U diag((d - lambda)_+) V^T

(soft-thresholded SVD of the matrix with its missing entries filled by the current fit).  y and
nu are imputed separately, either per gene (an N x C matrix for each gene) or transcriptome-wide
(one N x C.G matrix, what the paper uses for the iPSC data).

lambda is chosen as the authors' pipeline does: columns are centred and scaled over their
observed entries, the observed entries are split into K folds, a warm-started path of lambdas
(log-spaced from lambda_0, the smallest lambda whose solution is 0, down to a small value) is fit
with each fold held out, and the lambda with the smallest mean held-out squared error is refit on
all observed entries.  Only missing entries are replaced; observed ones are returned unchanged.

Imputed nu can be negative by chance.  The paper's rules (``fix_negative_nu``): for CTP,
a negative nu_ic is set to the largest observed nu_ic of that gene and cell type (so the pair
weighs little in the likelihood); for OP, it is set to 0 before nu_i = sum_c P_ic^2 nu_ic.

Numerics only: no Dask, no Ray.  Every step is batched over genes (scope="gene") or works on the
whole N x C.G matrix at once (scope="transcriptome"); there is no Python loop over genes.
"""
from __future__ import annotations

from typing import Literal, NamedTuple

import numpy as np

from scdist.errors import InputError

__all__ = ["ImputedCTP", "soft_impute_ctp", "soft_impute", "fix_negative_nu", "op_nu"]

# Above this many matrix entries (batch x rows x cols x folds) the CV folds run one after another
# instead of stacked on the batch axis, to bound memory (~8 bytes x a few temporaries each).
_STACK_FOLDS_MAX = 20_000_000


class ImputedCTP(NamedTuple):
    """Result of :func:`soft_impute_ctp`; arrays are (donor, celltype, gene) like the input.

    mean:        y_ic with missing pairs imputed (observed pairs unchanged).
    nu:          nu_ic for CTP fits: imputed, negatives set to the gene x cell type's largest
                 observed nu.
    nu_op:       nu_ic for OP: imputed, negatives set to 0 (feed to :func:`op_nu`).
    lambda_mean: chosen lambda for the mean, shape (gene,) for scope="gene", () otherwise.
    lambda_nu:   chosen lambda for nu, same shape.
    """

    mean: np.ndarray
    nu: np.ndarray
    nu_op: np.ndarray
    lambda_mean: np.ndarray
    lambda_nu: np.ndarray


# ---------------------------------------------------------------------------------------------
# Batched soft-thresholded SVD
# ---------------------------------------------------------------------------------------------
def _soft_svd(W: np.ndarray, lam: np.ndarray, rank_max: int, rank_cap: np.ndarray | None = None):
    """S_lambda(W) for a batch W (B, n, m); lam (B,).  Returns (low-rank matrix (B, n, m),
    rank of each result (B,)).  ``rank_cap`` (B,) keeps at most that many components.

    Uses the eigendecomposition of the small Gram matrix (n x n or m x m): for the thin
    matrices here (C = 4 columns per gene, or N ~ 100 donor rows transcriptome-wide) this is far
    cheaper than a general SVD and is batched by numpy.
    """
    B, n, m = W.shape
    wide = n < m
    G = W @ W.transpose(0, 2, 1) if wide else W.transpose(0, 2, 1) @ W   # (B, k, k)
    ev, vec = np.linalg.eigh(G)                                            # ascending
    ev, vec = ev[:, ::-1][:, :rank_max], vec[:, :, ::-1][:, :, :rank_max]
    d = np.sqrt(np.clip(ev, 0.0, None))
    shrink = np.clip(d - lam[:, None], 0.0, None)
    # factor = shrink/d, 0 where d == 0 (then shrink == 0 too)
    if rank_cap is not None:
        shrink = np.where(np.arange(shrink.shape[1])[None, :] < rank_cap[:, None], shrink, 0.0)
    factor = np.divide(shrink, d, out=np.zeros_like(d), where=d > 0)
    rank = (shrink > 0).sum(axis=1)
    # W V diag(factor) V^T  (tall)  or  U diag(factor) U^T W  (wide): equals U diag(shrink) V^T
    if wide:
        return (vec * factor[:, None, :]) @ (vec.transpose(0, 2, 1) @ W), rank
    return (W @ vec) * factor[:, None, :] @ vec.transpose(0, 2, 1), rank


def _fit_path(X: np.ndarray, obs: np.ndarray, lambdas: np.ndarray, rank_max: int, *,
              maxit: int, tol: float, heldout: np.ndarray | None = None, patience: int = 3):
    """Warm-started softImpute along a decreasing lambda path for a batch.

    X: (B, n, m) data (any value at unobserved entries); obs: bool mask of the entries used for
    fitting; lambdas: (L, B).  With ``heldout`` (bool mask) returns the held-out mean squared
    error per lambda (L, B); otherwise the fitted matrix at the last lambda.

    As in the authors' CV script, the rank along the path starts at 2 and grows by at most 2
    per lambda (it is what makes the path cheap: small lambdas would otherwise fit full rank).
    In CV mode the path stops once every matrix's held-out error has been above its minimum
    for ``patience`` lambdas (the rest of the path cannot be chosen; its error is set to inf).
    Matrices converge after very different numbers of iterations, so each lambda works on the
    still-active ones, compacting the batch whenever fewer than half of its rows are active.
    """
    B = X.shape[0]
    Z = np.zeros_like(X)
    Xo = np.where(obs, X, 0.0)
    cap = np.full(B, min(2, rank_max))
    errs = np.full((len(lambdas), B), np.inf)
    n_held = np.maximum(heldout.sum(axis=(1, 2)), 1) if heldout is not None else None
    best = np.full(B, np.inf)
    worse = np.zeros(B, dtype=int)
    for li, lam in enumerate(lambdas):
        idx = np.arange(B)
        Xa, Oa, Za, La, Ca = Xo, obs, Z, lam, cap
        ranks = np.zeros(B, dtype=int)
        active = np.ones(B, dtype=bool)
        for _ in range(maxit):
            Znew, ra = _soft_svd(np.where(Oa, Xa, Za), La, rank_max, Ca)
            num = ((Znew - Za) ** 2).sum(axis=(1, 2))
            den = (Za ** 2).sum(axis=(1, 2))
            Za = Znew
            ranks[idx] = ra
            active &= num > tol * np.maximum(den, 1e-300)
            n_act = int(active.sum())
            if n_act == 0:
                break
            if n_act < 0.5 * len(idx):           # write back the converged rows, shrink
                Z[idx] = Za
                keep = np.flatnonzero(active)
                idx, Xa, Oa, Za, La, Ca = (idx[keep], Xa[keep], Oa[keep], Za[keep], La[keep],
                                           Ca[keep])
                active = np.ones(len(idx), dtype=bool)
        Z[idx] = Za
        cap = np.minimum(ranks + 2, rank_max)
        if heldout is not None:
            errs[li] = (np.where(heldout, Z - X, 0.0) ** 2).sum(axis=(1, 2)) / n_held
            worse = np.where(errs[li] < best, 0, worse + 1)
            best = np.minimum(best, errs[li])
            if (worse >= patience).all():
                break
    return errs if heldout is not None else Z


def soft_impute(X: np.ndarray, *, n_folds: int = 10, n_lambda: int = 30,
                lambda_min_ratio: float = 1e-4, rank_max: int | None = None, scale: bool = True,
                maxit: int = 100, tol: float = 1e-5, seed: int = 0):
    """Complete a batch of matrices X (B, n, m) with NaN for missing entries.

    Parameters
    ----------
    X : (B, n, m) float array, NaN = missing.  Each of the B matrices is imputed on its own.
    n_folds : K of the K-fold cross-validation over observed entries that picks lambda.
    n_lambda, lambda_min_ratio : the lambda path, log-spaced from lambda_0 (the largest singular
        value of the zero-filled, scaled matrix: the smallest lambda with a zero solution) down
        to lambda_0 * lambda_min_ratio.
    rank_max : cap on the rank of the fit (default min(n, m) - 1, as the authors' script).
    scale : centre and scale each column over its observed entries first (undone afterwards).
    maxit, tol : iterations per lambda; stop when ||Z_new - Z||^2 <= tol ||Z||^2.
    seed : fold assignment.

    Returns
    -------
    (X_completed, lambda) : completed (B, n, m) array (observed entries unchanged) and the
    chosen lambda per matrix (B,), on the scaled data.
    """
    X = np.asarray(X, dtype=np.float64)
    if X.ndim != 3:
        raise InputError(f"expected a (batch, rows, cols) array, got shape {X.shape}",
                         field="X", fix="pass donor x column matrices stacked on axis 0")
    B, n, m = X.shape
    obs = np.isfinite(X)
    n_obs_col = obs.sum(axis=1)                                        # (B, m)
    if (n_obs_col == 0).any():
        b, c = np.argwhere(n_obs_col == 0)[0]
        raise InputError(f"column {c} of matrix {b} has no observed entry, nothing to impute "
                         "it from", field="mean/nu",
                         fix="drop cell types without any observed donor for a gene "
                             "(or lower min_cells)")
    if obs.all():
        return X.copy(), np.zeros(B)
    rank_max = min(n, m) - 1 if rank_max is None else int(rank_max)
    rank_max = max(1, min(rank_max, n, m))

    if scale:
        mu = np.nanmean(X, axis=1, keepdims=True)
        sd = np.nanstd(X, axis=1, keepdims=True)
        sd = np.where(np.isfinite(sd) & (sd > 0), sd, 1.0)
    else:
        mu, sd = np.zeros((B, 1, m)), np.ones((B, 1, m))
    Xs = np.where(obs, (X - mu) / sd, 0.0)

    lam0 = np.sqrt(np.clip(np.linalg.eigvalsh(
        Xs @ Xs.transpose(0, 2, 1) if n < m else Xs.transpose(0, 2, 1) @ Xs)[:, -1], 0, None))
    lam0 = np.maximum(lam0, 1e-12)
    lambdas = lam0[None, :] * np.logspace(0.0, np.log10(lambda_min_ratio), n_lambda)[:, None]

    # K folds over each matrix's observed entries (independent assignment per matrix).  Small
    # problems stack the K training sets on the batch axis (one path instead of K).
    rng = np.random.default_rng(seed)
    fold = rng.integers(0, n_folds, size=X.shape)
    kw = dict(maxit=maxit, tol=tol)
    if B * n * m * n_folds <= _STACK_FOLDS_MAX:
        held = obs[None] & (fold[None] == np.arange(n_folds)[:, None, None, None])  # (K,B,n,m)
        held = held.reshape(n_folds * B, n, m)
        Xk = np.broadcast_to(Xs, (n_folds, B, n, m)).reshape(n_folds * B, n, m)
        obs_k = np.broadcast_to(obs, (n_folds, B, n, m)).reshape(n_folds * B, n, m) & ~held
        lam_k = np.tile(lambdas, (1, n_folds))
        cv = _fit_path(Xk, obs_k, lam_k, rank_max, heldout=held, **kw)
        cv = cv.reshape(n_lambda, n_folds, B).sum(axis=1)
    else:
        cv = np.zeros((n_lambda, B))
        for k in range(n_folds):
            held = obs & (fold == k)
            cv += _fit_path(Xs, obs & ~held, lambdas, rank_max, heldout=held, **kw)
    best = np.argmin(cv, axis=0)                                         # (B,)
    lam = lambdas[best, np.arange(B)]
    # refit on all observed entries along the path down to each matrix's chosen lambda
    path = np.where(np.arange(n_lambda)[:, None] <= best[None, :], lambdas, lam[None, :])
    path = path[: best.max() + 1]
    Z = _fit_path(Xs, obs, path, rank_max, **kw)
    out = np.where(obs, X, Z * sd + mu)
    return out, lam


# ---------------------------------------------------------------------------------------------
# CTMM-specific wrappers
# ---------------------------------------------------------------------------------------------
def _check_cube(name: str, a: np.ndarray) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    if a.ndim != 3:
        raise InputError(f"expected dims (donor, celltype, gene), got shape {a.shape}",
                         field=name, fix="pass the pseudobulk cube's variable as a numpy array")
    if np.isinf(a).any():
        raise InputError("contains infinite values", field=name,
                         fix="mark missing donor x cell type pairs with NaN, not inf")
    return a


def fix_negative_nu(nu_imputed: np.ndarray, nu_raw: np.ndarray, *,
                    target: Literal["ctp", "op"]) -> np.ndarray:
    """Apply the paper's rule for negative imputed noise variances.

    nu_imputed: imputed nu_ic (donor, celltype, gene); nu_raw: the same with NaN where the pair
    was missing (the raw, observed nu_ic).  ``target="ctp"``: a negative value becomes the
    largest raw nu_ic of its gene and cell type.  ``target="op"``: it becomes 0.
    """
    nu_imputed = np.asarray(nu_imputed, dtype=np.float64)
    neg = nu_imputed < 0
    if target == "op":
        return np.where(neg, 0.0, nu_imputed)
    if target == "ctp":
        raw_max = np.nanmax(np.where(np.isfinite(nu_raw), nu_raw, -np.inf), axis=0,
                            keepdims=True)
        return np.where(neg, np.broadcast_to(raw_max, nu_imputed.shape), nu_imputed)
    raise InputError(f"unknown target {target!r}", field="target", fix='use "ctp" or "op"')


def op_nu(nu_op: np.ndarray, P: np.ndarray) -> np.ndarray:
    """Eq 2 noise of overall pseudobulk: nu_i = sum_c P_ic^2 nu_ic (nu_op from fix_negative_nu
    with target="op"; P (donor, celltype)).  Returns (donor, gene)."""
    return np.einsum("ic,icg->ig", np.asarray(P, dtype=np.float64) ** 2, nu_op)


def _to_batches(a: np.ndarray, scope: str) -> np.ndarray:
    N, C, G = a.shape
    if scope == "gene":
        return a.transpose(2, 0, 1)                    # (G, N, C)
    return a.reshape(1, N, C * G)                      # (1, N, C.G): column c*G + g


def _from_batches(b: np.ndarray, shape: tuple[int, int, int], scope: str) -> np.ndarray:
    N, C, G = shape
    if scope == "gene":
        return b.transpose(1, 2, 0)
    return b.reshape(N, C, G)


def soft_impute_ctp(mean: np.ndarray, nu: np.ndarray, *,
                    scope: Literal["transcriptome", "gene"] = "transcriptome",
                    n_folds: int = 10, n_lambda: int = 30, lambda_min_ratio: float = 1e-4,
                    rank_max: int | None = None, scale: bool = True, maxit: int = 100,
                    tol: float = 1e-5, seed: int = 0) -> ImputedCTP:
    """Impute missing donor x cell type pairs of CTP means y_ic and noise variances nu_ic.

    Parameters
    ----------
    mean : (donor, celltype, gene) y_ic, NaN where the pair is missing (<= min_cells cells).
    nu : (donor, celltype, gene) nu_ic = sigma_ic^2 / n_ic, NaN at the same pairs (a NaN in only
        one of the two is imputed in that one).
    scope : "transcriptome" imputes one N x C.G matrix (the paper's choice for real data);
        "gene" imputes each gene's N x C matrix on its own (batched over genes).
    n_folds, n_lambda, lambda_min_ratio, rank_max, scale, maxit, tol, seed :
        see :func:`soft_impute` (lambda picked by K-fold CV over observed entries).

    Returns
    -------
    :class:`ImputedCTP` with ``mean``, ``nu`` (CTP rule for negatives), ``nu_op`` (OP rule) and
    the chosen lambdas.
    """
    mean = _check_cube("mean", mean)
    nu = _check_cube("nu", nu)
    if mean.shape != nu.shape:
        raise InputError(f"mean {mean.shape} and nu {nu.shape} differ in shape", field="nu",
                         fix="pass mean and nu from the same pseudobulk cube")
    if scope not in ("transcriptome", "gene"):
        raise InputError(f"unknown scope {scope!r}", field="scope",
                         fix='use "transcriptome" or "gene"')
    if (nu[np.isfinite(nu)] < 0).any():
        raise InputError("observed noise variances must be >= 0", field="nu",
                         fix="nu is var / n_cells of a pair; recompute the pseudobulk")
    kw = dict(n_folds=n_folds, n_lambda=n_lambda, lambda_min_ratio=lambda_min_ratio,
              rank_max=rank_max, scale=scale, maxit=maxit, tol=tol, seed=seed)
    m_imp, lam_m = soft_impute(_to_batches(mean, scope), **kw)
    n_imp, lam_n = soft_impute(_to_batches(nu, scope), **kw)
    m_imp = _from_batches(m_imp, mean.shape, scope)
    n_imp = _from_batches(n_imp, nu.shape, scope)
    if scope == "transcriptome":
        lam_m, lam_n = lam_m[0], lam_n[0]
    return ImputedCTP(mean=m_imp, nu=fix_negative_nu(n_imp, nu, target="ctp"),
                      nu_op=fix_negative_nu(n_imp, nu, target="op"),
                      lambda_mean=np.asarray(lam_m), lambda_nu=np.asarray(lam_n))
