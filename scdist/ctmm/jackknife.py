"""Leave-one-donor-out jackknife, vectorised over (gene x left-out donor).

For genes ``g`` and donors ``j`` the refit of gene g without donor j is one row of a batched
problem whose mask switches donor j's entries off; all ``G * N`` refits then run as one
batched optimisation, warm-started from each gene's full-data estimate. Rows are processed in
chunks to bound memory.
"""
from __future__ import annotations

import numpy as np

from .design import Layout, Problem
from .he import _pattern_terms, he_rows
from .linalg import _SMALL
from .optimize import maximize_with_restarts

_ROW_BUDGET = 1_500_000  # elements of one (rows, B, m, m) array per chunk (cache-sized)


def donor_weights(prob: Problem, layout: Layout) -> np.ndarray:
    """(R, N) True where donor j has at least one observed entry for row r."""
    doe = layout.donor_of_entry()                          # (B, m)
    N = int(layout.slots.max()) + 1
    R, B, m = prob.mask.shape
    if layout.slots.shape[1] == 1:                         # one donor per block
        w = np.zeros((R, N), bool)
        w[:, layout.slots[:, 0]] = prob.mask.any(axis=2)
        return w
    valid = doe.ravel() >= 0
    onehot = np.zeros((B * m, N), np.float32)
    onehot[np.flatnonzero(valid), doe.ravel()[valid]] = 1.0
    return (prob.mask.reshape(R, B * m).astype(np.float32) @ onehot) > 0

def _shares_data(prob: Problem, layout: Layout) -> bool:
    """Leave-one-out rows can share their gene's data (one donor per block, no extra random
    effects: the compiled kernel's cases)."""
    return (layout.slots.shape[1] == 1 and prob.K.shape[-1] <= _SMALL
            and (prob.K.shape[1] == 1 or prob.K.shape[0] == prob.n_vc))


def _loo_problem(prob: Problem, layout: Layout, genes: np.ndarray, share: bool = False) -> Problem:
    doe = layout.donor_of_entry()                          # (B, m)
    N = int(layout.slots.max()) + 1
    g = len(genes)
    if share:
        # row (gene i, donor j) reads gene i's data with block j (= donor j) left out
        blocks = layout.slots[:, 0]
        block_of = np.empty(N, int)
        block_of[blocks] = np.arange(len(blocks))
        return Problem(y=prob.y[genes], nu=prob.nu[genes], mask=prob.mask[genes], X=prob.X,
                       K=prob.K, n_vc=prob.n_vc, src=np.repeat(np.arange(g), N),
                       drop=np.tile(block_of, g))
    drop = doe[None] == np.arange(N)[:, None, None]        # (N, B, m)
    mask = prob.mask[genes][:, None] & ~drop[None]         # (g, N, B, m)
    B, m = doe.shape
    rep = lambda a: np.broadcast_to(a[genes][:, None], (g, N, B, m)).reshape(g * N, B, m)
    return Problem(y=rep(prob.y), nu=rep(prob.nu), mask=mask.reshape(g * N, B, m),
                   X=prob.X, K=prob.K, n_vc=prob.n_vc)


def _chunks(prob: Problem, layout: Layout, share: bool = False):
    N = int(layout.slots.max()) + 1
    B, m = layout.slots.shape[0], layout.m
    # shared-data rows hold no per-row arrays beyond the optimiser's (R, K, K) state
    per_gene = max(1, N * (B * m if share else B * m * m))
    step = max(1, _ROW_BUDGET // per_gene)
    for start in range(0, prob.rows, step):
        yield np.arange(start, min(prob.rows, start + step))


def jackknife_reml(prob: Problem, layout: Layout, theta: np.ndarray, method: str, *,
                   random_start, n_restarts: int = 3, seed: int = 0):
    """Leave-one-donor-out ML/REML refits.

    Returns ``theta_jk (R, N, K)``, ``beta_jk (R, N, p)``, ``converged (R, N)`` (a regular
    optimum) and ``rcmin (R, N)`` (the refit's smallest block condition proxy; small values
    mean the refit sits on the singular-covariance edge).
    """
    N = int(layout.slots.max()) + 1
    R, K = theta.shape
    p = prob.X.shape[-1]
    th = np.full((R, N, K), np.nan)
    be = np.full((R, N, p), np.nan)
    cv = np.zeros((R, N), bool)
    rc = np.zeros((R, N))
    share = _shares_data(prob, layout)
    for genes in _chunks(prob, layout, share):
        sub = _loo_problem(prob, layout, genes, share)
        start = np.repeat(theta[genes], N, axis=0)
        bad = ~np.isfinite(start).all(axis=1)
        if bad.any():
            start[bad] = random_start(np.random.default_rng(seed), np.repeat(genes, N)[bad])
        res = maximize_with_restarts(sub, start, method, random_start=lambda rng, rows: random_start(
            rng, np.repeat(genes, N)[rows]), n_restarts=n_restarts, seed=seed)
        th[genes] = res.theta.reshape(len(genes), N, K)
        be[genes] = res.beta.reshape(len(genes), N, p)     # GLS beta at the refit's theta
        cv[genes] = res.converged.reshape(len(genes), N)
        r = res.rcmin
        # without a condition proxy (general blocks) the regular flag is all that is known
        rc[genes] = (np.where(res.converged, 1.0, 0.0) if r is None else r).reshape(len(genes), N)
    return th, be, cv, rc


def jackknife_he(prob: Problem, layout: Layout, beta_fn):
    """Leave-one-donor-out HE refits: ``theta_jk (R, N, K)``, ``beta_jk (R, N, p)``.

    ``beta_fn(problem, theta) -> beta`` computes the fixed effects for given HE estimates.
    """
    N = int(layout.slots.max()) + 1
    R = prob.rows
    K = prob.K.shape[0]
    p = prob.X.shape[-1]
    th = np.full((R, N, K), np.nan)
    be = np.full((R, N, p), np.nan)
    # the HE normal equations' left side depends only on which entries are observed: compute
    # it once per (gene mask pattern, left-out donor) for the whole block
    B, m = prob.mask.shape[1:]
    pats, pat_of_gene = np.unique(prob.mask.reshape(R, B * m), axis=0, return_inverse=True)
    pat_of_gene = pat_of_gene.ravel()
    doe = layout.donor_of_entry()
    drop = doe[None] == np.arange(N)[:, None, None]                       # (N, B, m)
    loo_masks = (pats.reshape(-1, 1, B, m) & ~drop[None]).reshape(-1, B, m)  # (U * N, B, m)
    terms = _pattern_terms(loo_masks, prob.X, prob.K)
    for genes in _chunks(prob, layout):
        sub = _loo_problem(prob, layout, genes)
        inv = (pat_of_gene[genes][:, None] * N + np.arange(N)[None]).ravel()
        t, _ = he_rows(sub, terms, inv)
        th[genes] = t.reshape(len(genes), N, K)
        be[genes] = beta_fn(sub, t).reshape(len(genes), N, p)
    return th, be
