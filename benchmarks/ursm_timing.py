"""URSM time per EM iteration on one core, in-process (paper §6 / issue targets).

Usage: .venv/bin/python benchmarks/ursm_timing.py [--genes 200 1000] [--iters 5] [--repeats 3]

Measures CPU seconds (time.process_time, BLAS pinned to one thread) per warm EM iteration of
scdist.ursm on the §4.1 simulation (L = 100 cells, M = 150 bulk samples, K = 3), B + T = 150
sweeps, for bulk Gibbs and MAP-W, and splits one iteration into single-cell E-step, bulk E-step
and M-step. Prints a Markdown table.
"""
from __future__ import annotations

import os

for v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[v] = "1"

import argparse  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

from scdist.ursm import fit, simulate  # noqa: E402
from scdist.ursm.gibbs import BulkBlockSampler, CellBlockSampler  # noqa: E402
from scdist.ursm.params import initial_theta  # noqa: E402


VARIANTS = {"bulk Gibbs": {}, "MAP-W": dict(map_w=True),
            "bulk Gibbs, bulk chain 10 + 30 sweeps": dict(bulk_burnin=10, bulk_samples=30)}


def per_iteration(sim, iters, kw):
    # the first EM iteration (cold start) is excluded: it always runs the full burn-in
    fit(sim.Y, sim.cell_types, sim.X, em_iters=1, burnin=50, samples=100, final_estep=False, **kw)
    t0 = time.process_time()
    fit(sim.Y, sim.cell_types, sim.X, em_iters=iters + 1, burnin=50, samples=100, final_estep=False, **kw)
    t1 = time.process_time() - t0
    t0 = time.process_time()
    fit(sim.Y, sim.cell_types, sim.X, em_iters=1, burnin=50, samples=100, final_estep=False, **kw)
    return (t1 - (time.process_time() - t0)) / iters
    return (time.process_time() - t0) / iters


def split(sim):
    th = initial_theta(sim.Y, sim.cell_types, sim.X, 3, {}, eps_A=1e-6)
    rng = np.random.default_rng(0)
    c = CellBlockSampler(sim.Y, sim.cell_types, 3)
    b = BulkBlockSampler(sim.X, 3)
    t0 = time.process_time()
    c.run(th, rng, 50, 100, cold=True)
    t1 = time.process_time()
    b.run(th, rng, 50, 100)
    t2 = time.process_time()
    return t1 - t0, t2 - t1


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--genes", type=int, nargs="+", default=[200, 1000])
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--variants", nargs="*", default=None)
    a = ap.parse_args()
    print("| N genes | variant | CPU s / EM iteration (median) | single-cell E-step | bulk E-step |")
    print("|---|---|---|---|---|")
    for N in a.genes:
        sim = simulate(n_genes=N, seed=1)
        sc, bk = np.median([split(sim) for _ in range(a.repeats)], axis=0)
        for name, kw in VARIANTS.items():
            if a.variants and name not in a.variants:
                continue
            t = np.median([per_iteration(sim, a.iters, kw) for _ in range(a.repeats)])
            print(f"| {N} | {name} | {t:.2f} | {sc:.2f} | {'-' if 'MAP' in name else f'{bk:.2f}'} |", flush=True)


if __name__ == "__main__":
    main()
