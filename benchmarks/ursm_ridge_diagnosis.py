"""URSM: what holds μκ back? EM from the true A with κ/τ's prior at the default wide start,
against EM from the naive A with κ/τ's prior at the truth (§4.1 simulation, N = 200, joint).

Usage: NUMBA_NUM_THREADS=1 .venv/bin/python benchmarks/ursm_ridge_diagnosis.py [--seed 0] [--em-iters 20]

Prints μκ, μτ, στ² and L1(A) after 1 / 5 / 10 / 20 EM iterations for both starts (50 + 100
sweeps, defaults otherwise). If μκ converges fast from the true A but creeps from the naive A even
with its prior started at the truth, its slowness comes from A's convergence, not from the EM rate
of (μ, σ²).
"""
from __future__ import annotations

import argparse
import os

import numpy as np

from scdist.ursm import fit, simulate
from scdist.ursm.params import Theta, initial_theta


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--em-iters", type=int, default=20)
    a = ap.parse_args()
    print(f"load average at start: {os.getloadavg()[0]:.1f}", flush=True)
    sim = simulate(seed=a.seed)
    N = sim.A.shape[0]
    A = np.maximum(sim.A, 1e-6)
    A /= A.sum(0)
    wide = initial_theta(sim.Y, sim.cell_types, sim.X, 3, {}, eps_A=1e-6)
    cases = {
        "true A and alpha, kappa/tau prior at the default (wide) start":
            Theta(A=A, alpha=np.asarray(sim.alpha, float), mu_kappa=wide.mu_kappa, s2_kappa=wide.s2_kappa,
                  mu_tau=wide.mu_tau, s2_tau=wide.s2_tau),
        "naive A (default start), kappa/tau prior at the truth":
            Theta(A=wide.A, alpha=wide.alpha, mu_kappa=-1.0, s2_kappa=0.25, mu_tau=1.5 * N, s2_tau=(0.15 * N) ** 2),
    }
    for name, th0 in cases.items():
        rec = []
        fit(sim.Y, sim.cell_types, sim.X, em_iters=a.em_iters, seed=a.seed, theta0=th0, final_estep=False,
            callback=lambda it, th, p: rec.append((th.mu_kappa, th.mu_tau, th.s2_tau, np.abs(th.A - sim.A).sum())))
        print(name, flush=True)
        for t in (1, 5, 10, 20, 50):
            if t <= a.em_iters:
                mk, mt, s2t, l1 = rec[t - 1]
                print(f"  t={t}: mu_kappa {mk:+.3f} mu_tau {mt:.1f} s2_tau {s2t:.0f} L1(A) {l1:.3f}", flush=True)
    print(f"load average at end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
