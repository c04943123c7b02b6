"""MrVI end to end on a simulated population study: train, then every post-training analysis,
each result written to the study store under results/mrvi/<run>/<analysis>.

    .venv/bin/python examples/mrvi_analysis.py [STORE] [--cells 20000] [--epochs 60] [--dask]

With ``--dask`` the per-cell analyses are mapped over the cell chunks on a local Dask cluster.
Read the results back with ``xarray.open_zarr(f"{STORE}/results/mrvi/example/distances",
consolidated=False)``.
"""
from __future__ import annotations

import argparse
import contextlib

import numpy as np
import pandas as pd


def run(store: str, *, n_cells: int = 20_000, epochs: int = 60, run_name: str = "example", client=None,
        seed: int = 0) -> dict:
    from scdist.simulate import simulate_study
    from scdist.store import open_study
    from scdist.vae import train_mrvi
    from scdist.vae import analysis as A

    study = simulate_study(store, n_donors=16, n_cells=n_cells, n_genes=300, n_celltypes=4, seed=seed,
                           n_groups=(2, 2), chunk_cells=max(512, n_cells // 8), overwrite=True)
    truth = study.truth()
    model = train_mrvi(study, "donor", "batch", seed=seed, max_epochs=epochs)
    urls = {}
    # 1. exploratory: aggregated distances per cell type and the dendrogram of the donors
    dist = model.sample_distances(data=study, groupby="celltype", client=client)
    urls["distances"] = A.write_result(dist, study, run_name, "distances")
    urls["sample_clusters"] = A.write_result(A.cluster_samples(dist, n_clusters=4), study, run_name, "sample_clusters")
    # 2. cells clustered by their distance matrices, then distances per cluster
    cc = A.cluster_cells(model, study, max_fit_cells=min(5000, n_cells), client=client)
    urls["cell_clusters"] = A.write_result(cc[["cluster"]], study, run_name, "cell_clusters")
    # 3. out-of-distribution filter, then DE of the top donor group
    top = truth["donor_top_group"].to_series().reindex(list(model.samples))
    adm = model.admissibility(study, client=client)
    urls["admissibility"] = A.write_result(adm, study, run_name, "admissibility")
    cov = pd.DataFrame({"top_group": top.astype(str).to_numpy()}, index=top.index)
    de = model.differential_expression(cov, study, groupby="celltype", admissible=adm, client=client,
                                       lfc_cells=np.arange(min(100, n_cells)))
    urls["de"] = A.write_result(de, study, run_name, "de")
    # 4. DA: top group 1 against top group 0, tested per cell type
    groups = {"top1_vs_top0": (list(top.index[top == 1]), list(top.index[top == 0]))}
    da = model.differential_abundance(groups, study, groupby="celltype", client=client)
    urls["da"] = A.write_result(da, study, run_name, "da")
    return {"study": open_study(store), "model": model, "urls": urls, "distances": dist, "de": de, "da": da}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("store", nargs="?", default="mrvi_example.zarr")
    ap.add_argument("--cells", type=int, default=20_000)
    ap.add_argument("--epochs", type=int, default=60)
    ap.add_argument("--dask", action="store_true")
    a = ap.parse_args()
    from scdist.engines.dask import dask_client
    with (dask_client(n_workers=2) if a.dask else contextlib.nullcontext()) as client:
        out = run(a.store, n_cells=a.cells, epochs=a.epochs, client=client)
    d = out["distances"]
    print(d.round(2).to_dataframe().groupby("group")["distance"].mean())
    print(out["da"][["mean_difference", "pvalue"]].to_dataframe())
    for k, v in out["urls"].items():
        print(f"{k:16s} {v}")


if __name__ == "__main__":
    main()
