"""MrVI analyses on scdist's semi-synthetic study: sample stratification, DE and DA quality.

    .venv/bin/python benchmarks/mrvi_quality.py [--cells 20000] [--epochs 60] [--variant attention]
                                                [--options '{"l2_scale": 1.0}']

Training checkpoints every epoch into the study store under a run named after the settings, so an
interrupted run continues where it stopped when started again with the same arguments.

Design (``scdist.simulate.simulate_study`` defaults with ``MRVI_STUDY_DESIGN``'s smaller donor
random effects, 40 donors in 2 batches, 4 cell types; the
store is named after ``MRVI_DESIGN_VERSION`` and any ``--design`` knobs, so a changed simulator
never reuses a stale store; benchmarks/mrvi_quality_scvi.py runs scvi-tools on the same study):
donors in 2 top groups x 4 subgroups (8 leaves); in cell type ``mrvi_celltype`` the leaves
shift a gene set hierarchically (top-group effect + leaf effect); cell type ``da_celltype``
is 3x more abundant in top group 1; the other types carry no group structure. MrVI is
trained with sample = donor, nuisance = batch. Reported (issue 5 targets in brackets):
- ARI of hierarchical clustering (average linkage; also Ward, complete, single) of the
  aggregated distances at 8 clusters vs the true leaves, DE type [1.0]; Spearman of distances vs the true tree distance
  (0 same leaf, 1 same top group, 2 otherwise) [>= 0.8]; ARI in the null types [<= 0.1];
  between / within-leaf distance ratio per type; all of these also for the distances between
  the decoded counterfactual log-expression (``space="expression"``, key ``distances_expression``);
- DE: AUC of |mean LFC| (top group 1 vs 0, DE type) for the MrVI genes vs the rest [1.0],
  Pearson r with the true LFC; the same with ``lfc_space="expression"``; with
  ``--de-variants`` the LFC estimators of :func:`de_variants`;
- DA: ROC AUC / average precision of the log density ratio (top 1 vs top 0) for cells of
  the DA type vs the rest [1.0], cluster-level composite-null test per type;
- kNN top-group agreement of u inside each cell type (0.5 = mixed: u sample-unaware);
- held-out terms (``held_out``): -ELBO as trained, reconstruction, KL of u, z-u penalty, and
  reconstruction + KL (comparable across ``l2_scale`` / ``n_latent``).
Results: benchmarks/out/mrvi_quality_<cells>_<run>.json.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.stats import rankdata, spearmanr

HERE = Path(__file__).resolve().parent
OUT = HERE / "out"


def auc(score, truth):
    score, truth = np.asarray(score, float), np.asarray(truth, bool)
    r = rankdata(score)
    n1, n0 = truth.sum(), (~truth).sum()
    return float((r[truth].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def average_precision(score, truth):
    order = np.argsort(-np.asarray(score, float), kind="stable")
    t = np.asarray(truth, bool)[order]
    prec = np.cumsum(t) / np.arange(1, t.size + 1)
    return float((prec * t).sum() / max(t.sum(), 1))


def ari(a, b):
    from scipy.special import comb
    ct = pd.crosstab(np.asarray(a), np.asarray(b)).to_numpy()
    s_ij = comb(ct, 2).sum()
    s_a, s_b = comb(ct.sum(1), 2).sum(), comb(ct.sum(0), 2).sum()
    exp = s_a * s_b / comb(ct.sum(), 2)
    return float((s_ij - exp) / (0.5 * (s_a + s_b) - exp))


def design_tag(design: dict) -> str:
    import hashlib
    return hashlib.sha1(json.dumps(design, sort_keys=True).encode()).hexdigest()[:8]


def build_study(cells: int, seed: int = 0, design: dict | None = None):
    """The benchmark's study (created once): 40 donors in 2 batches, 500 genes, 4 cell types,
    ``simulate_study`` defaults with the MrVI study's donor random-effect sizes
    (``MRVI_STUDY_DESIGN``), plus ``design`` knobs (which override both); the path names the
    simulator's design version and the extra knobs, so a changed simulator never reuses a stale
    store."""
    from scdist.simulate import simulate_study
    from scdist.simulate.population import MRVI_DESIGN_VERSION, MRVI_STUDY_DESIGN
    from scdist.store import open_study
    design = design or {}
    name = f"mrvi_quality_{cells}_v{MRVI_DESIGN_VERSION}" + (f"_{design_tag(design)}" if design else "")
    if seed:
        name += f"_s{seed}"
    url = str(OUT / f"{name}.zarr")
    if not Path(url, "zarr.json").exists():
        simulate_study(url, n_donors=40, n_cells=cells, n_genes=500, n_celltypes=4, seed=seed,
                       chunk_cells=4096, overwrite=True, **{**MRVI_STUDY_DESIGN, **design})
    return open_study(url)


def tree_of(donors, truth):
    """Leaf labels, top-group labels and the true tree distance (0 same leaf, 1 same top group,
    2 otherwise) of ``donors`` (in that order)."""
    leaf = truth["donor_group"].to_series().reindex(donors).to_numpy()
    top = truth["donor_top_group"].to_series().reindex(donors).to_numpy()
    tree = np.where(leaf[:, None] == leaf[None], 0, np.where(top[:, None] == top[None], 1, 2))
    return leaf, top, tree


def distance_figures(dist_by_type: dict, donors, truth, n_clusters: int = 8) -> dict:
    """Per cell type: ARI of average-linkage clustering at ``n_clusters`` vs the true leaves
    (``ari_8``; ``ari_8_<method>`` for Ward -- the linkage of the MrVI authors' benchmark code,
    YosefLab/mrvi-reproducibility ``compute_rf.py`` -- complete and single linkage), Spearman of
    distances vs the tree distance, between / within-leaf ratio, mean distance.
    ``dist_by_type``: cell type -> donors x donors aggregated distance matrix."""
    from scipy.cluster.hierarchy import fcluster, linkage
    leaf, _, tree = tree_of(donors, truth)
    iu = np.triu_indices(len(donors), 1)
    off = ~np.eye(len(donors), dtype=bool)
    out = {}
    for ct, D in dist_by_type.items():
        D = np.asarray(D, float)
        ok = ~np.isnan(D[iu])
        d = np.nan_to_num(D[iu], nan=np.nanmax(D))
        # z-scored distances can be negative; a constant shift leaves average linkage unchanged
        Z = linkage(d - min(0.0, d.min()), method="average")
        cl = fcluster(Z, n_clusters, criterion="maxclust")
        others = {f"ari_8_{m}": ari(fcluster(linkage(d - min(0.0, d.min()), method=m), n_clusters,
                                                  criterion="maxclust"), leaf) for m in ("ward", "complete", "single")}
        out[str(ct)] = {"ari_8": ari(cl, leaf), **others,
                        "tree_spearman": float(spearmanr(D[iu][ok], tree[iu][ok]).correlation),
                        "between_within_ratio": float(np.nanmean(D[tree > 0]) / np.nanmean(D[(tree == 0) & off])),
                        "mean_distance": float(np.nanmean(D[iu])),
                        # mean distance within a leaf / between siblings / between cousins
                        "tier_means": [float(np.nanmean(D[(tree == t) & off])) for t in (0, 1, 2)]}
    return out


def distance_variants(model, study, draws: int = 5, seed: int = 0) -> dict:
    import torch
    with torch.no_grad():
        return _distance_variants(model, study, draws, seed)


def _distance_variants(model, study, draws: int, seed: int) -> dict:
    """Aggregations of the counterfactual z distances per cell type, outside the paper's
    default (mean over the cells of D(n), D(n) from the posterior mean of u_n), for the screen:
    ``draws``: D(n) averaged over ``draws`` posterior draws u_n ~ q(u | x_n) before the mean;
    ``of_means``: the distance between the group means of z_n^s (mean over cells first);
    ``balanced``: each cell weighted 1 / (cells of its own sample in the type), so every sample
    contributes equally to the aggregate. Returns variant -> cell type -> S x S matrix."""
    import torch
    from scdist.vae.analysis.kernels import pairwise_distances
    ct = study.obs()["celltype"].astype(str).to_numpy()
    types = sorted(set(ct))
    code = {t: i for i, t in enumerate(types)}
    S, T = len(model.samples), len(types)
    gen = torch.Generator().manual_seed(seed)
    sum_draw = torch.zeros(T, S, S, dtype=torch.float64)
    sum_z = torch.zeros(T, S, model.module.n_latent, dtype=torch.float64)
    n = torch.zeros(T, dtype=torch.float64)
    own = study.obs()["donor"].astype(str).map({d: i for i, d in enumerate(model.samples)}).to_numpy()
    n_own = pd.crosstab(ct, own).reindex(index=types, columns=range(S), fill_value=0).to_numpy()   # T x S
    sum_bal = torch.zeros(T, S, S, dtype=torch.float64)
    for b in model.iter_counterfactuals(study, batch_size=512):
        idx = b["index"].numpy()
        c = torch.as_tensor([code[t] for t in ct[idx]])
        onehot = (c[None, :] == torch.arange(T)[:, None]).double()       # T x B
        n += onehot.sum(1)
        w = onehot / torch.from_numpy(n_own[:, own[idx]]).double().clamp_min(1)
        sum_bal += (w @ pairwise_distances(b["z"].transpose(0, 1)).reshape(-1, S * S).double()).view(T, S, S)
        sum_z += torch.einsum("tb,sbl->tsl", onehot, b["z"].double())
        acc = 0
        for _ in range(draws):
            u = b["u_mean"] + b["u_std"] * torch.randn(b["u_std"].shape, generator=gen)
            acc = acc + pairwise_distances(model.module.counterfactual_z(u).transpose(0, 1))
        sum_draw += (onehot @ (acc / draws).reshape(acc.shape[0], S * S).double()).view(T, S, S)
    zbar = sum_z / n[:, None, None]
    of_means = torch.cdist(zbar, zbar)
    n_s = torch.from_numpy((n_own > 0).sum(1)).double()
    return {"draws": {t: (sum_draw[i] / n[i]).numpy() for i, t in enumerate(types)},
            "balanced": {t: (sum_bal[i] / n_s[i]).numpy() for i, t in enumerate(types)},
            "of_means": {t: of_means[i].numpy() for i, t in enumerate(types)}}


def true_lfc(truth) -> np.ndarray:
    """The true top-group log2 fold change per gene in the DE type (mean true eta of top group 1's
    donors minus top group 0's, over ln 2); what the oracle DE AUC ranks."""
    eta = truth["eta"].sel(celltype=truth.attrs["mrvi_celltype"]).values
    top = truth["donor_top_group"].values
    return (eta[top == 1].mean(0) - eta[top == 0].mean(0)) / np.log(2)


def de_figures(lfc, truth) -> dict:
    """AUC of |LFC| for the MrVI genes vs the rest (``auc_centred``: of |LFC - median over genes|;
    h is a composition, so a change of total expression shifts every gene's LFC alike), Pearson
    r with the true LFC, and the slope of the LFC on the true LFC over the MrVI genes (1 =
    unshrunk), ``median``: the median LFC over genes."""
    genes, t = truth["mrvi_gene"].values, true_lfc(truth)
    lfc = np.asarray(lfc, float)
    med = float(np.median(lfc))
    return {"auc": auc(np.abs(lfc), genes), "auc_centred": auc(np.abs(lfc - med), genes), "median": med,
            "pearson_true": float(np.corrcoef(lfc, t)[0, 1]),
            "slope_true": float(np.polyfit(t[genes], lfc[genes], 1)[0])}


def de_variants(model, study, draws: int = 10, seed: int = 0) -> dict:
    """The top-group LFC of the DE type's cells by estimators the paper's wording allows or other
    software uses (all samples admissible: the filter removes none on this study), mean over
    the type's cells. Contrast states from the per-cell regression z_n^s ~ beta_n0 + beta_n1 x_s
    (x centred top-group indicator): ``fitted`` (scdist's default: the fitted states of the two
    groups, beta_n0 + x_lo beta_n1 vs beta_n0 + x_hi beta_n1), ``literal`` (the paper's words:
    z^0 = u_n, here A_uz u_n + gamma_uz, vs z^0 + beta_n1), ``intercept`` (scvi-tools' MRVI:
    beta_n0 vs beta_n0 + beta_n1), ``expression`` (the regression fitted to the decoded log h of
    every counterfactual instead: lfc_space="expression"). Each at the posterior mean of u_n
    (``mean``), averaged over ``draws`` posterior draws as LFCs (``draws_lfc``) or as decoded
    expression before the log (``draws_h``); under the cell's own batch (``own``) or the decoded
    expression averaged over all batches (``marginal``). Returns name -> :func:`de_figures`."""
    import torch
    from scdist.vae.analysis.counterfactual import counterfactual_states
    truth = study.truth()
    mod = model.module
    donors = list(model.samples)
    S, K = len(donors), mod.n_batch
    x = (truth["donor_top_group"].to_series().reindex(donors).to_numpy() == 1).astype(float)
    X = torch.tensor(np.stack([np.ones(S), x - x.mean()], 1), dtype=torch.float32)
    pinv = torch.linalg.pinv(X)                                            # 2 x S
    lo, hi = -x.mean(), 1 - x.mean()
    g1, g0 = torch.from_numpy(x == 1), torch.from_numpy(x == 0)
    cells = np.flatnonzero(study.obs()["celltype"].astype(str).to_numpy() == truth.attrs["mrvi_celltype"])
    gen = torch.Generator().manual_seed(seed)
    sums, n = {}, 0
    with torch.no_grad():
        for b in model.iter_batches(study, batch_size=256, cells=cells):
            qm, qs = mod.encode(b["x"], b["sample"])
            B = qm.shape[0]
            n += B
            us = [qm] + [qm + qs * torch.randn(qs.shape, generator=gen) for _ in range(draws)]
            logh = {}                                    # estimator -> (draw, batch) -> (log h0, log h1), B x G
            for d, u in enumerate(us):
                Z = counterfactual_states(mod, u, torch.arange(S))           # B x S x Lz
                coef = torch.einsum("ps,bsl->bpl", pinv, Z)
                b0, b1 = coef[:, 0], coef[:, 1]
                zb = mod.z_base(u)
                states = {"fitted": (b0 + lo * b1, b0 + hi * b1), "literal": (zb, zb + b1), "intercept": (b0, b0 + b1)}
                for k in range(K):
                    bk = torch.full((B,), k, dtype=torch.long)
                    for name, (z0, z1) in states.items():
                        logh.setdefault(name, {})[d, k] = (torch.log_softmax(mod.h_logits(z0, bk), -1),
                                                           torch.log_softmax(mod.h_logits(z1, bk), -1))
                    lh = torch.log_softmax(mod.h_logits(Z, bk[:, None].expand(B, S)), -1)   # B x S x G
                    logh.setdefault("expression", {})[d, k] = (lh[:, g0].mean(1), lh[:, g1].mean(1))
            own = b["batch"]
            for name, v in logh.items():
                # (draws + 1) x K x B x G, one per contrast end
                h0, h1 = (torch.stack([torch.stack([v[d, k][e] for k in range(K)]) for d in range(len(us))])
                          for e in (0, 1))
                for dr in ("mean", "draws_lfc", "draws_h"):
                    a0, a1 = (h0[:1], h1[:1]) if dr == "mean" else (h0[1:], h1[1:])
                    if dr == "draws_h":      # average expression over the draws, then the log
                        a0, a1 = (torch.logsumexp(a, 0, keepdim=True) - np.log(draws) for a in (a0, a1))
                    for bo in ("own", "marginal"):
                        if bo == "own":
                            c0, c1 = a0[:, own, torch.arange(B)], a1[:, own, torch.arange(B)]
                        else:
                            c0, c1 = (torch.logsumexp(a, 1) - np.log(K) for a in (a0, a1))
                        key = f"{name}|{dr}|{bo}"
                        sums[key] = sums.get(key, 0) + ((c1 - c0).mean(0) / np.log(2)).double().sum(0)
    return {k: de_figures((v / n).numpy(), truth) for k, v in sums.items()}



def held_out_terms(model, study) -> dict:
    """Held-out (validation split) per-cell terms: -ELBO as trained, reconstruction NLL, KL(q(u|x) || p(u))
    and the z-u penalty (-log N(z; A_uz u + gamma, l2_scale^2 I)); ``nelbo_no_penalty`` = recon + KL
    is comparable across ``l2_scale`` (the penalty's normaliser grows by L_z log l2_scale)."""
    import torch
    from scdist.vae.data import CellLoader
    source, cats = model._resolve(study)
    loader = CellLoader(source, cats, batch_size=1024, split="val", shuffle=False,
                        val_fraction=model.train_config["val_fraction"], split_seed=model.train_config["seed"])
    tot = {"nelbo": 0.0, "recon": 0.0, "kl": 0.0}
    n = 0
    was = model.module.training
    model.module.eval()
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        for batch in loader:
            out = model.module(batch, kl_weight=1.0)
            for k in tot:
                tot[k] += float(out[k])
            n += batch["x"].shape[0]
    model.module.train(was)
    r = {k: v / n for k, v in tot.items()}
    r["penalty"] = r["nelbo"] - r["recon"] - r["kl"]
    r["nelbo_no_penalty"] = r["recon"] + r["kl"]
    return r


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cells", type=int, default=20_000)
    ap.add_argument("--epochs", type=int, default=60)
    ap.add_argument("--variant", default="attention")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--train-seed", type=int, default=None, help="model seed (default: --seed, the study's)")
    ap.add_argument("--options", default="{}", help="JSON of further train_mrvi options")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--design", default="{}", help="JSON of simulate_study design knobs (default: its defaults)")
    ap.add_argument("--de-variants", action="store_true",
                    help="also score the DE LFC estimators of de_variants (key de_variants)")
    a = ap.parse_args()
    options = json.loads(a.options)
    import torch
    torch.set_num_threads(a.threads)
    from scdist.simulate.population import MRVI_DESIGN_VERSION
    from scdist.vae import MrVI, train_mrvi

    study = build_study(a.cells, a.seed, json.loads(a.design))
    truth = study.truth()
    import hashlib
    from scdist.vae.mrvi import MRVI_OPTIMIZER
    # the run is named after the options together with MrVI's optimiser defaults, so a changed
    # default never reloads a model trained under the old one
    named = {**{k: v for k, v in MRVI_OPTIMIZER.items() if k != "optimizer"}, **options}
    tag = hashlib.sha1(json.dumps(named, sort_keys=True).encode()).hexdigest()[:8]
    train_seed = a.seed if a.train_seed is None else a.train_seed
    run = f"q{MRVI_DESIGN_VERSION}_{a.epochs}_{a.variant}_{a.seed}_{tag}"
    if train_seed != a.seed:
        run += f"_t{train_seed}"
    if a.design != "{}":
        run += "_d" + design_tag(json.loads(a.design))
    mdir = OUT / f"mrvi_quality_model_{a.cells}_{run}"
    t0 = time.perf_counter()
    cached = (mdir / "config.json").exists()
    if cached:
        model = MrVI.load(str(mdir))
    else:
        model = train_mrvi(study, "donor", "batch", seed=train_seed, max_epochs=a.epochs, variant=a.variant,
                           run_name=run, **options)
        model.save(str(mdir))
    train_s = time.perf_counter() - t0
    prev = OUT / f"mrvi_quality_{a.cells}_{run}.json"
    if cached and prev.exists():
        # rescoring a cached model: keep the training time measured when it was trained
        train_s = json.loads(prev.read_text()).get("train_s", train_s)
    donors = list(model.samples)
    leaf = truth["donor_group"].to_series().reindex(donors).to_numpy()
    top = truth["donor_top_group"].to_series().reindex(donors).to_numpy()
    tree = np.where(leaf[:, None] == leaf[None], 0, np.where(top[:, None] == top[None], 1, 2))
    de_type, da_type = truth.attrs["mrvi_celltype"], truth.attrs["da_celltype"]
    res = {"load_avg_start": os.getloadavg(), "cells": a.cells, "study": study.url, "train_seed": train_seed, "epochs": a.epochs, "variant": a.variant, "options": named, "train_s": train_s,
           "epochs_run": len(model.history.epoch)}
    res["held_out"] = held_out_terms(model, study)

    t0 = time.perf_counter()
    agg = model.sample_distances(data=study, groupby="celltype")
    res["distances_s"] = time.perf_counter() - t0
    res["distances"] = distance_figures({str(ct): agg.sel(group=ct).values for ct in agg["group"].values},
                                        donors, truth)
    # the paper's optional Monte Carlo normalisation (z-scores against same-sample distances)
    t0 = time.perf_counter()
    agg = model.sample_distances(data=study, groupby="celltype", normalize=True)
    res["distances_normalized_s"] = time.perf_counter() - t0
    res["distances_normalized"] = distance_figures({str(ct): agg.sel(group=ct).values
                                                    for ct in agg["group"].values}, donors, truth)
    # how much the aggregate hides: leaf ARI of single cells' own D(n), 200 random DE-type cells
    from scipy.cluster.hierarchy import fcluster, linkage
    from scipy.spatial.distance import squareform
    from scdist.vae.analysis import local_sample_distances
    ctv_all = study.obs()["celltype"].astype(str).to_numpy()
    pick = np.sort(np.random.default_rng(0).choice(np.flatnonzero(ctv_all == de_type), 200, replace=False))
    Dn = local_sample_distances(model, pick, data=study).values
    res["per_cell_leaf_ari_median"] = {m: float(np.median([ari(fcluster(linkage(squareform(D, checks=False), m), 8,
                                                                        "maxclust"), leaf) for D in Dn]))
                                       for m in ("average", "ward")}
    # other aggregations (posterior draws; distance of group means), for the screen
    for k, v in distance_variants(model, study).items():
        res[f"distances_{k}"] = distance_figures(v, donors, truth)
    # the same distances between decoded counterfactual log-expression (space="expression")
    t0 = time.perf_counter()
    agg = model.sample_distances(data=study, groupby="celltype", space="expression")
    res["distances_expression_s"] = time.perf_counter() - t0
    res["distances_expression"] = distance_figures({str(ct): agg.sel(group=ct).values
                                                    for ct in agg["group"].values}, donors, truth)
    # does u keep the donor groups apart inside a cell type? (kNN top-group agreement, 0.5 = mixed)
    from mrvi_u_leak import knn_group_agreement
    u = model.latent("u", study).values
    obs = study.obs()
    ct_all = obs["celltype"].astype(str).to_numpy()
    top_all = truth["donor_top_group"].to_series().reindex(obs["donor"].astype(str).to_numpy()).to_numpy()
    rng = np.random.default_rng(0)
    res["u_top_group_agreement"] = {}
    for ct in sorted(set(ct_all)):
        idx = rng.choice(np.flatnonzero(ct_all == ct), min(3000, int((ct_all == ct).sum())), replace=False)
        res["u_top_group_agreement"][ct] = knn_group_agreement(u[idx], top_all[idx])
    res["de_type"], res["da_type"] = de_type, da_type

    t0 = time.perf_counter()
    cov = pd.DataFrame({"top_group": top.astype(str)}, index=donors)
    de = model.differential_expression(cov, data=study, groupby="celltype")
    res["de_s"] = time.perf_counter() - t0
    genes = truth["mrvi_gene"].values
    lfc = de["lfc_mean"].sel(group=de_type).values[0]
    res["de_auc_genes"] = auc(np.abs(lfc), genes)
    res["de_figures"] = de_figures(lfc, truth)
    res["de_min_n_admissible"] = int(de["n_admissible"].values.min())
    ctv = study.obs()["celltype"].astype(str).to_numpy()[de["cell_index"].values]
    res["de_auc_cells_beta_norm"] = auc(np.nan_to_num(de["beta_norm"].values[:, 0]), ctv == de_type)
    res["de_median_n_admissible"] = float(np.median(de["n_admissible"].values))
    de0 = model.differential_expression(cov, data=study, groupby="celltype", admissible=False)
    res["de_auc_genes_no_filter"] = auc(np.abs(de0["lfc_mean"].sel(group=de_type).values[0]), genes)
    # the linear model on the decoded log-expression of the counterfactuals (lfc_space="expression")
    t0 = time.perf_counter()
    dex = model.differential_expression(cov, data=study, groupby="celltype", lfc_space="expression")
    res["de_expression_s"] = time.perf_counter() - t0
    lfc_x = dex["lfc_mean"].sel(group=de_type).values[0]
    res["de_auc_genes_expression"] = auc(np.abs(lfc_x), genes)
    res["de_figures_expression"] = de_figures(lfc_x, truth)
    if a.de_variants:
        t0 = time.perf_counter()
        res["de_variants"] = de_variants(model, study)
        res["de_variants_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    groups = {"top1_vs_top0": ([d for d, t in zip(donors, top) if t == 1], [d for d, t in zip(donors, top) if t == 0])}
    da = model.differential_abundance(groups, data=study, groupby="celltype")
    res["da_s"] = time.perf_counter() - t0
    r = da["log_ratio"].values[:, 0]
    ctd = study.obs()["celltype"].astype(str).to_numpy()[da["cell_index"].values]
    res["da_auc"] = auc(r, ctd == da_type)
    res["da_average_precision"] = average_precision(r, ctd == da_type)
    res["da_cluster_test"] = {str(g): {"mean_difference": float(da["mean_difference"].sel(group=g)[0]),
                                       "pvalue": float(da["pvalue"].sel(group=g)[0])} for g in da["group"].values}
    res["load_avg_end"] = os.getloadavg()
    OUT.mkdir(exist_ok=True)
    (OUT / f"mrvi_quality_{a.cells}_{run}.json").write_text(json.dumps(res, indent=1))
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    import sys
    sys.path.insert(0, str(HERE))
    main()
