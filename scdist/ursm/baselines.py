"""Baselines and metrics used to evaluate URSM (paper Section 4): naive profile (Eq. 4.2), the NMF
dropout score of Section 4.4, L1 losses and ROC AUC."""
from __future__ import annotations

import numpy as np
from scipy.stats import rankdata

from .params import naive_profile

__all__ = ["naive_profile", "nmf", "nmf_dropout_score", "auc", "roc_curve", "l1"]


def l1(est, truth) -> float:
    """Σ |est − truth| (paper's L1 loss for A and W)."""
    return float(np.abs(np.asarray(est) - np.asarray(truth)).sum())


def nmf(V: np.ndarray, rank: int, *, n_iter: int = 500, seed: int = 0, eps: float = 1e-12):
    """Rank-``rank`` NMF V ≈ B H (Lee & Seung 2000 multiplicative updates, Frobenius loss)."""
    rng = np.random.default_rng(seed)
    n, m = V.shape
    scale = np.sqrt(V.mean() / rank)
    B = rng.uniform(0.5, 1.5, size=(n, rank)) * scale
    H = rng.uniform(0.5, 1.5, size=(rank, m)) * scale
    for _ in range(n_iter):
        H *= (B.T @ V) / (B.T @ B @ H + eps)
        B *= (V @ H.T) / (B @ (H @ H.T) + eps)
    return B, H


def nmf_dropout_score(Y: np.ndarray, rank: int, *, seed: int = 0, n_iter: int = 500) -> np.ndarray:
    """Section 4.4: the rank-K NMF approximation of the depth-normalised counts; on zero entries a
    higher value suggests a dropout rather than a structural zero."""
    R = Y.sum(axis=1, keepdims=True)
    V = Y / np.maximum(R, 1)
    B, H = nmf(V, rank, seed=seed, n_iter=n_iter)
    return B @ H


def auc(score, label) -> float:
    """Area under the ROC curve of ``score`` for boolean ``label`` (Mann–Whitney, ties averaged)."""
    score = np.asarray(score, float).ravel()
    label = np.asarray(label, bool).ravel()
    n1, n0 = label.sum(), (~label).sum()
    if n1 == 0 or n0 == 0:
        return float("nan")
    r = rankdata(score)
    return float((r[label].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def roc_curve(score, label, n_points: int = 101):
    """(false positive rate, true positive rate) at ``n_points`` score quantiles."""
    score = np.asarray(score, float).ravel()
    label = np.asarray(label, bool).ravel()
    th = np.quantile(score, np.linspace(1, 0, n_points))
    tpr = np.array([(score[label] >= t).mean() for t in th])
    fpr = np.array([(score[~label] >= t).mean() for t in th])
    return fpr, tpr
