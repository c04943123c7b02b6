"""Gibbs-EM driver (paper Section 3): E-step on blocks of cells / bulk samples, pooled statistics,
M-step, objective and multi-chain diagnostics. Engine-agnostic: an *executor* runs the blocks
(in-process here; Ray actors in ``scdist.engines.ray_actors``); this module imports neither.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from . import mstep
from .diagnostics import max_finite, split_rhat_from_moments, split_rhat_traces
from .gibbs import BulkBlockSampler, BulkStats, CellBlockSampler, CellStats, block_rng
from .mcerror import StopRule, batch_stats, crossfit_increment, increment_se
from .params import Theta

CELL, BULK = 0, 1
APPEND_KEY = 1 << 20     # stream key offset of the extra rounds of kept sweeps (stop_rule='ascent')


@dataclass
class EMSettings:
    em_iters: int = 50
    burnin: int = 50
    samples: int = 100
    warm_burnin: int | None = None      # burn-in after the first EM iteration (warm-started chains)
    chains: int = 1
    map_w: bool = False
    map_w_steps: int = 1
    eps_A: float = 1e-6
    eps_alpha: float = 1e-2
    sc_warm_start: bool = True
    s_update: str = "gamma"
    pg_sampler: str = "polyagamma"
    rao_blackwell: bool = True
    seed: int = 0
    a_max_iter: int = 500
    a_tol: float = 1e-6
    a_solver: str = "scaled"
    final_estep: bool = True
    update_alpha: bool = True
    bulk_burnin: int | None = None      # bulk chain: burn-in after the first EM iteration (default: as cells)
    bulk_samples: int | None = None     # bulk chain: kept sweeps (default: ``samples``)
    thin: int = 1                       # keep every thin-th sweep after burn-in
    mc_batches: int = 0                 # batch means per chain for the MC error of ΔQ (0: none)
    stop_rule: str = "none"             # 'crossfit' / 'ascent': MC-error-aware stopping (mcerror)
    stop_max_rounds: int = 4            # 'ascent': at most this many rounds of T kept sweeps
    stop_k: float = 2.0
    stop_patience: int = 3
    stop_min_iters: int = 5
    prior_step: str = "em"              # 'collapsed': μκ, μτ maximise Q with (κ, τ) integrated out

    @property
    def samples_bulk(self) -> int:
        return self.bulk_samples or self.samples

    @property
    def track(self) -> bool:
        return self.chains > 1


@dataclass
class BlockLayout:
    """Row ranges of the cell blocks and bulk blocks; each block has its own RNG stream."""

    cell_blocks: list = field(default_factory=list)
    bulk_blocks: list = field(default_factory=list)

    @staticmethod
    def make(L: int, M: int, cell_block: int, bulk_block: int, map_w: bool) -> "BlockLayout":
        cb = [(s, min(s + cell_block, L)) for s in range(0, L, cell_block)] if L else []
        bb = [] if (map_w or not M) else [(s, min(s + bulk_block, M)) for s in range(0, M, bulk_block)]
        return BlockLayout(cb, bb)

    def tasks(self, chains: int) -> list[tuple[int, int, int]]:
        """All (chain, kind, block) keys in reduction order."""
        out = []
        for c in range(chains):
            out += [(c, CELL, b) for b in range(len(self.cell_blocks))]
            out += [(c, BULK, b) for b in range(len(self.bulk_blocks))]
        return out


def make_sampler(kind: int, data: np.ndarray, G, K: int, s: EMSettings):
    if kind == CELL:
        return CellBlockSampler(data, G, K, s_update=s.s_update, rao_blackwell=s.rao_blackwell,
                                pg_sampler=s.pg_sampler, ridge=s.prior_step == "collapsed")
    return BulkBlockSampler(data, K, rao_blackwell=s.rao_blackwell)


def run_block(sampler, key, theta: Theta, s: EMSettings, em_iter: int, burnin: int, cold_sc: bool):
    """Run one block's E-step with its own stream (same code on every engine)."""
    chain, kind, block = key
    rng = block_rng(s.seed, chain, kind, block, em_iter)
    if kind == CELL:
        return sampler.run(theta, rng, burnin, s.samples, cold=cold_sc, track=s.track, thin=s.thin,
                           batches=s.mc_batches)
    if s.bulk_burnin is not None and 0 < em_iter < APPEND_KEY:     # not in the extra rounds (no burn-in)
        burnin = s.bulk_burnin
    return sampler.run(theta, rng, burnin, s.samples_bulk, cold=False, track=s.track, thin=s.thin,
                       batches=s.mc_batches)


class LocalExecutor:
    """Runs every (chain, block) sampler in this process, in key order."""

    name = "local"

    def __init__(self, Y, G, X, K, layout: BlockLayout, s: EMSettings):
        self.samplers = {}
        for key in layout.tasks(s.chains):
            _, kind, b = key
            if kind == CELL:
                a, z = layout.cell_blocks[b]
                self.samplers[key] = make_sampler(CELL, Y[a:z], G[a:z], K, s)
            else:
                a, z = layout.bulk_blocks[b]
                self.samplers[key] = make_sampler(BULK, X[a:z], None, K, s)
        self.s = s

    def estep(self, theta, em_iter, burnin, cold_sc):
        return {key: run_block(sm, key, theta, self.s, em_iter, burnin, cold_sc)
                for key, sm in self.samplers.items()}

    def close(self):
        pass


@dataclass
class Pooled:
    """Statistics of one chain (or pooled over chains)."""

    cell: CellStats | None
    bulk: BulkStats | None


def _cat(parts, name, axis):
    return None if getattr(parts[0], name) is None else np.concatenate([getattr(p, name) for p in parts], axis=axis)


def _add(parts, name):
    return None if getattr(parts[0], name) is None else sum(getattr(p, name) for p in parts)


def _concat_cells(parts: list[CellStats]) -> CellStats:
    return CellStats(bES=_cat(parts, "bES", 1), bmom=_cat(parts, "bmom", 2), bC1=_add(parts, "bC1"),
                     bC2=_add(parts, "bC2"),
                     ES=np.concatenate([p.ES for p in parts]), Ek=np.concatenate([p.Ek for p in parts]),
                     Ek2=np.concatenate([p.Ek2 for p in parts]), Et=np.concatenate([p.Et for p in parts]),
                     Et2=np.concatenate([p.Et2 for p in parts]), C1=sum(p.C1 for p in parts),
                     C2=sum(p.C2 for p in parts),
                     halves=None if parts[0].halves is None else np.concatenate([p.halves for p in parts], axis=-1),
                     logjoint=None if parts[0].logjoint is None else sum(p.logjoint for p in parts),
                     ridge=_add(parts, "ridge"))


def _concat_bulk(parts: list[BulkStats]) -> BulkStats:
    return BulkStats(bcZ=_add(parts, "bcZ"), bElnW=_add(parts, "bElnW"), cZ=sum(p.cZ for p in parts),
                     ElnW=sum(p.ElnW for p in parts),
                     EW=np.concatenate([p.EW for p in parts]),
                     halves=None if parts[0].halves is None else np.concatenate([p.halves for p in parts], axis=2),
                     logjoint=None if parts[0].logjoint is None else sum(p.logjoint for p in parts))


def _mean(objs, attrs, cls):
    return cls(**{a: np.mean([getattr(o, a) for o in objs], axis=0) for a in attrs})


def mean_pooled(parts: list[Pooled]) -> Pooled:
    """Equal-weight mean of statistics (batches); bulk statistics shared by all parts stay as they are."""
    cell = bulk = None
    if parts[0].cell is not None:
        cell = _mean([p.cell for p in parts], ["ES", "Ek", "Ek2", "Et", "Et2", "C1", "C2"], CellStats)
    if parts[0].bulk is not None:
        bulk = parts[0].bulk if all(p.bulk is parts[0].bulk for p in parts) else BulkStats(
            cZ=np.mean([p.bulk.cZ for p in parts], axis=0), ElnW=np.mean([p.bulk.ElnW for p in parts], axis=0),
            EW=None if parts[0].bulk.EW is None else np.mean([p.bulk.EW for p in parts], axis=0))
    return Pooled(cell, bulk)


def pool(results: dict, layout: BlockLayout, chains: int) -> tuple[Pooled, list[Pooled]]:
    """Per-chain statistics (blocks joined in block order) and their equal-weight mean over chains."""
    per_chain = []
    for c in range(chains):
        cells = [results[(c, CELL, b)] for b in range(len(layout.cell_blocks))]
        bulks = [results[(c, BULK, b)] for b in range(len(layout.bulk_blocks))]
        per_chain.append(Pooled(_concat_cells(cells) if cells else None, _concat_bulk(bulks) if bulks else None))
    cell = bulk = None
    if per_chain[0].cell is not None:
        cell = _mean([p.cell for p in per_chain], ["ES", "Ek", "Ek2", "Et", "Et2", "C1", "C2"], CellStats)
        if per_chain[0].cell.ridge is not None:
            cell.ridge = np.mean([p.cell.ridge for p in per_chain], axis=0)
    if per_chain[0].bulk is not None:
        bulk = _mean([p.bulk for p in per_chain], ["cZ", "ElnW", "EW"], BulkStats)
    return Pooled(cell, bulk), per_chain


@dataclass
class EMState:
    theta: Theta
    W_map: np.ndarray | None = None     # MAP-W variant: W kept across EM iterations
    a_step: np.ndarray | None = None    # last accepted step sizes of the A ascent
    trace: dict = field(default_factory=dict)


class GibbsEM:
    """The EM loop over prepared arrays (Y: L × N, G: (L,), X: M × N; either may be None)."""

    def __init__(self, Y, G, X, K: int, settings: EMSettings, theta0: Theta, executor):
        self.Y, self.G, self.X, self.K, self.s = Y, G, X, K, settings
        self.ex = executor
        self.N = theta0.A.shape[0]
        self.L = 0 if Y is None else Y.shape[0]
        self.M = 0 if X is None else X.shape[0]
        self.R = Y.sum(axis=1).astype(float) if Y is not None else np.zeros(0)
        self.Ysum = np.zeros((self.N, K))
        if Y is not None:
            H = np.zeros((self.L, K))
            H[np.arange(self.L), G] = 1.0
            self.Ysum = Y.T.astype(float) @ H
        self.Xf = X.astype(float) if X is not None else None
        self.state = EMState(theta=theta0.copy())
        if X is not None and settings.map_w:
            self.state.W_map = np.tile(theta0.alpha / theta0.alpha.sum(), (self.M, 1))
        self.pooled: Pooled | None = None

    # -- E-step ------------------------------------------------------------------
    def estep(self, em_iter: int, append: int = 0) -> tuple[Pooled, list[Pooled]]:
        """E-step of ``em_iter``; ``append`` = r > 0: the r-th extra round of T kept sweeps, which
        continues every chain without burn-in on the stream key em_iter + r·APPEND_KEY (and leaves
        MAP-W's deterministic bulk step to round 0)."""
        s = self.s
        first = em_iter == 0 and not append
        burnin = s.burnin if (first or s.warm_burnin is None) else s.warm_burnin
        cold_sc = first or not s.sc_warm_start
        if append:
            burnin, cold_sc = 0, False
        res = self.ex.estep(self.state.theta, em_iter + append * APPEND_KEY, burnin, cold_sc)
        pooled, per_chain = pool(res, self.layout, s.chains)
        if self.X is not None and s.map_w and not append:
            th = self.state.theta
            W = self.state.W_map
            for _ in range(s.map_w_steps):
                W = mstep.map_w_step(self.Xf, th.A, W, th.alpha)
            self.state.W_map = W
            cZ, ElnW, EW = mstep.map_w_stats(self.Xf, th.A, W)
            pooled.bulk = BulkStats(cZ=cZ, ElnW=ElnW, EW=EW)
            for p in per_chain:
                p.bulk = pooled.bulk
        return pooled, per_chain

    # -- M-step ------------------------------------------------------------------
    def mstep(self, pooled: Pooled, keep_state: bool = True) -> Theta:
        """θᵗ⁺¹ from the statistics ``pooled``; ``keep_state=False`` leaves the EM state untouched
        (the cross-fitted M-steps of the stopping rule)."""
        s, th = self.s, self.state.theta.copy()
        N, K = self.N, self.K
        C1 = C2 = np.zeros((N, K))
        ES = np.zeros((0, N))
        if pooled.cell is not None:
            c = pooled.cell
            if c.ridge is not None:
                # θᵗ's prior precisions are the D of the E-step's (S3) conditionals
                th.mu_kappa, th.s2_kappa, th.mu_tau, th.s2_tau = mstep.update_dropout_prior_collapsed(
                    c.ridge, c.Ek, c.Ek2, c.Et, c.Et2, th)
            else:
                th.mu_kappa, th.s2_kappa, th.mu_tau, th.s2_tau = mstep.update_dropout_prior(c.Ek, c.Ek2, c.Et,
                                                                                            c.Et2)
            C1, C2, ES = c.C1, c.C2, c.ES
        cZ = np.zeros((N, K))
        if pooled.bulk is not None:
            if s.update_alpha:
                th.alpha = mstep.update_alpha(th.alpha, pooled.bulk.ElnW, self.M, s.eps_alpha)
            cZ = pooled.bulk.cZ
        A, steps, t = mstep.update_profile(th.A, cZ + self.Ysum, C1, C2, ES, self.R,
                                           self.G if self.G is not None else np.zeros(0, np.int64),
                                           s.eps_A, max_iter=s.a_max_iter, tol=s.a_tol, t0=self.state.a_step,
                                           solver=s.a_solver)
        th.A = A
        if keep_state:
            self.state.a_step = t
            self._a_steps = steps
        return th

    def objective(self, th: Theta, p: Pooled) -> float:
        """Expected complete-data log-likelihood at θ (Jensen bound on −R ln U), up to θ-free terms."""
        N, K = self.N, self.K
        val = 0.0
        cZ = np.zeros((N, K)) if p.bulk is None else p.bulk.cZ
        if p.cell is not None:
            c = p.cell
            obj = mstep.ProfileObjective(cZ + self.Ysum, c.C1, c.C2, c.ES, self.R, self.G)
            val += float(obj.value(th.A)[0].sum())
            val += mstep.gaussian_term(c.Ek, c.Ek2, th.mu_kappa, th.s2_kappa)
            val += mstep.gaussian_term(c.Et, c.Et2, th.mu_tau, th.s2_tau)
        else:
            val += float((cZ * np.log(th.A)).sum())
        if p.bulk is not None:
            val += mstep.alpha_objective(th.alpha, p.bulk.ElnW, self.M)
        return val

    def diagnostics(self, per_chain: list[Pooled]) -> dict:
        if self.s.chains < 2:
            return {}
        n = self.s.samples // 2
        out = {}
        if per_chain[0].cell is not None:
            h = np.concatenate([p.cell.halves for p in per_chain], axis=0)    # (2C, 4, L)
            out["rhat_kappa"] = max_finite(split_rhat_from_moments(h[:, 0], h[:, 1], n))
            out["rhat_tau"] = max_finite(split_rhat_from_moments(h[:, 2], h[:, 3], n))
        if per_chain[0].bulk is not None and per_chain[0].bulk.halves is not None:
            h = np.concatenate([p.bulk.halves for p in per_chain], axis=0)    # (2C, 2, M, K)
            out["rhat_W"] = max_finite(split_rhat_from_moments(h[:, 0], h[:, 1], self.s.samples_bulk // 2))
        if self.s.samples_bulk == self.s.samples:
            lj = [sum(x.logjoint for x in (p.cell, p.bulk) if x is not None and x.logjoint is not None)
                  for p in per_chain]
            if all(isinstance(x, np.ndarray) for x in lj):
                out["rhat_logjoint"] = split_rhat_traces(np.stack(lj))
        return out

    def estep_rounds(self, it: int, rounds: int):
        """E-step of iteration ``it`` with ``rounds`` × T kept sweeps: the first round as ``estep``,
        each further one continues the chains for T more kept sweeps (no burn-in) on its own stream.
        Returns (pooled statistics of all rounds, first round's per-chain statistics, batch
        statistics of all rounds for the MC error: [] without ``mc_batches``)."""
        s = self.s
        pooled, per_chain = self.estep(it)
        parts, bats = [pooled], []
        fixed = pooled.bulk if (self.X is not None and s.map_w) else None
        if s.mc_batches:
            bats = batch_stats(per_chain, CellStats, BulkStats, Pooled, fixed_bulk=fixed)
        for r in range(1, rounds):
            p, pc = self.estep(it, append=r)
            if fixed is not None:
                p.bulk = fixed
            parts.append(p)
            if s.mc_batches:
                bats += batch_stats(pc, CellStats, BulkStats, Pooled, fixed_bulk=fixed)
        if rounds > 1:
            pooled = mean_pooled(parts)
        return pooled, per_chain, bats

    def run(self, layout: BlockLayout, callback=None, progress=None):
        self.layout = layout
        s = self.s
        tr = {k: [] for k in ("objective", "a_steps", "rhat_kappa", "rhat_tau", "rhat_W", "rhat_logjoint")}
        tr["objective_chain"] = []
        tr.update(dQ=[], dQ_se=[], dQ_cv=[], dQ_cv_se=[], samples=[])
        rule = StopRule(s.stop_rule, s.stop_k, s.stop_patience, s.stop_min_iters, s.stop_max_rounds)
        self.stop_reason, self.iters_run = "em_iters", s.em_iters
        for it in range(s.em_iters):
            rounds = rule.rounds
            pooled, per_chain, bats = self.estep_rounds(it, rounds)
            th_old = self.state.theta
            th = self.mstep(pooled)
            self.state.theta = th
            dq = se = cv = cv_se = np.nan
            if len(bats) >= 2:
                dq, se = increment_se(self.objective, th_old, th, pooled, bats)
                cv, cv_se = crossfit_increment(self.objective, lambda p: self.mstep(p, keep_state=False),
                                               mean_pooled, th_old, bats)
            tr["dQ"].append(dq)
            tr["dQ_se"].append(se)
            tr["dQ_cv"].append(cv)
            tr["dQ_cv_se"].append(cv_se)
            tr["samples"].append(s.samples * rounds)
            tr["objective"].append(self.objective(th, pooled))
            tr["objective_chain"].append([self.objective(th, p) for p in per_chain])
            tr["a_steps"].append(self._a_steps)
            d = self.diagnostics(per_chain)
            for k in ("rhat_kappa", "rhat_tau", "rhat_W", "rhat_logjoint"):
                tr[k].append(d.get(k, np.nan))
            self.pooled = pooled
            if callback is not None:
                callback(it, th, pooled)
            if progress is not None:
                progress.update(1)
            if rule.update(it, cv, cv_se):
                self.stop_reason, self.iters_run = "mc_error", it + 1
                break
        self.rounds = rule.rounds
        if s.final_estep:
            pooled, _, _ = self.estep_rounds(self.iters_run, rule.rounds)
            self.pooled = pooled
        self.state.trace = tr
        return self.state.theta, self.pooled, tr
