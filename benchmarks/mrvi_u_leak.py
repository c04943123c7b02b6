"""How much of a known sample-group effect MrVI leaks into u (which should be sample-unaware).

    .venv/bin/python benchmarks/mrvi_u_leak.py '{}' '{"l2_scale": 3.0}' '{"labels_key": "celltype"}' ...

Simulation (``scdist.vae.simulate.sample_effects``: 2,000 cells, 150 genes, 6 samples in 2 groups,
3 cell types, 20 marker genes, group 1 shifting genes in cell type t0 only, ``--lfc``). For each
setting (a JSON of ``train_mrvi`` options; ``labels_key`` included), trains 60 epochs and reports,
per cell type, the kNN group agreement (mean fraction of a cell's 15 nearest neighbours, in u or
in z, from the same sample group; 0.5 = groups mixed, 1 = groups apart) and the ratio of
counterfactual z distances between / within sample groups. Ideal: u ~0.5 in every type, the
distance ratio high in t0 and ~1 in t1, t2. One JSON line per setting on stdout.
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np


def knn_group_agreement(X: np.ndarray, labels: np.ndarray, k: int = 15) -> float:
    d = ((X[:, None] - X[None]) ** 2).sum(-1)
    np.fill_diagonal(d, np.inf)
    nn = np.argpartition(d, k, axis=1)[:, :k]
    return float((labels[nn] == labels[:, None]).mean())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("settings", nargs="*", default=["{}"])
    ap.add_argument("--lfc", type=float, default=1.0)
    ap.add_argument("--epochs", type=int, default=60)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    import torch
    torch.set_num_threads(1)
    from scdist.vae import train_mrvi
    from scdist.vae.simulate import sample_effects

    adata, info = sample_effects(n_cells=2000, n_genes=150, n_samples=6, n_types=3, n_markers=20, lfc=a.lfc,
                                 seed=0)
    ct = adata.obs["celltype"].cat.codes.to_numpy()
    grp = adata.obs["group"].cat.codes.to_numpy()
    g = info["sample_group"]
    same = (g[:, None] == g[None]) & ~np.eye(len(g), dtype=bool)
    diff = g[:, None] != g[None]
    for text in a.settings:
        opts = json.loads(text)
        labels_key = opts.pop("labels_key", None)
        t0 = time.perf_counter()
        m = train_mrvi(adata, "sample", labels_key=labels_key, seed=a.seed, max_epochs=a.epochs, **opts)
        res = {"settings": json.loads(text), "train_s": round(time.perf_counter() - t0, 1)}
        for kind in ("u", "z"):
            X = m.latent(kind).values
            res[f"{kind}_group_agreement"] = [round(knn_group_agreement(X[ct == t], grp[ct == t]), 3)
                                              for t in range(3)]
        res["u_celltype_agreement"] = round(knn_group_agreement(m.latent("u").values, ct), 3)
        D = np.concatenate([torch.cdist(b["z"].permute(1, 0, 2), b["z"].permute(1, 0, 2)).numpy()
                            for b in m.iter_counterfactuals(batch_size=500)])
        res["z_distance_ratio"] = [round(float(D[ct == t].mean(0)[diff].mean() / D[ct == t].mean(0)[same].mean()), 2)
                                   for t in range(3)]
        res["val_nelbo"] = round(float(m.history.val_nelbo[-1]), 2)
        print(json.dumps(res), flush=True)


if __name__ == "__main__":
    main()
