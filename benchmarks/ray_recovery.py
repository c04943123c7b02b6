"""URSM on Ray actors: cost of surviving a killed actor.

Side by side in one process on one local Ray (medians of ``--repeats``):
  * ``plain``: actors that return no chain state (what the executor did before actor restarts
    were supported; a killed actor then failed the run),
  * ``resilient``: the executor as shipped (each E-step also returns the blocks' Gibbs state,
    kept in the object store for a restarted actor),
  * ``killed``: as ``resilient`` with one actor SIGKILLed in the middle of EM iteration 1's E-step;
    the result is checked to equal the undisturbed one bit for bit.

    python benchmarks/ray_recovery.py --cells 400 --genes 200 --repeats 3
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import threading
import time

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cells", type=int, default=400)
    ap.add_argument("--genes", type=int, default=200)
    ap.add_argument("--bulk", type=int, default=60)
    ap.add_argument("--em-iters", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    import ray

    import scdist.engines.ray_actors as ra
    from scdist.ursm import fit, simulate

    class PlainActor(ra.BlockActor):
        def run(self, theta, em_iter, burnin, cold_sc, prev=None):
            from scdist.ursm.em import run_block
            return {key: run_block(sm, key, theta, self.settings, em_iter, burnin, cold_sc)
                    for key, sm in self.samplers.items()}, None

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    s = simulate(n_genes=args.genes, n_cells=args.cells, n_bulk=args.bulk, seed=4)
    kw = dict(em_iters=args.em_iters, burnin=10, samples=20, chains=2, cell_block_size=max(1, args.cells // 2),
              bulk_block_size=max(1, args.bulk // 2), seed=2, engine="ray", min_ray_entries=0, n_actors=2,
              ray_timeout=600)

    def run(kind):
        actor_cls = ra.BlockActor
        killed = []

        def kill_busy_actor():
            pid = ex_pids[0]
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

        ex_pids = []
        orig_init = ra.RayBlockExecutor.__init__

        def init(self, *a, **k):
            orig_init(self, *a, **k)
            ex_pids.extend(ray.get([x.pid.remote() for x in self.actors], timeout=120))

        def callback(it, theta, pooled):
            if kind == "killed" and it == 0:   # during EM iteration 1's E-step
                threading.Timer(0.3, kill_busy_actor).start()

        if kind == "plain":
            ra.BlockActor = PlainActor
        ra.RayBlockExecutor.__init__ = init
        try:
            t0 = time.perf_counter()
            ds = fit(s.Y, s.cell_types, s.X, callback=callback, **kw)
            return time.perf_counter() - t0, ds, killed
        finally:
            ra.BlockActor = actor_cls
            ra.RayBlockExecutor.__init__ = orig_init

    times = {"plain": [], "resilient": [], "killed": []}
    ref = None
    for _ in range(args.repeats):
        for kind in times:
            sec, ds, killed = run(kind)
            times[kind].append(sec)
            if ref is None:
                ref = ds
            for v in ref.data_vars:
                assert np.array_equal(ref[v].values, ds[v].values), (kind, v)
            if kind == "killed":
                assert killed, "no actor was killed"
    med = {k: statistics.median(v) for k, v in times.items()}
    out = {"cells": args.cells, "genes": args.genes, "bulk": args.bulk, "em_iters": args.em_iters,
           "repeats": args.repeats, "seconds": times, "median_s": med,
           "state_overhead": med["resilient"] / med["plain"] - 1.0,
           "recovery_s": med["killed"] - med["resilient"], "results_identical": True,
           "load_avg_1m": os.getloadavg()[0]}
    print(json.dumps(out, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
