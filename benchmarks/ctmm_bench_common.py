"""Shared parts of the CTMM study-scale benchmarks (ctmm_transcriptome.py, resume_ctmm.py,
ctmm_perf.py --part scale): the simulated transcriptome study, peak-memory sampling, timed
stage runs on a fresh LocalCluster, and the result-JSON tail.
"""
from __future__ import annotations

import json
import os
import shutil
import threading
import time

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

# the stage runs of the transcriptome benchmark: REML with all tests, then HE with its tests
STAGES = {
    "reml": {"run": "reml", "method": "reml", "models": ["hom", "free"],
             "tests": ["lrt", "wald", "jackknife"]},
    "he": {"run": "he", "method": "he", "models": ["hom", "free"], "tests": ["wald", "jackknife"]},
}


def make_study(path: str, G: int, chunk: int, seed: int = 0) -> None:
    """A study whose pseudobulk cube is simulated from the Free model at the paper's size
    (N = 94 donors, C = 4), chunked by ``chunk`` genes, with its stage marker."""
    import scdist.ctmm as ctmm
    from scdist.store import create_study
    from scdist.store.markers import STAGE, mark_done

    sim = ctmm.simulate_ctp(G, 94, 4, hom2=0.2, V=[0.1, 0.2, 0.0, 0.1], seed=seed)
    pb = sim.drop_vars([v for v in sim.data_vars if v.startswith("true_")])
    study = create_study(path)
    pb.chunk({"gene": chunk}).to_zarr(study.group_url("pseudobulk"), mode="w", consolidated=False,
                                       zarr_format=3)
    mark_done(study.group_url("pseudobulk"), STAGE, {"stage": "pseudobulk", "config_hash": "bench"})


class PeakRSS(threading.Thread):
    """Peak resident memory of this process and all its descendants (sum, and the largest
    single process), sampled in the background; use as a context manager."""

    def __init__(self, every: float = 0.25):
        super().__init__(daemon=True)
        self.every, self.peak_total, self.peak_child = every, 0, 0
        self._halt = threading.Event()

    def run(self):
        import psutil

        me = psutil.Process()
        while not self._halt.is_set():
            total, child_max = me.memory_info().rss, 0
            for p in me.children(recursive=True):
                try:
                    r = p.memory_info().rss
                except psutil.Error:
                    continue
                total += r
                child_max = max(child_max, r)
            self.peak_total = max(self.peak_total, total)
            self.peak_child = max(self.peak_child, child_max)
            self._halt.wait(self.every)

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self._halt.set()
        self.join()


def own_cpu_seconds() -> float:
    """User + system CPU seconds of this process and its live descendants (nannies, workers):
    scdist's own CPU, unlike the machine's, which includes the other users' jobs."""
    import psutil

    me = psutil.Process()
    t = me.cpu_times()
    total = t.user + t.system
    for p in me.children(recursive=True):
        try:
            c = p.cpu_times()
        except psutil.Error:
            continue
        total += c.user + c.system
    return total


def timed_stages(store: str, n_workers: int, stages: dict = STAGES) -> dict:
    """Run ``stages`` one after the other through ``scdist.run`` on a fresh LocalCluster of
    ``n_workers`` x 1 thread: wall seconds per stage and in total, CPU seconds of the driver
    and the cluster's processes per stage, machine CPU seconds, peak memory and the load
    average at start and end."""
    import psutil
    from distributed import Client, LocalCluster

    import scdist

    row = {"workers": n_workers, "load_start": os.getloadavg()}
    cpu0 = psutil.cpu_times()
    with PeakRSS() as mem:
        t_all = time.perf_counter()
        with LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True,
                          dashboard_address=None, memory_limit="8GiB") as cl, Client(cl) as client:
            for name, cfg in stages.items():
                t = time.perf_counter()
                c = own_cpu_seconds()
                scdist.run({"store": store, "stages": {"ctmm": cfg}}, client=client, rich=False)
                row[f"{name}_s"] = time.perf_counter() - t
                # the cluster's processes live across stages: their CPU during this stage
                row[f"{name}_own_cpu_s"] = own_cpu_seconds() - c
        row["total_s"] = time.perf_counter() - t_all
    cpu1 = psutil.cpu_times()
    row["machine_cpu_s"] = (cpu1.user + cpu1.system) - (cpu0.user + cpu0.system)
    row["peak_rss_total_gib"] = mem.peak_total / 2**30
    row["peak_rss_one_process_gib"] = mem.peak_child / 2**30
    row["load_end"] = os.getloadavg()
    return row


def transcriptome_runs(genes: int, chunk: int, workers, tmp: str, stages: dict = STAGES) -> dict:
    """:func:`timed_stages` on a fresh copy of one simulated study per worker count, with the
    REML run's counts of regular Free fits and jackknife-tested genes; adds the 1 vs 2 worker
    speed-up when both were run."""
    import xarray as xr

    out = {"genes": genes, "donors": 94, "celltypes": 4, "chunk": chunk, "stages": stages,
           "load_before": os.getloadavg(), "runs": []}
    base = os.path.join(tmp, "base.zarr")
    t0 = time.perf_counter()
    make_study(base, genes, chunk)
    out["simulate_s"] = time.perf_counter() - t0
    for n in workers:
        store = os.path.join(tmp, f"w{n}.zarr")
        shutil.copytree(base, store)
        row = timed_stages(store, n, stages)
        if "reml" in stages:
            res = xr.open_zarr(f"{store}/results/ctmm/reml", consolidated=False)
            p = res["pvalue"].sel(test="free_vs_hom_jackknife")
            row["jackknife_tested"] = int(p.notnull().sum())
            row["free_converged"] = int(res["converged"].sel(model="free").sum())
        out["runs"].append(row)
        print(json.dumps(row), flush=True)
        shutil.rmtree(store, ignore_errors=True)
    by = {r["workers"]: r["total_s"] for r in out["runs"]}
    if 1 in by and 2 in by:
        out["speedup_2_over_1"] = by[1] / by[2]
    return out


def write_result(name: str, out: dict) -> str:
    """Print ``out`` and write it to benchmarks/results/<name>.json; returns the path."""
    print(json.dumps(out, indent=1))
    os.makedirs(RESULTS, exist_ok=True)
    path = os.path.join(RESULTS, f"{name}.json")
    with open(path, "w") as f:
        json.dump(out, f, indent=1)
    return path
