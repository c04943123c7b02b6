"""URSM E-step on Ray actors: wall time per EM iteration with 1, 2, 4 actors vs in-process.

Usage: .venv/bin/python benchmarks/ursm_scaling.py [--genes 500 --cells 2000 --bulk 400 --iters 4
                                                    --actors 1 2 --repeats 2]

The block layout (cell_block_size / bulk_block_size) is fixed, so every run draws the same
random numbers: the script also checks that A is bit-identical across engines and actor counts.
Wall time of every EM iteration is taken from fit's callback; the table reports the median over
the steady-state iterations (2nd onwards: actor start-up, data transfer and kernel loading fall in
the first) and, separately, the first iteration. Configurations are interleaved over ``--repeats``
rounds, every other round in reverse order, so that a drift in machine load hits all of them
alike; the load average is printed.
Starts a local Ray with all CPUs of this machine, its workers at the driver's priority.
"""
from __future__ import annotations

import os

for v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(v, "1")

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402


def block_cpu(sim, kw, a):
    """Load-robust view of what the block layout allows: the CPU time of each (chain, block)
    E-step run in-process (median over warm EM iterations), summed per actor under the executor's
    round-robin assignment (``keys[i::n]``, as in ``scdist.engines.ray_actors``). With one
    dedicated core per actor, the wall time of an E-step is at least the largest actor's sum; the
    ratio to the one-actor sum is the speed-up the layout permits (Ray's scatter/gather and
    start-up not included)."""
    from scdist.ursm.em import BlockLayout, EMSettings, LocalExecutor, run_block
    from scdist.ursm.params import initial_theta

    s = EMSettings(burnin=kw["burnin"], samples=kw["samples"], seed=kw["seed"])
    layout = BlockLayout.make(len(sim.cell_types), sim.X.shape[0], kw["cell_block_size"], kw["bulk_block_size"],
                              False)
    ex = LocalExecutor(sim.Y, np.asarray(sim.cell_types), sim.X, 3, layout, s)
    theta = initial_theta(sim.Y, np.asarray(sim.cell_types), sim.X, 3, {}, eps_A=s.eps_A)
    keys = layout.tasks(1)
    cpu = {k: [] for k in keys}
    for it in range(a.iters):
        for k in keys:
            t0 = time.process_time()
            run_block(ex.samplers[k], k, theta, s, it, s.burnin, it == 0)
            cpu[k].append(time.process_time() - t0)
    per = {k: float(np.median(v[1:] if len(v) > 1 else v)) for k, v in cpu.items()}
    total = sum(per.values())
    print(f"N={a.genes}, L={a.cells}, M={a.bulk}, {sum(a.sweeps)} sweeps: CPU s per warm E-step of each block "
          f"(median over iterations 2..{a.iters}): " + ", ".join(f"{'cell' if k[1] == 0 else 'bulk'} {k[2]}: "
                                                               f"{per[k]:.2f}" for k in keys))
    print(f"load average {os.getloadavg()[0]:.1f}\n")
    print("| actors | largest actor's CPU s per E-step | speed-up the layout permits vs 1 actor |")
    print("|---|---|---|")
    for n in a.actors:
        crit = max(sum(per[k] for k in keys[i::n]) for i in range(n))
        print(f"| {n} | {crit:.2f} | {total / crit:.2f} |")


def main():
    import ray

    from scdist.ursm import fit, simulate

    ap = argparse.ArgumentParser()
    ap.add_argument("--genes", type=int, default=500)
    ap.add_argument("--cells", type=int, default=2000)
    ap.add_argument("--bulk", type=int, default=400)
    ap.add_argument("--iters", type=int, default=4)
    ap.add_argument("--sweeps", type=int, nargs=2, default=[10, 20], metavar=("BURNIN", "SAMPLES"))
    ap.add_argument("--actors", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--json", default=None, help="also write the raw per-iteration times here")
    ap.add_argument("--block-cpu", action="store_true",
                    help="no Ray: CPU time of every block's E-step in-process and the per-actor critical path")
    a = ap.parse_args()
    sim = simulate(n_genes=a.genes, n_cells=a.cells, n_bulk=a.bulk, seed=1)
    kw = dict(em_iters=a.iters, burnin=a.sweeps[0], samples=a.sweeps[1], cell_block_size=a.cells // 8,
              bulk_block_size=a.bulk // 4, final_estep=False, seed=3)
    # Ray starts its workers at niceness 15 by default; on a shared machine they would then run at
    # a far lower priority than the in-process driver they are compared with.
    os.environ.setdefault("RAY_worker_niceness", "0")
    if a.block_cpu:
        return block_cpu(sim, kw, a)
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    configs = [("in-process", None)] + [("ray", n) for n in a.actors]
    times = {c: [] for c in configs}
    ref = None
    same = {c: True for c in configs}
    load0 = os.getloadavg()
    for rnd in range(a.repeats):
        # odd rounds run the configurations in reverse order, so a load drift hits them alike
        for c in (configs if rnd % 2 == 0 else configs[::-1]):
            stamps = [time.perf_counter()]
            cb = lambda it, th, pooled: stamps.append(time.perf_counter())  # noqa: E731
            if c[0] == "in-process":
                ds = fit(sim.Y, sim.cell_types, sim.X, engine="local", callback=cb, **kw)
            else:
                ds = fit(sim.Y, sim.cell_types, sim.X, engine="ray", n_actors=c[1], min_ray_entries=0,
                         ray_timeout=3600, callback=cb, **kw)
            times[c].append(np.diff(stamps).tolist())
            if ref is None:
                ref = ds.A.values
            same[c] &= bool(np.array_equal(ds.A.values, ref))
            print(json.dumps({"config": f"{c[0]} {c[1] or ''}".strip(), "iter_s": times[c][-1]}), flush=True)
    load1 = os.getloadavg()
    ray.shutdown()
    print(f"\nN={a.genes}, L={a.cells}, M={a.bulk}, 8 cell blocks + 4 bulk blocks, {sum(a.sweeps)} sweeps, "
          f"{os.cpu_count()} CPUs, {a.repeats} rounds; load average {load0[0]:.1f} before, {load1[0]:.1f} after\n")
    print("| engine | actors | wall s / EM iteration (steady state, median) | speed-up vs in-process | "
          "vs 1 actor | first iteration s | A bit-identical to in-process |")
    print("|---|---|---|---|---|---|---|")
    steady = {c: float(np.median([t for run in times[c] for t in run[1:]])) for c in configs}
    first = {c: float(np.median([run[0] for run in times[c]])) for c in configs}
    base = steady[configs[0]]
    one = steady.get(("ray", 1))
    for c in configs:
        vs1 = f"{one / steady[c]:.2f}" if (one and c[0] == "ray") else "-"
        print(f"| {c[0]} | {c[1] or '-'} | {steady[c]:.2f} | {base / steady[c]:.2f} | {vs1} | {first[c]:.2f} | "
              f"{'-' if c == configs[0] else ('yes' if same[c] else 'NO')} |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"args": vars(a), "load": [load0, load1],
                       "times": {f"{k[0]} {k[1] or ''}".strip(): v for k, v in times.items()}}, f, indent=1)


if __name__ == "__main__":
    main()
