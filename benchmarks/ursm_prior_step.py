"""URSM: the collapsed μ step (``prior_step='collapsed'``) against plain EM (Eq. 3.6) on the κ–τ ridge.

Usage: NUMBA_NUM_THREADS=1 .venv/bin/python benchmarks/ursm_prior_step.py [--seeds 0 1 2] [--em-iters 50]
       [--models joint] [--out benchmarks/results/ursm_prior_step.json]

§4.1 simulation at N = 200 (the ``simulate`` defaults), 50 + 100 sweeps, defaults otherwise; per EM
iteration μκ, μτ, σκ², L1(A) = Σ_ik |Â_ik − A_ik| and CPU seconds (``process_time``) are recorded
through fit's callback. Prints μκ and L1(A) after 10 / 20 / 50 iterations per seed and variant.
"""
from __future__ import annotations

import os

for v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[v] = "1"

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

from scdist.ursm import fit, simulate  # noqa: E402


def run(seed, model, prior_step, em_iters):
    sim = simulate(seed=seed)
    rec = {"mu_kappa": [], "mu_tau": [], "s2_kappa": [], "l1_A": [], "cpu_s": []}
    t0 = time.process_time()

    def cb(it, th, pooled):
        rec["mu_kappa"].append(th.mu_kappa)
        rec["mu_tau"].append(th.mu_tau)
        rec["s2_kappa"].append(th.s2_kappa)
        rec["l1_A"].append(float(np.abs(th.A - sim.A).sum()))
        rec["cpu_s"].append(time.process_time() - t0)

    fit(sim.Y, sim.cell_types, sim.X if model == "joint" else None, em_iters=em_iters, seed=seed,
        prior_step=prior_step, final_estep=False, callback=cb)
    return rec


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--em-iters", type=int, default=50)
    ap.add_argument("--models", nargs="+", default=["joint"])
    ap.add_argument("--variants", nargs="+", default=["em", "collapsed"])
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    print(f"load average at start: {os.getloadavg()[0]:.1f}", flush=True)
    res = []
    marks = [t for t in (10, 20, 50, 100) if t <= a.em_iters]
    for model in a.models:
        for seed in a.seeds:
            for ps in a.variants:
                r = run(seed, model, ps, a.em_iters)
                res.append({"model": model, "seed": seed, "prior_step": ps, **r})
                print(f"{model} seed {seed} {ps:9s} " + " ".join(
                    f"t={t}: mu_kappa {r['mu_kappa'][t - 1]:+.3f} L1(A) {r['l1_A'][t - 1]:.3f}" for t in marks)
                    + f" | CPU s/iter {r['cpu_s'][-1] / a.em_iters:.2f}", flush=True)
                if a.out:
                    with open(a.out, "w") as f:
                        json.dump(res, f)
    print(f"load average at end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
