"""Re-check of the joint model's convergence after a change to the sampler's kernels.

Usage: NUMBA_NUM_THREADS=1 .venv/bin/python benchmarks/ursm_convergence_recheck.py [--seed 1] [--em-iters 22]

Fits the §4.1 simulation of ``--seed`` with the defaults (as ``ursm_paper_figures.py fig2`` does)
and prints L1(A) after every EM iteration next to the trace stored in
``benchmarks/results/ursm_fig2_s<seed>.json`` by an earlier version of the code, and the first
iteration with L1(A) <= 0.17 in each. A change that only alters how variates are produced (not
the conditionals) should leave the two traces within Monte Carlo noise.
"""
from __future__ import annotations

import os

os.environ.setdefault("NUMBA_NUM_THREADS", "1")

import argparse  # noqa: E402
import json  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

from scdist.ursm import fit, simulate  # noqa: E402
from scdist.ursm.baselines import l1  # noqa: E402


def first_below(trace, level=0.17):
    return next((i + 1 for i, x in enumerate(trace) if x <= level), None)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--em-iters", type=int, default=22)
    a = ap.parse_args()
    sim = simulate(seed=a.seed)
    tr = []
    fit(sim.Y, sim.cell_types, sim.X, em_iters=a.em_iters, seed=a.seed, final_estep=False,
        callback=lambda it, th, pooled: tr.append(l1(th.A, sim.A)))
    stored = Path(__file__).with_name("results") / f"ursm_fig2_s{a.seed}.json"
    old = json.loads(stored.read_text())[0]["joint_trace"][:a.em_iters]
    print("EM iteration | L1(A) now | L1(A) stored")
    for i, (x, y) in enumerate(zip(tr, old)):
        print(f"{i + 1} | {x:.3f} | {y:.3f}")
    print(f"largest |difference| {np.max(np.abs(np.array(tr) - np.array(old))):.4f}; first iteration with "
          f"L1(A) <= 0.17: now {first_below(tr)}, stored {first_below(old)}")


if __name__ == "__main__":
    main()
