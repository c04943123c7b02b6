"""URSM E-step on Ray actors: wall time per EM iteration with 1, 2, 4 actors vs in-process.

Usage: .venv/bin/python benchmarks/ursm_scaling.py [--genes 500 --cells 2000 --bulk 400 --iters 3]

The block layout (cell_block_size / bulk_block_size) is fixed, so every run draws the same
random numbers: the script also checks that A is bit-identical across engines and actor counts.
Starts a local Ray with all CPUs of this machine.
"""
from __future__ import annotations

import os

for v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(v, "1")

import argparse  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402


def main():
    import ray

    from scdist.ursm import fit, simulate

    ap = argparse.ArgumentParser()
    ap.add_argument("--genes", type=int, default=500)
    ap.add_argument("--cells", type=int, default=2000)
    ap.add_argument("--bulk", type=int, default=400)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--sweeps", type=int, nargs=2, default=[10, 20], metavar=("BURNIN", "SAMPLES"))
    ap.add_argument("--actors", type=int, nargs="+", default=[1, 2, 4])
    a = ap.parse_args()
    sim = simulate(n_genes=a.genes, n_cells=a.cells, n_bulk=a.bulk, seed=1)
    kw = dict(em_iters=a.iters, burnin=a.sweeps[0], samples=a.sweeps[1], cell_block_size=a.cells // 8,
              bulk_block_size=a.bulk // 4, final_estep=False, seed=3)
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    print(f"N={a.genes}, L={a.cells}, M={a.bulk}, 8 cell blocks + 4 bulk blocks, "
          f"{sum(a.sweeps)} sweeps, {os.cpu_count()} CPUs")
    print("| engine | actors | wall s / EM iteration | speed-up | A identical to in-process |")
    print("|---|---|---|---|---|")
    t0 = time.perf_counter()
    ref = fit(sim.Y, sim.cell_types, sim.X, engine="local", **kw)
    base = (time.perf_counter() - t0) / a.iters
    print(f"| in-process | - | {base:.2f} | 1.00 | - |", flush=True)
    for n in a.actors:
        t0 = time.perf_counter()
        ds = fit(sim.Y, sim.cell_types, sim.X, engine="ray", n_actors=n, min_ray_entries=0, ray_timeout=3600, **kw)
        t = (time.perf_counter() - t0) / a.iters
        same = np.array_equal(ds.A.values, ref.A.values)
        print(f"| ray | {n} | {t:.2f} | {base / t:.2f} | {same} |", flush=True)
    ray.shutdown()


if __name__ == "__main__":
    main()
