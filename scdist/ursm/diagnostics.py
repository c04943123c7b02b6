"""Convergence diagnostics across independent Gibbs chains (split R-hat, Gelman et al. BDA3 §11.4)."""
from __future__ import annotations

import numpy as np


def split_rhat_from_moments(s1: np.ndarray, s2: np.ndarray, n: int) -> np.ndarray:
    """Split R-hat from per-sequence sums. ``s1``/``s2``: (n_seq, ...) Σ x and Σ x² over the ``n`` draws
    of each sequence (each chain contributes its two halves as two sequences). Elementwise result."""
    if n < 2 or s1.shape[0] < 2:
        return np.full(s1.shape[1:], np.nan)
    mean = s1 / n
    var = np.maximum(s2 - n * mean * mean, 0.0) / (n - 1)
    W = var.mean(axis=0)
    B = n * mean.var(axis=0, ddof=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.sqrt(((n - 1) / n * W + B / n) / W)
    return np.where(W > 1e-300, r, np.nan)


def split_rhat_traces(traces: np.ndarray) -> float:
    """Split R-hat of a scalar from (chains, T) traces."""
    traces = np.asarray(traces, float)
    h = traces.shape[1] // 2
    seqs = np.concatenate([traces[:, :h], traces[:, traces.shape[1] - h:]], axis=0)
    return float(split_rhat_from_moments(seqs.sum(1), (seqs * seqs).sum(1), h))


def max_finite(x) -> float:
    x = np.asarray(x, float)
    x = x[np.isfinite(x)]
    return float(x.max()) if x.size else float("nan")
