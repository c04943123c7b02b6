"""What DE gene AUC can reach on the MrVI quality study (issue 5 target 1.0), and why not 1.0.

    .venv/bin/python benchmarks/mrvi_de_ceiling.py [--cells 20000] [MODEL_DIR ...]

The benchmark's DE score (benchmarks/mrvi_quality.py, ``de_auc_genes``) is the AUC of |LFC|
(top group 1 vs 0, DE cell type) for the MrVI gene set against the other genes. This script
scores the same ranking on quantities that need no model:

- ``eta``: the true per-donor log means of the DE type (the benchmark's oracle): mean over
  top-group-1 donors minus top-group-0 donors. It contains the donors' own random effects
  (alpha_i + Gamma_i,c), their covariates and their batch, as the counts do;
- ``eta_no_batch``: the same with the batch effect removed (MrVI treats batch as nuisance);
- ``group_effect``: only the designed effect (top-group effect +-1 plus the mean of the 4 leaf
  effects of each top group; 0 for every other gene): the population contrast without donors;
- ``pseudobulk``: from the counts alone -- per donor log mean of size-normalised counts of the
  DE type's cells, averaged per top group (what the data say, sampling noise included);
- ``pooled``: log ratio of the two top groups' mean normalised counts over all their cells;
- ``pseudobulk_batch``: the same after regressing each gene's per-donor values on the batch
  (least squares with top group and batch as covariates: the top-group coefficient).

For the ``eta`` oracle it lists the MrVI genes ranked at or below the largest null gene, with
their designed components, and the null genes above them with the source of their contrast.
With model folders (saved by mrvi_quality.py), it computes their default DE LFCs and reports
which MrVI genes they misrank, and how many of those the oracle misranks too.
Results: benchmarks/out/mrvi_de_ceiling_<cells>.json.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from mrvi_quality import OUT, auc, build_study  # noqa: E402


def donor_pseudobulk(study, celltype: str, donors) -> np.ndarray:
    """donor x gene log mean of size-normalised counts (counts / cell total * 1e4) of ``celltype``."""
    obs = study.obs()
    ct = obs["celltype"].astype(str).to_numpy()
    dn = obs["donor"].astype(str).to_numpy()
    index = {d: i for i, d in enumerate(donors)}
    sums = np.zeros((len(donors), study.n_genes))
    n = np.zeros(len(donors))
    start = 0
    for a, b in study.cell_chunks:
        X = study.read_counts(a, b)
        sel = np.flatnonzero(ct[a:b] == celltype)
        if sel.size:
            Xs = X[sel].toarray().astype(float)
            Xs = Xs / np.maximum(Xs.sum(1, keepdims=True), 1) * 1e4
            rows = np.array([index[d] for d in dn[a:b][sel]])
            np.add.at(sums, rows, Xs)
            np.add.at(n, rows, 1)
        start = b
    return np.log(sums / n[:, None] + 1e-3), sums, n


def top_contrast(values: np.ndarray, top: np.ndarray) -> np.ndarray:
    return values[top == 1].mean(0) - values[top == 0].mean(0)


def batch_adjusted_contrast(values: np.ndarray, top: np.ndarray, batch: np.ndarray) -> np.ndarray:
    """Top-group coefficient of a per-gene least-squares fit values ~ 1 + top + batch (all genes at once)."""
    levels = sorted(set(batch))
    X = np.column_stack([np.ones(len(top)), top == 1] + [batch == b for b in levels[1:]]).astype(float)
    beta, *_ = np.linalg.lstsq(X, values, rcond=None)
    return beta[1]


def misranked(score: np.ndarray, genes: np.ndarray) -> np.ndarray:
    """Indices of MrVI genes whose |score| is not above the largest null gene's."""
    top_null = np.abs(score[~genes]).max()
    return np.flatnonzero(genes & (np.abs(score) <= top_null))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cells", type=int, default=20_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("models", nargs="*", help="model folders saved by mrvi_quality.py")
    a = ap.parse_args()
    import torch
    torch.set_num_threads(1)
    study = build_study(a.cells, a.seed)
    truth = study.truth()
    de_type = str(truth.attrs["mrvi_celltype"])
    donors = list(truth["donor"].values)
    top = truth["donor_top_group"].values
    leaf = truth["donor_group"].values
    batch = np.array([str(b) for b in truth["donor_batch"].values], dtype=object)
    genes = truth["mrvi_gene"].values
    c = [str(x) for x in truth["celltype"].values].index(de_type)
    eta = truth["eta"].values[:, c]
    b_idx = np.array([int(b.replace("batch", "")) for b in batch])
    batch_eff = truth["batch_effect"].values[b_idx] if "batch_effect" in truth else None
    ge = truth["group_effect"].values  # leaf x gene
    S = ge.shape[0] // 2
    designed = ge[S:].mean(0) - ge[:S].mean(0)
    pb, pb_sums, pb_n = donor_pseudobulk(study, de_type, donors)
    # pooled over each top group's cells (no per-donor averaging of logs: less noise at low counts)
    pooled = np.log(pb_sums[top == 1].sum(0) / pb_n[top == 1].sum() + 1e-3) - np.log(
        pb_sums[top == 0].sum(0) / pb_n[top == 0].sum() + 1e-3)
    scores = {"eta": top_contrast(eta, top), "group_effect": designed,
              "pseudobulk": top_contrast(pb, top), "pooled": pooled,
              "pseudobulk_batch": batch_adjusted_contrast(pb, top, batch)}
    if batch_eff is not None:
        scores["eta_no_batch"] = top_contrast(eta - batch_eff, top)
    scores["eta_batch_adjusted"] = batch_adjusted_contrast(eta, top, batch)
    res = {"cells": a.cells, "de_type": de_type, "n_mrvi_genes": int(genes.sum()), "n_genes": int(genes.size),
           "batch_by_top_group": {f"top{t}": {b: int(((top == t) & (batch == b)).sum()) for b in sorted(set(batch))}
                                  for t in (0, 1)},
           "auc": {k: auc(np.abs(v), genes) for k, v in scores.items()},
           # h is a composition: a change of the type's total shifts every gene's contrast alike
           "auc_centred": {k: auc(np.abs(v - np.median(v)), genes) for k, v in scores.items()},
           "median": {k: float(np.median(v)) for k, v in scores.items()}}
    # the oracle's misranked MrVI genes and the null genes above them
    s = scores["eta"]
    bad = misranked(s, genes)
    null_top = np.flatnonzero(~genes)[np.argsort(-np.abs(s[~genes]))[:5]]
    donor_noise = top_contrast(truth["alpha"].values + truth["gamma"].values[:, c], top)
    batch_c = top_contrast(batch_eff, top) if batch_eff is not None else np.zeros_like(s)
    # eta contrast = designed + donor random effects + batch + covariates (sex, age): the rest
    res["oracle_misranked"] = [{"gene": int(g), "eta_contrast": float(s[g]), "designed": float(designed[g]),
                                "donor_effects": float(donor_noise[g]), "batch": float(batch_c[g]),
                                "covariates": float(s[g] - designed[g] - donor_noise[g] - batch_c[g])}
                               for g in bad]
    res["oracle_top_null_genes"] = [{"gene": int(g), "eta_contrast": float(s[g]),
                                     "donor_effects": float(donor_noise[g]),
                                     "batch": float(batch_c[g])} for g in null_top]
    res["designed_abs_quantiles_mrvi_genes"] = np.quantile(np.abs(designed[genes]), [0, 0.05, 0.1, 0.5]).tolist()
    res["donor_effects_abs_max_null"] = float(np.abs(donor_noise[~genes]).max())
    res["donor_effects_sd"] = float(donor_noise.std())
    # models: their default DE LFCs, misranked genes against the oracle's
    if a.models:
        import pandas as pd
        from scdist.vae import MrVI
        res["models"] = {}
        for m in a.models:
            model = MrVI.load(m)
            mt = truth["donor_top_group"].to_series().reindex(list(model.samples)).to_numpy()
            cov = pd.DataFrame({"top_group": mt.astype(str)}, index=list(model.samples))
            de = model.differential_expression(cov, data=study, groupby="celltype")
            lfc = de["lfc_mean"].sel(group=de_type).values[0] * np.log(2)  # log2 -> natural log
            mb = misranked(lfc, genes)
            res["models"][Path(m).name] = {
                "auc": auc(np.abs(lfc), genes), "n_misranked": int(mb.size),
                "misranked_also_by_oracle": int(np.isin(mb, bad).sum()),
                "misranked_designed_abs_median": float(np.median(np.abs(designed[mb]))) if mb.size else None,
                "largest_null_abs_lfc": float(np.abs(lfc[~genes]).max()),
                "auc_vs_pseudobulk_rank_corr": float(np.corrcoef(np.abs(lfc), np.abs(scores["pseudobulk_batch"]))[0, 1])}
    OUT.mkdir(exist_ok=True)
    (OUT / f"mrvi_de_ceiling_{a.cells}.json").write_text(json.dumps(res, indent=1))
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
