"""URSM large case: 5,000 genes x 10,000 cells x 500 bulk samples, peak memory and time per EM iteration.

Usage: .venv/bin/python benchmarks/ursm_large.py [--genes 5000 --cells 10000 --bulk 500]
       [--sweeps 5 10] [--em-iters 2] [--final-estep] [--engine local|ray]
       (one full EM iteration as in the issue: --sweeps 50 100 --em-iters 1, ~22 CPU minutes)

Runs ``--em-iters`` full EM iterations (E-step with B + T sweeps given by --sweeps, then the
M-step) and, with --final-estep, the final E-step. Reports the CPU time of every EM iteration
(from fit's callback: E-step + M-step, the first one including setup and the cold start), the
CPU time per sweep derived from the warm iterations, the CPU time a 150-sweep EM iteration would
take at that rate (an extrapolation, stated as such), and the peak resident memory of the process
(and of Ray workers when --engine ray). With --engine local all work runs in this process, so its
CPU time is the one-core cost.
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
    ap.add_argument("--sweeps", type=int, nargs=2, default=[5, 10], metavar=("BURNIN", "SAMPLES"))
    ap.add_argument("--em-iters", type=int, default=2)
    ap.add_argument("--final-estep", action="store_true")
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
    ds = fit(sim.Y, sim.cell_types, sim.X, em_iters=a.em_iters, burnin=B, samples=T, engine=a.engine,
             callback=cb, final_estep=a.final_estep, **kw)
    wall = time.perf_counter() - t0
    cpu = time.process_time() - c0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    child = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
    prev_w, prev_c = t0, c0
    its = []
    for it in sorted(marks):
        w, c = marks[it]
        its.append((c - prev_c, w - prev_w))
        print(f"EM iteration {it + 1}: CPU {c - prev_c:.1f} s, wall {w - prev_w:.1f} s "
              f"({B} + {T} sweeps, E-step + M-step{', incl. setup and cold start' if it == 0 else ''})")
        prev_w, prev_c = w, c
    print(f"N={a.genes} L={a.cells} M={a.bulk} engine={a.engine}: wall {wall:.1f} s, driver CPU {cpu:.1f} s "
          f"for {a.em_iters} EM iterations{' + final E-step' if a.final_estep else ''} at {B + T} sweeps each")
    warm = [c for c, _ in its[1:]]
    per_it = float(np.median(warm)) if warm else its[0][0]
    which = "median of warm iterations" if warm else "the only iteration: setup and cold start included"
    line = (f"CPU per EM iteration at {B + T} sweeps: {per_it:.1f} s ({which}) "
            f"=> {per_it / (B + T):.2f} CPU s per sweep")
    if B + T != 150:
        # the M-step is included in per_it, so scaling it by 150 / (B + T) over-estimates slightly
        line += f" => 150 sweeps ~{per_it / (B + T) * 150:.0f} CPU s (extrapolated, upper bound)"
    print(line)
    print(f"peak RSS driver {rss:.2f} GiB, largest child {child:.2f} GiB")
    print(f"L1(A) after {a.em_iters} iterations {l1(ds.A.values, sim.A):.3f} (A has {a.genes} x 3 entries)")


if __name__ == "__main__":
    main()
