"""Real data: LDVAE and MrVI on Kang 2018 (8 donors x 8 PBMC types, ../shared/data/kang2018_muscat).

Trains both models with their defaults (``--epochs`` caps the epochs to keep the run short),
then reports silhouette widths (as in the MrVI paper's integration metrics, on a subsample of
cells, Euclidean): by cell type (higher = cell types separated) and by donor (near 0 or
negative = donors mixed) in MrVI's u and z and in LDVAE's latent; and LDVAE's top genes
per factor (gene symbols).

    .venv/bin/python benchmarks/vae_realdata.py --epochs 60

Writes benchmarks/out/vae_realdata.json.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
DATA = HERE.parents[1] / "shared" / "data" / "kang2018_muscat" / "kang2018_ctrl_8donors.h5ad"


def silhouette(X: np.ndarray, labels: np.ndarray) -> float:
    """Mean silhouette width with Euclidean distances (all pairs: use a subsample)."""
    D = np.sqrt(np.maximum(((X[:, None, :] - X[None, :, :]) ** 2).sum(-1), 0))
    labs = np.unique(labels)
    onehot = (labels[:, None] == labs[None, :]).astype(float)
    sums = D @ onehot
    counts = onehot.sum(0)
    own = onehot.astype(bool)
    a = sums[own] / np.maximum(counts[np.argmax(onehot, 1)] - 1, 1)
    mean_other = np.where(own, np.inf, sums / counts)
    b = mean_other.min(1)
    return float(np.mean((b - a) / np.maximum(a, b)))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=60)
    ap.add_argument("--subsample", type=int, default=3000)
    args = ap.parse_args()
    import anndata as ad
    import torch

    from scdist.vae import train_ldvae, train_mrvi
    torch.set_num_threads(1)
    a = ad.read_h5ad(DATA)
    rng = np.random.default_rng(0)
    sub = np.sort(rng.choice(a.n_obs, min(args.subsample, a.n_obs), replace=False))
    ct = a.obs["cell_type"].astype(str).to_numpy()[sub]
    donor = a.obs["donor"].astype(str).to_numpy()[sub]
    out = {"data": str(DATA.name), "cells": int(a.n_obs), "genes": int(a.n_vars), "epochs_cap": args.epochs}

    t0 = time.perf_counter()
    mr = train_mrvi(a, "donor", seed=0, max_epochs=args.epochs)
    out["mrvi_train_s"] = time.perf_counter() - t0
    out["mrvi_epochs"] = len(mr.history.epoch)
    for kind in ("u", "z"):
        X = mr.latent(kind).values[sub]
        out[f"mrvi_{kind}_silhouette_celltype"] = silhouette(X, ct)
        out[f"mrvi_{kind}_silhouette_donor"] = silhouette(X, donor)

    t0 = time.perf_counter()
    ld = train_ldvae(a, None, n_latent=10, seed=0, max_epochs=args.epochs)
    out["ldvae_train_s"] = time.perf_counter() - t0
    out["ldvae_epochs"] = len(ld.history.epoch)
    Z = ld.latent().values[sub]
    out["ldvae_silhouette_celltype"] = silhouette(Z, ct)
    out["ldvae_silhouette_donor"] = silhouette(Z, donor)
    symbols = a.var["symbol"].astype(str).to_numpy() if "symbol" in a.var else a.var_names.to_numpy()
    top = ld.top_genes(8, sign="positive")
    out["ldvae_top_genes"] = {k: [str(symbols[list(a.var_names).index(g)]) for g in top[k]] for k in top.columns}
    out["ldvae_heldout"] = ld.evaluate(split="val")
    (HERE / "out").mkdir(exist_ok=True)
    (HERE / "out" / "vae_realdata.json").write_text(json.dumps(out, indent=1, default=float))
    for k, v in out.items():
        print(k, v)


if __name__ == "__main__":
    main()
