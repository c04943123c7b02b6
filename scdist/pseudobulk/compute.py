"""The pseudobulk cube as a distributed reduction over a study's cell chunks (Dask).

Graph (built with ``dask.delayed``, scheduled by Dask):

1. one task per cell chunk ``(start, stop)`` of ``cells/X``: reads its own rows with
   ``study.read_counts(start, stop)`` and runs :func:`scdist.pseudobulk.kernel.chunk_stats`.
   The partial is saved under ``_scratch/pseudobulk/<key>/<chunk>`` (zarr arrays) and
   marked done, so a killed run reloads finished chunks instead of recomputing them;
2. per gene block, a tree of :func:`~scdist.pseudobulk.kernel.combine_all` merges
   (``split_every`` partials per node), which Dask orders depth first, so only a few
   partials are alive at a time whatever the number of cells;
3. per gene block, one task finalises (CTMM quantities) and writes its region of the
   ``pseudobulk/`` Dataset, then its completion marker. The driver only gathers small
   dicts.

The stage marker ``__stage__`` carries the parameters; a rerun with the same parameters
returns at once, and a rerun after a crash writes only the missing gene blocks.
"""
from __future__ import annotations

import hashlib
import json
import logging
from typing import Any

import numpy as np
import pandas as pd
import xarray as xr

from ..errors import InputError
from ..store import layout
from ..store.markers import STAGE, done_set, is_done, mark_done
from . import kernel

log = logging.getLogger("scdist.pseudobulk")

SCRATCH = "_scratch/pseudobulk"
GENE_VARS = ("mean", "var", "nu", "counts", "op_mean", "op_nu")
#: Bytes one float64 (donor x celltype x gene) array of a gene block may take in a task.
BLOCK_BYTES = 64 * 2**20
DEFAULT_GENE_CHUNK = 512


def _codes(obs: pd.DataFrame, col: str) -> tuple[np.ndarray, np.ndarray]:
    """Integer codes and labels of a categorical obs column (InputError on missing values)."""
    if col not in obs:
        raise InputError(f"obs has no {col!r} column", field=f"obs.{col}",
                         fix="re-ingest the study naming the obs key for this column")
    cat = pd.Categorical(obs[col])
    codes = np.asarray(cat.codes, dtype=np.int64)
    if (codes < 0).any():
        raise InputError(f"{int((codes < 0).sum())} cells have no {col}", field=f"obs.{col}",
                         fix=f"drop those cells or give them a {col} label before ingest")
    return codes, np.asarray(cat.categories.astype(str), dtype=object)


def donor_table(obs: pd.DataFrame, donor_codes: np.ndarray, n_donors: int,
                covariates: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Donor-level ``batch`` (str), ``covariates`` (float) and covariate names.

    Each donor's value is that of its first cell (donor-level columns are constant within
    a donor). Numeric columns are kept as they are; categorical, string and boolean
    columns are one-hot encoded with the first level dropped (``<column>_<level>``).
    """
    first = np.full(n_donors, -1, np.int64)
    order = np.arange(donor_codes.size)[::-1]
    first[donor_codes[order]] = order  # the last write per donor is its first cell
    has = first >= 0
    rows = obs.iloc[first[has]].reset_index(drop=True)
    batch = np.full(n_donors, "", dtype=object)
    if layout.OBS_BATCH in obs:
        batch[has] = rows[layout.OBS_BATCH].astype(str).to_numpy()
    frames = []
    for col in covariates:
        if col not in obs:
            raise InputError(f"donor covariate {col!r} is not an obs column", field=f"obs.{col}",
                             fix="re-ingest naming existing obs keys as donor covariates")
        v = rows[col]
        if pd.api.types.is_bool_dtype(v) or not pd.api.types.is_numeric_dtype(v):
            d = pd.get_dummies(v.astype("category"), prefix=col, drop_first=True, dtype=float)
            frames.append(d)
        else:
            frames.append(pd.DataFrame({col: v.astype(float)}))
    if frames:
        cov_has = pd.concat(frames, axis=1)
        names = np.asarray(cov_has.columns.astype(str), dtype=object)
        cov = np.full((n_donors, len(names)), np.nan)
        cov[has] = cov_has.to_numpy(dtype=float)
    else:
        names = np.zeros(0, dtype=object)
        cov = np.zeros((n_donors, 0))
    return batch, cov, names


def gene_blocks(n_genes: int, gene_chunk: int, n_pairs: int) -> list[tuple[int, int]]:
    """Gene ranges of the reduction and write tasks (the units marked done in pseudobulk/).

    Each block is a whole number of stored chunks of ``gene_chunk`` genes, as many as keep
    one float64 (pairs x genes) array of the block under ``BLOCK_BYTES``.
    """
    per = max(1, BLOCK_BYTES // (8 * max(n_pairs, 1) * gene_chunk)) * gene_chunk
    return [(a, min(a + per, n_genes)) for a in range(0, n_genes, per)]


_gene_blocks = gene_blocks  # older name, used by the planner's pseudobulk stage


def _params_key(params: dict) -> str:
    return hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:16]


# ---- tasks (run on workers) -------------------------------------------------------------

def _save_partial(study, url_path: str, p: kernel.Partial) -> None:
    g = study.root.require_group(url_path)
    for name in ("groups", "n", "mean", "m2", "counts"):
        arr = getattr(p, name)
        a = g.create_array(name, shape=arr.shape, dtype=arr.dtype,
                           chunks=arr.shape if arr.size else None, overwrite=True)
        if arr.size:
            a[...] = arr


def _load_partial(study, url_path: str) -> kernel.Partial:
    g = study.root[url_path]
    return kernel.Partial(*(np.asarray(g[name][...]) for name in
                            ("groups", "n", "mean", "m2", "counts")))


def chunk_task(study, start: int, stop: int, n_celltypes: int, normalization: str,
               layer: str | None, scratch: str, blocks: list[tuple[int, int]]
               ) -> tuple[kernel.Partial, ...]:
    """Partials of cells ``start:stop`` split into gene ``blocks`` (reloaded if saved).

    The cells' donor and cell type codes are read from ``<scratch>/codes`` (written once by
    the driver), which keeps the task graph small however many cells there are.
    """
    cid = f"cells-{start}-{stop}"
    scratch_url = study.group_url(scratch)
    so = study.storage_options
    if is_done(scratch_url, cid, storage_options=so):
        p = _load_partial(study, f"{scratch}/{cid}")
    else:
        codes = study.root[f"{scratch}/codes"]
        donor, celltype = (np.asarray(codes[start:stop, k], dtype=np.int64) for k in (0, 1))
        counts = study.read_counts(start, stop)
        values = read_layer(study, layer, start, stop) if layer else None
        p = kernel.chunk_stats(counts, donor, celltype, n_celltypes,
                               normalization=normalization, values=values)
        _save_partial(study, f"{scratch}/{cid}", p)
        mark_done(scratch_url, cid, {"cells": stop - start}, storage_options=so)
    if len(blocks) == 1:
        return (p,)
    return tuple(p.gene_slice(a, b) for a, b in blocks)


def _save_codes(study, scratch: str, donor: np.ndarray, celltype: np.ndarray,
                chunk_len: int) -> None:
    """Write the per-cell (donor, celltype) codes for the chunk tasks (once per scratch key)."""
    url = study.group_url(scratch)
    if is_done(url, "codes", storage_options=study.storage_options):
        return
    g = study.root.require_group(scratch)
    codes = np.stack([donor, celltype], axis=1).astype(np.int32)
    a = g.create_array("codes", shape=codes.shape, dtype=codes.dtype,
                       chunks=(max(1, chunk_len), 2), overwrite=True)
    a[...] = codes
    mark_done(url, "codes", storage_options=study.storage_options)


def _pick(parts: tuple, j: int) -> kernel.Partial:
    return parts[j]


def _combine_list(*parts: kernel.Partial) -> kernel.Partial:
    return kernel.combine_all(parts)


def block_task(study, partial: kernel.Partial, a: int, b: int, n_donors: int, n_celltypes: int,
               min_cells: int, expected_n: np.ndarray, out: str, gene_names) -> dict:
    """Finalise genes ``a:b`` and write them into the ``pseudobulk/`` template."""
    from ..store.results import write_region

    cube = kernel.finalize(partial, n_donors, n_celltypes, min_cells)
    if not np.array_equal(cube.n_cells, expected_n):
        raise InputError("cells counted in X differ from obs donor/celltype counts",
                         field="cells", fix="the store is inconsistent; re-ingest the study")
    dims3 = ("donor", "celltype", "gene")
    ds = xr.Dataset(
        {"mean": (dims3, cube.mean), "var": (dims3, cube.var), "nu": (dims3, cube.nu),
         "counts": (dims3, cube.counts), "op_mean": (("donor", "gene"), cube.op_mean),
         "op_nu": (("donor", "gene"), cube.op_nu)},
        coords={"gene": np.asarray(gene_names, dtype=object)})
    url = study.group_url(out)
    write_region(ds, url, {"gene": slice(a, b)}, storage_options=study.storage_options)
    mark_done(url, f"genes-{a}-{b}", {"genes": b - a}, storage_options=study.storage_options)
    return {"genes": b - a}


def read_layer(study, layer: str, start: int, stop: int):
    """Rows ``start:stop`` of ``cells/layers/<layer>`` (the user's normalised values)."""
    reader = getattr(study, "read_layer", None)
    if reader is not None:
        return reader(layer, start, stop)
    from anndata.io import sparse_dataset

    node = study.root[f"{layout.CELLS}/layers/{layer}"]
    if hasattr(node, "attrs") and str(node.attrs.get("encoding-type", "")).endswith("_matrix"):
        return sparse_dataset(node)[start:stop]  # anndata's backed CSR/CSC row slicing
    return np.asarray(node[start:stop], dtype=np.float64)


# ---- driver -------------------------------------------------------------------------------

def _template(study, out: str, *, donors, celltypes, genes, n_cells, observed, P, batch, cov,
              cov_names, gene_chunk: int, attrs: dict) -> None:
    import dask.array as da

    from ..store.results import write_region, write_template

    D, C, G = len(donors), len(celltypes), len(genes)
    dims3 = ("donor", "celltype", "gene")

    def lazy(shape, dtype, fill):
        return da.full(shape, fill, dtype=dtype, chunks=shape[:-1] + (gene_chunk,))

    big = xr.Dataset(
        {"mean": (dims3, lazy((D, C, G), float, np.nan)),
         "var": (dims3, lazy((D, C, G), float, np.nan)),
         "nu": (dims3, lazy((D, C, G), float, np.nan)),
         "counts": (dims3, lazy((D, C, G), np.int64, 0)),
         "op_mean": (("donor", "gene"), lazy((D, G), float, np.nan)),
         "op_nu": (("donor", "gene"), lazy((D, G), float, np.nan))})
    small = xr.Dataset(
        {"n_cells": (("donor", "celltype"), n_cells), "observed": (("donor", "celltype"), observed),
         "P": (("donor", "celltype"), P), "batch": (("donor",), batch),
         "covariates": (("donor", "covariate"), cov)},
        coords={"donor": donors, "celltype": celltypes, "covariate": cov_names})
    ds = xr.merge([big, small]).assign_coords(gene=genes)
    ds.attrs.update(attrs)
    url = study.group_url(out)
    write_template(ds, url, {"gene": gene_chunk}, storage_options=study.storage_options)
    write_region(small.drop_vars(["donor", "celltype", "covariate"]), url,
                 {"donor": slice(0, D)}, storage_options=study.storage_options,
                 check_alignment=False)


def compute_pseudobulk(study, *, client=None, min_cells: int = 10,
                       normalization: str = "log1p_cp10k", layer: str | None = None,
                       gene_chunk: int | None = None, split_every: int = 8,
                       keep_partials: bool = False, progress=None) -> str:
    """Compute and store the pseudobulk cube of ``study`` (CTMM Eqs 2-3); return its URL.

    Parameters (CTMM notation in brackets)
    ----------
    study : an open :class:`scdist.store.Study` (picklable; workers reopen it by URL).
    client : a ``distributed.Client``; default an embedded LocalCluster
        (:func:`scdist.engines.dask.dask_client`).
    min_cells : pairs with n_ic <= ``min_cells`` cells are unobserved: mean/var/nu NaN
        (CTMM uses 10). Must be >= 1 so every observed pair has a variance.
    normalization : y_ics from counts: ``log1p_cp10k`` (default), ``log1p`` or ``none``.
    layer : read y_ics from ``cells/layers/<layer>`` instead (normalization is then unused).
    gene_chunk : chunk length along ``gene`` of the stored cube (default 512 or all genes).
    split_every : fan-in of the reduction tree.
    keep_partials : keep the per-chunk partials in ``_scratch/`` after success.
    progress : object with ``update(n=1)``, called once per gene block written.

    Output ``pseudobulk/`` (dims donor, celltype, gene; chunked along gene): ``n_cells``
    [n_ic], ``observed`` [n_ic > min_cells], ``mean`` [y_ic], ``var`` [sigma2_ic], ``nu``
    [nu_ic = sigma2_ic / n_ic], ``counts`` (summed raw counts), ``P`` [P_ic],
    ``op_mean`` [y_i], ``op_nu`` [nu_i], ``batch``, ``covariates``. See
    :func:`scdist.pseudobulk.kernel.finalize` for how unobserved pairs enter OP.
    """
    if isinstance(min_cells, bool) or not isinstance(min_cells, (int, np.integer)) or min_cells < 1:
        raise InputError(f"min_cells must be an integer >= 1, got {min_cells!r}",
                         field="min_cells", fix="use e.g. 10 (the CTMM paper's threshold)")
    if layer is None and normalization not in kernel.NORMALIZATIONS:
        raise InputError(f"unknown normalization {normalization!r}", field="normalization",
                         fix=f"use one of {', '.join(kernel.NORMALIZATIONS)} or pass layer=")
    if layer is not None and not study.has(f"{layout.CELLS}/layers/{layer}"):
        raise InputError(f"cells/ has no layer {layer!r}", field="layer",
                         fix="name an existing layer or omit layer= to normalise counts")
    if not isinstance(split_every, int) or split_every < 2:
        raise InputError("split_every must be an integer >= 2", field="split_every",
                         fix="use the default 8")
    n_cells_total, n_genes = study.n_cells, study.n_genes
    if gene_chunk is None:
        gene_chunk = min(n_genes, DEFAULT_GENE_CHUNK)
    if not isinstance(gene_chunk, (int, np.integer)) or gene_chunk < 1:
        raise InputError(f"gene_chunk must be a positive integer, got {gene_chunk!r}",
                         field="gene_chunk", fix="use e.g. 512")
    gene_chunk = int(min(gene_chunk, n_genes))
    chunks = [tuple(map(int, c)) for c in study.cell_chunks]
    norm_label = f"layer:{layer}" if layer else normalization
    params = {"min_cells": int(min_cells), "normalization": norm_label,
              "gene_chunk": gene_chunk, "n_cells": int(n_cells_total), "n_genes": int(n_genes),
              "cells": _cells_fingerprint(study)}
    params_json = json.dumps(params, sort_keys=True)
    out = layout.PSEUDOBULK
    out_url = study.group_url(out)
    so = study.storage_options
    started = study.has(out) and dict(study.group(out).attrs).get("scdist_params") == params_json
    if started and is_done(out_url, STAGE, storage_options=so):
        log.info("pseudobulk already complete with these parameters; skipping")
        return out_url

    obs = study.obs()
    donor, donors = _codes(obs, layout.OBS_DONOR)
    celltype, celltypes = _codes(obs, layout.OBS_CELLTYPE)
    D, C = len(donors), len(celltypes)
    n_ic = np.bincount(donor * C + celltype, minlength=D * C).reshape(D, C)
    n_i = n_ic.sum(1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        P = np.where(n_i > 0, n_ic / np.maximum(n_i, 1), np.nan)
    batch, cov, cov_names = donor_table(obs, donor, D, list(study.donor_covariates))
    genes = np.asarray(study.gene_names, dtype=object)
    del obs

    # Resume a half-written cube only if it was started with the same parameters (and the
    # same cells); otherwise start over (the template replaces the group and its markers).
    if not started:
        _template(study, out, donors=donors, celltypes=celltypes, genes=genes, n_cells=n_ic,
                  observed=n_ic > min_cells, P=P, batch=batch, cov=cov, cov_names=cov_names,
                  gene_chunk=gene_chunk,
                  attrs={"min_cells": int(min_cells), "normalization": norm_label,
                         "scdist_params": params_json})
    blocks = gene_blocks(n_genes, gene_chunk, D * C)
    done = done_set(out_url, storage_options=so)
    todo = [(j, a, b) for j, (a, b) in enumerate(blocks) if f"genes-{a}-{b}" not in done]
    scratch_key = _params_key({"normalization": norm_label, "cells": params["cells"],
                               "n_cells": int(n_cells_total), "n_genes": int(n_genes),
                               "chunks": chunks})
    scratch = f"{SCRATCH}/{scratch_key}"
    if todo:
        _run_graph(study, client, chunks, donor, celltype, C, D, normalization, layer, scratch,
                   blocks, todo, split_every, min_cells, n_ic, out, genes, progress)
    mark_done(out_url, STAGE, {"params": params}, storage_options=so)
    if not keep_partials:
        _remove(study, SCRATCH)
    return out_url


def _cells_fingerprint(study) -> str:
    """Identifies the current ``cells/`` (stored entries + when its metadata was written), so
    a cube computed from cells that were re-ingested since is not taken as done."""
    from ..store import _fs

    nnz = int(study.root[f"{layout.CELLS}/X/indptr"][-1])
    fs, p = _fs.filesystem(study.group_url(layout.CELLS), study.storage_options)
    info = fs.info(f"{p}/zarr.json")
    stamp = info.get("mtime") or info.get("LastModified") or info.get("created") or ""
    return f"nnz={nnz};written={stamp}"


def _remove(study, path: str) -> None:
    from ..store import _fs

    fs, p = _fs.filesystem(study.group_url(path), study.storage_options)
    if fs.exists(p):
        fs.rm(p, recursive=True)


def _run_graph(study, client, chunks, donor, celltype, C, D, normalization, layer, scratch,
               blocks, todo, split_every, min_cells, n_ic, out, genes, progress) -> None:
    import dask
    from distributed import as_completed

    from ..engines.dask import dask_client

    _save_codes(study, scratch, donor, celltype, chunks[0][1] - chunks[0][0])
    chunk_parts = [dask.delayed(chunk_task, pure=False)(
        study, a, b, C, normalization, layer, scratch, blocks) for a, b in chunks]
    finals = []
    for j, a, b in todo:
        level = [dask.delayed(_pick)(p, j) for p in chunk_parts]
        while len(level) > 1:
            level = [dask.delayed(_combine_list)(*level[k:k + split_every])
                     for k in range(0, len(level), split_every)]
        finals.append(dask.delayed(block_task)(study, level[0], a, b, D, C, min_cells, n_ic,
                                               out, genes[a:b]))
    with dask_client(client=client) as c:
        futures = c.compute(finals)
        for fut in as_completed(futures):
            fut.result()  # raises the task's error here
            if progress is not None:
                progress.update(1)
