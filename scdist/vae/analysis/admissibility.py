"""Out-of-distribution filter of cell-sample pairs (MrVI Methods, "Out-of-distribution checks").

A_s(u_n) = max_{m in s} log q(u_n | x_m): how well sample s's cells cover the state u_n
(u_n the posterior mean; m over at most ``max_cells`` cells of s). The pair (n, s) is
admissible when A_s(u_n) > tau_s, with tau_s the ``quantile`` (5%) quantile of the
reference scores R_s(m) = max_{m' in s, m' != m} log q(u_m | x_m') of s's own cells (the
cell itself excluded). DE then uses only each cell's admissible samples.
"""
from __future__ import annotations

import numpy as np
import torch
import xarray as xr

from ...errors import InputError
from .kernels import ComponentScorer, gaussian_log_density
from .posteriors import SampleComponents, sample_components
from .stream import map_chunks, resolve_cells


def reference_thresholds(comps: SampleComponents, quantile: float) -> np.ndarray:
    """tau_s per sample from the within-sample leave-one-out scores of its component cells."""
    tau = np.full(len(comps.samples), np.nan)
    for k in range(len(comps.samples)):  # one small M x M block per sample
        v = comps.valid[k]
        m, s = comps.mean[k][v], comps.std[k][v]
        if m.shape[0] < 2:
            continue
        ld = gaussian_log_density(m, m, s)
        ld.fill_diagonal_(-np.inf)
        tau[k] = np.quantile(ld.amax(1).numpy(), quantile)
    return tau


@torch.no_grad()
def _score_kernel(model, batches, *, chunk, local, comp_mean, comp_std, comp_index, comp_valid, reduce):
    scorer = ComponentScorer(comp_mean, comp_std, comp_index, comp_valid)
    idx, out = [], []
    for b in batches:
        out.append(scorer(b["u_mean"], b["index"], reduce).numpy())
        idx.append(b["index"].numpy())
    return np.concatenate(idx), np.concatenate(out)


def per_cell_scores(model, data, comps: SampleComponents, reduce: str, *, cells=None, client=None,
                    batch_size: int = 1024, progress=None) -> tuple[np.ndarray, np.ndarray]:
    """(global cell indices, B x S log scores) for the selected cells, in index order."""
    parts = [p for _, p in map_chunks(model, data, _score_kernel, cells=cells, client=client, batch_size=batch_size,
                                      progress=progress, reduce=reduce, **comps.as_params())]
    idx = np.concatenate([p[0] for p in parts])
    sc = np.concatenate([p[1] for p in parts])
    order = np.argsort(idx, kind="stable")
    return idx[order], sc[order]


def admissibility(model, data=None, *, quantile: float = 0.05, max_cells: int = 1000, cells=None, seed: int = 0,
                  client=None, batch_size: int = 1024, progress=None) -> xr.Dataset:
    """Admissible cell-sample pairs. Returns a Dataset with ``log_score`` A_s(u_n) (cell, sample),
    ``threshold`` tau_s (sample), ``admissible`` (cell, sample) and ``n_admissible`` (cell)."""
    if not 0 < quantile < 1:
        raise InputError(f"quantile={quantile}", field="quantile", fix="use a quantile in (0, 1), default 0.05")
    comps = sample_components(model, data, max_cells=max_cells, seed=seed, client=client)
    tau = reference_thresholds(comps, quantile)
    source, _ = model._resolve(data)
    keep = resolve_cells(source.n_cells, cells)
    idx, score = per_cell_scores(model, data, comps, "max", cells=keep, client=client, batch_size=batch_size,
                                 progress=progress)
    adm = score > np.where(np.isnan(tau), np.inf, tau)[None, :]
    labels = np.asarray(model.samples, dtype=object)
    return xr.Dataset(
        {"log_score": (("cell", "sample"), score.astype(np.float32)),
         "threshold": ("sample", tau),
         "admissible": (("cell", "sample"), adm),
         "n_admissible": ("cell", adm.sum(1))},
        coords={"cell": model._cells(data)[idx], "sample": labels, "cell_index": ("cell", idx)},
        attrs={"quantile": float(quantile), "max_cells": int(max_cells), "seed": int(seed)})
