"""URSM time per EM iteration on one core, in-process (paper §6 / issue targets).

Usage: .venv/bin/python benchmarks/ursm_timing.py [--genes 200 1000] [--iters 5] [--repeats 3]
       [--variants NAME ...] [--compare-rev GIT_REV]

Measures CPU seconds (time.process_time, BLAS pinned to one thread) per warm EM iteration of
scdist.ursm on the §4.1 simulation (L = 100 cells, M = 150 bulk samples, K = 3), B + T = 150
sweeps, for bulk Gibbs (with the ``polyagamma`` package, pooled by |ψ| as by default or one call
per sweep, and with scdist's compiled Pólya-Gamma sampler) and MAP-W, and splits one iteration into single-cell and bulk E-step. Variants are
interleaved round by round in one process, so a change in machine load hits all of them alike.
``--compare-rev`` adds the default variant of an earlier commit (its ``scdist`` extracted with
``git archive`` and imported as a second package in this process), interleaved with the others,
and prints the median of the paired per-round ratios: on a loaded machine the ratio is the robust
figure. Prints a Markdown table and the load average.
"""
from __future__ import annotations

import os

for v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[v] = "1"

import argparse  # noqa: E402
import importlib  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

from scdist.ursm import fit, simulate  # noqa: E402
from scdist.ursm.gibbs import BulkBlockSampler, CellBlockSampler  # noqa: E402
from scdist.ursm.params import initial_theta  # noqa: E402


VARIANTS = {"bulk Gibbs": {}, "bulk Gibbs, compiled PG": dict(pg_sampler="compiled"),
            "bulk Gibbs, polyagamma one call per sweep": dict(pg_sampler="polyagamma_direct"),
            "MAP-W": dict(map_w=True),
            "bulk Gibbs, bulk chain 10 + 30 sweeps": dict(bulk_burnin=10, bulk_samples=30)}


def per_iteration(sim, iters, kw, fit_fn=fit):
    # the first EM iteration (cold start) is excluded: it always runs the full burn-in
    fit_fn(sim.Y, sim.cell_types, sim.X, em_iters=1, burnin=50, samples=100, final_estep=False, **kw)
    t0 = time.process_time()
    fit_fn(sim.Y, sim.cell_types, sim.X, em_iters=iters + 1, burnin=50, samples=100, final_estep=False, **kw)
    t1 = time.process_time() - t0
    t0 = time.process_time()
    fit_fn(sim.Y, sim.cell_types, sim.X, em_iters=1, burnin=50, samples=100, final_estep=False, **kw)
    return (t1 - (time.process_time() - t0)) / iters


def fit_at_rev(rev: str):
    """``scdist.ursm.fit`` as of git revision ``rev``, imported as package ``scdist_rev`` (its
    ursm modules import each other relatively, so they resolve inside the extracted copy)."""
    root = Path(__file__).resolve().parents[1]
    tmp = Path(tempfile.mkdtemp(prefix="ursm_rev_"))
    tar = subprocess.run(["git", "-C", str(root), "archive", rev, "scdist"], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(tmp)], input=tar, check=True)
    (tmp / "scdist").rename(tmp / "scdist_rev")
    sys.path.insert(0, str(tmp))
    return importlib.import_module("scdist_rev.ursm").fit


def split(sim, pg_sampler="polyagamma"):
    th = initial_theta(sim.Y, sim.cell_types, sim.X, 3, {}, eps_A=1e-6)
    rng = np.random.default_rng(0)
    c = CellBlockSampler(sim.Y, sim.cell_types, 3, pg_sampler=pg_sampler)
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
    ap.add_argument("--compare-rev", default=None, help="also time the default variant at this git revision")
    a = ap.parse_args()
    fits = {n: fit for n in VARIANTS}
    if a.compare_rev:
        label = f"bulk Gibbs @ {a.compare_rev}"
        VARIANTS[label] = {}
        fits[label] = fit_at_rev(a.compare_rev)
    print(f"load average at start: {os.getloadavg()[0]:.1f}", flush=True)
    print("| N genes | variant | CPU s / EM iteration (median) | single-cell E-step | bulk E-step |")
    print("|---|---|---|---|---|")
    names = [n for n in VARIANTS if not a.variants or n in a.variants or n.startswith("bulk Gibbs @")]
    for N in a.genes:
        sim = simulate(n_genes=N, seed=1)
        # E-step split, both Pólya-Gamma samplers interleaved in this process (load drift hits both)
        sp = {pg: [] for pg in ("compiled", "polyagamma", "polyagamma_direct")}
        for _ in range(a.repeats):
            for pg in sp:
                sp[pg].append(split(sim, pg))
        sp = {pg: np.median(v, axis=0) for pg, v in sp.items()}
        # whole EM iterations: the variants interleaved round by round for the same reason
        ts = {n: [] for n in names}
        for r in range(a.repeats):
            for n in (names if r % 2 == 0 else names[::-1]):
                ts[n].append(per_iteration(sim, a.iters, VARIANTS[n], fits[n]))
        for name in names:
            sc, bk = sp[VARIANTS[name].get("pg_sampler", "polyagamma")]
            if "@" in name:
                sc = bk = float("nan")
            print(f"| {N} | {name} | {np.median(ts[name]):.2f} | {sc:.2f} | {'-' if 'MAP' in name else f'{bk:.2f}'} |",
                  flush=True)
        if a.compare_rev and "bulk Gibbs" in ts:
            ratio = np.median(np.array(ts["bulk Gibbs"]) / np.array(ts[f"bulk Gibbs @ {a.compare_rev}"]))
            print(f"N = {N}: bulk Gibbs now / at {a.compare_rev}: median paired ratio {ratio:.3f} "
                  f"(per round: {np.round(np.array(ts['bulk Gibbs']) / np.array(ts[f'bulk Gibbs @ {a.compare_rev}']), 3).tolist()})",
                  flush=True)
    print(f"load average at end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
