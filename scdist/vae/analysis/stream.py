"""Streaming a trained MrVI model over the cells of a count source, one cell chunk at a time.

Every analysis is a *chunk kernel*: a pure function ``kernel(model, batches, **params)`` of
one cell chunk's encoded minibatches that returns a small result (per-cell rows of that
chunk, or partial sums). :func:`map_chunks` runs it over the source's chunks in-process, or
on a Dask cluster when a ``distributed.Client`` is given (``scdist.engines.dask.map_blocks``
does the placement; this module never imports Dask). Each cell is encoded once, in its
chunk; per-cell S x S matrices live only inside one minibatch.
"""
from __future__ import annotations

from typing import Any, Callable, Iterator

import numpy as np
import scipy.sparse as sp
import torch

from ...errors import InputError
from ..data import csr_rows
from .kernels import workspace

Kernel = Callable[..., Any]


def log1p_csr(X: sp.csr_matrix) -> sp.csr_matrix:
    """log1p of the stored entries as float32 (log1p(0) = 0 keeps the sparsity)."""
    return sp.csr_matrix((np.log1p(X.data, dtype=np.float32), X.indices, X.indptr), shape=X.shape)


def resolve_cells(n_cells: int, cells) -> np.ndarray | None:
    """Sorted global indices of ``cells`` (index array or boolean mask); None for all cells."""
    if cells is None:
        return None
    c = np.asarray(cells)
    if c.dtype == bool:
        if c.shape != (n_cells,):
            raise InputError(f"boolean cells mask has shape {c.shape}, expected ({n_cells},)", field="cells",
                             fix="pass a mask with one entry per cell, or integer cell positions")
        return np.flatnonzero(c)
    if c.size and (not np.issubdtype(c.dtype, np.integer) or c.min() < 0 or c.max() >= n_cells):
        raise InputError("cells must be integer positions in [0, n_cells) or a boolean mask", field="cells",
                         fix=f"use positions below {n_cells}")
    return np.unique(c.astype(np.int64))


def light_copy(model):
    """The model without its training data (what travels to workers)."""
    return type(model)(model.module, model.module_kwargs, gene_names=model.gene_names,
                       categories=model.categories, keys=model.keys, train_config=model.train_config,
                       history=model.history, source=None)


def batch_bounds(n: int, batch_size: int) -> list[tuple[int, int]]:
    """Row ranges of ``n`` rows in round(n / batch_size) near-equal minibatches (each at most
    1.5 x ``batch_size``): no short tail batch, whose fixed per-batch costs would be paid for
    few cells."""
    k = max(1, int(round(n / max(1, batch_size))))
    edges = np.linspace(0, n, k + 1).round().astype(np.int64)
    return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:]) if b > a]


@torch.no_grad()
def encoded_batches(model, source, cats, chunk_id: int, keep: np.ndarray | None = None,
                    batch_size: int = 1024, rows: tuple[int, int] | None = None) -> Iterator[dict]:
    """Minibatches of one cell chunk with q(u | x) attached: ``index`` (global cell index),
    ``sample``, ``batch`` (codes), ``u_mean``, ``u_std`` (B x L).
    ``keep``: sorted global indices inside the chunk to restrict to (None: all its cells).
    ``rows``: the cell range to read instead of the chunk's own (a block of whole chunks).

    The chunk is read once as CSR (log1p taken on its nonzeros); only one minibatch is dense
    at a time, densified into this thread's reused buffer (a fresh B x genes array per
    minibatch cost more than its fill: page faults on fresh memory).
    """
    module = model.module
    if module.training:
        module.eval()
    a, b = source.chunks[chunk_id] if rows is None else rows
    X = source.read(a, b)
    idx = np.arange(a, b, dtype=np.int64)
    if keep is not None and keep.size != b - a:  # a strict subset (sorted, unique, inside [a, b))
        X = X[keep - a]
        idx = np.asarray(keep, dtype=np.int64)
    X = log1p_csr(X)
    bounds = batch_bounds(idx.size, batch_size)
    buf = workspace().get("dense_counts", max((e - s for s, e in bounds), default=0), X.shape[1]).numpy()
    for s, e in bounds:
        ib = idx[s:e]
        out = {"index": torch.from_numpy(ib)}
        for name in ("sample", "batch"):
            out[name] = torch.from_numpy(np.ascontiguousarray(cats[name].codes[ib], dtype=np.int64))
        rows = X if (s, e) == (0, idx.size) else csr_rows(X, s, e)
        xlog = torch.from_numpy(rows.toarray(out=buf[:e - s]))
        out["u_mean"], out["u_std"] = module.encode_log1p(xlog, out["sample"])
        yield out


def _chunk_task(block, *, payload, kernel: Kernel, batch_size: int, params: dict):
    chunk_id, (a, b), keep, local, _ = block
    model, source, cats = payload
    torch.set_num_threads(1)
    return kernel(model, encoded_batches(model, source, cats, chunk_id, keep, batch_size, rows=(a, b)),
                  chunk=(chunk_id, a, b), local=local, **params)


def _blocks(chunks: list[tuple[int, int]], keep: np.ndarray | None, min_block_cells: int | None):
    """(first chunk id, (start, stop), kept cells, number of chunks) of consecutive chunks
    merged until each block holds at least ``min_block_cells`` selected cells (each chunk on
    its own when None); chunks without selected cells are skipped."""
    out, cur = [], None
    for c, (a, b) in enumerate(chunks):
        k = None if keep is None else keep[(keep >= a) & (keep < b)]
        if k is not None and not k.size:
            continue
        n = b - a if k is None else k.size
        if cur is not None and min_block_cells and cur[4] < min_block_cells and cur[1][1] == a:
            ks = None if k is None else np.concatenate([cur[2], k])
            cur = (cur[0], (cur[1][0], b), ks, cur[3] + 1, cur[4] + n)
        else:
            if cur is not None:
                out.append(cur)
            cur = (c, (a, b), k, 1, n)
    if cur is not None:
        out.append(cur)
    return [(c, span, k, n_chunks) for c, span, k, n_chunks, _ in out]


def map_chunks(model, data, kernel: Kernel, *, cells=None, client=None, batch_size: int = 1024,
               progress=None, cell_params: dict | None = None, min_block_cells: int | None = None,
               **params) -> Iterator[tuple[int, Any]]:
    """Yield ``(chunk_id, kernel(model, batches, chunk=(id, start, stop), local=..., **params))``
    for every cell chunk holding selected cells (in chunk order locally, in completion order
    on a Dask cluster).

    ``cells``: index array or boolean mask of the cells to use (all when None). ``params`` are
    broadcast to every task (keep them small: model-sized, not cell-sized). ``cell_params``:
    per-cell arrays (length n_cells); each task gets only its chunk's rows as ``local``
    (row ``index - start`` belongs to global cell ``index``). ``min_block_cells``: merge
    consecutive chunks smaller than this into one task (``chunk`` is then the first chunk's
    id with the block's start and stop), so minibatches of that size fit in a task; the same
    blocks in-process and on a cluster. ``progress`` advances once per source chunk.
    """
    source, cats = model._resolve(data)
    keep = resolve_cells(source.n_cells, cells)
    cell_params = cell_params or {}
    blocks = [(c, (a, b), k, {name: np.asarray(v)[a:b] for name, v in cell_params.items()}, n)
              for c, (a, b), k, n in _blocks(source.chunks, keep, min_block_cells)]
    if client is None:
        for c, (a, b), k, local, n in blocks:
            yield c, kernel(model, encoded_batches(model, source, cats, c, k, batch_size, rows=(a, b)),
                            chunk=(c, a, b), local=local, **params)
            if progress is not None:
                progress.update(n)
        return
    from ...engines.dask import map_blocks

    # One future for the whole payload (scattering a tuple would scatter its items one by one),
    # under a fresh key: with content-hashed keys a second analysis re-scattering the same model
    # races the release of the first one's copy, and workers then wait for data that is gone.
    [payload] = client.scatter([(light_copy(model), source, cats)], broadcast=True, hash=False)
    for block, res in map_blocks(client, _chunk_task, blocks, payload=payload,
                                 kernel=kernel, batch_size=batch_size, params=params):
        if progress is not None:
            progress.update(block[4])
        yield block[0], res


def cell_sample_codes(model, data) -> tuple[np.ndarray, np.ndarray, Any]:
    """(sample codes, batch codes) of every cell, and the source (no counts are read)."""
    source, cats = model._resolve(data)
    return cats["sample"].codes, cats["batch"].codes, source


def group_codes(model, data, groupby, n_cells: int) -> tuple[np.ndarray, list[str]]:
    """Per-cell group codes and labels from an obs column name, a per-cell label array, or None ("all")."""
    if groupby is None:
        return np.zeros(n_cells, np.int64), ["all"]
    if isinstance(groupby, str):
        source, _ = model._resolve(data)
        if groupby not in source.obs_columns():
            raise InputError(f"obs has no column {groupby!r}", field="groupby", fix=f"use one of {source.obs_columns()}")
        values = source.obs_column(groupby)
    else:
        values = np.asarray(groupby)
        if values.shape != (n_cells,):
            raise InputError(f"groupby labels have shape {values.shape}, expected ({n_cells},)", field="groupby",
                             fix="pass an obs column name or one label per cell")
    import pandas as pd
    s = pd.Series(np.asarray(values)).astype(str)
    labels = sorted(s.unique().tolist())
    codes = pd.Categorical(s, categories=labels).codes.astype(np.int64)
    return codes, labels
