"""URSM Figure 5 settings run for more EM iterations: per-type L1(A) after t iterations.

Usage: .venv/bin/python benchmarks/ursm_fig5_long.py [--settings 5,5 5,3 3,3] [--em-iters 60] [--seed 1]

Same simulation, markers and MAP-W settings as ``ursm_paper_figures.py fig5a``; prints one JSON
line per (K_sc, K_bulk) with L1(A) / K after 10, 20, 40, … iterations and the final L1(W) / K.
Shows whether a larger per-type loss at 20 iterations is slow convergence or bias.
"""
from __future__ import annotations

import os

for v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(v, "1")

import argparse  # noqa: E402
import json  # noqa: E402

from ursm_paper_figures import marker_sets  # noqa: E402  (benchmarks/ is the script's directory)

from scdist.ursm import fit, simulate  # noqa: E402
from scdist.ursm.baselines import l1  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--settings", nargs="+", default=["5,5", "5,3", "3,3"], help="K_sc,K_bulk pairs")
    ap.add_argument("--em-iters", type=int, default=60)
    ap.add_argument("--seed", type=int, default=1)
    a = ap.parse_args()
    checkpoints = [t for t in (10, 20, 40, 60, 80, 100) if t <= a.em_iters]
    for pair in a.settings:
        ks, kb = (int(x) for x in pair.split(","))
        sim = simulate(n_genes=200, n_types_sc=ks, n_types_bulk=kb, seed=a.seed)
        K = max(ks, kb)
        trace = []
        ds = fit(sim.Y, sim.cell_types, sim.X, n_types=K, markers=marker_sets(sim), em_iters=a.em_iters,
                 seed=a.seed, map_w=True, map_w_steps=20,
                 callback=lambda it, th, pooled: trace.append(l1(th.A, sim.A) / K))
        print(json.dumps({"K_sc": ks, "K_bulk": kb, "seed": a.seed,
                          "A_per_type_at": {t: round(trace[t - 1], 4) for t in checkpoints},
                          "W_per_type": l1(ds.W.values, sim.W) / K}), flush=True)


if __name__ == "__main__":
    main()
