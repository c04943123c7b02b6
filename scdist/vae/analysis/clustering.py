"""Clustering cells by their local sample distance matrices (MrVI Methods, "Estimating sample
distances at the cellular level": PCA of the flattened D(n), then graph clustering).

Each D(n) is flattened to its upper triangle (S(S-1)/2 values). PCA and the graph clustering
are fitted on at most ``max_fit_cells`` cells drawn with a seed; every cell is then projected
on those axes and labelled by a majority vote of its ``n_neighbors`` nearest fitted cells in PC
space -- two streaming passes whose memory does not grow with the number of cells.

Graph clustering: Louvain modularity optimisation (``networkx.community.louvain_communities``;
networkx is already installed as a dependency of torch) on the symmetrised kNN graph of the
fitted cells, with each community split into its connected components -- the connectivity
guarantee that distinguishes Leiden from Louvain. The paper uses Leiden (leidenalg, GPL);
on kNN graphs of well-separated populations both give the same partitions.
"""
from __future__ import annotations

import numpy as np
import torch
import xarray as xr

from ...errors import InputError
from .distances import _local_distances
from .stream import map_chunks


@torch.no_grad()
def _flat_kernel(model, batches, *, chunk, local, sidx, iu, center, axes):
    idx, out = [], []
    for b in batches:
        D = _local_distances(model.module, b, sidx, False, 0, None)
        F = D[:, iu[0], iu[1]].double()
        out.append(F.numpy() if axes is None else ((F - center) @ axes).numpy())
        idx.append(b["index"].numpy())
    return np.concatenate(idx), np.concatenate(out)


def _knn(A: torch.Tensor, B: torch.Tensor, k: int, exclude_self: bool) -> torch.Tensor:
    """Indices (rows of B) of the k nearest rows of B for every row of A, in blocks."""
    out = []
    for s in range(0, A.shape[0], 2048):
        d = torch.cdist(A[s:s + 2048], B)
        if exclude_self:
            d[torch.arange(d.shape[0]), torch.arange(s, s + d.shape[0])] = float("inf")
        out.append(d.topk(k, largest=False).indices)
    return torch.cat(out)


def louvain_labels(P: np.ndarray, n_neighbors: int, resolution: float, seed: int) -> np.ndarray:
    """Community labels (0..K-1, largest first) of the kNN graph of the rows of ``P``."""
    import networkx as nx

    T = torch.from_numpy(np.ascontiguousarray(P, dtype=np.float32))
    nn_idx = _knn(T, T, n_neighbors, exclude_self=True).numpy()
    g = nx.Graph()
    g.add_nodes_from(range(P.shape[0]))
    rows = np.repeat(np.arange(P.shape[0]), n_neighbors)
    g.add_edges_from(zip(rows.tolist(), nn_idx.ravel().tolist()))
    comms = nx.community.louvain_communities(g, resolution=resolution, seed=seed)
    parts = []
    for c in comms:  # split disconnected communities (Leiden's well-connectedness)
        parts.extend(nx.connected_components(g.subgraph(c)))
    labels = np.empty(P.shape[0], np.int64)
    for k, c in enumerate(sorted(parts, key=len, reverse=True)):
        labels[list(c)] = k
    return labels


def cluster_cells(model, data=None, *, n_pcs: int = 10, n_neighbors: int = 15, resolution: float = 1.0,
                  max_fit_cells: int = 10_000, samples=None, seed: int = 0, client=None, batch_size: int = 512,
                  progress=None) -> xr.Dataset:
    """Cluster cells by their sample distance matrices D(n).

    Returns a Dataset with ``cluster`` (cell; integer labels 0, 1, ..., largest cluster first),
    ``pcs`` (fit_cell, pc) of the fitted cells and ``explained_variance_ratio`` (pc).
    ``cluster`` can be passed as ``groupby`` to :func:`sample_distances` and the DE / DA.
    """
    if n_pcs < 1 or n_neighbors < 1 or max_fit_cells < 2 * n_neighbors:
        raise InputError(f"n_pcs={n_pcs}, n_neighbors={n_neighbors}, max_fit_cells={max_fit_cells}",
                         field="n_pcs", fix="use n_pcs >= 1, n_neighbors >= 1 and max_fit_cells >= 2 n_neighbors")
    sidx = model.sample_index(samples)
    S = len(sidx)
    if S < 3:
        raise InputError(f"{S} samples give {S * (S - 1) // 2} distance features", field="samples",
                         fix="cluster cells on at least 3 samples")
    iu = torch.triu_indices(S, S, offset=1)
    source, _ = model._resolve(data)
    n = source.n_cells
    rng = np.random.default_rng([seed, 23])
    fit = np.sort(rng.choice(n, min(n, max_fit_cells), replace=False))
    parts = [p for _, p in map_chunks(model, data, _flat_kernel, cells=fit, client=client, batch_size=batch_size,
                                      sidx=sidx, iu=iu, center=None, axes=None)]
    fit_idx = np.concatenate([p[0] for p in parts])
    F = np.concatenate([p[1] for p in parts])
    center = F.mean(0)
    U, sv, Vt = np.linalg.svd(F - center, full_matrices=False)
    k = min(n_pcs, Vt.shape[0])
    axes = Vt[:k].T
    evr = (sv[:k] ** 2) / max((sv ** 2).sum(), 1e-300)
    P_fit = (F - center) @ axes
    fit_labels = louvain_labels(P_fit, min(n_neighbors, len(fit_idx) - 1), resolution, seed)
    # pass 2: every cell projected and labelled by its nearest fitted cells
    labels = np.empty(n, np.int64)
    Pf = torch.from_numpy(P_fit.astype(np.float32))
    n_lab = fit_labels.max() + 1
    for _, (idx, P) in map_chunks(model, data, _flat_kernel, client=client, batch_size=batch_size, progress=progress,
                                  sidx=sidx, iu=iu, center=torch.from_numpy(center), axes=torch.from_numpy(axes)):
        nn_idx = _knn(torch.from_numpy(P.astype(np.float32)), Pf, min(n_neighbors, len(fit_idx)), False).numpy()
        votes = fit_labels[nn_idx]                                   # B x k
        counts = np.zeros((votes.shape[0], n_lab), np.int64)
        np.add.at(counts, (np.repeat(np.arange(votes.shape[0]), votes.shape[1]), votes.ravel()), 1)
        labels[idx] = counts.argmax(1)
    names = model._cells(data)
    return xr.Dataset({"cluster": ("cell", labels),
                       "pcs": (("fit_cell", "pc"), P_fit.astype(np.float32)),
                       "explained_variance_ratio": ("pc", evr)},
                      coords={"cell": names, "fit_cell": names[fit_idx], "fit_cell_index": ("fit_cell", fit_idx),
                              "pc": np.arange(k)},
                      attrs={"method": "louvain (networkx) + connected components", "resolution": float(resolution),
                             "n_neighbors": int(n_neighbors), "seed": int(seed)})
