"""Ingest single-cell AnnData (.h5ad, .zarr, in memory) and bulk counts into a study store.

Order of work, so that bad input never damages a store:

1. open the source and read the small parts (obs, var);
2. validate them (:mod:`scdist.store.validate`): obs keys, labels, donors, covariates,
   gene names; nothing is written yet;
3. stream X in blocks of ``chunk_cells`` rows into a temporary group (each block's counts
   are checked before it is written), then move the group into ``cells/``
   (:class:`scdist.store.cells.CellWriter`). Any failure removes the temporary group, and a
   store created by this call is removed again.

Reading an .h5ad or .zarr X touches one block at a time (the indptr slice and the matching
data/indices range of a CSR matrix, or a row block of a dense one; the next block is read
while the current one is written), so files larger than memory ingest with memory bounded
by two blocks of ``chunk_cells`` plus obs.
"""
from __future__ import annotations

import os
from typing import Any, Iterator, Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp

from ..errors import InputError
from . import _fs, layout, validate
from .cells import (DEFAULT_CHUNK_CELLS, TMP_DIR, CellWriter, _str_categorical, remove_tmp,
                    replace_group)
from .study import Study, create_study, open_study

CSC_LOAD_LIMIT = 1 << 30  # bytes of a CSC matrix we accept to load whole (it cannot stream by rows)


# ---- sources: obs, var and row blocks of one matrix --------------------------------------
class _Matrix:
    """Row blocks of an on-disk (h5py / zarr) or in-memory cells × genes matrix."""

    def __init__(self, elem, field: str):
        self.field = field
        self._lazy = None
        if hasattr(elem, "compute") and hasattr(elem, "chunks"):  # a dask array (lazy AnnData)
            self._lazy, self._mem, self.shape = elem, None, tuple(elem.shape)
            return
        if isinstance(elem, (np.ndarray, sp.spmatrix, sp.sparray)) or hasattr(elem, "todense"):
            self._mem = elem.tocsr() if sp.issparse(elem) else np.asarray(elem)
            self.shape = tuple(self._mem.shape)
            return
        self._mem = None
        attrs = dict(elem.attrs)
        enc = attrs.get("encoding-type", "")
        if enc in ("csr_matrix", "csc_matrix") or "h5sparse_format" in attrs:
            fmt = enc[:3] if enc else attrs["h5sparse_format"]
            self.shape = tuple(int(s) for s in attrs.get("shape", attrs.get("h5sparse_shape")))
            self._data, self._indices, self._indptr = elem["data"], elem["indices"], elem["indptr"]
            if fmt == "csc":
                nbytes = self._data.shape[0] * (self._data.dtype.itemsize + 8)
                if nbytes > CSC_LOAD_LIMIT:
                    raise InputError(
                        f"X is stored as CSC ({nbytes / 2**30:.1f} GiB), which cannot be read by "
                        "cells without loading it whole", field=field,
                        fix="convert to CSR first (adata.X = adata.X.tocsr(); adata.write_h5ad(...))")
                self._mem = sp.csc_matrix((self._data[:], self._indices[:], self._indptr[:]),
                                          shape=self.shape).tocsr()
            self.sparse = True
        elif enc in ("array", "") and hasattr(elem, "shape") and len(elem.shape) == 2:
            self.shape = tuple(int(s) for s in elem.shape)
            self._dense = elem
            self.sparse = False
        else:
            raise InputError(f"unsupported matrix encoding {enc!r}", field=field,
                             fix="store counts as a CSR/CSC sparse matrix or a dense array")

    def block(self, start: int, stop: int) -> sp.csr_matrix:
        if self._lazy is not None:
            m = self._lazy[start:stop].compute()
            return m.tocsr() if sp.issparse(m) else sp.csr_matrix(np.asarray(m))
        if self._mem is not None:
            m = self._mem[start:stop]
            return m if sp.issparse(m) else sp.csr_matrix(m)
        if not self.sparse:
            return sp.csr_matrix(np.asarray(self._dense[start:stop]))
        ip = np.asarray(self._indptr[start:stop + 1], dtype=np.int64)
        p0, p1 = int(ip[0]), int(ip[-1])
        data = np.asarray(self._data[p0:p1])
        ind = np.asarray(self._indices[p0:p1])
        return sp.csr_matrix((data, ind, ip - p0), shape=(stop - start, self.shape[1]))


def _read_elem(elem):
    from anndata.io import read_elem

    return read_elem(elem)


RAW = "raw.X"  # layer name selecting AnnData's raw.X (with raw.var's gene names)


def _matrix_elem(root, layer: str | None):
    """(matrix element, field name for errors, var element) of an on-disk AnnData."""
    if layer == RAW:
        if "raw" not in root or "X" not in root["raw"]:
            raise InputError("the file has no raw.X", field=RAW,
                             fix="pass layer=None for X or name a layer holding raw counts")
        return root["raw"]["X"], RAW, root["raw"]["var"]
    if layer is None:
        if "X" not in root:
            raise InputError("the file has no X matrix", field="X",
                             fix="name the layer holding raw counts with layer=")
        return root["X"], "X", root["var"]
    layers = root["layers"] if "layers" in root else {}
    if layer not in layers:
        raise InputError(f"no layer {layer!r}; available: {sorted(layers.keys())}",
                         field=f"layers[{layer!r}]",
                         fix=f"pass one of the available layers, layer='{RAW}' for raw.X, or "
                             "layer=None for X")
    return layers[layer], f"layers[{layer!r}]", root["var"]


# ---- the shared pipeline -------------------------------------------------------------------
def _prefetched(matrix: _Matrix, n: int, chunk_cells: int, first: int = 0
                ) -> Iterator[tuple[int, int, Any]]:
    """Blocks ``(start, stop, csr)`` from cell ``first`` on, reading block k+1 while block k is
    written (blocks end on multiples of ``chunk_cells``).

    Reading (h5py decompression) and writing (zarr compression) overlap; at most two blocks
    are in memory.
    """
    from concurrent.futures import ThreadPoolExecutor

    edges = [first, *range((first // chunk_cells + 1) * chunk_cells, n, chunk_cells), n]
    bounds = [(a, b) for a, b in zip(edges, edges[1:]) if b > a]
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="scdist-ingest-read") as pool:
        nxt = pool.submit(matrix.block, *bounds[0]) if bounds else None
        for i, (a, b) in enumerate(bounds):
            block = nxt.result()
            nxt = pool.submit(matrix.block, *bounds[i + 1]) if i + 1 < len(bounds) else None
            yield a, b, block


def _resolve_study(study_or_url, storage_options, overwrite: bool) -> tuple[Study | str, bool]:
    """Existing study (checked) or the location of a new one (not created yet)."""
    if isinstance(study_or_url, Study):
        study = study_or_url
    else:
        loc = _fs.normalize(study_or_url)
        fs, path = _fs.filesystem(loc, storage_options)
        if not fs.exists(f"{path}/zarr.json"):
            return loc, True
        study = open_study(loc, storage_options=storage_options)
    if study.has(layout.CELLS) and not overwrite:
        raise InputError(f"{study.url} already has cells ({study.n_cells} cells)",
                         field=layout.CELLS,
                         fix="pass overwrite=True to replace them, or ingest into a new store")
    return study, False


def _prepare_obs(obs: pd.DataFrame, *, donor_key, celltype_key, batch_key, covariates
                 ) -> pd.DataFrame:
    covariates = list(covariates)
    validate.check_obs(obs, donor_key=donor_key, celltype_key=celltype_key, batch_key=batch_key,
                       covariates=covariates)
    keys = {layout.OBS_DONOR: donor_key, layout.OBS_CELLTYPE: celltype_key}
    if batch_key is not None:
        keys[layout.OBS_BATCH] = batch_key
    clash = [c for c in covariates if c in (layout.OBS_DONOR, layout.OBS_CELLTYPE, layout.OBS_BATCH)]
    if clash:
        raise InputError(f"covariate column(s) {clash} would clash with scdist's standard obs "
                         "columns donor/celltype/batch", field=f"obs[{clash[0]!r}]",
                         fix="rename the column in obs before ingest")
    # categorical labels once for all cells: blocks are then cheap views of codes
    out = pd.DataFrame({std: _str_categorical(obs[key]) for std, key in keys.items()},
                       index=obs.index)
    for c in covariates:
        out[c] = obs[c].array
    return out


def _ingest(study_or_url, matrix: _Matrix, obs: pd.DataFrame, gene_names, *, donor_key,
            celltype_key, batch_key, covariates, chunk_cells, overwrite, storage_options,
            count_dtype, source: str, layer, progress=None, resume_key: str | None = None
            ) -> Study:
    n, g = matrix.shape
    if len(obs) != n:
        raise InputError(f"obs has {len(obs)} rows but the matrix has {n}", field="obs",
                         fix="the AnnData is inconsistent; rewrite it with anndata")
    if len(gene_names) != g:
        raise InputError(f"var has {len(gene_names)} genes but the matrix has {g}", field="var",
                         fix="the AnnData is inconsistent; rewrite it with anndata")
    genes = validate.check_gene_names(gene_names)
    std_obs = _prepare_obs(obs, donor_key=donor_key, celltype_key=celltype_key,
                           batch_key=batch_key, covariates=covariates)
    chunk_cells = int(chunk_cells)
    target, created = _resolve_study(study_or_url, storage_options, overwrite)
    study = create_study(target, storage_options=storage_options) if created else target
    source_keys = {layout.OBS_DONOR: donor_key, layout.OBS_CELLTYPE: celltype_key}
    if batch_key is not None:
        source_keys[layout.OBS_BATCH] = batch_key
    try:
        with CellWriter(study, genes, chunk_cells=chunk_cells, covariates=list(covariates),
                        source_keys=source_keys, count_dtype=count_dtype, field=matrix.field,
                        resume_key=resume_key) as w:
            if w.n_cells and progress is not None:  # resumed: these cells are already written
                progress(w.n_cells)
            for start, stop, block in _prefetched(matrix, n, chunk_cells, w.n_cells):
                w.append(block, std_obs.iloc[start:stop])
                if progress is not None:
                    progress(stop - start)
    except BaseException as exc:
        if created and not (resume_key and not isinstance(exc, InputError)):
            fs, path = _fs.filesystem(study.url, storage_options)
            fs.rm(path, recursive=True)
        raise
    study.add_provenance("ingest", {"donor_key": donor_key, "celltype_key": celltype_key,
                                    "batch_key": batch_key, "covariates": list(covariates),
                                    "layer": layer, "chunk_cells": chunk_cells},
                         [source])
    return study


_DOC_COMMON = """
    donor_key, celltype_key, batch_key : obs columns with the donor (sample) id ``i``, the
        cell type ``c`` and the batch; stored as ``donor``, ``celltype``, ``batch``
        (one batch when ``batch_key`` is None). Original names go to ``cells`` attrs.
    covariates : donor-level obs columns (constant within donor), stored in obs and listed
        in ``study.donor_covariates``.
    layer : layer holding raw counts (default X; ``"raw.X"`` for AnnData's ``raw``, with
        its own genes). Counts must be integer-valued and >= 0.
    chunk_cells : cells per block read and per chunk of the stored X.
    overwrite : replace existing cells in the store (otherwise an error).
    progress : optional callable, called with the number of cells after each block.
    Returns the :class:`Study`."""


def ingest_h5ad(study_or_url, path: str | os.PathLike, *, donor_key: str, celltype_key: str,
                batch_key: str | None = None, covariates: Sequence[str] = (),
                layer: str | None = None, chunk_cells: int = DEFAULT_CHUNK_CELLS,
                overwrite: bool = False, storage_options: dict | None = None,
                count_dtype="int32", progress=None, resume: bool = True) -> Study:
    import h5py

    path = os.fspath(path)
    if not os.path.exists(path):
        raise InputError(f"no such file: {path}", field="path", fix="check the .h5ad path")
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise InputError(f"{path} is not a readable .h5ad (HDF5) file: {exc}", field="path",
                         fix="pass an AnnData .h5ad file (for .zarr use ingest_zarr)") from exc
    with f:
        elem, field, var_elem = _matrix_elem(f, layer)
        matrix = _Matrix(elem, field)
        obs, var = _read_elem(f["obs"]), _read_elem(var_elem)
        key = _resume_key(path, donor_key, celltype_key, batch_key, list(covariates), layer,
                          int(chunk_cells), str(np.dtype(count_dtype))) if resume else None
        return _ingest(study_or_url, matrix, obs, var.index.to_numpy(), donor_key=donor_key,
                       celltype_key=celltype_key, batch_key=batch_key, covariates=covariates,
                       chunk_cells=chunk_cells, overwrite=overwrite,
                       storage_options=storage_options, count_dtype=count_dtype,
                       source=os.path.abspath(path), layer=layer, progress=progress,
                       resume_key=key)


def _resume_key(path: str, *params) -> str:
    """Names an ingest of this file (path, size, modification time) with these parameters."""
    import hashlib
    import json

    st = os.stat(path)
    ident = [os.path.abspath(path), st.st_size, st.st_mtime_ns, *params]
    return hashlib.sha256(json.dumps(ident, default=str).encode()).hexdigest()[:24]


def ingest_zarr(study_or_url, path: str | os.PathLike, *, donor_key: str, celltype_key: str,
                batch_key: str | None = None, covariates: Sequence[str] = (),
                layer: str | None = None, chunk_cells: int = DEFAULT_CHUNK_CELLS,
                overwrite: bool = False, storage_options: dict | None = None,
                source_storage_options: dict | None = None, count_dtype="int32",
                progress=None) -> Study:
    import zarr

    loc = _fs.normalize(path)
    try:
        root = zarr.open_group(store=loc, mode="r", **_fs.zarr_kwargs(loc, source_storage_options))
    except (FileNotFoundError, ValueError, KeyError) as exc:
        raise InputError(f"{loc} is not a readable AnnData .zarr: {exc}", field="path",
                         fix="pass a directory written by AnnData.write_zarr") from exc
    if "obs" not in root or "var" not in root:
        raise InputError(f"{loc} has no obs/var: not an AnnData .zarr", field="path",
                         fix="pass a directory written by AnnData.write_zarr")
    elem, field, var_elem = _matrix_elem(root, layer)
    matrix = _Matrix(elem, field)
    obs, var = _read_elem(root["obs"]), _read_elem(var_elem)
    return _ingest(study_or_url, matrix, obs, var.index.to_numpy(), donor_key=donor_key,
                   celltype_key=celltype_key, batch_key=batch_key, covariates=covariates,
                   chunk_cells=chunk_cells, overwrite=overwrite, storage_options=storage_options,
                   count_dtype=count_dtype, source=loc, layer=layer, progress=progress)


def ingest_anndata(study_or_url, adata=None, *, donor_key: str, celltype_key: str,
                   batch_key: str | None = None, covariates: Sequence[str] = (),
                   layer: str | None = None, chunk_cells: int = DEFAULT_CHUNK_CELLS,
                   overwrite: bool = False, storage_options: dict | None = None,
                   count_dtype="int32", progress=None) -> Study:
    import anndata as ad

    if isinstance(study_or_url, ad.AnnData):  # also accept ingest_anndata(adata, store)
        study_or_url, adata = adata, study_or_url
    if not isinstance(adata, ad.AnnData):
        raise InputError(f"expected an AnnData, got {type(adata).__name__}", field="adata",
                         fix="pass an anndata.AnnData (for files use ingest_h5ad / ingest_zarr)")
    if study_or_url is None:
        raise InputError("no store given", field="store", fix="pass a path or URL for the store")
    genes = adata.var_names
    if layer == RAW:
        if adata.raw is None:
            raise InputError("adata.raw is not set", field=RAW,
                             fix="pass layer=None for X or name a layer holding raw counts")
        x, field, genes = adata.raw.X, RAW, adata.raw.var_names
    elif layer is None:
        if adata.X is None:
            raise InputError("adata.X is empty", field="X", fix="pass layer= naming the counts")
        x, field = adata.X, "X"
    else:
        if layer not in adata.layers:
            raise InputError(f"no layer {layer!r}; available: {sorted(adata.layers.keys())}",
                             field=f"layers[{layer!r}]", fix="pass one of the available layers")
        x, field = adata.layers[layer], f"layers[{layer!r}]"
    if adata.isbacked and not sp.issparse(x) and not isinstance(x, np.ndarray):
        x = x.group if hasattr(x, "group") else x  # backed sparse dataset: stream its arrays
    matrix = _Matrix(x, field)
    return _ingest(study_or_url, matrix, adata.obs, genes.to_numpy(),
                   donor_key=donor_key, celltype_key=celltype_key, batch_key=batch_key,
                   covariates=covariates, chunk_cells=chunk_cells, overwrite=overwrite,
                   storage_options=storage_options, count_dtype=count_dtype,
                   source=f"AnnData({adata.n_obs} x {adata.n_vars})", layer=layer,
                   progress=progress)


ingest_h5ad.__doc__ = ("Ingest an .h5ad file into the study (read by blocks of cells; bounded "
                       "memory).\n" + _DOC_COMMON + """

    resume : an ingest of the same file (path, size, modification time) with the same
        parameters that was interrupted (exception, killed process) continues after its last
        complete chunk of cells instead of starting again; the result is byte-for-byte the
        same. Its partial copy waits in ``_scdist_tmp/cells-resume-<key>`` (removed by
        ``study.clean_tmp()``). Bad input (InputError) discards it. ``False``: always start
        from the first cell.""")
ingest_zarr.__doc__ = ("Ingest an AnnData .zarr directory (Zarr v2 or v3; path or fsspec URL, "
                       "``source_storage_options`` for its credentials).\n" + _DOC_COMMON)
ingest_anndata.__doc__ = ("Ingest an in-memory AnnData (``ingest_anndata(store, adata, ...)``; "
                          "``ingest_anndata(adata, store, ...)`` also works).\n" + _DOC_COMMON)


# ---- bulk ----------------------------------------------------------------------------------
def _read_bulk_table(source, orientation: str, layer: str | None) -> tuple[np.ndarray, list, list]:
    """(counts samples × genes, sample names, gene names) from a table, AnnData or file."""
    import anndata as ad

    if orientation not in ("genes_x_samples", "samples_x_genes"):
        raise InputError(f"unknown orientation {orientation!r}", field="orientation",
                         fix="use 'genes_x_samples' (rows are genes) or 'samples_x_genes'")
    if isinstance(source, (str, os.PathLike)):
        p = os.fspath(source)
        if not os.path.exists(p):
            raise InputError(f"no such file: {p}", field="bulk", fix="check the bulk counts path")
        low = p.lower().removesuffix(".gz").removesuffix(".bz2").removesuffix(".xz")
        if low.endswith(".h5ad"):
            source = ad.read_h5ad(p)
        elif low.endswith(".zarr"):
            source = ad.read_zarr(p)
        else:
            sep = "\t" if low.endswith((".tsv", ".txt", ".tab")) else ","
            try:
                source = pd.read_csv(p, sep=sep, index_col=0)
            except (ValueError, pd.errors.ParserError) as exc:
                raise InputError(f"cannot parse {p} as a table: {exc}", field="bulk",
                                 fix="pass a CSV/TSV with gene (or sample) names in the first "
                                     "column and a header row") from exc
    if isinstance(source, ad.AnnData):  # AnnData convention: obs = samples, var = genes
        x = source.X if layer is None else source.layers[layer]
        x = x.toarray() if sp.issparse(x) else np.asarray(x)
        return x, list(source.obs_names), list(source.var_names)
    if isinstance(source, pd.DataFrame):
        df = source if orientation == "samples_x_genes" else source.T
        non_num = [c for c in df.columns if not pd.api.types.is_numeric_dtype(df[c])]
        if non_num:
            raise InputError(f"{len(non_num)} gene columns are not numeric (e.g. {non_num[0]!r})",
                             field="bulk", fix="the table must hold only counts besides the "
                                               "first (name) column; check orientation")
        return df.to_numpy(), list(df.index), list(df.columns)
    raise InputError(f"unsupported bulk source {type(source).__name__}", field="bulk",
                     fix="pass a CSV/TSV path, a pandas DataFrame, an AnnData or an .h5ad path")


def ingest_bulk(study, source, *, orientation: str = "genes_x_samples",
                layer: str | None = None, true_W: pd.DataFrame | None = None,
                storage_options: dict | None = None) -> dict:
    """Ingest bulk RNA-seq counts into ``bulk/`` as ``counts(bulk_sample, gene)`` (int64).

    ``source``: CSV/TSV path (first column = names; ``orientation`` says whether rows are
    genes — the usual ``genes_x_samples`` — or samples), a DataFrame (same orientation
    rule), an AnnData or an .h5ad/.zarr path (obs = samples, var = genes). Genes are
    intersected with the single-cell genes (single-cell order kept); only shared genes
    are stored. ``true_W`` (samples × cell types, e.g. known proportions for benchmarks) is
    stored as ``true_W(bulk_sample, celltype)``. Returns the gene report (also in
    ``bulk`` attrs ``gene_report``): ``n_kept``, ``n_dropped_sc``, ``n_dropped_bulk`` and the
    dropped names. Replaces an existing ``bulk/``.
    """
    import xarray as xr

    from .results import strings_to_object

    if not isinstance(study, Study):
        study = open_study(study, storage_options=storage_options)
    if not study.has(layout.CELLS):
        raise InputError("the store has no single-cell data to match bulk genes against",
                         field=layout.CELLS, fix="ingest the single-cell AnnData first")
    x, samples, genes = _read_bulk_table(source, orientation, layer)
    validate.check_counts(x.ravel(), "bulk counts")
    genes = validate.check_gene_names(genes, field="bulk genes")
    samples = pd.Index(np.asarray(samples, dtype=object).astype(str))
    if len(samples) == 0:
        raise InputError("no bulk samples", field="bulk", fix="pass at least one sample")
    if samples.has_duplicates:
        raise InputError(f"bulk sample names are not unique: {list(samples[samples.duplicated()][:5])}",
                         field="bulk samples", fix="give every bulk sample a unique name")
    report = validate.intersect_genes(study.gene_names, genes)
    col = pd.Index(genes).get_indexer(report["kept"])
    counts = np.asarray(x[:, col]).astype(np.int64)
    ds = xr.Dataset({"counts": (("bulk_sample", "gene"), counts)},
                    coords={"bulk_sample": samples.to_numpy(dtype=object),
                            "gene": np.asarray(report["kept"], dtype=object)})
    if true_W is not None:
        w = pd.DataFrame(true_W)
        missing = samples.difference(w.index.astype(str))
        if len(missing):
            raise InputError(f"true_W lacks {len(missing)} bulk samples (e.g. {missing[0]!r})",
                             field="true_W", fix="index true_W by bulk sample name")
        w.index = w.index.astype(str)
        w = w.loc[samples]
        ds["true_W"] = (("bulk_sample", "celltype"), w.to_numpy(dtype=float))
        ds = ds.assign_coords(celltype=np.asarray(w.columns.astype(str), dtype=object))
    summary = {k: v for k, v in report.items() if k.startswith("n_")}
    ds.attrs["gene_report"] = {**summary, "dropped_sc": report["dropped_sc"],
                               "dropped_bulk": report["dropped_bulk"]}
    ds.attrs["orientation"] = orientation
    tmp = f"{TMP_DIR}/{layout.BULK}-{os.urandom(8).hex()}"
    try:
        strings_to_object(ds).to_zarr(_fs.normalize(study.group_url(tmp)), mode="w",
                                      consolidated=False, zarr_format=3,
                                      **_fs.zarr_kwargs(study.url, study.storage_options))
        replace_group(study, tmp, layout.BULK)
    except BaseException:
        remove_tmp(study, tmp)
        raise
    study.add_provenance("ingest_bulk", {"orientation": orientation, "layer": layer,
                                         **summary},
                         [os.fspath(source) if isinstance(source, (str, os.PathLike))
                          else type(source).__name__])
    return {**report}
