"""URSM time per EM iteration on one core, in-process (paper §6 / issue targets).

Usage: .venv/bin/python benchmarks/ursm_timing.py [--genes 200 1000] [--iters 5] [--repeats 3]

Measures CPU seconds (time.process_time, BLAS pinned to one thread) per EM iteration of
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


def per_iteration(sim, iters, map_w):
    t0 = time.process_time()
    fit(sim.Y, sim.cell_types, sim.X, em_iters=iters, burnin=50, samples=100, map_w=map_w, final_estep=False)
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
    a = ap.parse_args()
    print("| N genes | variant | CPU s / EM iteration (median) | single-cell E-step | bulk E-step |")
    print("|---|---|---|---|---|")
    for N in a.genes:
        sim = simulate(n_genes=N, seed=1)
        sc, bk = np.median([split(sim) for _ in range(a.repeats)], axis=0)
        for map_w in (False, True):
            t = np.median([per_iteration(sim, a.iters, map_w) for _ in range(a.repeats)])
            print(f"| {N} | {'MAP-W' if map_w else 'bulk Gibbs'} | {t:.2f} | {sc:.2f} | "
                  f"{'-' if map_w else f'{bk:.2f}'} |", flush=True)


if __name__ == "__main__":
    main()
