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

import numba as nb
import numpy as np

from .design import Problem
from .likelihood import EDGE, evaluate, fisher_at
from .linalg import ai_step, solve_small

# a converged optimum with a covariance block closer to singular than this (reciprocal
# condition proxy, see likelihood.RCOND) is re-examined by the random restarts
NEAR_EDGE = 1e-2
# a random restart whose iterate comes this close to a singular covariance block (condition
# proxy: the spike zone, likelihood.EDGE) is given up (see maximize_with_restarts)
RESTART_ABANDON = EDGE
# multi-start stopping rule (see maximize_with_restarts): a gene stops restarting once this
# many consecutive starts ended without a regular optimum and without raising its best
# log-likelihood by more than RESTART_STOP_TOL
RESTART_STOP_AFTER = 2
RESTART_STOP_TOL = 1e-3
# step-halving exponents tried per batched evaluation: [lo, hi) means 2^-(lo+1) .. 2^-hi
_HALVING_STAGES = ((0, 2), (2, 5), (5, 64))


@dataclass
class FitResult:
    theta: np.ndarray       # (R, K)
    loglik: np.ndarray      # (R,)
    converged: np.ndarray   # (R,) bool
    iterations: np.ndarray  # (R,) int (summed over restarts)
    rcmin: np.ndarray | None = None  # (R,) smallest block condition proxy at theta (fast path)
    beta: np.ndarray | None = None   # (R, p) GLS fixed effects at theta


def _solve_dir_numpy(ai: np.ndarray, g: np.ndarray) -> np.ndarray:
    """``linalg.ai_step`` in numpy (its reference in the tests)."""
    K = ai.shape[-1]
    scale = np.maximum(np.abs(np.diagonal(ai, axis1=1, axis2=2)).max(axis=1), 1e-300)
    if K == 1:     # one variance component (Hom): a division, no LAPACK call per row
        with np.errstate(all="ignore"):
            d = g / (ai[:, 0] + 1e-10 * scale[:, None])
        bad = ~np.isfinite(d[:, 0])
        if bad.any():
            d[bad] = g[bad] / scale[bad, None]
        return d
    A = ai + (1e-10 * scale)[:, None, None] * np.eye(K)
    with np.errstate(all="ignore"):
        d = solve_small(A, g)                # NaN rows where A is singular
    bad = ~np.isfinite(d).all(axis=1)
    if bad.any():  # fall back to a scaled gradient step
        d[bad] = g[bad] / scale[bad, None]
    return d


# the optimiser's AI / Newton directions (benchmarks swap in other solvers)
_solve_dir = ai_step


def _newton_dir(prob: Problem, theta: np.ndarray, grad: np.ndarray, ai: np.ndarray,
                method: str, rows) -> np.ndarray:
    """Exact Newton direction with the observed information ``2 AI - Fisher`` (valid for
    covariances linear in theta) where it is positive definite, else the AI direction;
    ``rows``: the problem rows of ``theta``."""
    obs = 2.0 * ai - fisher_at(prob, theta, method, rows=rows)
    d = _solve_dir(ai, grad)
    with np.errstate(all="ignore"):
        pd = np.linalg.eigvalsh(obs)[:, 0] > 0
    if pd.any():
        d[pd] = _solve_dir(obs[pd], grad[pd])
    return d


@nb.njit(cache=True)
def _accept_rows(rows, ncand, cand, ok, cll, cgrad, cai, cbeta, crc, track_rc, theta, ll, grad,
                 AI, flat, rcmin, beta, first):
    """Line search bookkeeping for ``rows`` (problem-row indices into the state arrays) whose
    candidates are ``cand[i * ncand + j]``, j = 0.. in order of decreasing step length: each
    row takes its first candidate where Sigma is positive definite and the log-likelihood did
    not drop (by more than 1e-10 |l|), storing theta, l, gradient, AI, beta and (``track_rc``)
    rcmin; ``flat`` counts consecutive accepted steps that changed l by at most
    1e-10 max(|l|, 1). ``first[i]``: the candidate taken, -1 for none."""
    K = cand.shape[1]
    p = cbeta.shape[1]
    for i in range(rows.size):
        r = rows[i]
        old = ll[r]
        thr = old - 1e-10 * abs(old)
        f = -1
        for j in range(ncand):
            c = i * ncand + j
            if ok[c] and cll[c] >= thr:
                f = j
                break
        first[i] = f
        if f < 0:
            continue
        c = i * ncand + f
        new = cll[c]
        m = abs(old)
        if m < 1.0:
            m = 1.0
        flat[r] = flat[r] + 1 if (new - old) <= 1e-10 * m else 0
        ll[r] = new
        for k in range(K):
            theta[r, k] = cand[c, k]
            grad[r, k] = cgrad[c, k]
            for l in range(K):
                AI[r, k, l] = cai[c, k, l]
        for q in range(p):
            beta[r, q] = cbeta[c, q]
        if track_rc:
            rcmin[r] = crc[c]


def _accept_take(rows, ncand, cand, st, theta, ll, grad, AI, flat, rcmin, beta) -> np.ndarray:
    """:func:`_accept_rows` for a state ``st`` of the candidates; returns ``first``."""
    first = np.empty(rows.size, np.int64)
    track = rcmin is not None
    c = np.ascontiguousarray
    _accept_rows(c(rows, dtype=np.int64), ncand, c(cand), c(st.ok), c(st.loglik), c(st.grad),
                 c(st.ai), c(st.beta), c(st.rcmin) if track else ll, track, theta, ll, grad, AI,
                 flat, rcmin if track else ll, beta, first)
    return first


def maximize(prob: Problem, theta0: np.ndarray, method: str = "reml", *, max_iter: int = 60,
             tol: float = 1e-9, max_halvings: int = 12, rows=None,
             newton: bool = False, abandon: float = 0.0) -> FitResult:
    """AI-Newton from ``theta0`` (R, K); converged when the Newton decrement ``g' AI^{-1} g / 2``
    falls below ``tol`` (log-likelihood units). Rows whose AI steps needed repeated halving
    (typically near the positive-definiteness boundary with negative variance components)
    switch to exact Newton steps with the observed information.

    ``rows`` (optional, R): the problem row each theta row fits, i.e. the same as
    ``maximize(prob.take(rows), theta0)`` without a new problem (the restarts use it, so a
    problem's per-row statistics are built once).

    ``abandon`` > 0: a row stops (not converged) as soon as its iterate has a covariance block
    closer to singular than that (condition proxy, compiled kernels only); the restarts use it
    (see :func:`maximize_with_restarts`)."""
    R, K = theta0.shape
    theta = np.array(theta0, float)
    data = np.arange(R) if rows is None else np.asarray(rows)
    st = evaluate(prob, theta, method, rows=None if rows is None else data)
    ll = st.loglik.copy()
    g, ai = st.grad, st.ai
    conv = np.zeros(R, bool)
    iters = np.zeros(R, int)
    failed = ~st.ok
    active = np.flatnonzero(~failed)
    grad = np.zeros((R, K))
    AI = np.zeros((R, K, K))
    grad[active], AI[active] = g[active], ai[active]
    hard = np.full(R, bool(newton))
    flat = np.zeros(R, int)   # consecutive accepted steps that changed l by < 1e-10 |l|
    rcmin = None if st.rcmin is None else st.rcmin.copy()
    beta = st.beta.copy()
    for _ in range(max_iter):
        if abandon > 0 and rcmin is not None:
            active = active[rcmin[active] >= abandon]
        if active.size == 0:
            break
        d = _solve_dir(AI[active], grad[active])
        h = hard[active]
        if h.any():
            rows = active[h]
            d[h] = _newton_dir(prob, theta[rows], grad[rows], AI[rows], method, data[rows])
        dec = 0.5 * np.einsum("rk,rk->r", d, grad[active])
        done = (dec < tol) | (flat[active] >= 2)
        conv[active[done]] = True
        active, d = active[~done], d[~done]
        if active.size == 0:
            break
        iters[active] += 1
        # full step for every active row, then shorter steps 2^-1 .. 2^-max_halvings for the
        # rows that did not improve, a few step lengths per batched evaluation (most rows
        # accept one of the first; the rest try the next ones). Each row takes the longest
        # accepted step, exactly as if every length had been tried at once.
        cand1 = theta[active] + d
        st1 = evaluate(prob, cand1, method, rows=data[active])
        first = _accept_take(active, 1, cand1, st1, theta, ll, grad, AI, flat, rcmin, beta)
        pending = np.flatnonzero(first < 0)
        for lo, hi in _HALVING_STAGES:
            hi = min(hi, max_halvings)
            if not pending.size or lo >= hi:
                break
            rows = active[pending]
            alphas = 0.5 ** np.arange(lo + 1, hi + 1)
            cand = (theta[rows][:, None] + alphas[None, :, None] * d[pending][:, None]).reshape(-1, K)
            stc = evaluate(prob, cand, method, rows=data[np.repeat(rows, alphas.size)])
            first = _accept_take(rows, alphas.size, cand, stc, theta, ll, grad, AI, flat, rcmin,
                                 beta)
            hit = first >= 0
            hard[rows[hit & (lo + first >= 2)]] = True
            pending = pending[~hit]
        if pending.size:
            # no ascent even for tiny steps along the AI direction: retry with exact Newton
            # steps; if those fail too we sit on the boundary of the parameter space (the
            # RCOND guard), which counts as the constrained optimum
            stuck = active[pending]
            retry = ~hard[stuck]
            hard[stuck[retry]] = True
            conv[stuck[~retry]] = True
            active = np.setdiff1d(active, stuck[~retry])
    # a maximum where some covariance block is numerically singular is a likelihood spike
    # created by negative variance components, not a regular optimum: report it as failed
    # so that restarts look for the regular maximum
    # (every kernel that tracks rcmin flags edge = rcmin < EDGE on its positive definite rows,
    # and a row's state is always one where Sigma is positive definite or ll = -inf)
    edge = rcmin < EDGE if rcmin is not None else np.zeros(R, bool)
    return FitResult(theta=theta, loglik=ll, converged=conv & np.isfinite(ll) & ~edge,
                     iterations=iters, rcmin=rcmin, beta=beta)


def near_edge(res: FitResult) -> np.ndarray:
    """(R,) fits whose covariance has a block within ``NEAR_EDGE`` of singular.

    There the likelihood is rugged (every donor whose noise ``nu_ic`` is small adds a bump as
    its block approaches singularity once variance components go negative), so a converged
    fit may be a poor local maximum."""
    if res.rcmin is None:
        return np.zeros(res.theta.shape[0], bool)
    return res.rcmin < NEAR_EDGE


def restart_rounds(n_restarts: int, stop_after: int = 0) -> list[int]:
    """Restarts per round: one, then all the others at once (``[1, n - 1]``); with the
    stopping rule (``stop_after`` = k > 0, see :func:`maximize_with_restarts`) one, then k,
    then the others (``[1, k, n - 1 - k]``), so that the rule can stop a gene after start
    k + 1.

    Most genes a restart can rescue are rescued by the first one; the rest rarely are (on
    the reference's 300-gene set none of the 24 genes left after the first restart, at
    N = 50 under Hom 0 of 129), yet each of them gets every restart. Running the later
    restarts as rows of one optimisation instead of sequential ones keeps the batches
    large (fewer optimiser iterations over tiny active sets, the size-specialised kernel)."""
    if stop_after <= 0 or n_restarts <= 1 + stop_after:
        return [r for r in (min(1, n_restarts), n_restarts - 1) if r > 0]
    return [1, stop_after, n_restarts - 1 - stop_after]


def maximize_with_restarts(prob: Problem, theta0: np.ndarray, method: str = "reml", *,
                           random_start, n_restarts: int = 10, seed: int = 0,
                           stop_after: int | None = None, stop_tol: float | None = None,
                           **kw) -> FitResult:
    """:func:`maximize`, then up to ``n_restarts`` random restarts for rows without a regular
    optimum, keeping the best: a regular optimum beats any other end point, and among regular
    optima (or among the others) the higher likelihood wins.

    Regular means converged (Newton decrement below ``tol``) with every covariance block at
    least ``NEAR_EDGE`` away from singular (:func:`near_edge`). Near that edge the likelihood
    is rugged -- each donor whose noise ``nu_ic`` is small adds a bump as its block approaches
    singularity once variance components go negative -- so an optimum there cannot be
    certified as the maximum (another start finds a higher bump); such fits are restarted like
    failed ones and, if no restart finds a regular optimum, reported with ``converged=False``.

    Restarts run in rounds (:func:`restart_rounds`); within a round every row without a regular
    optimum gets that many starts at once, and the rule is applied in start order exactly as
    if they had run one after the other: the first start that reaches a regular optimum wins
    (the row then stops restarting); otherwise a start replaces the current end point when its
    likelihood is higher. Start j of a round is drawn after start j - 1 for every row still
    without a regular optimum, so the draws are those of sequential restarts. ``iterations``
    counts every start that ran.

    Stopping rule (``stop_after`` = k > 0): a row also stops restarting once k consecutive
    starts ended without a regular optimum and none of them raised its best log-likelihood by
    more than ``stop_tol`` (checked at the end of a round; the rounds are ``[1, k, n - 1 - k]``).
    Such a row keeps finding the same or other spikes at the singular-covariance edge: on the
    reference's 300-gene set and on 1,000 null genes at N = 20 and 50 no start after the
    third rescued a gene (see the README). Stopped rows are still drawn for, so every other
    row gets the starts it gets without the rule. ``stop_after=0``: every row gets all
    ``n_restarts`` starts.

    ``random_start(rng, rows) -> (len(rows), K)`` draws starting points.
    """
    stop_after = RESTART_STOP_AFTER if stop_after is None else int(stop_after)
    stop_tol = RESTART_STOP_TOL if stop_tol is None else float(stop_tol)
    res = maximize(prob, theta0, method, **kw)
    res.converged &= ~near_edge(res)
    rng = np.random.default_rng(seed)
    stopped = np.zeros(res.theta.shape[0], bool)
    streak = np.zeros(res.theta.shape[0], int)     # consecutive starts without progress
    for k in restart_rounds(n_restarts, stop_after):
        drawn = np.flatnonzero(~res.converged)
        if drawn.size == 0:
            break
        rows = np.tile(drawn, k)                # start-major: start j of every row together
        start = random_start(rng, rows)
        go = ~stopped[drawn]
        bad = drawn[go]
        nb = bad.size
        if nb == 0:
            break
        keep = np.tile(go, k)
        rows, start = rows[keep], start[keep]
        r2 = maximize(prob, start, method, rows=rows, abandon=RESTART_ABANDON, **kw)
        r2.converged &= ~near_edge(r2)
        reg = r2.converged.reshape(k, nb)
        ll = r2.loglik.reshape(k, nb)
        cols = np.arange(nb)
        # the first regular start, else the highest likelihood (earliest of ties)
        pick = np.where(reg.any(axis=0), reg.argmax(axis=0), ll.argmax(axis=0))
        if stop_after > 0:
            best = res.loglik[bad].copy()
            st = streak[bad]
            for j in range(k):              # the rule in start order (rescued rows drop out)
                up = np.isfinite(ll[j]) & (ll[j] > best + stop_tol)
                st = np.where(up | reg[j], 0, st + 1)
                best = np.where(np.isfinite(ll[j]) & (ll[j] > best), ll[j], best)
            streak[bad] = st
            stopped[bad] = (st >= stop_after) & ~reg.any(axis=0)
        better = reg[pick, cols] | (ll[pick, cols] > res.loglik[bad])
        src = (pick * nb + cols)[better]
        sel = bad[better]
        res.theta[sel] = r2.theta[src]
        res.loglik[sel] = r2.loglik[src]
        res.converged[sel] = r2.converged[src]
        if res.rcmin is not None and r2.rcmin is not None:
            res.rcmin[sel] = r2.rcmin[src]
        res.beta[sel] = r2.beta[src]
        res.iterations[bad] += r2.iterations.reshape(k, nb).sum(axis=0)
    return res
