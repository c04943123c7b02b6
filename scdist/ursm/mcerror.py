"""Monte-Carlo error of the EM increment and the MC-error-aware stopping rule (spec §2.6).

Notation: Q(θ | s) is the M-step objective (``GibbsEM.objective``) evaluated on E-step statistics s
(averages over the T kept sweeps at θᵗ, spec §1.2); θᵗ⁺¹ maximises Q(· | s̄). The increment is
ΔQᵗ = Q(θᵗ⁺¹ | s̄) − Q(θᵗ | s̄) (Caffo, Jank & Jones 2005, with θᵗ⁺¹ held fixed). Its Monte-Carlo
standard error comes from B batch means s_b of the kept sweeps (``mc_batches`` consecutive batches
per chain, so B = chains × mc_batches; independent chains make the batches of different chains
independent): D_b = Q(θᵗ⁺¹ | s_b) − Q(θᵗ | s_b) and SE = sd(D_b) / √B.

ΔQ itself cannot tell convergence: its M-step also fits the E-step's noise, so at the MCEM fixed
point ΔQ stays many SEs above 0 when A has hundreds of entries (measured). The cross-fitted
increment (``crossfit_increment``) scores each half's M-step on the other half's draws instead.

Stopping (``StopRule``, ``stop_rule`` 'crossfit' or 'ascent'): after at least ``stop_min_iters``
iterations, the rule fires once the cross-fitted increment < k·SE (``stop_k``) in
``stop_patience`` consecutive iterations: EM's progress is no longer distinguishable from the
E-step's Monte-Carlo noise at the current number of kept sweeps.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

STOP_RULES = ("none", "crossfit", "ascent")


def batch_stats(per_chain, cell_cls, bulk_cls, pooled_cls, fixed_bulk=None) -> list:
    """One ``pooled_cls(cell, bulk)`` per (chain, batch), from the batch means each chain carries.

    ``fixed_bulk``: the bulk statistics to use in every batch (MAP-W: deterministic bulk block)."""
    out = []
    for p in per_chain:
        c, bk = p.cell, (None if fixed_bulk is not None else p.bulk)
        if c is None and bk is None:
            continue                      # bulk-only MAP-W: nothing random
        nb = (c.bES.shape[0] if c is not None else bk.bcZ.shape[0])
        for b in range(nb):
            cell = None if c is None else cell_cls(
                ES=c.bES[b], Ek=c.bmom[b, 0], Ek2=c.bmom[b, 1], Et=c.bmom[b, 2], Et2=c.bmom[b, 3],
                C1=c.bC1[b], C2=c.bC2[b])
            bulk = fixed_bulk if bk is None else bulk_cls(cZ=bk.bcZ[b], ElnW=bk.bElnW[b], EW=None)
            out.append(pooled_cls(cell, bulk))
    return out


def increment_se(objective, th_old, th_new, pooled, batches) -> tuple[float, float]:
    """(ΔQ, its Monte-Carlo SE) from the pooled statistics and the batch statistics (see module doc)."""
    dq = objective(th_new, pooled) - objective(th_old, pooled)
    d = np.array([objective(th_new, b) - objective(th_old, b) for b in batches])
    se = float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else float("nan")
    return float(dq), se


def crossfit_increment(objective, mstep, mean, th_old, batches) -> tuple[float, float]:
    """Cross-fitted increment and its SE: the batches are split into two interleaved groups (even /
    odd positions in chain-major batch order); θᵃ = M-step on group a's mean statistics is scored on
    group b's batches and vice versa: D_b = Q(θ^{other group} | s_b) − Q(θᵗ | s_b).

    Unlike ΔQ, whose M-step also fits the E-step's Monte-Carlo noise (so ΔQ stays ≫ its SE at the
    MCEM fixed point when A has hundreds of entries), the cross-fitted increment is scored on draws
    the step did not see: positive while EM still ascends, ≤ 0 in expectation once the step is
    noise."""
    ga, gb = batches[0::2], batches[1::2]
    th_a, th_b = mstep(mean(ga)), mstep(mean(gb))
    d = np.array([objective(th_b, x) - objective(th_old, x) for x in ga]
                 + [objective(th_a, x) - objective(th_old, x) for x in gb])
    return float(d.mean()), float(d.std(ddof=1) / np.sqrt(len(d)))


@dataclass
class StopRule:
    """The cross-fitted increment within ``k`` Monte-Carlo SEs for ``patience`` consecutive
    iterations (not before ``min_iters``) means the E-step's Monte-Carlo noise hides EM's progress.
    'crossfit' then stops. 'ascent' (after Caffo, Jank & Jones 2005) first enlarges the Monte-Carlo
    sample: one more round of T kept sweeps per iteration from the next iteration on, up to
    ``max_rounds`` rounds, and stops only when the test fires at the largest sample."""

    rule: str = "crossfit"
    k: float = 2.0
    patience: int = 3
    min_iters: int = 5
    max_rounds: int = 4
    run_length: int = 0
    rounds: int = 1

    def update(self, it: int, dq: float, se: float) -> bool:
        """Record iteration ``it`` (0-based); True when EM should stop after it."""
        if self.rule == "none":
            return False
        self.run_length = self.run_length + 1 if (np.isfinite(se) and dq < self.k * se) else 0
        if it + 1 < self.min_iters or self.run_length < self.patience:
            return False
        if self.rule == "ascent" and self.rounds < self.max_rounds:
            self.rounds += 1
            self.run_length = 0
            return False
        return True
