"""Batched maximisation of the ML / REML likelihood over many rows at once.

Average-information (AI) Newton steps ``theta <- theta + alpha AI^{-1} grad`` with step
halving until the likelihood increases and the covariance stays positive definite. All rows
(genes, or gene x left-out donor) iterate together; rows drop out of the active set as they
converge, so late iterations only touch the hard rows. Variance components may go negative
(as in Chen & Dahl) as long as every covariance block stays positive definite. Rows that fail
are refitted from random starting points (the paper reruns up to 10 random restarts), keeping
the best converged solution.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .design import Problem
from .likelihood import evaluate


@dataclass
class FitResult:
    theta: np.ndarray       # (R, K)
    loglik: np.ndarray      # (R,)
    converged: np.ndarray   # (R,) bool
    iterations: np.ndarray  # (R,) int (summed over restarts)


def _solve_dir(ai: np.ndarray, g: np.ndarray) -> np.ndarray:
    K = ai.shape[-1]
    scale = np.maximum(np.abs(np.diagonal(ai, axis1=1, axis2=2)).max(axis=1), 1e-300)
    A = ai + (1e-10 * scale)[:, None, None] * np.eye(K)
    with np.errstate(all="ignore"):
        try:
            d = np.linalg.solve(A, g[..., None])[..., 0]
        except np.linalg.LinAlgError:
            d = np.full_like(g, np.nan)
            for i in range(len(g)):          # rare: only when a batch holds a singular AI
                try:
                    d[i] = np.linalg.solve(A[i], g[i])
                except np.linalg.LinAlgError:
                    pass
    bad = ~np.isfinite(d).all(axis=1)
    if bad.any():  # fall back to a scaled gradient step
        d[bad] = g[bad] / scale[bad, None]
    return d


def maximize(prob: Problem, theta0: np.ndarray, method: str = "reml", *, max_iter: int = 60,
             tol: float = 1e-7, max_halvings: int = 30) -> FitResult:
    """AI-Newton from ``theta0`` (R, K); converged when the Newton decrement ``g' AI^{-1} g / 2``
    falls below ``tol`` (log-likelihood units)."""
    R, K = theta0.shape
    theta = np.array(theta0, float)
    st = evaluate(prob, theta, method)
    ll = st.loglik.copy()
    g, ai = st.grad, st.ai
    conv = np.zeros(R, bool)
    iters = np.zeros(R, int)
    failed = ~st.ok
    active = np.flatnonzero(~failed)
    grad = np.zeros((R, K))
    AI = np.zeros((R, K, K))
    grad[active], AI[active] = g[active], ai[active]
    for _ in range(max_iter):
        if active.size == 0:
            break
        d = _solve_dir(AI[active], grad[active])
        dec = 0.5 * np.einsum("rk,rk->r", d, grad[active])
        done = dec < tol
        conv[active[done]] = True
        active, d = active[~done], d[~done]
        if active.size == 0:
            break
        iters[active] += 1
        alpha = np.ones(active.size)
        pending = np.arange(active.size)
        for _h in range(max_halvings):
            rows = active[pending]
            cand = theta[rows] + alpha[pending, None] * d[pending]
            stc = evaluate(prob.take(rows), cand, method)
            better = stc.ok & (stc.loglik >= ll[rows] - 1e-10 * np.abs(ll[rows]))
            acc = rows[better]
            theta[acc] = cand[better]
            ll[acc] = stc.loglik[better]
            grad[acc] = stc.grad[better]
            AI[acc] = stc.ai[better]
            pending = pending[~better]
            if pending.size == 0:
                break
            alpha[pending] *= 0.5
        if pending.size:
            # no ascent along the AI direction: a (numerical) optimum if the gradient is tiny
            stuck = active[pending]
            gn = np.abs(grad[stuck]).max(axis=1)
            conv[stuck[gn < 1e-4]] = True
            failed[stuck] = True
            active = np.setdiff1d(active, stuck)
    return FitResult(theta=theta, loglik=ll, converged=conv & np.isfinite(ll), iterations=iters)


def maximize_with_restarts(prob: Problem, theta0: np.ndarray, method: str = "reml", *,
                           random_start, n_restarts: int = 10, seed: int = 0, **kw) -> FitResult:
    """:func:`maximize`, then up to ``n_restarts`` random restarts for rows that failed.

    ``random_start(rng, rows) -> (len(rows), K)`` draws starting points.
    """
    res = maximize(prob, theta0, method, **kw)
    rng = np.random.default_rng(seed)
    for _ in range(n_restarts):
        bad = np.flatnonzero(~res.converged)
        if bad.size == 0:
            break
        start = random_start(rng, bad)
        r2 = maximize(prob.take(bad), start, method, **kw)
        better = r2.converged | (~res.converged[bad] & (r2.loglik > res.loglik[bad]))
        sel = bad[better]
        res.theta[sel] = r2.theta[better]
        res.loglik[sel] = r2.loglik[better]
        res.converged[sel] = r2.converged[better]
        res.iterations[bad] += r2.iterations
    return res
