"""Reproduce the URSM paper's simulation figures (Sections 4.2–4.5), averaged over seeds.

Usage:
  .venv/bin/python benchmarks/ursm_paper_figures.py fig2 --seeds 5      # L1(A): naive / single-cell / joint; L1(W); AUC
  .venv/bin/python benchmarks/ursm_paper_figures.py convergence --seeds 3   # EM iterations to L1(A) <= 0.17, options
  .venv/bin/python benchmarks/ursm_paper_figures.py fig5a --seeds 3     # K_sc != K_bulk (markers, MAP-W)
  .venv/bin/python benchmarks/ursm_paper_figures.py fig5b --seeds 3     # N = 200, 500, 1000
  .venv/bin/python benchmarks/ursm_paper_figures.py summary             # Markdown tables of the above
(--seed-list 3 runs one seed, so seeds can run as parallel processes.)

Writes JSON to benchmarks/results/ursm_<section>.json and prints a Markdown table.
"""
from __future__ import annotations

import os

for v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(v, "1")

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

from scdist.ursm import fit, naive_profile, simulate  # noqa: E402
from scdist.ursm.baselines import auc, l1, nmf_dropout_score  # noqa: E402

OUT = Path(__file__).resolve().parent / "results"


def l1_trace(sim):
    tr = []
    return tr, (lambda it, th, pooled: tr.append(l1(th.A, sim.A)))


def first_below(tr, level=0.17):
    idx = [i + 1 for i, v in enumerate(tr) if v <= level]
    return idx[0] if idx else None


def fig2(seeds, em_iters):
    rows = []
    for seed in seeds:
        sim = simulate(seed=seed)
        zero = sim.Y == 0
        drop = sim.S[zero] == 0
        r = {"seed": seed, "naive": l1(naive_profile(sim.Y, sim.cell_types, 3), sim.A)}
        t0 = time.process_time()
        sc = fit(sim.Y, sim.cell_types, None, em_iters=em_iters, seed=seed)
        r["sc_only"] = l1(sc.A.values, sim.A)
        r["sc_only_auc"] = auc(sc.dropout_prob.values[zero], drop)
        tr, cb = l1_trace(sim)
        joint = fit(sim.Y, sim.cell_types, sim.X, em_iters=em_iters, seed=seed, callback=cb)
        r["joint"] = l1(joint.A.values, sim.A)
        r["joint_trace"] = tr
        r["joint_W"] = l1(joint.W.values, sim.W)
        r["joint_auc"] = auc(joint.dropout_prob.values[zero], drop)
        r["nmf_auc"] = auc(nmf_dropout_score(sim.Y, 3, seed=seed)[zero], drop)
        r["truth_dropout_among_zeros"] = float(drop.mean())
        r["cpu_s"] = time.process_time() - t0
        rows.append(r)
        print(json.dumps({k: v for k, v in r.items() if k != "joint_trace"}), flush=True)
    return rows


CONFIGS = {
    "scdist defaults": {},
    "reference-like (MAP-W 1 step, cold SC chain, pinned tau, Euclidean A steps)": dict(
        map_w=True, warm_start=False, init_dropout="pinned", a_solver="euclidean"),
    "defaults but cold SC chain": dict(warm_start=False),
    "defaults but pinned tau init": dict(init_dropout="pinned"),
    "defaults but Euclidean A steps": dict(a_solver="euclidean"),
    "defaults, shorter bulk chain (10 + 30 sweeps)": dict(bulk_burnin=10, bulk_samples=30),
    "MAP-W, 1 step / iteration": dict(map_w=True),
    "MAP-W, 20 steps / iteration": dict(map_w=True, map_w_steps=20),
}


def convergence(seeds, em_iters, configs=None):
    rows = []
    for name, kw in CONFIGS.items():
        if configs and name not in configs:
            continue
        for seed in seeds:
            sim = simulate(seed=seed)
            tr, cb = l1_trace(sim)
            t0 = time.process_time()
            fit(sim.Y, sim.cell_types, sim.X, em_iters=em_iters, seed=seed, callback=cb, final_estep=False, **kw)
            r = {"config": name, "seed": seed, "trace": tr, "first_le_0.17": first_below(tr),
                 "cpu_s_per_iter": (time.process_time() - t0) / em_iters}
            rows.append(r)
            print(json.dumps({k: v for k, v in r.items() if k != "trace"} | {"final": tr[-1]}), flush=True)
    return rows


def marker_sets(sim, n_true=5, n_imperfect=3):
    """§4.5: per type, 5 true markers + 3 imperfect ones (non-markers with the largest gap between the
    highest and second-highest entry of A, taken among genes whose highest type is that type)."""
    A = sim.A
    K = A.shape[1]
    true_all = np.concatenate([sim.markers[k] for k in range(K)])
    srt = np.sort(A, axis=1)
    gap = srt[:, -1] - srt[:, -2]
    top = A.argmax(axis=1)
    out = {}
    for k in range(K):
        cand = [i for i in np.argsort(-gap) if top[i] == k and i not in true_all]
        out[k] = np.concatenate([sim.markers[k][:n_true], cand[:n_imperfect]]).astype(int)
    return out


def fig5(seeds, em_iters, settings):
    rows = []
    for (k_sc, k_bk, N) in settings:
        for seed in seeds:
            sim = simulate(n_genes=N, n_types_sc=k_sc, n_types_bulk=k_bk, seed=seed)
            K = max(k_sc, k_bk)
            t0 = time.process_time()
            ds = fit(sim.Y, sim.cell_types, sim.X, n_types=K, markers=marker_sets(sim), em_iters=em_iters,
                     seed=seed, map_w=True, map_w_steps=20)
            r = {"K_sc": k_sc, "K_bulk": k_bk, "N": N, "seed": seed,
                 "A_per_type": l1(ds.A.values, sim.A) / K,
                 "W_per_type": l1(ds.W.values, sim.W) / K,
                 "naive_A_per_type": (l1(naive_profile(sim.Y, sim.cell_types, K)[:, :k_sc], sim.A[:, :k_sc]) / k_sc),
                 "cpu_s": time.process_time() - t0}
            rows.append(r)
            print(json.dumps(r), flush=True)
    return rows


def _load(prefix):
    """Rows of the finished runs (JSON), plus the per-run lines a still-running section has printed."""
    rows = []
    for f in sorted(OUT.glob(f"ursm_{prefix}*.json")):
        rows += json.loads(f.read_text())
    seen = {json.dumps({k: r.get(k) for k in ("seed", "config", "K_sc", "K_bulk", "N")}) for r in rows}
    for f in sorted(OUT.glob(f"ursm_{prefix}*.log")):
        for line in f.read_text().splitlines():
            if line.startswith("{"):
                r = json.loads(line)
                key = json.dumps({k: r.get(k) for k in ("seed", "config", "K_sc", "K_bulk", "N")})
                if key not in seen:
                    seen.add(key)
                    rows.append(r)
    return rows


def _ms(x):
    x = np.asarray([v for v in x if v is not None], float)
    return f"{x.mean():.3f} ± {x.std(ddof=1) if len(x) > 1 else 0:.3f}" if len(x) else "-"


def summary():
    """Markdown tables from the JSON files written by the other sections."""
    f2 = _load("fig2")
    if f2:
        print(f"Figures 2–4 (N = 200, L = 100, M = 150, K = 3; {len(f2)} seeds: {[r['seed'] for r in f2]}), mean ± sd:\n")
        print("| quantity | naive | single-cell only | joint URSM | paper (naive / sc / joint) |")
        print("|---|---|---|---|---|")
        print(f"| L1(A) | {_ms([r['naive'] for r in f2])} | {_ms([r['sc_only'] for r in f2])} | "
              f"{_ms([r['joint'] for r in f2])} | 0.81 / 0.27 / 0.17 |")
        print(f"| L1(W) (sum over 150 × 3 entries) | - | - | {_ms([r['joint_W'] for r in f2])} | - |")
        print(f"| dropout AUC (zeros; label S = 0) | NMF rank 3: {_ms([r['nmf_auc'] for r in f2])} | "
              f"{_ms([r['sc_only_auc'] for r in f2])} | {_ms([r['joint_auc'] for r in f2])} | URSM > NMF (Fig. 4a) |")
        firsts = [first_below(r["joint_trace"]) for r in f2 if "joint_trace" in r]
        print(f"| first EM iteration with L1(A) ≤ 0.17 | - | - | {', '.join(map(str, firsts))} | - |")
        print()
    cv = _load("convergence")
    if f2 and not any(r["config"] == "scdist defaults" for r in cv):
        cv = [{"config": "scdist defaults (traces of the fig2 runs, 50 iterations)", "seed": r["seed"],
               "trace": r["joint_trace"], "first_le_0.17": first_below(r["joint_trace"]),
               "cpu_s_per_iter": float("nan")} for r in f2 if "joint_trace" in r] + cv
    if cv:
        print("Convergence of the joint model (N = 200), L1(A) after EM iteration t, mean over seeds:\n")
        print("| configuration | seeds | t = 10 | t = 20 | t = 30 | t = 50 | t = 60 | first t with L1(A) ≤ 0.17 | CPU s / iteration |")
        print("|---|---|---|---|---|---|---|---|---|")
        for name in dict.fromkeys(r["config"] for r in cv):
            rs = [r for r in cv if r["config"] == name]
            at = lambda t: _ms([r["trace"][t - 1] for r in rs if len(r.get("trace", [])) >= t])  # noqa: E731
            firsts = [r["first_le_0.17"] for r in rs]
            fs = ", ".join("never" if v is None else str(v) for v in firsts)
            print(f"| {name} | {len(rs)} | {at(10)} | {at(20)} | {at(30)} | {at(50)} | {at(60)} | {fs} | "
                  f"{np.mean([r['cpu_s_per_iter'] for r in rs]):.2f} |")
        print()
    f5 = _load("fig5")
    if f5:
        print("Figure 5 (MAP-W with 20 steps per EM iteration, 5 true + 3 imperfect markers per type, "
              "average per-type L1; W summed over the 150 samples):\n")
        print("| K_sc | K_bulk | N | seeds | L1(A) per type | L1(W) per type | naive L1(A) per sc type |")
        print("|---|---|---|---|---|---|---|")
        keys = sorted({(r["K_sc"], r["K_bulk"], r["N"]) for r in f5}, key=lambda k: (k[2], k[0], k[1]))
        for k in keys:
            rs = {r["seed"]: r for r in f5 if (r["K_sc"], r["K_bulk"], r["N"]) == k}.values()
            print(f"| {k[0]} | {k[1]} | {k[2]} | {len(rs)} | {_ms([r['A_per_type'] for r in rs])} | "
                  f"{_ms([r['W_per_type'] for r in rs])} | {_ms([r['naive_A_per_type'] for r in rs])} |")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("section", choices=["fig2", "convergence", "fig5a", "fig5b", "summary"])
    ap.add_argument("--seeds", type=int, default=3, help="run seeds 1..SEEDS")
    ap.add_argument("--seed-list", type=int, nargs="*", default=None, help="run exactly these seeds")
    ap.add_argument("--em-iters", type=int, default=None)
    ap.add_argument("--configs", nargs="*", default=None)
    a = ap.parse_args()
    OUT.mkdir(exist_ok=True)
    seeds = a.seed_list if a.seed_list else list(range(1, a.seeds + 1))
    a.seeds = seeds
    if a.section == "summary":
        return summary()
    if a.section == "fig2":
        rows = fig2(a.seeds, a.em_iters or 50)
    elif a.section == "convergence":
        rows = convergence(a.seeds, a.em_iters or 60, a.configs)
    elif a.section == "fig5a":
        rows = fig5(a.seeds, a.em_iters or 30, [(ks, kb, 200) for ks in (3, 4, 5) for kb in (3, 4, 5)])
    else:
        rows = fig5(a.seeds, a.em_iters or 30, [(3, 3, N) for N in (200, 500, 1000)])
    tag = "" if not a.seed_list else "_s" + "-".join(map(str, seeds))
    (OUT / f"ursm_{a.section}{tag}.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
