"""URSM large case: 5,000 genes x 10,000 cells x 500 bulk samples, peak memory and time per EM iteration.

Usage: .venv/bin/python benchmarks/ursm_large.py [--genes 5000 --cells 10000 --bulk 500]
       [--sweeps 2 5] [--engine local|ray]

Runs one EM iteration with a reduced number of sweeps (B + T given by --sweeps) plus the final
E-step, measures the CPU time per sweep of the E-step and of the M-step, and reports the CPU time an
EM iteration with 150 sweeps takes (per-sweep time x 150 + M-step) together with the peak resident
memory of the process (and of Ray workers when --engine ray).
"""
from __future__ import annotations

import os

for v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(v, "1")

import argparse  # noqa: E402
import resource  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402


def main():
    from scdist.ursm import fit, simulate
    from scdist.ursm.baselines import l1

    ap = argparse.ArgumentParser()
    ap.add_argument("--genes", type=int, default=5000)
    ap.add_argument("--cells", type=int, default=10000)
    ap.add_argument("--bulk", type=int, default=500)
    ap.add_argument("--sweeps", type=int, nargs=2, default=[2, 5], metavar=("BURNIN", "SAMPLES"))
    ap.add_argument("--engine", default="local")
    a = ap.parse_args()
    t0 = time.perf_counter()
    sim = simulate(n_genes=a.genes, n_cells=a.cells, n_bulk=a.bulk, seed=1)
    print(f"simulated in {time.perf_counter() - t0:.1f} s; zeros {np.mean(sim.Y == 0):.2f}", flush=True)
    marks = {}

    def cb(it, th, pooled):
        marks[it] = (time.perf_counter(), time.process_time())

    B, T = a.sweeps
    kw = {}
    if a.engine == "ray":
        import ray

        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
        kw = dict(min_ray_entries=0)
    t0 = time.perf_counter()
    c0 = time.process_time()
    ds = fit(sim.Y, sim.cell_types, sim.X, em_iters=1, burnin=B, samples=T, engine=a.engine, callback=cb, **kw)
    wall = time.perf_counter() - t0
    cpu = time.process_time() - c0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    child = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
    # CPU time (robust on a shared machine): the final E-step is B + T sweeps plus output assembly
    final_cpu = cpu - (marks[0][1] - c0)
    per_sweep = final_cpu / (B + T)
    first_cpu = marks[0][1] - c0                  # setup + E-step (B + T sweeps) + M-step
    mstep = max(first_cpu - final_cpu, 0.0)
    print(f"N={a.genes} L={a.cells} M={a.bulk} engine={a.engine}: wall {wall:.1f} s, driver CPU {cpu:.1f} s "
          f"for 1 EM iteration + final E-step at {B + T} sweeps each")
    print(f"per sweep <= {per_sweep:.2f} CPU s; setup + M-step ~{mstep:.1f} CPU s; "
          f"=> EM iteration with 150 sweeps ~{per_sweep * 150 + mstep:.0f} CPU s (one core)")
    print(f"peak RSS driver {rss:.2f} GiB, largest child {child:.2f} GiB")
    print(f"L1(A) after 1 iteration {l1(ds.A.values, sim.A):.3f} (A has {a.genes} x 3 entries)")


if __name__ == "__main__":
    main()
