"""CTMM at the paper's transcriptome scale on the embedded LocalCluster: wall time, peak memory,
and the 1-worker vs 2-worker speed-up (issue 3's "transcriptome scale" target: < 5 min).

Study: a CTP pseudobulk cube simulated from the Free model (scdist.ctmm.simulate_ctp) at the
Cuomo et al. size of the CTMM paper: G = 11,231 genes, N = 94 donors, C = 4 cell types, chunked
by 256 genes. Work, through ``scdist.run`` as a user runs it, one stage run after the other:

1. ``ctmm`` REML, Hom + Free, tests LRT + Wald + jackknife (run ``reml``);
2. ``ctmm`` HE, Hom + Free, HE's Wald and jackknife tests (run ``he``).

Each worker count gets its own LocalCluster (n x 1 thread, BLAS threads 1) and a fresh copy of the
study. Memory: the resident set of the driver and of every process it started (nannies, workers),
sampled every 0.25 s; reported as the peak of the sum and the peak of one worker.

    python benchmarks/ctmm_transcriptome.py [--genes 11231] [--workers 2 1]

Writes benchmarks/results/ctmm_transcriptome.json.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
import time

for v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(v, "1")

STAGES = {
    "reml": {"run": "reml", "method": "reml", "models": ["hom", "free"],
             "tests": ["lrt", "wald", "jackknife"]},
    "he": {"run": "he", "method": "he", "models": ["hom", "free"], "tests": ["wald", "jackknife"]},
}


class RssSampler(threading.Thread):
    """Peak resident memory of this process and all its descendants, sampled in the background."""

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

    def stop(self):
        self._halt.set()
        self.join()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--genes", type=int, default=11231)
    ap.add_argument("--chunk", type=int, default=256)
    ap.add_argument("--workers", type=int, nargs="+", default=[2, 1])
    args = ap.parse_args(argv)

    import psutil
    import xarray as xr
    from distributed import Client, LocalCluster

    import scdist
    from resume_ctmm import _make_store

    out = {"genes": args.genes, "donors": 94, "celltypes": 4, "chunk": args.chunk, "stages": STAGES,
           "load_before": os.getloadavg(), "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        base = os.path.join(tmp, "base.zarr")
        t0 = time.perf_counter()
        _make_store(base, args.genes, args.chunk)
        out["simulate_s"] = time.perf_counter() - t0
        for n in args.workers:
            store = os.path.join(tmp, f"w{n}.zarr")
            shutil.copytree(base, store)
            row = {"workers": n, "load_start": os.getloadavg()}
            sampler = RssSampler()
            sampler.start()
            cpu0 = psutil.cpu_times()
            t_all = time.perf_counter()
            with LocalCluster(n_workers=n, threads_per_worker=1, processes=True,
                              dashboard_address=None, memory_limit="8GiB") as cl, Client(cl) as client:
                for name, cfg in STAGES.items():
                    t = time.perf_counter()
                    scdist.run({"store": store, "stages": {"ctmm": cfg}}, client=client, rich=False)
                    row[f"{name}_s"] = time.perf_counter() - t
            row["total_s"] = time.perf_counter() - t_all
            cpu1 = psutil.cpu_times()
            sampler.stop()
            row["machine_cpu_s"] = (cpu1.user + cpu1.system) - (cpu0.user + cpu0.system)
            row["peak_rss_total_gib"] = sampler.peak_total / 2**30
            row["peak_rss_one_process_gib"] = sampler.peak_child / 2**30
            row["load_end"] = os.getloadavg()
            res = xr.open_zarr(f"{store}/results/ctmm/reml", consolidated=False)
            row["jackknife_tested"] = int(res["pvalue"].sel(test="free_vs_hom_jackknife").notnull().sum())
            row["free_converged"] = int(res["converged"].sel(model="free").sum())
            out["runs"].append(row)
            print(json.dumps(row), flush=True)
            shutil.rmtree(store, ignore_errors=True)
    by = {r["workers"]: r["total_s"] for r in out["runs"]}
    if 1 in by and 2 in by:
        out["speedup_2_over_1"] = by[1] / by[2]
    print(json.dumps(out, indent=1))
    os.makedirs(os.path.join(os.path.dirname(__file__), "results"), exist_ok=True)
    with open(os.path.join(os.path.dirname(__file__), "results", "ctmm_transcriptome.json"), "w") as f:
        json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    sys.exit(main())
