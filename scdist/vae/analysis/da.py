"""Cluster-free differential abundance (MrVI Methods, "Assessing cluster-free differences in
composition").

q_s(u) = (1/n_s) sum_{n: s_n = s} q(u | x_n) the aggregated posterior of sample s,
approximated by at most ``max_cells`` cells per sample (leaving each cell's own posterior out
when it is one of them); q_A(u) = (1/|A|) sum_{s in A} q_s(u) for a set A of samples;
r_AB(u) = log q_A(u) - log q_B(u) the log density ratio (Eq. 4), evaluated at every cell's
posterior mean u_n. Cost: cells x samples x max_cells, i.e. linear in cells.

Cluster level: for a cell group A (cluster or label), a Welch t-test of mean r over A's
cells versus the other cells against the composite null |difference| <= delta (0.1).
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import pandas as pd
import xarray as xr
from scipy.special import logsumexp

from ...errors import InputError
from .admissibility import per_cell_scores
from .design import sample_table
from .kernels import composite_null_ttest
from .posteriors import sample_components
from .stream import group_codes, resolve_cells


def _contrasts(model, data, sample_groups) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """name -> (sample positions of A, of B)."""
    labels = np.asarray(model.samples, dtype=object)
    pos = {str(s): i for i, s in enumerate(labels)}
    if isinstance(sample_groups, str):
        v = sample_table(model, data, [sample_groups])[sample_groups].astype(str).to_numpy()
        levels = sorted(set(v))
        if len(levels) < 2:
            raise InputError(f"{sample_groups!r} has one value over the samples", field="sample_groups",
                             fix="use a sample covariate with at least two values")
        if len(levels) == 2:  # one contrast: the second level against the first
            levels = levels[1:]
        return {f"{sample_groups}={lev}": (np.flatnonzero(v == lev), np.flatnonzero(v != lev)) for lev in levels}
    if isinstance(sample_groups, Mapping):
        out = {}
        for name, (A, B) in sample_groups.items():
            unknown = [s for s in list(A) + list(B) if str(s) not in pos]
            if unknown:
                raise InputError(f"contrast {name!r} names unknown samples {unknown[:5]}", field="sample_groups",
                                 fix="use labels from model.samples")
            a = np.array([pos[str(s)] for s in A], dtype=np.int64)
            b = np.array([pos[str(s)] for s in B], dtype=np.int64)
            if not a.size or not b.size or np.intersect1d(a, b).size:
                raise InputError(f"contrast {name!r} needs two non-empty disjoint sample sets", field="sample_groups",
                                 fix="give (A, B) with no sample in both")
            out[str(name)] = (a, b)
        return out
    raise InputError(f"sample_groups must be an obs column or a mapping, got {type(sample_groups).__name__}",
                     field="sample_groups", fix="pass e.g. 'disease' or {'case_vs_ctrl': (case_samples, ctrl_samples)}")


def log_density_ratio(log_probs: np.ndarray, A: np.ndarray, B: np.ndarray) -> np.ndarray:
    """r_AB per cell from per-sample log densities (cells x S): log mean_A q_s - log mean_B q_s."""
    la = logsumexp(log_probs[:, A], axis=1) - np.log(len(A))
    lb = logsumexp(log_probs[:, B], axis=1) - np.log(len(B))
    return la - lb


def differential_abundance(model, sample_groups, data=None, *, groupby=None, cells=None, max_cells: int = 500,
                           delta: float = 0.1, seed: int = 0, client=None, batch_size: int = 1024,
                           progress=None) -> xr.Dataset:
    """Log density ratios of aggregated posteriors per cell, and cluster-level tests.

    ``sample_groups``: a sample-level obs column (each value against the rest; with two values,
    the second against the first) or a mapping name -> (samples of A, samples of B).
    ``groupby``: obs column or per-cell labels defining the cell groups to test (optional).
    ``max_cells``: cells per sample representing q_s. ``delta``: composite-null margin.

    Returns a Dataset: ``log_probs`` log q_s(u_n) (cell, sample), ``log_ratio`` r_AB(u_n)
    (cell, contrast) and with ``groupby`` the tests ``mean_difference`` (mean r in the group minus
    mean r elsewhere), ``std_error``, ``t_statistic`` ((|difference| - delta) / se), ``dof`` (Welch),
    ``pvalue`` (group, contrast) and ``n_cells`` (group).
    """
    if delta < 0:
        raise InputError(f"delta={delta}", field="delta", fix="use a non-negative margin (default 0.1)")
    contrasts = _contrasts(model, data, sample_groups)
    comps = sample_components(model, data, max_cells=max_cells, seed=seed, client=client)
    source, _ = model._resolve(data)
    keep = resolve_cells(source.n_cells, cells)
    idx, lp = per_cell_scores(model, data, comps, "mean", cells=keep, client=client, batch_size=batch_size,
                              progress=progress)
    names = list(contrasts)
    ratio = np.stack([log_density_ratio(lp, *contrasts[c]) for c in names], axis=1)
    ds = xr.Dataset({"log_probs": (("cell", "sample"), lp.astype(np.float32)),
                     "log_ratio": (("cell", "contrast"), ratio)},
                    coords={"cell": model._cells(data)[idx], "cell_index": ("cell", idx),
                            "sample": np.asarray(model.samples, dtype=object),
                            "contrast": np.asarray(names, dtype=object)},
                    attrs={"max_cells": int(max_cells), "delta": float(delta), "seed": int(seed)})
    if groupby is not None:
        codes, groups = group_codes(model, data, groupby, source.n_cells)
        codes = codes[idx]
        res = {k: np.full((len(groups), len(names)), np.nan) for k in ("diff", "se", "t", "df", "pvalue")}
        for g in range(len(groups)):  # one test per (group, contrast): a few, not per cell
            inside = codes == g
            for j in range(len(names)):
                r = composite_null_ttest(ratio[inside, j], ratio[~inside, j], delta)
                for k in res:
                    res[k][g, j] = r[k]
        ds = ds.assign_coords(group=np.asarray(groups, dtype=object))
        for k, v in res.items():  # "diff" / "t" would shadow Dataset methods
            ds[{"diff": "mean_difference", "t": "t_statistic", "se": "std_error", "df": "dof"}.get(k, k)] = (
                ("group", "contrast"), v)
        ds["n_cells"] = ("group", np.bincount(codes, minlength=len(groups)))
    return ds
