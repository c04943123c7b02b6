"""CTMM kernel speed (scdist only; the side-by-side with the reference is ctmm_reference.py).

Part 1 (--genes G): per-gene CPU time on one core (BLAS pinned to 1 thread) at the paper's
size N = 94 donors, C = 4 cell types, data simulated from the Free model:
Hom REML, Free REML, Free REML + jackknife, HE (+ jackknife). CPU time (process_time) is
reported because the development machine is shared; ratios use the reference's measured
per-gene CPU figures quoted in issue 3 (Free REML 1.6 s, Hom REML 0.3 s, Free + JK ~150 s).

Part 2 (--scale G): end-to-end study run on an embedded LocalCluster (1 then 2 workers x 1
thread): Hom + Free REML with LRT/Wald/jackknife, then HE with its jackknife, wall time and
peak RSS of the workers.

    OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 python benchmarks/ctmm_speed.py --genes 300 --repeats 3
    python benchmarks/ctmm_speed.py --scale 11231 --workers 1 2
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

for v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
    os.environ.setdefault(v, "1")

import numpy as np  # noqa: E402

REFERENCE_CPU_S = {"hom_reml": 0.3, "free_reml": 1.6, "free_reml_jackknife": 150.0}


def kernel_speed(G: int, seed: int = 0, repeats: int = 3) -> dict:
    from scdist.ctmm.kernel import FitConfig, fit_block, test_labels
    from scdist.ctmm.simulate import simulate_ctp

    sim = simulate_ctp(G, 94, 4, hom2=0.2, V=[0.1, 0.2, 0.0, 0.1], seed=seed)
    # the compiled likelihood kernel is built (or loaded from numba's cache) on first use in a
    # process: time that once, outside the per-gene figures
    t = time.process_time()
    warm = FitConfig(models=("hom", "free"), method="reml", tests=("jackknife",),
                     test_labels=test_labels(("hom", "free"), "reml", ("jackknife",)))
    fit_block(sim.isel(gene=slice(0, 2)), warm)
    first_call = time.process_time() - t
    cases = {
        "hom_reml": (("hom",), "reml", ()),
        "free_reml": (("free",), "reml", ()),
        "free_reml_jackknife": (("free",), "reml", ("jackknife",)),
        "free_he": (("free",), "he", ()),
        "free_he_jackknife": (("free",), "he", ("jackknife",)),
    }
    out = {}
    for name, (models, method, tests) in cases.items():
        cfg = FitConfig(models=models, method=method, tests=tests,
                        test_labels=test_labels(models, method, tests))
        runs = []
        for _ in range(repeats):
            t = time.process_time()
            res = fit_block(sim, cfg)
            runs.append((time.process_time() - t) / G)
        cpu = float(np.median(runs))
        out[name] = {"cpu_ms_per_gene": round(cpu * 1e3, 3),
                     "cpu_ms_per_gene_runs": [round(r * 1e3, 3) for r in runs],
                     "converged": float(res.converged.mean())}
        if name in REFERENCE_CPU_S:
            out[name]["speedup_vs_reference"] = round(REFERENCE_CPU_S[name] / cpu)
        print(name, out[name], flush=True)
    out["first_call_cpu_s"] = round(first_call, 2)
    return out


def scale_run(G: int, workers: list[int], seed: int = 0) -> dict:
    import psutil
    from distributed import Client, LocalCluster

    import scdist.ctmm as ctmm
    from scdist.store import create_study
    from scdist.store.markers import STAGE, mark_done

    sim = ctmm.simulate_ctp(G, 94, 4, hom2=0.2, V=[0.1, 0.2, 0.0, 0.1], seed=seed)
    pb = sim.drop_vars([v for v in sim.data_vars if v.startswith("true_")])
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        study = create_study(os.path.join(tmp, "scale.zarr"))
        pb.chunk({"gene": 256}).to_zarr(study.group_url("pseudobulk"), mode="w",
                                        consolidated=False, zarr_format=3)
        mark_done(study.group_url("pseudobulk"), STAGE)
        for n in workers:
            with LocalCluster(n_workers=n, threads_per_worker=1, processes=True,
                              dashboard_address=None, memory_limit="6GiB") as cl, Client(cl) as c:
                peak = [0]

                def rss():
                    return sum(psutil.Process(w.pid).memory_info().rss
                               for w in cl.workers.values() if w.pid)
                t = time.perf_counter()
                ctmm.fit(study, models=("hom", "free"), method="reml",
                         tests=("lrt", "wald", "jackknife"), client=c, run=f"reml{n}",
                         overwrite=True)
                t_reml = time.perf_counter() - t
                peak[0] = max(peak[0], rss())
                ctmm.fit(study, models=("hom", "free"), method="he", tests=("jackknife",),
                         client=c, run=f"he{n}", overwrite=True)
                wall = time.perf_counter() - t
                peak[0] = max(peak[0], rss())
            out[f"{n}_workers"] = {"wall_s": round(wall, 1), "reml_s": round(t_reml, 1),
                                   "worker_rss_gib_at_end": round(peak[0] / 2 ** 30, 2)}
            print(n, out[f"{n}_workers"], flush=True)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--genes", type=int, default=0, help="genes for the kernel speed part")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per case (median)")
    ap.add_argument("--scale", type=int, default=0, help="genes for the LocalCluster run")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--out", default="benchmarks/results/ctmm_speed.json")
    a = ap.parse_args(argv)
    res = {"machine_load_1min": os.getloadavg()[0], "cpu_count": os.cpu_count()}
    if a.genes:
        res["kernel"] = kernel_speed(a.genes, repeats=a.repeats)
        res["load_after"] = os.getloadavg()
    if a.scale:
        res["scale"] = {"genes": a.scale, **scale_run(a.scale, a.workers)}
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    prev = json.load(open(a.out)) if os.path.exists(a.out) else {}
    prev.update(res)
    json.dump(prev, open(a.out, "w"), indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
