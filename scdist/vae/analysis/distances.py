"""Counterfactual sample distances (MrVI, "Estimating sample distances at the cellular level";
preprint Sections 3.1-3.2) and hierarchical clustering of samples.

Notation -> arguments: z_n^{s} counterfactual state of cell n for sample s (Eq. 2), from the
posterior mean of u_n; D(n)_{s,s'} = ||z_n^s - z_n^{s'}||_2 the local sample distance
matrix; with ``normalize=True`` the Monte Carlo z-scores (D(n) - mu_n) / sigma_n, where
mu_n, sigma_n are the mean and s.d. of ||z_n^{s_n}(u^1) - z_n^{s_n}(u^2)||, u^1, u^2 ~ q(u | x_n)
(``mc_samples`` pairs); D(C) = mean of D(n) over the cells n of a group C (``groupby``),
samples with fewer than k = ``min_cells`` cells in C are left out (NaN), as in the preprint.

``space="expression"`` (outside the paper; default ``"z"``, the paper's): the same distances
between the decoded counterfactual expression log h_n^{s} (natural log, the cell's own
nuisance batch) instead of z_n^{s}. The Euclidean metric of z is not identified by the model
(z's scale per direction and the decoder's attention can trade it freely), and on the
semi-synthetic study z distances put siblings as far apart as cousins while log h distances
keep the tree (docs/readme/vae.md).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd
import torch
import xarray as xr

from ...errors import InputError
from .counterfactual import CounterfactualMap, counterfactual_map
from .kernels import (distances_from_centred, group_distance_sums, pairwise_distances,
                      same_sample_distance_stats)
from .stream import group_codes, map_chunks, resolve_cells

PAIRS_PER_BATCH = 1 << 16  # (cell, sample) pairs per minibatch by default: ~8 MB per per-pair intermediate
MAX_LOCAL_ELEMENTS = 200_000_000  # cells x S x S floats returned by local_sample_distances
SPACES = ("z", "expression")
DECODED_ELEMENTS = 1 << 23  # cells x S x genes floats of decoded states held at once (space="expression")


def _generator(seed: int, chunk_id: int) -> torch.Generator:
    # one stream per (seed, chunk): the same numbers on any engine and chunk order
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, chunk_id]).generate_state(1)[0]))


def _decode(module, Z: torch.Tensor, batch: torch.Tensor, space: str) -> torch.Tensor:
    """States in the distance's space: Z itself, or log h (natural log) decoded under ``batch``
    (codes broadcastable to Z's leading dims)."""
    if space == "z":
        return Z
    return torch.log_softmax(module.h_logits(Z, batch.expand(Z.shape[:-1])), dim=-1)


def _mc_stats(module, b: dict, mc_samples: int, gen: torch.Generator, space: str = "z",
              rows: slice = slice(None), own: CounterfactualMap | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Monte Carlo mean and s.d. per cell of the same-sample distance (the normalisation).

    ``own``: a map over all of the module's samples (its ``own`` method evaluates the draws
    at each cell's own sample on the fast path); the module's ``z_from_u`` when None.
    """
    qm, qs = b["u_mean"][rows], b["u_std"][rows]
    eps = torch.randn((2 * mc_samples,) + tuple(qm.shape), generator=gen)
    u = qm + qs * eps                                            # 2M x B x L
    s = b["sample"][rows].expand(2 * mc_samples, -1)
    if own is None:
        z_own = module.z_from_u(u, s)
    else:
        z_own = own.own(u.reshape(-1, u.shape[-1]), s.reshape(-1)).view(*u.shape[:2], -1)
    return same_sample_distance_stats(_decode(module, z_own, b["batch"][rows], space))


def _blocks(module, b: dict, S: int, space: str):
    """Row slices of one minibatch: all rows in z; in expression space few enough cells that
    their decoded states (cells x S x genes) stay within DECODED_ELEMENTS."""
    B = b["u_mean"].shape[0]
    step = B if space == "z" else max(1, DECODED_ELEMENTS // (S * module.n_genes))
    return [slice(a, min(a + step, B)) for a in range(0, B, step)]


def _states(cmap: CounterfactualMap, b: dict, space: str, rows: slice) -> torch.Tensor:
    """Counterfactual states (B x S x L_z, or B x S x G decoded) of the minibatch rows ``rows``."""
    return _decode(cmap.module, cmap(b["u_mean"][rows]), b["batch"][rows][:, None], space)


def _maps(module, sidx: torch.Tensor, normalize: bool) -> tuple[CounterfactualMap, CounterfactualMap | None]:
    """The map over the compared samples, and with ``normalize`` one over all samples (the
    cells' own samples need not be among the compared ones)."""
    cmap = counterfactual_map(module, sidx)
    own = counterfactual_map(module, torch.arange(module.n_sample)) if normalize else None
    return cmap, own


def _local_distances(module, b: dict, sidx: torch.Tensor, normalize: bool, mc_samples: int,
                     gen: torch.Generator | None, space: str = "z", maps=None) -> torch.Tensor:
    """D(n) (B x S x S) for one encoded minibatch, optionally z-scored."""
    cmap, own = maps if maps is not None else _maps(module, sidx, normalize)
    out = []
    for rows in _blocks(module, b, len(sidx), space):
        if space == "z":
            D = distances_from_centred(cmap.centred_t(b["u_mean"][rows]))
        else:
            D = pairwise_distances(_states(cmap, b, space, rows))
        if normalize:
            mu, sd = _mc_stats(module, b, mc_samples, gen, space, rows, own)
            D = (D - mu[:, None, None]) / sd[:, None, None]
        out.append(D)
    return torch.cat(out)


@torch.no_grad()
def _aggregate_kernel(model, batches, *, chunk, local, sidx, n_groups, normalize, mc_samples, seed, space="z"):
    gen = _generator(seed, chunk[0]) if normalize else None
    S = len(sidx)
    module = model.module
    cmap, own = _maps(module, sidx, normalize)
    sums = torch.zeros((n_groups, S, S), dtype=torch.float64)
    for b in batches:
        codes = torch.from_numpy(local["group"][b["index"].numpy() - chunk[1]])
        for rows in _blocks(module, b, S, space):
            mu, sd = _mc_stats(module, b, mc_samples, gen, space, rows, own) if normalize else (None, None)
            if space == "z":  # float32 in a block, float64 across
                sums += group_distance_sums(cmap.centred_t(b["u_mean"][rows]), codes[rows], n_groups, mu, sd,
                                            centred_t=True)
            else:
                sums += group_distance_sums(_states(cmap, b, space, rows), codes[rows], n_groups, mu, sd)
    return sums.numpy()


@torch.no_grad()
def _local_kernel(model, batches, *, chunk, local, sidx, normalize, mc_samples, seed, space="z"):
    gen = _generator(seed, chunk[0]) if normalize else None
    maps = _maps(model.module, sidx, normalize)
    idx, out = [], []
    for b in batches:
        out.append(_local_distances(model.module, b, sidx, normalize, mc_samples, gen, space, maps).numpy())
        idx.append(b["index"].numpy())
    return np.concatenate(idx), np.concatenate(out)


def _batch_size(batch_size: int | None, n_samples: int) -> int:
    """Cells per minibatch: ``batch_size``, or by default enough for PAIRS_PER_BATCH
    (cell, sample) pairs and at least 512 (2,048 at S = 32: fewer, larger products)."""
    if batch_size is not None:
        if int(batch_size) < 1:
            raise InputError(f"batch_size={batch_size}", field="batch_size", fix="use a positive number of cells")
        return int(batch_size)
    return int(max(512, PAIRS_PER_BATCH // max(1, n_samples)))


def _samples(model, samples) -> tuple[torch.Tensor, np.ndarray]:
    sidx = model.sample_index(samples)
    return sidx, np.asarray(model.samples, dtype=object)[sidx.numpy()]


def sample_distances(model, groupby=None, cells=None, *, data=None, samples: Sequence[str] | None = None,
                     normalize: bool = False, mc_samples: int = 20, min_cells: int = 5, seed: int = 0,
                     client=None, batch_size: int | None = None, progress=None, space: str = "z") -> xr.DataArray:
    """Aggregated counterfactual sample distance matrices D(C) per cell group.

    ``groupby``: obs column name, one label per cell (e.g. :func:`cluster_cells` output), or
    None (one group ``"all"``). ``cells``: positions or mask of the cells to use (all when
    None). ``samples``: the sample labels to compare (all when None). ``normalize``: Monte
    Carlo z-scores with ``mc_samples`` pairs of posterior draws (seeded by ``seed``).
    ``min_cells``: samples with fewer cells in a group get NaN rows / columns there.
    ``client``: a ``distributed.Client`` to map the cell chunks on (in-process when None).
    ``space``: ``"z"`` (the paper's) or ``"expression"`` (decoded log h, see the module docstring).
    ``batch_size``: cells per minibatch (default: ~65,000 cell-sample pairs, at least 512);
    smaller cell chunks of the source are merged into tasks of at least that many cells.

    Returns DataArray ``distance`` with dims (group, sample, sample_b) and the non-index
    coordinate ``n_cells`` (group, sample): the number of the group's cells from each sample.
    Memory: one minibatch of S x S matrices at a time; nothing per cell is kept.
    """
    _check_common(normalize, mc_samples, min_cells, space)
    sidx, labels = _samples(model, samples)
    source, cats = model._resolve(data)
    n = source.n_cells
    codes, groups = group_codes(model, data, groupby, n)
    keep = resolve_cells(n, cells)
    sel = np.ones(n, bool) if keep is None else np.isin(np.arange(n), keep)
    codes = np.where(sel, codes, -1)
    G, S = len(groups), len(sidx)
    total = np.zeros((G, S, S))
    bs = _batch_size(batch_size, S)
    for _, part in map_chunks(model, data, _aggregate_kernel, cells=keep, client=client, batch_size=bs,
                              min_block_cells=bs, progress=progress, cell_params={"group": codes}, sidx=sidx,
                              n_groups=G, normalize=normalize, mc_samples=mc_samples, seed=seed, space=space):
        total += part
    n_group = np.bincount(codes[codes >= 0], minlength=G).astype(float)
    # cells of each group from each compared sample
    col = np.full(cats["sample"].n, -1, np.int64)
    col[sidx.numpy()] = np.arange(S)
    col = col[cats["sample"].codes]                              # position on the compared-sample axis
    ok = (codes >= 0) & (col >= 0)
    counts = np.bincount(codes[ok] * S + col[ok], minlength=G * S).reshape(G, S)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = total / n_group[:, None, None]
    low = counts < min_cells
    mean[low[:, :, None] | low[:, None, :]] = np.nan
    mean[n_group == 0] = np.nan
    da = xr.DataArray(mean, dims=("group", "sample", "sample_b"), name="distance",
                      coords={"group": np.asarray(groups, dtype=object), "sample": labels, "sample_b": labels.copy(),
                              "n_cells": (("group", "sample"), counts)},
                      attrs={"normalized": int(normalize), "mc_samples": int(mc_samples) if normalize else 0,
                             "space": space,
                             "min_cells": int(min_cells), "groupby": groupby if isinstance(groupby, str) else "",
                             "description": "mean over the group's cells of ||z_n^s - z_n^s'||_2"
                                            + (" of decoded log h" if space == "expression" else "")
                                            + (" z-scored against same-sample distances" if normalize else "")})
    return da


def local_sample_distances(model, cells, *, data=None, samples: Sequence[str] | None = None, normalize: bool = False,
                           mc_samples: int = 20, seed: int = 0, client=None, batch_size: int | None = None,
                           space: str = "z") -> xr.DataArray:
    """Per-cell sample distance matrices D(n) for the cells in ``cells`` (positions or mask):
    DataArray (cell, sample, sample_b). For a subset of cells: the full set is cells x S x S.
    ``space``: as in :func:`sample_distances`."""
    _check_common(normalize, mc_samples, 5, space)
    sidx, labels = _samples(model, samples)
    source, _ = model._resolve(data)
    keep = resolve_cells(source.n_cells, cells)
    if keep is None:
        keep = np.arange(source.n_cells)
    if keep.size * len(sidx) ** 2 > MAX_LOCAL_ELEMENTS:
        raise InputError(f"{keep.size} cells x {len(sidx)}^2 samples is too large to return", field="cells",
                         fix="pass fewer cells, or use sample_distances(groupby=...) for aggregates")
    bs = _batch_size(batch_size, len(sidx))
    parts = sorted(map_chunks(model, data, _local_kernel, cells=keep, client=client, batch_size=bs,
                              min_block_cells=bs,
                              sidx=sidx, normalize=normalize, mc_samples=mc_samples, seed=seed, space=space),
                   key=lambda t: t[0])
    idx = np.concatenate([p[1][0] for p in parts])
    D = np.concatenate([p[1][1] for p in parts])
    order = np.argsort(idx, kind="stable")
    names = model._cells(data)[idx[order]]
    return xr.DataArray(D[order], dims=("cell", "sample", "sample_b"), name="distance",
                        coords={"cell": names, "sample": labels, "sample_b": labels.copy(),
                                "cell_index": ("cell", idx[order])},
                        attrs={"normalized": int(normalize), "space": space})


def counterfactual_z(model, cells, *, data=None, samples: Sequence[str] | None = None,
                     batch_size: int = 512) -> xr.DataArray:
    """Counterfactual states z_n^{s} (Eq. 2) from the posterior mean of u_n, for the cells in
    ``cells`` and the samples in ``samples`` (all when None): DataArray (cell, sample, latent_z)."""
    sidx, labels = _samples(model, samples)
    source, _ = model._resolve(data)
    keep = resolve_cells(source.n_cells, cells)

    @torch.no_grad()
    def kernel(m, batches, *, chunk, local):
        cmap = counterfactual_map(m.module, sidx)
        out = [(b["index"].numpy(), cmap(b["u_mean"]).numpy()) for b in batches]
        return np.concatenate([o[0] for o in out]), np.concatenate([o[1] for o in out])

    parts = [p for _, p in sorted(map_chunks(model, data, kernel, cells=keep, batch_size=batch_size),
                                  key=lambda t: t[0])]
    idx = np.concatenate([p[0] for p in parts])
    Z = np.concatenate([p[1] for p in parts])
    return xr.DataArray(Z, dims=("cell", "sample", "latent_z"), name="z",
                        coords={"cell": model._cells(data)[idx], "sample": labels,
                                "latent_z": np.arange(Z.shape[-1]), "cell_index": ("cell", idx)})


def _check_common(normalize, mc_samples, min_cells, space="z"):
    if space not in SPACES:
        raise InputError(f"space={space!r}", field="space", fix=f"use one of {SPACES}")
    if normalize and int(mc_samples) < 2:
        raise InputError(f"mc_samples={mc_samples} is too few for the normalisation", field="mc_samples",
                         fix="use at least 2 (default 20)")
    if int(min_cells) < 1:
        raise InputError(f"min_cells={min_cells}", field="min_cells", fix="use a positive count (default 5)")


# ----------------------------------------------------------------------------- sample clustering
def cluster_samples(distances: xr.DataArray, *, method: str = "ward", n_clusters: int | None = None
                    ) -> xr.Dataset:
    """Hierarchical clustering of samples on each group's aggregated distance matrix D(C).

    ``method``: scipy linkage method ("ward", "average", "complete", ...). The default is Ward's
    variance minimisation, the linkage of the MrVI paper's sample dendrograms (Nature Methods,
    Supplementary figure legends) and of its authors' benchmark code. Samples with NaN
    rows (too few cells in the group) are left out. Returns a Dataset with
    ``linkage(group, merge, linkage_field)`` (scipy's Z: the two merged clusters, their
    distance, the new cluster's size; leaf i = i-th sample with ``clustered``), ``clustered(group,
    sample)``, ``order(group, rank)`` (sample labels in dendrogram leaf order, "" padding)
    and, with ``n_clusters``, ``cluster(group, sample)`` (1..n_clusters, 0 = left out).
    """
    from scipy.cluster.hierarchy import fcluster, leaves_list, linkage
    from scipy.spatial.distance import squareform

    if distances.dims != ("group", "sample", "sample_b"):
        raise InputError(f"distances has dims {distances.dims}", field="distances",
                         fix="pass the DataArray returned by sample_distances")
    groups = distances["group"].values
    samples = distances["sample"].values
    S = len(samples)
    Z = np.full((len(groups), max(S - 1, 0), 4), np.nan)
    used = np.zeros((len(groups), S), bool)
    order = np.full((len(groups), S), -1, np.int64)
    clusters = np.zeros((len(groups), S), np.int64)
    for g in range(len(groups)):
        D = np.asarray(distances.values[g], float)
        ok = ~np.isnan(D).all(1) & ~np.isnan(D).any(0)
        k = int(ok.sum())
        if k < 2:
            continue
        sub = D[np.ix_(ok, ok)]
        sub = 0.5 * (sub + sub.T)
        sub = sub - np.diag(np.diag(sub))
        if sub.min() < 0:  # z-scored distances: shift to non-negative dissimilarities
            sub = sub - sub.min()
            np.fill_diagonal(sub, 0.0)
        L = linkage(squareform(sub, checks=False), method=method)
        Z[g, :k - 1] = L
        used[g] = ok
        order[g, :k] = np.flatnonzero(ok)[leaves_list(L)]
        if n_clusters:
            clusters[g, ok] = fcluster(L, t=min(n_clusters, k), criterion="maxclust")
    ds = xr.Dataset({"linkage": (("group", "merge", "linkage_field"), Z),
                     "clustered": (("group", "sample"), used),
                     "order": (("group", "rank"), order)},
                    coords={"group": groups, "sample": samples, "merge": np.arange(max(S - 1, 0)),
                            "linkage_field": np.array(["left", "right", "distance", "size"], dtype=object),
                            "rank": np.arange(S)},
                    attrs={"method": method})
    if n_clusters:
        ds["cluster"] = (("group", "sample"), clusters)
        ds.attrs["n_clusters"] = int(n_clusters)
    return ds
