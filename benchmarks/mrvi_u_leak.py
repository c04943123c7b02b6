"""How much of a known sample-group effect MrVI leaks into u (which should be sample-unaware).

    .venv/bin/python benchmarks/mrvi_u_leak.py '{}' '{"l2_scale": 3.0}' '{"labels_key": "celltype"}' ...

Simulation (``scdist.vae.simulate.sample_effects``: 2,000 cells, 150 genes, 6 samples in 2 groups,
3 cell types, 20 marker genes, group 1 shifting genes in cell type t0 only, ``--lfc``). For each
setting (a JSON of ``train_mrvi`` options; ``labels_key`` included), trains 60 epochs and reports,
per cell type, the kNN group agreement (mean fraction of a cell's 15 nearest neighbours, in u or
in z, from the same sample group; 0.5 = groups mixed, 1 = groups apart) and the ratio of
counterfactual z distances between / within sample groups, and the held-out accuracy of a
linear probe (multinomial logistic regression) of the sample and of the group on u per type, on
the posterior means (what the analyses use) and on draws u ~ q(u | x) (what the decoder and the
``u_adversary`` classifier see); with ``u_adversary``, the trained classifier's accuracy and
cross-entropy (chance: log S). Ideal: u ~0.5 in every type, the distance ratio high in t0 and ~1
in t1, t2, the probes at chance. One JSON line per setting on stdout.

    .venv/bin/python benchmarks/mrvi_u_leak.py --tree MODEL_DIR [MODEL_DIR ...]

Tree diagnosis of models saved by benchmarks/mrvi_quality.py (design v3 study of their cell
count): in the DE type, splits the cells into terciles of their u kNN top-group agreement and
reports the mean per-cell distance D(n) within a leaf / between siblings / between cousins and
the tree Spearman per tercile; the top-group component in u (difference of the two top groups'
mean z_base(u)) and in g(u_n, s) = z_n^s - z_base(u_n) (mean over the cells of the top-1 minus
top-0 sample mean of g), the leaf component of g (leaf means of g minus their top group's), the
same two components of the decoded counterfactual log h (cell's own batch), and of the truth's
log means eta.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np


def knn_group_agreement(X: np.ndarray, labels: np.ndarray, k: int = 15) -> float:
    d = ((X[:, None] - X[None]) ** 2).sum(-1)
    np.fill_diagonal(d, np.inf)
    nn = np.argpartition(d, k, axis=1)[:, :k]
    return float((labels[nn] == labels[:, None]).mean())


def probe_accuracy(X: np.ndarray, labels: np.ndarray, *, seed: int = 0, test_fraction: float = 0.3,
                   l2: float = 1e-3) -> float:
    """Held-out accuracy of a multinomial logistic regression of ``labels`` on ``X`` (standardised)."""
    import torch
    rng = np.random.default_rng(seed)
    test = np.zeros(len(labels), bool)
    test[rng.choice(len(labels), int(len(labels) * test_fraction), replace=False)] = True
    _, y = np.unique(labels, return_inverse=True)
    X = torch.as_tensor(np.asarray(X), dtype=torch.float64)
    X = (X - X[~test].mean(0)) / X[~test].std(0).clamp_min(1e-8)
    y, tr = torch.as_tensor(y), torch.as_tensor(~test)
    W = torch.zeros(X.shape[1], int(y.max()) + 1, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(W.shape[1], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([W, b], max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(X[tr] @ W + b, y[tr]) + l2 * W.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return float(((X[~tr] @ W + b).argmax(1) == y[~tr]).double().mean())


def tree_diagnosis(model_dir: str) -> dict:
    """See the module docstring (``--tree``)."""
    import torch
    from scipy.stats import spearmanr
    from scdist.store import open_study
    from scdist.vae import MrVI
    model = MrVI.load(model_dir)
    mod = model.module
    cells_n = int(str(Path(model_dir).name).split("_")[3])
    study = open_study(str(Path(model_dir).parent / f"mrvi_quality_{cells_n}_v3.zarr"))
    truth, obs = study.truth(), study.obs()
    donors = list(model.samples)
    leaf = truth["donor_group"].to_series().reindex(donors).to_numpy()
    top = truth["donor_top_group"].to_series().reindex(donors).to_numpy()
    tree = np.where(leaf[:, None] == leaf[None], 0, np.where(top[:, None] == top[None], 1, 2))
    off, iu = ~np.eye(len(donors), dtype=bool), np.triu_indices(len(donors), 1)
    cells = np.flatnonzero(obs["celltype"].astype(str).to_numpy() == truth.attrs["mrvi_celltype"])
    own_top = truth["donor_top_group"].to_series().reindex(obs["donor"].astype(str).to_numpy()[cells]).to_numpy()
    U, D, G, H = [], [], [], []
    with torch.no_grad():
        for b in model.iter_counterfactuals(study, cells=cells, batch_size=512):
            Z = b["z"].transpose(0, 1)                                       # B x S x Lz
            U.append(b["u"].numpy())
            D.append(torch.cdist(Z, Z).numpy())
            G.append((Z - mod.z_base(b["u"])[:, None]).numpy())             # g(u_n, s)
            # decoded log h of every counterfactual under the cell's own batch
            H.append(torch.log_softmax(mod.h_logits(Z, b["batch"][:, None].expand(Z.shape[:2])), -1).numpy())
        U, D, G, H = np.concatenate(U), np.concatenate(D), np.concatenate(G), np.concatenate(H)
        zb = mod.z_base(torch.as_tensor(U)).numpy()
    dd = torch.cdist(torch.as_tensor(U), torch.as_tensor(U))
    dd.fill_diagonal_(float("inf"))
    mix = (own_top[dd.topk(15, largest=False).indices.numpy()] == own_top[:, None]).mean(1)
    cut = np.quantile(mix, [1 / 3, 2 / 3])
    bins = {"mixed": mix <= cut[0], "middle": (mix > cut[0]) & (mix <= cut[1]), "separated": mix > cut[1]}
    res = {"model": model_dir, "cells": int(len(cells)), "u_agreement": float(mix.mean()),
           "probe_top_group_u": probe_accuracy(U, own_top), "tercile_cuts": cut.tolist(), "by_u_mixing": {}}
    for k, sel in bins.items():
        A = D[sel].mean(0)
        res["by_u_mixing"][k] = {"n": int(sel.sum()), "agreement": float(mix[sel].mean()),
                                 "tiers": [float(A[(tree == t) & off].mean()) for t in (0, 1, 2)],
                                 "spearman": float(spearmanr(A[iu], tree[iu]).correlation)}

    def components(V):
        """Top-group difference and mean leaf deviation of per-sample vectors V (... x S x L)."""
        tops = np.stack([V[..., top == t, :].mean(-2) for t in (0, 1)], -2)
        leaves = np.unique(leaf)
        lm = np.stack([V[..., leaf == l, :].mean(-2) for l in leaves], -2)
        lt = np.array([top[leaf == l][0] for l in leaves])
        return tops[..., 1, :] - tops[..., 0, :], np.linalg.norm(lm - tops[..., lt, :], axis=-1).mean(-1)

    g_top, g_leaf = components(G)
    h_top, h_leaf = components(H)
    res["top_in_logh_norm"] = float(np.linalg.norm(h_top, axis=-1).mean())
    res["leaf_in_logh_norm"] = float(h_leaf.mean())
    du = zb[own_top == 1].mean(0) - zb[own_top == 0].mean(0)
    res["top_in_u_norm"] = float(np.linalg.norm(du))
    res["top_in_g_norm"] = float(np.linalg.norm(g_top, axis=-1).mean())
    res["top_in_g_norm_of_cell_mean"] = float(np.linalg.norm(g_top.mean(0)))
    res["leaf_in_g_norm"] = float(g_leaf.mean())
    res["top_in_g_by_u_mixing"] = {k: float(np.linalg.norm(g_top[sel], axis=-1).mean()) for k, sel in bins.items()}
    eta = truth["eta"].sel(celltype=truth.attrs["mrvi_celltype"]).to_series().unstack().reindex(donors).to_numpy()
    t_top, t_leaf = components(eta)
    res["truth_eta_top_norm"], res["truth_eta_leaf_norm"] = float(np.linalg.norm(t_top)), float(t_leaf)
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("settings", nargs="*", default=["{}"])
    ap.add_argument("--lfc", type=float, default=1.0)
    ap.add_argument("--epochs", type=int, default=60)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tree", nargs="+", default=None, help="saved mrvi_quality model folders: tree diagnosis")
    a = ap.parse_args()
    import torch
    torch.set_num_threads(1)
    if a.tree:
        for d in a.tree:
            print(json.dumps(tree_diagnosis(d)), flush=True)
        return
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
        u_mean, u_draw = m.latent("u").values, m.latent("u", give_mean=False).values
        smp = adata.obs["sample"].cat.codes.to_numpy()
        for name, X in (("mean", u_mean), ("draw", u_draw)):
            res[f"probe_sample_{name}"] = [round(probe_accuracy(X[ct == t], smp[ct == t]), 3) for t in range(3)]
            res[f"probe_group_{name}"] = [round(probe_accuracy(X[ct == t], grp[ct == t]), 3) for t in range(3)]
        if hasattr(m.module, "sample_classifier"):
            with torch.no_grad():
                logits = m.module.sample_classifier(torch.as_tensor(u_mean))
            res["classifier_accuracy_mean"] = round(float((logits.argmax(1).numpy() == smp).mean()), 3)
            res["classifier_ce_mean"] = round(float(torch.nn.functional.cross_entropy(
                logits, torch.as_tensor(smp, dtype=torch.long))), 3)
        res["u_celltype_agreement"] = round(knn_group_agreement(m.latent("u").values, ct), 3)
        D = np.concatenate([torch.cdist(b["z"].permute(1, 0, 2), b["z"].permute(1, 0, 2)).numpy()
                            for b in m.iter_counterfactuals(batch_size=500)])
        res["z_distance_ratio"] = [round(float(D[ct == t].mean(0)[diff].mean() / D[ct == t].mean(0)[same].mean()), 2)
                                   for t in range(3)]
        res["val_nelbo"] = round(float(m.history.val_nelbo[-1]), 2)
        print(json.dumps(res), flush=True)


if __name__ == "__main__":
    main()
