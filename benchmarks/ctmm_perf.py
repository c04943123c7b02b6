"""CTMM performance: scdist vs the authors' package side by side, and at transcriptome scale.

Part 1 (``--part ratio``): per-gene CPU seconds on one core for Free REML + jackknife, Free REML,
Hom REML and HE.  The reference (``ctmm`` 1.1.0, R optim through rpy2, in its own venv made by
``ctmm_reference.py``) runs on the first ``--ref-genes`` simulated genes (``--ref-jk-genes`` of
them with its serial jackknife, which is very slow); scdist runs in this process on all
``--genes`` genes of the same seeded set (which start with the reference's genes), best of
``--repeats``.  Both with one BLAS thread.  The table gives the ratio of per-gene CPU times.

Part 2 (``--part scale``): the transcriptome-scale runs of ``ctmm_transcriptome.py`` (shared
code in ``ctmm_bench_common.py``): 11,231 genes x 94 donors x 4 cell types as a study, the
``ctmm`` stage with Hom + Free REML (LRT, Wald, jackknife) then HE, on a LocalCluster with
``--scale-workers`` workers (default 2 then 1), wall time, peak memory, 1 vs 2 speed-up.

The machine is shared with other jobs: absolute figures are noisy; the ratios in part 1 are
measured in the same run.  Usage::

    .venv/bin/python benchmarks/ctmm_perf.py                      # both parts
    .venv/bin/python benchmarks/ctmm_perf.py --part ratio --ref-genes 4 --ref-jk-genes 1
    .venv/bin/python benchmarks/ctmm_perf.py --part scale --scale-genes 11231
"""
from __future__ import annotations

import os

for _k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
    os.environ[_k] = "1"   # one core per process; must precede numpy's import

import argparse  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import xarray as xr  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from ctmm_reference import ensure_environment, simulate_ctp, single_thread_env  # noqa: E402

CALLS = {  # label -> scdist.ctmm.fit keyword arguments (same work as the reference's call)
    "free_reml_jk": dict(models=["free"], method="reml", tests=["jackknife"]),
    "free_reml": dict(models=["free"], method="reml", tests=["wald"]),
    "hom_reml": dict(models=["hom"], method="reml", tests=[]),
    "he": dict(models=["free"], method="he", tests=[]),
}
LABELS = {"free_reml_jk": "Free REML + jackknife", "free_reml": "Free REML (Wald)",
          "hom_reml": "Hom REML", "he": "HE (Free)"}


def as_cube(sim: dict, genes=slice(None)) -> xr.Dataset:
    Y, nu = sim["Y"][genes], sim["nu"][genes]
    G, N, C = Y.shape
    return xr.Dataset(
        {"mean": (("donor", "celltype", "gene"), Y.transpose(1, 2, 0)),
         "nu": (("donor", "celltype", "gene"), nu.transpose(1, 2, 0))},
        coords={"donor": np.array([f"d{i:03d}" for i in range(N)], dtype=object),
                "celltype": np.array([f"ct{c}" for c in range(C)], dtype=object),
                "gene": np.array([f"g{g:05d}" for g in range(G)], dtype=object)})


def scdist_cpu_per_gene(ds: xr.Dataset, repeats: int) -> dict[str, float]:
    import scdist.ctmm as ctmm

    out = {}
    for label, kw in CALLS.items():
        best = np.inf
        for _ in range(repeats):
            t = time.process_time()
            ctmm.fit(ds, **kw)
            best = min(best, time.process_time() - t)
        out[label] = best / ds.sizes["gene"]
        print(f"  scdist {label}: {out[label] * 1e3:.2f} ms CPU per gene", flush=True)
    return out


def reference_cpu_per_gene(n_genes: int, n_jk: int, seed: int) -> dict[str, list[float]]:
    py = ensure_environment()
    cmd = [str(py), str(HERE / "ctmm_reference.py"), "--inner", "--time", "--genes",
           str(n_genes), "--jk-genes", str(n_jk), "--seed", str(seed)]
    r = subprocess.run(cmd, env=single_thread_env(), stdout=subprocess.PIPE, check=True,
                       text=True)
    return json.loads(r.stdout.strip().splitlines()[-1])["cpu_s"]


def part_ratio(args) -> dict:
    args.genes = 300   # the reference script's simulated set (its genes are the first ones)
    sim = simulate_ctp(args.genes, seed=args.seed)
    # the reference's genes are select_genes(is_free, k) of the 300-gene set: the first k
    # genes (alternating Hom/Free), so they are among scdist's
    print(f"scdist on {args.genes} genes (best of {args.repeats})", flush=True)
    sc = scdist_cpu_per_gene(as_cube(sim), args.repeats)
    print(f"reference on {args.ref_genes} genes ({args.ref_jk_genes} with jackknife)",
          flush=True)
    ref = reference_cpu_per_gene(args.ref_genes, args.ref_jk_genes, args.seed)
    jk_note = f"timed here on {len(ref.get('free_reml_jk', []))} gene(s)"
    if not ref.get("free_reml_jk"):
        # the serial jackknife costs minutes per gene: fall back to the jackknife CPU times
        # that ctmm_reference.py recorded on the same simulated set (same machine, other run)
        meta = HERE.parent / "tests" / "fixtures" / "ctmm_reference_meta_extra.json"
        jk = json.loads(meta.read_text()).get("sim_jackknife", {}) if meta.exists() else {}
        ref["free_reml_jk"] = jk.get("cpu_s", {}).get("free_reml_jk", [])
        jk_note = f"from {meta.name} ({len(ref['free_reml_jk'])} gene(s), earlier run)"
    print(f"reference jackknife timing: {jk_note}", flush=True)
    rows = []
    for label in CALLS:
        r = float(np.median(ref[label])) if ref.get(label) else float("nan")
        rows.append({"fit": LABELS[label], "reference_cpu_s_per_gene": r,
                     "reference_genes": len(ref.get(label, [])),
                     "scdist_cpu_ms_per_gene": sc[label] * 1e3,
                     "speedup": r / sc[label]})
    print("\n| fit | reference CPU s/gene (genes) | scdist CPU ms/gene | ratio |")
    print("|---|---|---|---|")
    for row in rows:
        print(f"| {row['fit']} | {row['reference_cpu_s_per_gene']:.3g} "
              f"({row['reference_genes']}) | {row['scdist_cpu_ms_per_gene']:.3g} | "
              f"{row['speedup']:.0f}x |")
    return {"ratio": rows, "scdist_genes": args.genes, "reference_jackknife_timing": jk_note}


def part_scale(args) -> dict:
    """The transcriptome-scale runs of ``ctmm_transcriptome.py`` (one shared implementation in
    ``ctmm_bench_common``): 2 then 1 worker(s) on the simulated 11,231-gene study."""
    from ctmm_bench_common import transcriptome_runs

    tmp = tempfile.mkdtemp(prefix="ctmm_perf_", dir=HERE / "out")
    try:
        return {"scale": transcriptome_runs(args.scale_genes, args.gene_chunk,
                                            args.scale_workers, tmp)}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--part", choices=["all", "ratio", "scale"], default="all")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--ref-genes", type=int, default=6)
    ap.add_argument("--ref-jk-genes", type=int, default=1)
    ap.add_argument("--scale-genes", type=int, default=11231)
    ap.add_argument("--scale-workers", type=int, nargs="+", default=[2, 1])
    ap.add_argument("--gene-chunk", type=int, default=256)
    ap.add_argument("--seed", type=int, default=20240611)
    ap.add_argument("--out", default=str(HERE / "out" / "ctmm_perf.json"))
    args = ap.parse_args(argv)
    (HERE / "out").mkdir(exist_ok=True)
    res: dict = {"argv": sys.argv[1:], "started": time.strftime("%Y-%m-%d %H:%M:%S UTC",
                                                                time.gmtime()),
                 "load_average_start": os.getloadavg()}
    if args.part in ("all", "ratio"):
        res.update(part_ratio(args))
    if args.part in ("all", "scale"):
        res.update(part_scale(args))
    res["load_average_end"] = os.getloadavg()
    res["ended"] = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    Path(args.out).write_text(json.dumps(res, indent=1))
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
