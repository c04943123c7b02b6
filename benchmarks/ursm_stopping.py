"""EM stopping rules on §4.1 simulations (N = 200, joint and single-cell-only, several seeds).

Per (model, seed): (1) the fixed maximum of EM iterations with the Monte-Carlo error of each
increment traced; the 'crossfit' rule is replayed on that trace (it only truncates the run, so the
stopped fit is the fixed run's prefix: same A, and W from the E-step it would run last); (2) a real
run with stop_rule='ascent' (its sample grows, so its path differs). Compared: iterations, L1(A),
L1(W), μκ and CPU seconds at the stop against the fixed run's end.

  NUMBA_NUM_THREADS=1 .venv/bin/python benchmarks/ursm_stopping.py --seeds 0 1 2 --models joint \
      --out benchmarks/results/ursm_stopping_joint.json
  .venv/bin/python benchmarks/ursm_stopping.py --report benchmarks/results/ursm_stopping_*.json
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from scdist.ursm import fit, simulate  # noqa: E402
from scdist.ursm.mcerror import StopRule  # noqa: E402

# replayed on the fixed run: (rule, k, patience, min_iters)
RULES = [("crossfit", 2.0, 3, 5), ("crossfit", 2.0, 5, 5), ("crossfit", 1.0, 3, 5)]


def run_one(seed: int, model: str, em_iters: int, mc_batches: int, chains: int, rule: str) -> dict:
    sim = simulate(seed=seed)
    rec = {"l1A": [], "l1W": [], "cpu": [], "mu_kappa": []}
    t0 = time.process_time()

    def cb(it, th, pooled):
        rec["cpu"].append(time.process_time() - t0)
        rec["l1A"].append(float(np.abs(th.A - sim.A).sum()))
        rec["mu_kappa"].append(float(th.mu_kappa))
        # W of this iteration's E-step (at θ^it): what a fit stopped after iteration it-1 returns
        rec["l1W"].append(float(np.abs(pooled.bulk.EW - sim.W).sum()) if pooled.bulk is not None else None)

    ds = fit(sim.Y, sim.cell_types, sim.X if model == "joint" else None, em_iters=em_iters,
             mc_batches=mc_batches, chains=chains, seed=seed, stop_rule=rule, callback=cb)
    rec["cpu_total"] = time.process_time() - t0
    rec["l1W_final"] = float(np.abs(ds.W.values - sim.W).sum()) if model == "joint" else None
    for k in ("dQ", "dQ_se", "dQ_cv", "dQ_cv_se", "samples"):
        rec[k] = ds[k].values.tolist()
    rec.update(seed=seed, model=model, em_iters=em_iters, mc_batches=mc_batches, chains=chains, rule=rule,
               iters_run=int(ds.attrs["em_iters_run"]), stop_reason=ds.attrs["stop_reason"],
               l1A_final=float(np.abs(ds.A.values - sim.A).sum()), load=os.getloadavg()[0])
    return rec


def replay(rec: dict, name: str, k: float, patience: int, min_iters: int) -> int:
    rule = StopRule(name, k, patience, min_iters)
    for it, (d, se) in enumerate(zip(rec["dQ_cv"], rec["dQ_cv_se"])):
        if rule.update(it, d, se):
            return it + 1
    return rec["em_iters"]


def at_stop(rec: dict, n: int) -> dict:
    """Figures of the fit stopped after n iterations."""
    l1W = None
    if rec["model"] == "joint":
        l1W = rec["l1W_final"] if n == rec["em_iters"] else rec["l1W"][n]
    return {"iters": n, "l1A": rec["l1A"][n - 1], "l1W": l1W, "cpu": rec["cpu"][n - 1],
            "mu_kappa": rec["mu_kappa"][n - 1]}


def report(recs: list) -> None:
    print("| model | seed | rule | iterations | L1(A) stop / fixed | L1(W) stop / fixed "
          "| μκ stop / fixed | CPU s stop / fixed |")
    print("|---|---|---|---|---|---|---|---|")
    fixed = {(r["model"], r["seed"]): r for r in recs if r["rule"] == "none"}
    for rec in recs:
        full = at_stop(fixed[rec["model"], rec["seed"]], rec["em_iters"])
        rows = []
        if rec["rule"] == "none":
            rows = [(f"{name} (k {k:g}, patience {m}), replayed", at_stop(rec, replay(rec, name, k, m, mi)))
                    for name, k, m, mi in RULES]
        else:
            n = rec["iters_run"]
            rows = [(f"{rec['rule']} (k 2, patience 3, ≤ 4 rounds), run; final T {rec['samples'][-1]}",
                     {"iters": n, "l1A": rec["l1A_final"], "l1W": rec["l1W_final"], "cpu": rec["cpu_total"],
                      "mu_kappa": rec["mu_kappa"][n - 1]})]
        for label, s in rows:
            w = "-" if s["l1W"] is None else f"{s['l1W']:.2f} / {full['l1W']:.2f}"
            print(f"| {rec['model']} | {rec['seed']} | {label} | {s['iters']} | {s['l1A']:.3f} / "
                  f"{full['l1A']:.3f} | {w} | {s['mu_kappa']:.2f} / {full['mu_kappa']:.2f} | "
                  f"{s['cpu']:.1f} / {full['cpu']:.1f} |")
    print()
    for key in ("dQ", "dQ_cv"):
        print(f"{key} / SE per iteration (every 5th), fixed runs:")
        for rec in fixed.values():
            z = np.array(rec[key]) / np.array(rec[key + "_se"])
            print(rec["model"], rec["seed"], " ".join(f"{v:.1f}" for v in z[::5]))


def overhead(repeats: int, em_iters: int) -> None:
    """Paired CPU seconds per EM iteration: rule off (no batches) vs 'crossfit' statistics traced."""
    sim = simulate(seed=0)
    fit(sim.Y, sim.cell_types, sim.X, em_iters=1, burnin=2, samples=4)       # warm the kernels
    res = {0: [], 4: []}
    for r in range(repeats):
        for nb in ((0, 4) if r % 2 == 0 else (4, 0)):
            t0 = time.process_time()
            fit(sim.Y, sim.cell_types, sim.X, em_iters=em_iters, mc_batches=nb, final_estep=False)
            res[nb].append((time.process_time() - t0) / em_iters)
    ratios = [b / a for a, b in zip(res[0], res[4])]
    print(f"CPU s / EM iteration (N = 200 joint, {em_iters} iterations, {repeats} rounds, load "
          f"{os.getloadavg()[0]:.1f}): without trace {np.median(res[0]):.3f}, with MC-error trace "
          f"(4 batches, cross-fit) {np.median(res[4]):.3f}; paired ratios {', '.join(f'{x:.3f}' for x in ratios)} "
          f"(median {np.median(ratios):.3f})")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--models", nargs="+", default=["joint", "sc"], choices=["joint", "sc"])
    ap.add_argument("--em-iters", type=int, default=50)
    ap.add_argument("--mc-batches", type=int, default=4)
    ap.add_argument("--chains", type=int, default=1)
    ap.add_argument("--rules", nargs="+", default=["none", "ascent"], choices=["none", "ascent", "crossfit"])
    ap.add_argument("--out", default=None)
    ap.add_argument("--report", nargs="+", default=None, help="print tables from saved JSON files")
    ap.add_argument("--overhead", type=int, default=0, metavar="REPEATS",
                    help="CPU s per EM iteration with and without the MC-error trace (joint, seed 0), "
                         "alternating, REPEATS rounds")
    a = ap.parse_args()
    if a.report:
        recs = [r for f in a.report for r in json.load(open(f))["runs"]]
        report(recs)
        return
    if a.overhead:
        overhead(a.overhead, a.em_iters)
        return
    rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    recs = []
    for model in a.models:
        for seed in a.seeds:
            for rule in a.rules:
                recs.append(run_one(seed, model, a.em_iters, a.mc_batches, a.chains, rule))
                print(f"{model} seed {seed} {rule}: {recs[-1]['iters_run']} iterations, "
                      f"{recs[-1]['cpu_total']:.1f} CPU s, load {os.getloadavg()[0]:.1f}", flush=True)
            if a.out:
                json.dump({"commit": rev, "argv": sys.argv, "runs": recs}, open(a.out, "w"))
    report(recs)


if __name__ == "__main__":
    main()
