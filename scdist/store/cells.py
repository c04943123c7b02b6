"""``cells/``: cell × gene counts as AnnData-on-Zarr (Zarr format 3), written chunk by chunk.

Layout (anndata's documented on-disk encoding, so ``anndata.read_zarr(<store>/cells)`` and
``anndata.io.read_elem`` read it back)::

    cells/              attrs: encoding-type=anndata, source_keys, donor_covariates, chunk_cells
      X/                CSR: data (integer counts), indices (int32), indptr (int64);
                        attrs encoding-type=csr_matrix, shape=[n_cells, n_genes]
      obs/              DataFrame: donor, celltype, batch (categorical) + covariate columns
      var/              DataFrame indexed by gene name
      obsm/ varm/ obsp/ varp/ layers/ uns/   empty

X's rows are read in the blocks listed by ``cell_chunks`` (``chunk_cells`` rows each), and
indptr is chunked the same way, so a reader touches only the rows it needs.

:class:`CellWriter` writes into a temporary group beside ``cells/`` and moves it into place
only when it closes successfully (so ``cells/`` exists only when complete: it carries no
completion markers, which would also break ``anndata.read_zarr``); an error (or an exception in its ``with`` block) deletes
the temporary group and leaves the store exactly as it was.
"""
from __future__ import annotations

import uuid
from typing import Mapping, Sequence

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
import zarr
from anndata.io import read_elem, write_elem

from ..errors import InputError
from . import _fs, layout, validate

DEFAULT_CHUNK_CELLS = 10_000
NNZ_CHUNK = 1 << 19  # stored entries per chunk of X/data and X/indices (2 MiB of int32)


def _x_compressors():
    # Blosc lz4 + bit-shuffle: on counts/indices here it wrote 2-4x faster and read faster
    # than zarr's default zstd, at a similar size (benchmarks/bench_ingest.py).
    from zarr.codecs import BloscCodec

    return [BloscCodec(cname="lz4", clevel=5, shuffle="bitshuffle")]
TMP_DIR = "_scdist_tmp"
OBS_STANDARD = (layout.OBS_DONOR, layout.OBS_CELLTYPE, layout.OBS_BATCH)
DEFAULT_BATCH = "batch0"


def _write_elem(group, key, value):
    # Explicitly unsharded: concurrent writers rely on chunk == unit of write.
    with ad.settings.override(auto_shard_zarr_v3=False):
        write_elem(group, key, value)


class _ChunkAppender:
    """Append to a 1-d zarr array in whole chunks (each chunk compressed once, never rewritten).

    Values are buffered until at least one chunk is full; :meth:`flush` writes the rest.
    """

    def __init__(self, arr: zarr.Array):
        self.arr = arr
        self.chunk = arr.chunks[0]
        self.size = arr.shape[0]
        self._buf: list[np.ndarray] = []
        self._n = 0

    def push(self, values: np.ndarray) -> None:
        if values.size:
            self._buf.append(values)
            self._n += values.size
        if self._n >= self.chunk:
            self._write(self._n // self.chunk * self.chunk)

    def flush(self) -> None:
        if self._n:
            self._write(self._n)

    def _write(self, n: int) -> None:
        buf = np.concatenate(self._buf) if len(self._buf) > 1 else self._buf[0]
        self.arr.resize((self.size + n,))
        self.arr[self.size:self.size + n] = buf[:n]
        self.size += n
        rest = buf[n:]
        self._buf = [rest] if rest.size else []
        self._n = rest.size


def _str_categorical(col: pd.Series) -> pd.Categorical:
    """Labels as a Categorical with string categories (no per-cell string copies)."""
    if isinstance(col.dtype, pd.CategoricalDtype):
        cats = col.cat.categories
        if cats.dtype != object or pd.api.types.infer_dtype(cats) != "string":
            cats = pd.Index(cats.astype(str), dtype=object)
        if cats.is_unique:
            return pd.Categorical.from_codes(col.cat.codes.to_numpy(), cats)
    return pd.Categorical(np.asarray(col).astype(str).astype(object))


def _concat_categoricals(parts: list[pd.Categorical]) -> pd.Categorical:
    return pd.api.types.union_categoricals(parts) if len(parts) > 1 else parts[0]


def replace_group(study, src: str, dst: str) -> None:
    """Move the store's group ``src`` to ``dst`` (replacing ``dst``), then tidy ``src``'s parent."""
    fs, root = _fs.filesystem(study.url, study.storage_options)
    s, d = f"{root}/{src}", f"{root}/{dst}"
    if fs.exists(d):
        fs.rm(d, recursive=True)
    fs.mv(s, d, recursive=True)
    _tidy_tmp(fs, root)


def remove_tmp(study, path: str) -> None:
    """Delete a temporary group of the store (and the temp folder if it is now empty)."""
    fs, root = _fs.filesystem(study.url, study.storage_options)
    p = f"{root}/{path}"
    if fs.exists(p):
        fs.rm(p, recursive=True)
    _tidy_tmp(fs, root)


def _tidy_tmp(fs, root: str) -> None:
    t = f"{root}/{TMP_DIR}"
    try:
        left = [n for n in fs.ls(t, detail=False) if not n.rstrip("/").endswith("zarr.json")]
    except FileNotFoundError:
        return
    if not left:
        fs.rm(t, recursive=True)


class CellWriter:
    """Append chunks of cells to a study's ``cells/`` group; publish at :meth:`close`.

    Parameters
    ----------
    study : Study
        Target store (an existing ``cells/`` is replaced only when the writer closes).
    gene_names : sequence of str
        Gene (column) names, unique.
    chunk_cells : int
        Rows per chunk of X (the unit later stages map over).
    covariates : sequence of str
        Donor-level covariate columns expected in every ``obs`` chunk (stored in obs; the
        list becomes ``study.donor_covariates``).
    source_keys : mapping
        The user's original obs key names, e.g. ``{"donor": "indiv", "celltype": "cell_type"}``,
        stored in ``cells`` attrs.
    count_dtype : numpy integer dtype of the stored counts.
    field : name of the counts in error messages (e.g. ``"layers['counts']"``).

    Use as a context manager; ``append(counts, obs)`` takes a cells × genes matrix (scipy
    sparse or dense, integer-valued) and a DataFrame with columns ``donor``, ``celltype``,
    optionally ``batch`` (a single batch ``"batch0"`` when absent) and the covariates.
    """

    def __init__(self, study, gene_names: Sequence[str], *, chunk_cells: int = DEFAULT_CHUNK_CELLS,
                 covariates: Sequence[str] = (), source_keys: Mapping[str, str] | None = None,
                 count_dtype="int32", field: str = "X"):
        if int(chunk_cells) < 1:
            raise InputError(f"chunk_cells must be >= 1, got {chunk_cells}", field="chunk_cells",
                             fix="use e.g. 10000")
        self.study = study
        self.gene_names = validate.check_gene_names(gene_names)
        self.chunk_cells = int(chunk_cells)
        self.covariates = [str(c) for c in covariates]
        bad = [c for c in self.covariates if c in OBS_STANDARD]
        if bad:
            raise InputError(f"covariate names {bad} clash with the standard obs columns",
                             field="covariates", fix="rename those covariate columns")
        self.source_keys = dict(source_keys or {})
        self.count_dtype = np.dtype(count_dtype)
        if self.count_dtype.kind not in "iu":
            raise InputError(f"count_dtype must be an integer dtype, got {self.count_dtype}",
                             field="count_dtype", fix="use 'int32' or 'int64'")
        self.field = field
        self.n_cells = 0
        self.nnz = 0
        self._obs: list[dict] = []
        self._tmp = f"{TMP_DIR}/{layout.CELLS}-{uuid.uuid4().hex}"
        self._closed = False
        n_genes = len(self.gene_names)
        self._group = zarr.open_group(store=study.group_url(self._tmp), mode="w", zarr_format=3,
                                      **_fs.zarr_kwargs(study.url, study.storage_options))
        x = self._group.create_group("X")
        x.attrs.update({"encoding-type": "csr_matrix", "encoding-version": "0.1.0",
                        "shape": [0, n_genes]})
        comp = _x_compressors()
        self._data = x.create_array("data", shape=(0,), dtype=self.count_dtype,
                                    chunks=(NNZ_CHUNK,), compressors=comp)
        self._indices = x.create_array("indices", shape=(0,), dtype="int32", chunks=(NNZ_CHUNK,),
                                       compressors=comp)
        self._indptr = x.create_array("indptr", shape=(1,), dtype="int64",
                                      chunks=(self.chunk_cells,), compressors=comp)
        self._indptr[:] = np.zeros(1, dtype="int64")
        self._out = [_ChunkAppender(a) for a in (self._data, self._indices, self._indptr)]

    # ---- context manager ----------------------------------------------------------------
    def __enter__(self) -> "CellWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    # ---- writing ------------------------------------------------------------------------
    def append(self, counts, obs: pd.DataFrame) -> None:
        """Append a block of cells: ``counts`` (cells × genes) and its ``obs`` rows."""
        if self._closed:
            raise RuntimeError("CellWriter is closed")
        try:
            self._append(counts, obs)
        except BaseException:
            self.abort()
            raise

    def _append(self, counts, obs: pd.DataFrame) -> None:
        m = sp.csr_matrix(counts) if not sp.issparse(counts) else counts.tocsr()
        n, g = m.shape
        where = f"cells {self.n_cells}-{self.n_cells + n - 1}"
        if g != len(self.gene_names):
            raise InputError(f"a block has {g} genes but {len(self.gene_names)} gene names were "
                             f"given ({where})", field=self.field,
                             fix="pass blocks with one column per gene name")
        if len(obs) != n:
            raise InputError(f"obs block has {len(obs)} rows for {n} cells ({where})",
                             field="obs", fix="pass one obs row per cell")
        need = [layout.OBS_DONOR, layout.OBS_CELLTYPE, *self.covariates]
        missing = [c for c in need if c not in obs.columns]
        if missing:
            raise InputError(f"obs block lacks columns {missing} ({where})", field="obs",
                             fix=f"pass obs with columns {need} (batch optional)")
        validate.check_counts(m.data, self.field, where=where,
                              max_value=int(np.iinfo(self.count_dtype).max))
        if not m.has_canonical_format:
            m = m.copy()
            m.sum_duplicates()
        data, indices, indptr = self._out
        data.push(m.data.astype(self.count_dtype, copy=False))
        indices.push(m.indices.astype("int32", copy=False))
        indptr.push(m.indptr[1:].astype("int64") + self.nnz)
        block = {"index": obs.index}  # a view; converted to str once, at close
        for c in (*OBS_STANDARD, *self.covariates):
            if c in obs.columns:
                col = obs[c]
                block[c] = _str_categorical(col) if c in OBS_STANDARD else col.to_numpy()
        self._obs.append(block)
        self.n_cells += n
        self.nnz += m.nnz

    def abort(self) -> None:
        """Discard everything written so far; the store is left as it was."""
        if self._closed:
            return
        self._closed = True
        remove_tmp(self.study, self._tmp)

    def close(self) -> None:
        """Finish obs/var/metadata, check donor-level consistency, move into ``cells/``."""
        if self._closed:
            return
        try:
            self._finish()
        except BaseException:
            self.abort()
            raise
        self._closed = True
        replace_group(self.study, self._tmp, layout.CELLS)
        self.study._invalidate()

    def _finish(self) -> None:
        if self.n_cells == 0:
            raise InputError("no cells were written", field="obs",
                             fix="pass at least one block of cells")
        for appender in self._out:
            appender.flush()
        blocks, self._obs = self._obs, []
        index = pd.Index(np.concatenate([np.asarray(b.pop("index"), dtype=object) for b in blocks]),
                         dtype=object)
        if pd.api.types.infer_dtype(index, skipna=False) != "string":
            index = index.astype(str).astype(object)
        cols: dict[str, object] = {}
        for c in OBS_STANDARD:
            present = sum(c in b for b in blocks)
            if present == len(blocks):
                cols[c] = _concat_categoricals([b.pop(c) for b in blocks])
            elif present:
                raise InputError(f"obs column {c!r} is in {present} of {len(blocks)} blocks",
                                 field=f"obs[{c!r}]", fix="pass it in every block or in none")
            else:  # only batch can be absent (checked in append)
                cols[c] = pd.Categorical.from_codes(np.zeros(len(index), "int8"), [DEFAULT_BATCH])
        for c in self.covariates:
            parts = [b.pop(c) for b in blocks]
            if any(isinstance(p, pd.Categorical) for p in parts) or any(
                    p.dtype == object or p.dtype.kind in "US" for p in parts):
                cols[c] = pd.Categorical(np.concatenate([np.asarray(p, dtype=object) for p in parts]
                                                        ).astype(str))
            else:
                cols[c] = np.concatenate(parts)
        del blocks
        obs = pd.DataFrame(cols, index=index)
        validate.check_obs(obs, donor_key=layout.OBS_DONOR, celltype_key=layout.OBS_CELLTYPE,
                           batch_key=layout.OBS_BATCH, covariates=self.covariates)
        if obs.index.has_duplicates:  # as AnnData.obs_names_make_unique: 'a', 'a-1', ...
            obs.index = ad.utils.make_index_unique(obs.index)
        g = self._group
        g["X"].attrs["shape"] = [self.n_cells, len(self.gene_names)]
        _write_elem(g, "obs", obs)
        _write_elem(g, "var", pd.DataFrame(index=pd.Index(self.gene_names, dtype=object)))
        for k in ("obsm", "varm", "obsp", "varp", "layers", "uns"):
            _write_elem(g, k, {})
        g.attrs.update({"encoding-type": "anndata", "encoding-version": "0.1.0",
                        "source_keys": self.source_keys, "donor_covariates": self.covariates,
                        "chunk_cells": self.chunk_cells, "count_dtype": str(self.count_dtype)})


class CellsReader:
    """Read side of ``cells/`` (used by :class:`scdist.store.Study`)."""

    def __init__(self, group: zarr.Group):
        self.group = group
        x = group["X"]
        self._data, self._indices, self._indptr = x["data"], x["indices"], x["indptr"]
        self.n_cells, self.n_genes = (int(v) for v in x.attrs["shape"])
        attrs = group.attrs
        self.chunk_cells = int(attrs.get("chunk_cells", DEFAULT_CHUNK_CELLS))
        self.donor_covariates = list(attrs.get("donor_covariates", []))
        self.source_keys = dict(attrs.get("source_keys", {}))
        self._genes = None
        self._obs = None

    @property
    def gene_names(self) -> np.ndarray:
        if self._genes is None:
            self._genes = read_elem(self.group["var"]).index.to_numpy(dtype=object)
        return self._genes

    @property
    def cell_chunks(self) -> list[tuple[int, int]]:
        c, n = self.chunk_cells, self.n_cells
        return [(s, min(s + c, n)) for s in range(0, n, c)]

    def obs(self) -> pd.DataFrame:
        if self._obs is None:
            self._obs = read_elem(self.group["obs"])
        return self._obs.copy()

    def _gene_index(self, genes) -> np.ndarray:
        g = np.asarray(genes)
        if g.dtype.kind == "b":
            if g.shape != (self.n_genes,):
                raise InputError(f"gene mask has length {g.size}, expected {self.n_genes}",
                                 field="genes", fix="pass a mask with one entry per gene")
            return np.flatnonzero(g)
        if g.dtype.kind in "iu":
            if g.size and (g.min() < -self.n_genes or g.max() >= self.n_genes):
                raise InputError("gene index out of range", field="genes",
                                 fix=f"use positions in [0, {self.n_genes})")
            return g
        pos = pd.Index(self.gene_names).get_indexer(g.astype(str))
        if (pos < 0).any():
            raise InputError(f"unknown genes: {list(g[pos < 0][:5])}", field="genes",
                             fix="use names from study.gene_names")
        return pos

    def read_counts(self, start: int, stop: int, genes=None) -> sp.csr_matrix:
        start, stop = int(start), int(stop)
        if not 0 <= start <= stop <= self.n_cells:
            raise InputError(f"cell range {start}:{stop} is outside 0:{self.n_cells}",
                             field="start/stop", fix="use a range from study.cell_chunks")
        ip = self._indptr[start:stop + 1]
        p0, p1 = int(ip[0]), int(ip[-1])
        data = self._data[p0:p1] if p1 > p0 else np.zeros(0, self._data.dtype)
        ind = self._indices[p0:p1] if p1 > p0 else np.zeros(0, "int32")
        m = sp.csr_matrix((data, ind, ip - p0), shape=(stop - start, self.n_genes))
        if genes is not None:
            m = m[:, self._gene_index(genes)]
        return m
