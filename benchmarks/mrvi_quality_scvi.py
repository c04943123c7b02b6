"""scvi-tools 1.4.2 MRVI on exactly the study benchmarks/mrvi_quality.py trains on, scored with the
same figures (is a miss the model or the simulated design?).

    .venv/bin/python benchmarks/mrvi_quality_scvi.py [--cells 20000] [--epochs 40] [--train-seed 0] [--design '{}']

The study (``mrvi_quality.build_study``, same cells / seed / design knobs) is exported once to
h5ad (raw counts; obs donor, batch, celltype, top_group); scvi-tools runs in its own venv
(benchmarks/.venv-scvi, made by vae_scvi_env.py) through mrvi_quality_scvi_worker.py: MRVI with
sample = donor, batch = batch, its default architecture, minibatch 256, 90% train, one CPU
thread, ``--epochs`` epochs. Scored here:
- aggregated local sample distances per cell type (``get_local_sample_distances``, mean of z,
  averaged over each type's cells) -> ``mrvi_quality.distance_figures`` (leaf ARI at 8
  clusters, tree Spearman, between / within-leaf ratio);
- DE: AUC of |mean LFC| over the DE type's cells (top group 1 vs 0; 600 random cells of
  that type analysed, scvi-tools' DE is slow) for the MrVI genes vs the rest;
- DA: AUC / average precision of log(mean density over top-1 donors) - log(mean over top-0
  donors) of each cell's u, DA type vs the rest.
- kNN top-group agreement of u inside each cell type (as mrvi_quality.py; 0.5 = groups mixed).
Also the oracle: the same distance figures on the true per-donor log means ``eta`` of each
cell type (what a perfect model could reach), and the DE gene AUC of the true top-group
difference of mean eta in the DE type. Results: benchmarks/out/mrvi_quality_scvi_<...>.json.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from scipy.special import logsumexp

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from mrvi_quality import (OUT, auc, average_precision, build_study, de_figures, design_tag,  # noqa: E402
                          distance_figures, tree_of)


def export_h5ad(study, path: Path) -> None:
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp
    X = sp.vstack([study.read_counts(a, b) for a, b in study.cell_chunks]).tocsr().astype(np.float32)
    obs = study.obs()[["donor", "batch", "celltype"]].astype(str)
    top = study.truth()["donor_top_group"].to_series()
    obs["top_group"] = top.reindex(obs["donor"].to_numpy()).astype(str).to_numpy()
    obs = obs.astype("category")
    obs.index = obs.index.astype(str)
    a = ad.AnnData(X=X, obs=obs, var=pd.DataFrame(index=np.asarray(study.gene_names, dtype=str)),
                   uns={"mrvi_celltype": str(study.truth().attrs["mrvi_celltype"])})
    a.write_h5ad(path)


def oracle_figures(truth) -> dict:
    donors = list(truth["donor"].values)
    eta = truth["eta"].values
    return distance_figures({str(ct): np.sqrt(((eta[:, c, None] - eta[None, :, c]) ** 2).sum(-1))
                             for c, ct in enumerate(truth["celltype"].values)}, donors, truth)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cells", type=int, default=20_000)
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--train-seed", type=int, default=0, help="scvi-tools' seed (model init, shuffling)")
    ap.add_argument("--design", default="{}")
    a = ap.parse_args()
    design = json.loads(a.design)
    from scdist.simulate.population import MRVI_DESIGN_VERSION
    from vae_scvi_env import scvi_python

    study = build_study(a.cells, a.seed, design)
    truth = study.truth()
    tag = f"{a.cells}_v{MRVI_DESIGN_VERSION}" + (f"_{design_tag(design)}" if design else "") + f"_s{a.seed}"
    h5ad = OUT / f"mrvi_quality_{tag}.h5ad"
    if not h5ad.exists():
        export_h5ad(study, h5ad)
    run = f"{tag}_{a.epochs}" + (f"_t{a.train_seed}" if a.train_seed else "")
    npz = OUT / f"mrvi_quality_scvi_{run}.npz"
    if not npz.exists():
        t0 = time.perf_counter()
        subprocess.run([str(scvi_python()), str(HERE / "mrvi_quality_scvi_worker.py"), str(h5ad), str(a.epochs),
                        str(npz), str(a.train_seed)], check=True, cwd=HERE)
        print(f"scvi-tools worker: {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    r = np.load(npz, allow_pickle=False)
    donors = list(r["dist_sample_order"])
    cts = [k[5:] for k in r.files if k.startswith("dist_") and k != "dist_sample_order"]
    res = {"impl": "scvi-tools 1.4.2 MRVI", "cells": a.cells, "epochs": a.epochs, "train_seed": a.train_seed,
           "design": design,
           "design_version": MRVI_DESIGN_VERSION, "train_s": float(r["train_s"]),
           "epochs_run": int(r["epochs_run"]),
           "distances": distance_figures({ct: r[f"dist_{ct}"] for ct in cts}, donors, truth),
           "oracle_eta_distances": oracle_figures(truth)}
    de_type, da_type = truth.attrs["mrvi_celltype"], truth.attrs["da_celltype"]
    # oracle DE: |difference of the top groups' mean true eta| in the DE type (leaf effects can cancel the top effect)
    eta_de = truth["eta"].sel(celltype=de_type).values
    top_d = truth["donor_top_group"].values
    res["oracle_de_auc_genes"] = auc(np.abs(eta_de[top_d == 1].mean(0) - eta_de[top_d == 0].mean(0)),
                                     truth["mrvi_gene"].values)
    obs = study.obs()
    ct_all = obs["celltype"].astype(str).to_numpy()
    # DA: per-donor log densities -> log mean over each top group's donors
    lp_donors = list(r["log_probs_samples"])
    _, top, _ = tree_of(lp_donors, truth)
    lp = r["log_probs"]
    ratio = (logsumexp(lp[:, top == 1], 1) - np.log((top == 1).sum())
             - logsumexp(lp[:, top == 0], 1) + np.log((top == 0).sum()))
    res["da_auc"] = auc(ratio, ct_all == da_type)
    res["da_average_precision"] = average_precision(ratio, ct_all == da_type)
    # DE: mean LFC over the analysed DE-type cells
    lfc = r["lfc"]  # (cell, covariate, gene), cells of the DE type only
    assert (ct_all[r["de_cells"]] == de_type).all()
    mean_lfc = lfc[:, -1].mean(0)
    res["de_n_cells"] = int(lfc.shape[0])
    res["de_auc_genes"] = auc(np.abs(mean_lfc), truth["mrvi_gene"].values)
    res["de_figures"] = de_figures(mean_lfc, truth)
    res["de_lfc_covariates"] = list(r["lfc_covariate"])
    if "u" in r.files:  # kNN top-group agreement of u inside each cell type (0.5 = mixed), as mrvi_quality.py
        from mrvi_u_leak import knn_group_agreement
        top_all = truth["donor_top_group"].to_series().reindex(obs["donor"].astype(str).to_numpy()).to_numpy()
        rng = np.random.default_rng(0)
        res["u_top_group_agreement"] = {}
        for ct in sorted(set(ct_all)):
            idx = rng.choice(np.flatnonzero(ct_all == ct), min(3000, int((ct_all == ct).sum())), replace=False)
            res["u_top_group_agreement"][ct] = knn_group_agreement(r["u"][idx], top_all[idx])
    (OUT / f"mrvi_quality_scvi_{run}.json").write_text(json.dumps(res, indent=1))
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
