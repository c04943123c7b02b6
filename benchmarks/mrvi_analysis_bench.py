"""MrVI post-training analyses: throughput and memory, side by side with scvi-tools' MRVI.

    .venv/bin/python benchmarks/mrvi_analysis_bench.py [--cells 20000] [--scvi] [--repeats 3] [--only de,da]
    .venv/bin/python benchmarks/mrvi_analysis_bench.py --da-scaling-only --da-sizes 20000,100000,1000000

Measures, on one CPU thread, in a fresh process per analysis (peak RSS reset after training,
so it is the analysis's own; CPU time the median of ``--repeats``):
local sample distances (aggregated per cell type) for S = 32 and S = 200 samples (with
``--only distances32norm,distances32norm_slow`` also the Monte Carlo normalisation,
``normalize=True, mc_samples=20``, on its fast path and on the former one; scvi-tools'
``normalize_distances=True`` needs ``use_mean=False`` and draws ``mc_samples=10`` states per
cell and sample, a different computation, timed for context), DE
(admissibility filter + per-cell regression + LFCs) and DA (log density ratios) in cells
per CPU-second; DA CPU time versus cells on a streamed study store (near-linear expected).
With ``--scvi`` the same analyses run in scvi-tools 1.4.2 (benchmarks/.venv-scvi, created by
vae_scvi_env.py) on the same h5ad. Models are trained for one epoch: the analyses' cost does
not depend on the weights. Results: benchmarks/out/mrvi_analysis.json.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from mrvi_bench_common import record, reset_peak_rss, timed, timed_repeats

HERE = Path(__file__).resolve().parent
OUT = HERE / "out"


def h5ad_path(S: int, n: int) -> Path:
    return OUT / f"mrvi_bench_S{S}_{n}.h5ad"


def prepare(S: int, n: int) -> Path:
    p = h5ad_path(S, n)
    if not p.exists():
        from scdist.vae.simulate import sample_effects
        adata, _ = sample_effects(n_cells=n, n_genes=2000, n_samples=S, n_types=4, n_markers=50, seed=0)
        OUT.mkdir(exist_ok=True)
        adata.write_h5ad(p)
    return p


def ours(what: str, S: int, n: int, n_run: int, repeats: int = 1) -> dict:
    """One measurement in this process (called in a subprocess by main)."""
    import anndata as ad
    import numpy as np
    import torch

    torch.set_num_threads(1)
    from scdist.vae import train_mrvi

    adata = ad.read_h5ad(prepare(S, n))
    model = train_mrvi(adata, "sample", seed=0, max_epochs=1)
    cells = np.arange(n_run)
    # warm-up on a few cells (first-call allocations, lazy imports) outside the timing
    slow_norm = what == "distances_norm_slow"
    if slow_norm:  # the former path of the normalisation: the module's own z_from_u for the draws
        import scdist.vae.analysis.distances as dist
        fast_maps = dist._maps
        dist._maps = lambda module, sidx, normalize: (fast_maps(module, sidx, False)[0], None)
    what = "distances_norm" if slow_norm else what
    {"distances": lambda: model.sample_distances(cells=cells[:300]),
     "distances_norm": lambda: model.sample_distances(cells=cells[:300], normalize=True),
     "de": lambda: model.differential_expression("group", cells=cells[:300], max_cells=50),
     "da": lambda: model.differential_abundance("group", cells=cells[:300], max_cells=20)}[what]()
    run = {"distances": lambda: model.sample_distances(groupby="celltype", cells=cells),
           "distances_norm": lambda: model.sample_distances(groupby="celltype", cells=cells, normalize=True,
                                                            mc_samples=20),
           "de": lambda: model.differential_expression("group", groupby="celltype", cells=cells),
           "da": lambda: model.differential_abundance("group", groupby="celltype", cells=cells)}[what]
    reset_peak_rss()
    return record("scdist" + (" (former normalisation path)" if slow_norm else ""), what, n_run, S,
                  *timed_repeats(run, repeats))


def da_scaling(sizes: list[int], S: int = 32) -> list[dict]:
    """DA CPU time versus cells on a simulated study store streamed chunk by chunk."""
    import numpy as np
    import torch

    torch.set_num_threads(1)
    from scdist.simulate import simulate_study
    from scdist.store import open_study
    from scdist.vae import train_mrvi

    url = str(OUT / f"mrvi_da_study_{max(sizes)}.zarr")
    if not Path(url, "zarr.json").exists():
        from scdist.engines.dask import dask_client
        with dask_client(n_workers=2) as client:  # chunks generated on 2 workers, written in order
            simulate_study(url, n_donors=S, n_cells=max(sizes), n_genes=2000, n_celltypes=4, seed=0,
                           chunk_cells=10_000, overwrite=True, client=client)
    study = open_study(url)
    # a one-epoch model is enough for timing; train it on 300 cells of every chunk (all donors)
    import anndata as ad
    import scipy.sparse as sp
    rng = np.random.default_rng(0)
    obs = study.obs()
    parts, rows = [], []
    for a, b in study.cell_chunks:
        pick = np.sort(rng.choice(np.arange(a, b), min(300, b - a), replace=False))
        parts.append(study.read_counts(a, b)[pick - a])
        rows.append(pick)
    rows = np.concatenate(rows)
    train = ad.AnnData(sp.vstack(parts).tocsr(), obs=obs.iloc[rows].copy())
    train.var_names = list(study.gene_names)
    model = train_mrvi(train, "donor", seed=0, max_epochs=1)
    top = study.truth()["donor_top_group"].to_series()
    groups = {"top1_vs_top0": ([d for d, t in top.items() if t == 1], [d for d, t in top.items() if t == 0])}
    rows = []
    import os
    for n in sizes:
        reset_peak_rss()
        rss0 = _status_gib("VmRSS")
        cpu, wall = timed(lambda: model.differential_abundance(groups, study, cells=None if n == study.n_cells
                                                               else np.arange(n)))
        rows.append({"n_cells": n, "cpu_s": cpu, "wall_s": wall, "rss_before_gib": rss0,
                     "peak_rss_gib": _status_gib("VmHWM"), "load_avg_1min": os.getloadavg()[0]})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def _status_gib(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 2**20
    return float("nan")


def _sub(args: list[str]) -> dict:
    r = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(r.stderr[-3000:])
    return json.loads(r.stdout.strip().splitlines()[-1])


def _scvi(what: str, S: int, n: int, n_run: int, repeats: int = 1) -> dict:
    from vae_scvi_env import scvi_python
    out = OUT / f"mrvi_scvi_{what}_{S}.json"
    r = subprocess.run([str(scvi_python()), str(HERE / "mrvi_scvi_worker.py"), str(prepare(S, n)), what, str(n_run),
                        str(out), str(repeats)], capture_output=True, text=True)
    if r.returncode:
        return {"impl": "scvi-tools", "what": what, "error": r.stderr[-1500:]}
    return json.loads(out.read_text())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cells", type=int, default=20_000)
    ap.add_argument("--scvi", action="store_true")
    ap.add_argument("--da-sizes", default="25000,50000,100000,200000")
    ap.add_argument("--skip-da-scaling", action="store_true")
    ap.add_argument("--repeats", type=int, default=3, help="timed repeats per analysis (median reported)")
    ap.add_argument("--only", default="", help="comma list of distances32,distances200,de,da (default: these "
                                               "four), distances32norm, distances32norm_slow")
    ap.add_argument("--one", nargs=5, metavar=("WHAT", "S", "N", "NRUN", "REPEATS"), help=argparse.SUPPRESS)
    ap.add_argument("--da-scaling-only", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        print(json.dumps(ours(a.one[0], int(a.one[1]), int(a.one[2]), int(a.one[3]), int(a.one[4]))))
        return
    sizes = [int(s) for s in a.da_sizes.split(",")]
    if a.da_scaling_only:
        rows = da_scaling(sizes)
        OUT.mkdir(exist_ok=True)
        (OUT / f"mrvi_da_scaling_{max(sizes)}.json").write_text(json.dumps(rows, indent=1))
        print(json.dumps(rows))
        return
    n = a.cells
    plan = {"distances32": ("distances", 32, n), "distances200": ("distances", 200, n),
            "distances32norm": ("distances_norm", 32, min(n, 5000)),
            "distances32norm_slow": ("distances_norm_slow", 32, min(n, 5000)),
            "de": ("de", 32, min(n, 5000)), "da": ("da", 32, n)}
    if a.only:
        plan = {k: v for k, v in plan.items() if k in a.only.split(",")}
    else:
        plan = {k: v for k, v in plan.items() if not k.startswith("distances32norm")}
    scvi_n = {"distances32": min(n, 5000), "distances200": min(n, 2000), "distances32norm": min(n, 1000),
              "de": 300, "da": n}
    results = []
    for key, (what, S, n_run) in plan.items():
        prepare(S, n)
        r = _sub(["--one", what, str(S), str(n), str(n_run), str(a.repeats)])
        results.append(r)
        print(json.dumps(r), flush=True)
        if a.scvi and key in scvi_n:
            s = _scvi(what, S, n, min(n_run, scvi_n[key]), a.repeats)
            results.append(s)
            print(json.dumps(s), flush=True)
    out = {"analyses": results}
    if not a.skip_da_scaling:
        out["da_scaling"] = _sub(["--da-scaling-only", "--da-sizes", a.da_sizes])
    OUT.mkdir(exist_ok=True)
    (OUT / ("mrvi_analysis.json" if not a.only else f"mrvi_analysis_{a.only.replace(',', '_')}.json")).write_text(
        json.dumps(out, indent=1))


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    main()
