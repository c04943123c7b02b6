"""Pseudobulk throughput (cells/s) and peak memory on simulated studies.

For each study size (default 100k and 1M cells x 2,000 genes) the script simulates a store
once (reused by later runs), then computes the pseudobulk cube on a fresh LocalCluster with
1 and with 2 worker processes (1 thread each), ``--repeats`` times, and reports the median
wall time, cells/s, and the peak of the summed worker RSS (``distributed``'s MemorySampler,
``measure="process"``) and the driver's peak RSS. Each repeat starts from an empty cube
(``pseudobulk/`` and the per-chunk scratch removed), so it measures the full reduction.

    .venv/bin/python benchmarks/bench_pseudobulk.py                      # 100k and 1M
    .venv/bin/python benchmarks/bench_pseudobulk.py --cells 100000 --repeats 3

Results are printed as a Markdown table and written to benchmarks/out/pseudobulk.json.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import threading
import time
from pathlib import Path

import psutil

HERE = Path(__file__).resolve().parent


class DriverPeak:
    """Peak RSS of this process, sampled in a background thread."""

    def __init__(self, interval=0.2):
        self.interval, self.peak, self._stop = interval, 0, threading.Event()
        self._proc = psutil.Process()

    def __enter__(self):
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._proc.memory_info().rss)
            time.sleep(self.interval)

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()


def ensure_store(path: Path, n_cells: int, n_genes: int, n_donors: int, chunk_cells: int,
                 seed: int) -> None:
    """Simulate the study at ``path`` unless one with the same parameters is there."""
    from scdist.engines.dask import dask_client
    from scdist.simulate import simulate_study
    from scdist.store import open_study

    want = dict(n_cells=n_cells, n_genes=n_genes, n_donors=n_donors, chunk_cells=chunk_cells,
                seed=seed)
    if (path / "zarr.json").exists():
        try:
            prov = open_study(str(path)).provenance
            got = next(p["params"] for p in prov if p["stage"] == "simulate")
            if all(got.get(k) == v for k, v in want.items()):
                return
        except Exception:
            pass
    t0 = time.perf_counter()
    with dask_client(n_workers=2) as client:
        simulate_study(str(path), n_celltypes=8, n_batches=4, overwrite=True, client=client,
                       **want)
    print(f"simulated {n_cells:,} cells x {n_genes:,} genes in {time.perf_counter() - t0:.0f} s "
          f"-> {path}", flush=True)


def run_once(path: Path, n_workers: int) -> dict:
    from distributed import Client, LocalCluster
    from distributed.diagnostics import MemorySampler

    from scdist.pseudobulk import compute_pseudobulk
    from scdist.store import open_study

    for sub in ("pseudobulk", "_scratch"):
        shutil.rmtree(path / sub, ignore_errors=True)
    study = open_study(str(path))
    ms = MemorySampler()
    with LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True,
                      dashboard_address=None, memory_limit=None) as cluster, \
            Client(cluster) as client:
        client.wait_for_workers(n_workers)
        base = sum(w["metrics"]["memory"] for w in client.scheduler_info()["workers"].values())
        cpu0 = sum(client.run(_cpu_seconds).values())
        with DriverPeak() as drv, ms.sample("pb", client=client, measure="process",
                                            interval=0.25):
            t0 = time.perf_counter()
            compute_pseudobulk(study, client=client)
            wall = time.perf_counter() - t0
        cpu = sum(client.run(_cpu_seconds).values()) - cpu0
        series = ms.to_pandas()["pb"]
    return {"wall_s": wall, "cells_per_s": study.n_cells / wall, "worker_cpu_s": cpu,
            "cells_per_cpu_s": study.n_cells / cpu,
            "peak_workers_gib": float(series.max()) / 2**30,
            "idle_workers_gib": base / 2**30, "peak_driver_gib": drv.peak / 2**30,
            "load_avg_1min": os.getloadavg()[0]}


def _cpu_seconds() -> float:
    """CPU time (user + system) of the calling worker process."""
    t = psutil.Process().cpu_times()
    return t.user + t.system


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cells", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--genes", type=int, default=2000)
    ap.add_argument("--donors", type=int, default=100)
    ap.add_argument("--chunk-cells", type=int, default=10_000)
    ap.add_argument("--repeats", type=int, default=3, help="repeats for studies < 1M cells")
    ap.add_argument("--repeats-large", type=int, default=1, help="repeats for >= 1M cells")
    ap.add_argument("--data-dir", default=str(HERE / "out" / "data"))
    ap.add_argument("--out", default=str(HERE / "out" / "pseudobulk.json"))
    ap.add_argument("--simulate-only", action="store_true", help="only create the stores")
    args = ap.parse_args()

    rows = []
    for n_cells in args.cells:
        path = Path(args.data_dir) / f"pb_{n_cells}x{args.genes}.zarr"
        path.parent.mkdir(parents=True, exist_ok=True)
        ensure_store(path, n_cells, args.genes, args.donors, args.chunk_cells, seed=0)
        if args.simulate_only:
            continue
        reps = args.repeats if n_cells < 1_000_000 else args.repeats_large
        for w in args.workers:
            runs = [run_once(path, w) for _ in range(reps)]
            row = {"cells": n_cells, "genes": args.genes, "workers": w, "repeats": reps,
                   **{k: statistics.median(r[k] for r in runs) for k in runs[0]},
                   "wall_s_all": [round(r["wall_s"], 2) for r in runs]}
            rows.append(row)
            print(json.dumps(row), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"machine": {"cpus": os.cpu_count(),
                                                      "mem_gib": psutil.virtual_memory().total / 2**30},
                                          "rows": rows}, indent=1))
    print("\n| cells | genes | workers | wall (s, median) | cells/s | worker CPU (s) | cells per "
          "CPU-s | peak worker RSS sum (GiB) | idle workers (GiB) | peak driver RSS (GiB) "
          "| load avg |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['cells']:,} | {r['genes']:,} | {r['workers']} | {r['wall_s']:.1f} | "
              f"{r['cells_per_s']:,.0f} | {r['worker_cpu_s']:.0f} | {r['cells_per_cpu_s']:,.0f} | "
              f"{r['peak_workers_gib']:.2f} | {r['idle_workers_gib']:.2f} | "
              f"{r['peak_driver_gib']:.2f} | {r['load_avg_1min']:.0f} |")


if __name__ == "__main__":
    main()
