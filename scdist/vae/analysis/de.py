"""Cluster-free differential expression (MrVI Methods, "Cluster-free assessment of differences
in expression", Eq. 3).

Per cell n, the counterfactual states z_n^s of its admissible samples s are regressed on the
sample covariates: z_n^s = beta_n^T x_s + e (x_s: intercept + centred covariate columns, see
:mod:`.design`), by least squares over admissible samples only. Per covariate j:
``chi2`` = ||beta_nj||^2 / (sigma_n^2 [(X^T W_n X)^{-1}]_jj) (the chi-squared statistic of
beta_n^j, L_z d.f.; p-value from F(L_z, (S_n - P) L_z) since sigma_n^2 is estimated) and
``beta_norm`` = ||beta_nj||_2. LFC per gene: decode z_n^1 and z_n^0, the fitted states at the
covariate's two contrast values with the other covariates at their mean (binary: its two
levels; continuous: +-1/2 s.d.), under the cell's own nuisance batch:
LFC_ng = log2 h_ng(z_n^1) - log2 h_ng(z_n^0). Per-cell LFCs are cells x covariates x genes,
so they are kept for ``lfc_cells`` only; their mean per cell group always.

``lfc_space="expression"`` (outside the paper; default ``"z"``, the paper's): the same linear
model fitted to the decoded counterfactual log-expression log2 h_n(z_n^s) (cell's own batch)
instead of z_n^s, the LFC being its coefficient times the contrast width (binary: the mean
decoded log2 h of one level's samples minus the other's). With the nonlinear decoder,
decoding the fitted mean state is not the mean of the decoded states; on the semi-synthetic
study this ranks the true DE genes better (docs/readme/vae.md). The effect statistics
(chi2, beta_norm) stay in z either way.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd
import torch
import xarray as xr

from ...errors import InputError
from .admissibility import reference_thresholds
from .counterfactual import counterfactual_states
from .design import design_matrix, sample_table
from .kernels import ComponentScorer, covariate_statistics, group_sums, weighted_least_squares
from .posteriors import sample_components
from .stream import group_codes, map_chunks, resolve_cells

LN2 = float(np.log(2.0))
LFC_SPACES = ("z", "expression")
DECODED_ELEMENTS = 1 << 23  # cells x S x genes floats of decoded states held at once (lfc_space="expression")


def _expression_lfc(module, Z: torch.Tensor, batch: torch.Tensor, X: torch.Tensor, W: torch.Tensor,
                    XtWX_inv: torch.Tensor, width: torch.Tensor) -> torch.Tensor:
    """LFCs (B x (P-1) x G, log2) from the per-cell weighted least squares of the decoded
    log h_n(z_n^s) (natural log, batch ``batch``) on X over the admissible samples W (B x S)
    (``XtWX_inv``: the z regression's (X^T W_n X)^{-1}, the same design and weights), times the
    contrast width of each covariate column; decoded in blocks of cells."""
    B, S = Z.shape[0], Z.shape[1]
    Xf = X.float()
    inv = XtWX_inv[:, 1:].float()                                                # B x (P-1) x P
    step = max(1, DECODED_ELEMENTS // (S * module.n_genes))
    out = []
    for a in range(0, B, step):
        r = slice(a, a + step)
        logh = torch.log_softmax(module.h_logits(Z[r], batch[r, None].expand(-1, S)), dim=-1)  # b x S x G
        out.append(inv[r] @ torch.einsum("sp,bs,bsg->bpg", Xf, W[r].float(), logh))
    return torch.cat(out) * (width[None, :, None] / LN2)


@torch.no_grad()
def _de_kernel(model, batches, *, chunk, local, X, low, high, n_groups, filter=None, lfc_space="z"):
    module = model.module
    # admissibility scored here, on the same encoded minibatches (no second pass over the counts)
    scorer = None if filter is None else (ComponentScorer(*filter["components"]), filter["threshold"])
    sidx = torch.arange(X.shape[0])
    Xt = torch.from_numpy(X)
    P = X.shape[1]
    lo = torch.from_numpy(low[1:]).float()[None, :, None]
    hi = torch.from_numpy(high[1:]).float()[None, :, None]
    width = torch.from_numpy(high[1:] - low[1:]).float()
    G = len(model.gene_names)
    lfc_sum = torch.zeros((n_groups, P - 1, G), dtype=torch.float64)
    lfc_n = torch.zeros((n_groups, P - 1), dtype=torch.float64)
    rows = {k: [] for k in ("index", "chi2", "pvalue", "beta_norm", "beta", "n_adm")}
    kept_idx, kept_lfc = [], []
    for b in batches:
        r = b["index"].numpy() - chunk[1]
        if scorer is None:
            W = torch.from_numpy(local["admissible"][r]).double()
        else:
            W = (scorer[0](b["u_mean"], b["index"], "max") > scorer[1]).double()
        Z = counterfactual_states(module, b["u_mean"], sidx)
        fit = weighted_least_squares(Z, Xt, W)
        st = covariate_statistics(fit)
        beta = fit["beta"].float()                                   # B x P x Lz
        if lfc_space == "expression":
            lfc = _expression_lfc(module, Z, b["batch"], Xt, W, fit["inv"], width)
        else:
            z0 = beta[:, :1] + lo * beta[:, 1:]                      # B x (P-1) x Lz
            z1 = beta[:, :1] + hi * beta[:, 1:]
            bb = b["batch"][:, None].expand(-1, P - 1)
            lfc = (torch.log_softmax(module.h_logits(z1, bb), -1)
                   - torch.log_softmax(module.h_logits(z0, bb), -1)) / LN2
        ok = torch.from_numpy(np.isfinite(st["chi2"][:, 1:]))        # identified covariates
        lfc = torch.where(ok[:, :, None], lfc, torch.zeros(()))
        codes = torch.from_numpy(local["group"][r])
        lfc_sum += group_sums(lfc.double(), codes, n_groups)
        lfc_n += group_sums(ok.double(), codes, n_groups)
        want = local["lfc_cell"][r]
        if want.any():
            kept_idx.append(b["index"].numpy()[want])
            kept_lfc.append(torch.where(ok[:, :, None], lfc, torch.nan)[torch.from_numpy(want)].numpy())
        rows["index"].append(b["index"].numpy())
        rows["chi2"].append(st["chi2"][:, 1:])
        rows["pvalue"].append(st["pvalue"][:, 1:])
        rows["beta_norm"].append(st["beta_norm"][:, 1:])
        rows["beta"].append(beta[:, 1:].numpy())
        rows["n_adm"].append(W.sum(1).numpy().astype(np.int64))
    out = {k: np.concatenate(v) for k, v in rows.items()}
    out["lfc_sum"], out["lfc_n"] = lfc_sum.numpy(), lfc_n.numpy()
    out["lfc_index"] = np.concatenate(kept_idx) if kept_idx else np.zeros(0, np.int64)
    out["lfc"] = np.concatenate(kept_lfc) if kept_lfc else np.zeros((0, P - 1, G), np.float32)
    return out


def differential_expression(model, covariates: Sequence[str] | str, data=None, *, groupby=None, cells=None,
                            admissible=True, lfc_cells=None, quantile: float = 0.05, max_cells: int = 1000,
                            seed: int = 0, client=None, batch_size: int = 512, progress=None,
                            lfc_space: str = "z") -> xr.Dataset:
    """Per-cell multivariate DE of sample covariates (obs columns constant within samples).

    ``covariates``: sample-level obs columns c^s (categorical: one-hot after the first level;
    numeric: standardised, or 0/1 when binary), or a DataFrame of them indexed by sample label. ``admissible``: True = filter out-of-distribution
    cell-sample pairs first (:func:`admissibility` with ``quantile``, ``max_cells``, ``seed``);
    False = use every sample; or a Dataset returned by :func:`admissibility` (reused).
    ``groupby``: obs column / per-cell labels for the group-mean LFCs (one group "all" when None).
    ``lfc_cells``: positions / mask of cells whose per-gene LFCs are returned in full.
    ``lfc_space``: "z" (the paper's: decode the fitted states z_n^1, z_n^0) or "expression"
    (the linear model on the decoded counterfactual log-expression; module docstring).

    Returns a Dataset: ``chi2``, ``pvalue``, ``beta_norm`` (cell, covariate), ``beta`` (cell,
    covariate, latent_z), ``n_admissible`` (cell), ``lfc_mean`` (group, covariate, gene: mean LFC
    over the group's cells where the covariate is identified), ``n_lfc`` (group, covariate) and,
    with ``lfc_cells``, ``lfc`` (lfc_cell, covariate, gene).
    """
    if lfc_space not in LFC_SPACES:
        raise InputError(f"lfc_space={lfc_space!r}", field="lfc_space", fix=f"use one of {LFC_SPACES}")
    if isinstance(covariates, pd.DataFrame):
        missing = [s for s in model.samples if s not in covariates.index.astype(str)]
        if missing:
            raise InputError(f"covariate table lacks samples {missing[:5]}", field="covariates",
                             fix="index the table by all of model.samples")
        table = covariates.set_axis(covariates.index.astype(str)).loc[list(model.samples)]
        covariates = list(table.columns)
    else:
        if isinstance(covariates, str):
            covariates = [covariates]
        if not covariates:
            raise InputError("no covariates given", field="covariates",
                             fix="name at least one sample-level obs column")
        table = sample_table(model, data, covariates)
    design = design_matrix(table, covariates)
    source, _ = model._resolve(data)
    n, S = source.n_cells, len(model.samples)
    keep = resolve_cells(n, cells)
    filt, adm_full = None, None
    if admissible is True:  # tau_s here, the per-cell scores inside the DE pass
        if not 0 < quantile < 1:
            raise InputError(f"quantile={quantile}", field="quantile", fix="use a quantile in (0, 1), default 0.05")
        comps = sample_components(model, data, max_cells=max_cells, seed=seed, client=client)
        tau = reference_thresholds(comps, quantile)
        filt = {"components": (comps.mean, comps.std, comps.index, comps.valid),
                "threshold": torch.from_numpy(np.where(np.isnan(tau), np.inf, tau))[None, :]}
    elif admissible is False or admissible is None:
        adm_full = np.ones((n, S), bool)
    elif isinstance(admissible, xr.Dataset) and "admissible" in admissible:
        if list(admissible["sample"].values) != list(model.samples):
            raise InputError("admissibility was computed for other samples", field="admissible",
                             fix="pass the Dataset returned by model.admissibility() for this model")
        adm_full = np.ones((n, S), bool)
        adm_full[admissible["cell_index"].values] = admissible["admissible"].values
    else:
        raise InputError(f"admissible={type(admissible).__name__}", field="admissible",
                         fix="pass True, False or the Dataset returned by admissibility()")
    codes, groups = group_codes(model, data, groupby, n)
    lfc_keep = resolve_cells(n, lfc_cells)
    lfc_mask = np.zeros(n, bool)
    if lfc_keep is not None:
        lfc_mask[lfc_keep] = True
    Pm = design.X.shape[1] - 1
    G = len(model.gene_names)
    if lfc_mask.sum() * Pm * G > 200_000_000:
        raise InputError(f"{int(lfc_mask.sum())} lfc_cells x {Pm} covariates x {G} genes is too large",
                         field="lfc_cells", fix="pass fewer lfc_cells; group means are always returned")
    parts = [p for _, p in map_chunks(model, data, _de_kernel, cells=keep, client=client, batch_size=batch_size,
                                      progress=progress,
                                      cell_params={"group": codes, "lfc_cell": lfc_mask,
                                                   **({} if adm_full is None else {"admissible": adm_full})},
                                      X=design.X, low=design.lfc_low, high=design.lfc_high, n_groups=len(groups),
                                      filter=filt, lfc_space=lfc_space)]
    cat = {k: np.concatenate([p[k] for p in parts]) for k in ("index", "chi2", "pvalue", "beta_norm", "beta", "n_adm",
                                                              "lfc_index", "lfc")}
    lfc_sum = sum(p["lfc_sum"] for p in parts)
    lfc_n = sum(p["lfc_n"] for p in parts)
    order = np.argsort(cat["index"], kind="stable")
    idx = cat["index"][order]
    cov_names = np.asarray(design.names[1:], dtype=object)
    names = model._cells(data)
    with np.errstate(invalid="ignore", divide="ignore"):
        lfc_mean = lfc_sum / lfc_n[:, :, None]
    ds = xr.Dataset(
        {"chi2": (("cell", "covariate"), cat["chi2"][order]),
         "pvalue": (("cell", "covariate"), cat["pvalue"][order]),
         "beta_norm": (("cell", "covariate"), cat["beta_norm"][order]),
         "beta": (("cell", "covariate", "latent_z"), cat["beta"][order]),
         "n_admissible": ("cell", cat["n_adm"][order]),
         "lfc_mean": (("group", "covariate", "gene"), lfc_mean.astype(np.float32)),
         "n_lfc": (("group", "covariate"), lfc_n.astype(np.int64))},
        coords={"cell": names[idx], "cell_index": ("cell", idx), "covariate": cov_names,
                "gene": np.asarray(model.gene_names, dtype=object), "group": np.asarray(groups, dtype=object),
                "latent_z": np.arange(cat["beta"].shape[-1])},
        attrs={"covariates": list(covariates), "design_kinds": design.kind[1:], "lfc_base": 2, "lfc_space": lfc_space,
               "groupby": groupby if isinstance(groupby, str) else ""})
    if lfc_keep is not None:
        o = np.argsort(cat["lfc_index"], kind="stable")
        li = cat["lfc_index"][o]
        ds["lfc"] = (("lfc_cell", "covariate", "gene"), cat["lfc"][o].astype(np.float32))
        ds = ds.assign_coords(lfc_cell=names[li], lfc_cell_index=("lfc_cell", li))
    return ds
