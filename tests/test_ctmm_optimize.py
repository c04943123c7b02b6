"""CTMM optimiser: batched restart rounds apply the sequential rule, abandoned restarts."""
from __future__ import annotations

import numpy as np
import pytest

import scdist.ctmm as ctmm
from scdist.ctmm import optimize as opt
from scdist.ctmm.kernel import FitConfig, _Fitter


@pytest.fixture(autouse=True)
def _one_compiled_kernel(monkeypatch):
    """One compiled kernel version for every size (see test_ctmm_fit)."""
    from scdist.ctmm import blockkernel

    monkeypatch.setattr(blockkernel, "SPECIALISE_MIN", 10 ** 12)


def _free_problem(n_genes=60, n_donors=20, seed=4):
    """Free fits of Hom-simulated genes at small N: many end on the singular-covariance edge
    (the genes the restarts are for)."""
    sim = ctmm.simulate_ctp(n_genes, n_donors, 4, hom2=0.25, V=[0, 0, 0, 0], seed=seed)
    Y = sim["mean"].transpose("gene", "donor", "celltype").values
    NU = sim["nu"].transpose("gene", "donor", "celltype").values
    fitter = _Fitter(Y, NU, np.isfinite(Y), None, [], None, 4, FitConfig())
    return fitter, fitter.problem("free")


def _recording_draw(fitter):
    """Free random starts that also record each call's (rows, starts) for a sequential replay."""
    draw = fitter.random_start("free")
    starts = []

    def recording(rng, rows):
        th = draw(rng, rows)
        starts.append((np.array(rows), th.copy()))
        return th

    return draw, recording, starts


def _round_starts(rows, th):
    """Split one recorded round (its starts stacked start by start) into (rows, starts) per start."""
    k = len(rows) // len(np.unique(rows))
    nb = len(rows) // k
    return [(rows[j * nb:(j + 1) * nb], th[j * nb:(j + 1) * nb]) for j in range(k)]


def test_restart_rounds_apply_the_sequential_rule_in_start_order():
    """Every start of a round is one row of one optimisation; the result must be what running
    the same starts one after the other gives: the first start reaching a regular optimum
    wins (the row then stops), otherwise a start replaces the end point when its likelihood
    is higher. (Without the stopping rule: every row gets every start.)"""
    fitter, prob = _free_problem(n_donors=15, seed=3)    # restarts 1 and 2-5 rescue genes
    _, recording, starts = _recording_draw(fitter)
    n = 5
    assert opt.restart_rounds(n) == [1, 4]
    res = opt.maximize_with_restarts(prob, fitter.start("free"), "reml", random_start=recording,
                                     n_restarts=n, seed=3, stop_after=0)
    # sequential replay of the same starts
    ref = opt.maximize(prob, fitter.start("free"), "reml")
    ref.converged &= ~opt.near_edge(ref)
    assert 0 < (~ref.converged).sum() < prob.rows      # some genes need the restarts
    n_regular_by_restart = 0
    for rows, th in starts:
        for r, t in _round_starts(rows, th):
            todo = ~ref.converged[r]                    # still without a regular optimum
            r, t = r[todo], t[todo]
            if not r.size:
                continue
            r2 = opt.maximize(prob, t, "reml", rows=r, abandon=opt.RESTART_ABANDON)
            r2.converged &= ~opt.near_edge(r2)
            better = r2.converged | (r2.loglik > ref.loglik[r])
            n_regular_by_restart += int(r2.converged.sum())
            ref.theta[r[better]] = r2.theta[better]
            ref.loglik[r[better]] = r2.loglik[better]
            ref.converged[r[better]] = r2.converged[better]
            ref.beta[r[better]] = r2.beta[better]
    np.testing.assert_array_equal(res.converged, ref.converged)
    np.testing.assert_array_equal(res.loglik, ref.loglik)
    np.testing.assert_array_equal(res.theta, ref.theta)
    np.testing.assert_array_equal(res.beta, ref.beta)
    # a restart reaches a regular optimum in both rounds here (in round 2 all four starts of
    # one gene do: the first is kept)
    assert n_regular_by_restart >= 2


def test_abandoned_rows_stop_in_the_spike_zone_and_others_are_unchanged():
    """``abandon``: a row whose iterate gets closer to singular than the threshold stops there,
    not converged; a row that never does follows exactly the path it follows without it."""
    fitter, prob = _free_problem(seed=6)
    rng = np.random.default_rng(0)
    start = fitter.random_start("free")(rng, np.arange(prob.rows))
    free = opt.maximize(prob, start, "reml")
    stop = opt.maximize(prob, start, "reml", abandon=opt.RESTART_ABANDON)
    gave_up = stop.rcmin < opt.RESTART_ABANDON
    assert gave_up.any() and (~gave_up).any()
    assert not stop.converged[gave_up].any()
    assert (stop.iterations[gave_up] <= free.iterations[gave_up]).all()
    for name in ("theta", "loglik", "beta", "rcmin", "iterations", "converged"):
        np.testing.assert_array_equal(getattr(stop, name)[~gave_up], getattr(free, name)[~gave_up])


def test_stopping_rule_replays_sequentially_and_changes_only_stopped_rows():
    """Multi-start stopping rule: a row stops restarting once ``stop_after`` consecutive starts
    ended non-regular without raising its best log-likelihood by more than ``stop_tol``
    (checked at round ends; rounds [1, k, n - 1 - k]). The batched rounds must equal a
    sequential replay of the same draws with that rule, and rows the rule never stops must
    end exactly where they end when every row gets every start."""
    fitter, prob = _free_problem(n_donors=15, seed=3)
    draw, recording, starts = _recording_draw(fitter)
    n, k, tol = 6, 2, 1e-3
    assert opt.restart_rounds(n, k) == [1, 2, 3]
    res = opt.maximize_with_restarts(prob, fitter.start("free"), "reml", random_start=recording,
                                     n_restarts=n, seed=3, stop_after=k, stop_tol=tol)
    ref = opt.maximize(prob, fitter.start("free"), "reml")
    ref.converged &= ~opt.near_edge(ref)
    stopped = np.zeros(prob.rows, bool)
    streak = np.zeros(prob.rows, int)
    for rows, th in starts:
        per_start = _round_starts(rows, th)
        # stopped rows are still drawn for (the other rows' draws do not depend on the rule)
        assert set(per_start[0][0]) == set(np.flatnonzero(~ref.converged))
        for r, t in per_start:
            todo = ~ref.converged[r] & ~stopped[r]
            r, t = r[todo], t[todo]
            if not r.size:
                continue
            r2 = opt.maximize(prob, t, "reml", rows=r, abandon=opt.RESTART_ABANDON)
            r2.converged &= ~opt.near_edge(r2)
            for i, g in enumerate(r):
                up = np.isfinite(r2.loglik[i]) and r2.loglik[i] > ref.loglik[g] + tol
                streak[g] = 0 if (up or r2.converged[i]) else streak[g] + 1
                if r2.converged[i] or r2.loglik[i] > ref.loglik[g]:
                    ref.theta[g], ref.loglik[g] = r2.theta[i], r2.loglik[i]
                    ref.converged[g], ref.beta[g] = r2.converged[i], r2.beta[i]
        stopped |= (streak >= k) & ~ref.converged
    assert stopped.any() and (~stopped & ~ref.converged).any()
    np.testing.assert_array_equal(res.converged, ref.converged)
    np.testing.assert_array_equal(res.loglik, ref.loglik)
    np.testing.assert_array_equal(res.theta, ref.theta)
    # rows never stopped: exactly the result of the same rounds without stops (a tolerance of
    # -inf counts every finite start as progress)
    full = opt.maximize_with_restarts(prob, fitter.start("free"), "reml", random_start=draw,
                                      n_restarts=n, seed=3, stop_after=k, stop_tol=-np.inf)
    np.testing.assert_array_equal(res.converged, full.converged)     # no rescue lost here
    keep = ~stopped
    for name in ("theta", "loglik", "beta", "converged"):
        np.testing.assert_array_equal(getattr(res, name)[keep], getattr(full, name)[keep])
    assert res.iterations.sum() < full.iterations.sum()


def test_compiled_small_solve_equals_lapack_and_flags_singular_rows():
    """The optimiser's compiled batched solve (Gaussian elimination with partial pivoting)
    against LAPACK, on systems that need pivoting; exactly singular or NaN rows come back
    NaN (the optimiser then takes a scaled gradient step)."""
    from scdist.ctmm.linalg import solve_small

    rng = np.random.default_rng(0)
    A = rng.normal(size=(50, 5, 5))
    A[:10, 0, 0] = 0.0                      # first pivot must come from another row
    b = rng.normal(size=(50, 5))
    x = solve_small(A, b)
    np.testing.assert_allclose(np.einsum("rij,rj->ri", A, x), b, atol=1e-9)
    np.testing.assert_allclose(x, np.linalg.solve(A, b[..., None])[..., 0], rtol=1e-8, atol=1e-10)
    A[3] = 0.0
    A[4, :, 2] = 0.0
    A[5, 1, 1] = np.nan
    x = solve_small(A, b)
    assert np.isnan(x[3:6]).all() and np.isfinite(np.delete(x, [3, 4, 5], axis=0)).all()


@pytest.mark.parametrize("K", [1, 2, 5])
def test_compiled_ai_step_is_the_numpy_direction_bit_for_bit(K):
    """The optimiser's compiled AI / Newton direction (regularised solve, scaled-gradient
    fallback) equals its numpy formulation exactly, including singular, NaN, infinite and
    tiny information matrices and NaN gradients (the optimiser's iterates must not change)."""
    from scdist.ctmm.linalg import ai_step

    rng = np.random.default_rng(K)
    R = 120
    B = rng.normal(size=(R, K, K))
    A = B @ B.transpose(0, 2, 1)
    A[:20] = B[:20]                          # indefinite, not symmetric: pivoting
    A[20:25] = 0.0
    A[25:30, 0, :] = 0.0
    A[25:30, :, 0] = 0.0
    A[30:33, 0, 0] = np.nan
    A[33:36, -1, -1] = np.inf
    A[36:40] *= 1e-320
    g = rng.normal(size=(R, K))
    g[40:42] = np.nan
    with np.errstate(all="ignore"):
        ref = opt._solve_dir_numpy(A, g)
    got = ai_step(A, g)
    np.testing.assert_array_equal(got, ref)
    assert np.array_equal(np.signbit(got), np.signbit(ref))
    assert np.isfinite(got[40:]).sum() > 0 and np.isnan(got[40:42]).all()


def test_compiled_line_search_bookkeeping_takes_the_longest_accepted_step():
    """``_accept_take``: each row takes its first (longest-step) candidate with Sigma positive
    definite and l not lower by more than 1e-10 |l|, and stores that candidate's state; the
    flat-step counter counts steps that changed l by <= 1e-10 max(|l|, 1) -- checked against
    the rule written out in numpy."""
    from types import SimpleNamespace

    rng = np.random.default_rng(1)
    R, K, p, nc = 40, 3, 2, 4
    rows = rng.permutation(R)[:25]
    ll0 = rng.normal(size=R) * 50
    ll0[:3] = 0.5                                       # |l| < 1: the flat rule's floor
    cl = np.repeat(ll0[rows], nc) + rng.normal(size=rows.size * nc) * 1e-3
    cl[::5] = np.repeat(ll0[rows], nc)[::5] - 1e-12 * np.abs(np.repeat(ll0[rows], nc)[::5])
    st = SimpleNamespace(ok=rng.random(rows.size * nc) > 0.2, loglik=cl,
                         grad=rng.normal(size=(rows.size * nc, K)),
                         ai=rng.normal(size=(rows.size * nc, K, K)),
                         beta=rng.normal(size=(rows.size * nc, p)), rcmin=rng.random(rows.size * nc))
    cand = rng.normal(size=(rows.size * nc, K))
    state = [np.zeros((R, K)), ll0.copy(), np.zeros((R, K)), np.zeros((R, K, K)),
             rng.integers(0, 2, R), np.zeros(R), np.zeros((R, p))]
    ref = [a.copy() for a in state]
    first = opt._accept_take(rows, nc, cand, st, *state)
    good = (st.ok & (cl >= np.repeat(ll0[rows], nc) - 1e-10 * np.abs(np.repeat(ll0[rows], nc))))
    good = good.reshape(rows.size, nc)
    want = np.where(good.any(axis=1), good.argmax(axis=1), -1)
    np.testing.assert_array_equal(first, want)
    assert (want >= 0).sum() > 5 and (want < 0).sum() > 0 and (want > 0).sum() > 0
    theta, ll, grad, AI, flat, rc, beta = ref
    for i, r in enumerate(rows):
        if want[i] < 0:
            continue
        c = i * nc + want[i]
        small = cl[c] - ll[r] <= 1e-10 * max(abs(ll[r]), 1.0)
        flat[r] = flat[r] + 1 if small else 0
        theta[r], ll[r], grad[r], AI[r] = cand[c], cl[c], st.grad[c], st.ai[c]
        beta[r], rc[r] = st.beta[c], st.rcmin[c]
    for got, exp in zip(state, ref):
        np.testing.assert_array_equal(got, exp)
