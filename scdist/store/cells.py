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
indptr is chunked the same way, so a reader touches only the rows it needs. obs is streamed
too: its index and every column are resizable arrays chunked by ``chunk_cells`` (categorical
columns as int32 codes, their categories written at close), appended as blocks arrive.

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
from . import _fs, layout, markers, validate

DEFAULT_CHUNK_CELLS = 10_000
NNZ_CHUNK = 1 << 19  # stored entries per chunk of X/data and X/indices (2 MiB of int32)


def _x_compressors():
    # Blosc lz4 + bit-shuffle: on counts/indices here it wrote 2-4x faster and read faster
    # than zarr's default zstd, at a similar size (benchmarks/bench_ingest.py).
    from zarr.codecs import BloscCodec

    return [BloscCodec(cname="lz4", clevel=5, shuffle="bitshuffle")]
TMP_DIR = "_scdist_tmp"
RESUME_PREFIX = "resume-"  # temporary group of a resumable writer: cells-resume-<key>
OBS_CODES_DTYPE = "int32"  # categorical codes: the number of categories is not known up front
_ARRAY_ATTRS = {"encoding-type": "array", "encoding-version": "0.2.0"}
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

    def truncate(self, length: int) -> None:
        """Resume at ``length`` values: drop what follows, re-buffer the last partial chunk.

        Only values below the durable size (whole chunks written before a resume marker)
        are read back; the chunks after them are rewritten with the same bytes later.
        """
        base = length // self.chunk * self.chunk
        tail = np.asarray(self.arr[base:length]) if length > base else None
        if tail is not None and tail.dtype.kind == "T":  # zarr's StringDType -> object, as pushed
            tail = tail.astype(object)
        self.arr.resize((base,))
        self.size = base
        self._buf = [tail] if tail is not None else []
        self._n = 0 if tail is None else tail.size

    def _write(self, n: int) -> None:
        buf = np.concatenate(self._buf) if len(self._buf) > 1 else self._buf[0]
        self.arr.resize((self.size + n,))
        self.arr[self.size:self.size + n] = buf[:n]
        self.size += n
        rest = buf[n:].copy()  # a view would keep the whole concatenated buffer alive
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


class _Categories:
    """Categories seen so far, in order of first appearance among the blocks' category lists.

    This is the order :func:`pandas.api.types.union_categoricals` gives the concatenation
    (unused categories of a block included), so streaming keeps the codes one
    whole-table concatenation would have.
    """

    def __init__(self, labels: Sequence[str] = ()):
        self.labels = pd.Index(np.asarray(list(labels), dtype=object), dtype=object)

    def __len__(self) -> int:
        return len(self.labels)

    def codes(self, cat: pd.Categorical) -> np.ndarray:
        """Global codes (int32) of a block's Categorical; new categories are appended."""
        cats = pd.Index(np.asarray(cat.categories, dtype=object), dtype=object)
        pos = self.labels.get_indexer(cats)
        new = pos < 0
        if new.any():
            pos[new] = len(self.labels) + np.arange(int(new.sum()))
            self.labels = self.labels.append(cats[new])
        codes = np.asarray(cat.codes)
        return np.where(codes < 0, -1, pos[np.maximum(codes, 0)]).astype(OBS_CODES_DTYPE)


class _ObsColumn:
    """One obs column streamed into ``obs/<name>``: numeric values, or categorical codes.

    Categorical columns become anndata's categorical encoding (``codes`` appended chunk by
    chunk, ``categories`` written by :meth:`finish`); numeric and boolean ones an array.
    """

    def __init__(self, obs_group: zarr.Group, name: str, first: pd.Series, chunk: int,
                 *, categorical: bool, sort_categories: bool = False):
        self.name = name
        self.categorical = categorical
        self.sort_categories = sort_categories
        if categorical:
            g = obs_group.create_group(name)
            g.attrs.update({"encoding-type": "categorical", "encoding-version": "0.2.0",
                            "ordered": False})
            self.group = g
            self.cats = _Categories()
            arr = g.create_array("codes", shape=(0,), dtype=OBS_CODES_DTYPE, chunks=(chunk,))
        else:
            self.dtype = np.dtype(_numeric_values(first, name).dtype)
            arr = obs_group.create_array(name, shape=(0,), dtype=self.dtype, chunks=(chunk,))
        arr.attrs.update(_ARRAY_ATTRS)
        self.out = _ChunkAppender(arr)

    @classmethod
    def reopen(cls, obs_group: zarr.Group, name: str, *, sort_categories: bool,
               labels: Sequence[str] | None) -> "_ObsColumn":
        """The column of an interrupted writer (its categories from the resume marker)."""
        self = cls.__new__(cls)
        self.name, self.sort_categories = name, sort_categories
        node = obs_group[name]
        self.categorical = isinstance(node, zarr.Group)
        if self.categorical:
            self.group, self.cats = node, _Categories(labels or ())
            self.out = _ChunkAppender(node["codes"])
        else:
            self.dtype = np.dtype(node.dtype)
            self.out = _ChunkAppender(node)
        return self

    def values(self, col: pd.Series) -> np.ndarray:
        """The block's values as stored (global codes, or numbers in the first block's dtype)."""
        if self.categorical:
            cat = _str_categorical(col)
            if self.sort_categories:  # covariates: used labels only, as pd.Categorical(column)
                cat = cat.remove_unused_categories()
            return self.cats.codes(cat)
        v = _numeric_values(col, self.name)
        if not np.can_cast(v.dtype, self.dtype, casting="same_kind"):
            raise InputError(f"obs column {self.name!r} has dtype {v.dtype} in a later block but "
                             f"{self.dtype} in the first", field=f"obs[{self.name!r}]",
                             fix="give the column one dtype in every block")
        return v.astype(self.dtype, copy=False)

    def finish(self) -> None:
        """Flush; write the categories (sorted, codes remapped chunk by chunk, if asked)."""
        self.out.flush()
        if not self.categorical:
            return
        labels = self.cats.labels
        if self.sort_categories and not labels.is_monotonic_increasing:
            order = np.argsort(labels.to_numpy(dtype=str), kind="stable")
            remap = np.empty(len(order), OBS_CODES_DTYPE)
            remap[order] = np.arange(len(order), dtype=OBS_CODES_DTYPE)
            arr = self.out.arr
            step = arr.chunks[0]
            for a in range(0, arr.shape[0], step):  # a chunk at a time: memory stays flat
                arr[a:a + step] = remap[arr[a:a + step]]
            labels = labels[order]
        _write_elem(self.group, "categories", labels.to_numpy(dtype=object))


def _numeric_values(col: pd.Series, name: str) -> np.ndarray:
    dt = col.dtype
    if isinstance(dt, pd.api.extensions.ExtensionDtype) and hasattr(dt, "numpy_dtype"):
        return col.to_numpy(dtype=dt.numpy_dtype)  # nullable Int64/boolean (NA checked before)
    v = np.asarray(col)
    if v.dtype.kind not in "biuf":
        raise InputError(f"obs column {name!r} holds {v.dtype} values in a later block but "
                         "numbers in the first", field=f"obs[{name!r}]",
                         fix="give the column one type (all numbers or all labels) in every block")
    return v


def _is_label_column(col: pd.Series) -> bool:
    dt = col.dtype
    return (isinstance(dt, pd.CategoricalDtype) or dt == object or pd.api.types.is_string_dtype(dt)
            or np.dtype(getattr(dt, "numpy_dtype", dt)).kind not in "biuf")


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

    Memory does not grow with the number of cells: counts and every obs column (the index,
    categorical codes, numbers) are appended to resizable Zarr arrays in whole chunks as
    blocks arrive. What is kept is per category (labels; each donor's covariate values,
    to check they are constant within donor) and, at :meth:`close`, 8 bytes per cell to
    find duplicated cell names.

    ``resume_key`` (a string identifying the input and its parameters) makes the writer
    resumable: its temporary group is named after the key and keeps what was written when
    the writer fails for any reason other than bad input (InputError); after each block a
    completion marker (:mod:`scdist.store.markers`) records the writer's state. A later
    writer with the same key continues after the last complete chunk: :attr:`n_cells` is
    then the first cell the caller must append next, and the published ``cells/`` is
    byte-for-byte the one an uninterrupted writer produces.
    """

    def __init__(self, study, gene_names: Sequence[str], *, chunk_cells: int = DEFAULT_CHUNK_CELLS,
                 covariates: Sequence[str] = (), source_keys: Mapping[str, str] | None = None,
                 count_dtype="int32", field: str = "X", resume_key: str | None = None):
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
        self.resume_key = resume_key
        name = f"{RESUME_PREFIX}{resume_key}" if resume_key else uuid.uuid4().hex
        self._tmp = f"{TMP_DIR}/{layout.CELLS}-{name}"
        self._closed = False
        # obs/ is created with the first block (its column types come from it)
        self._obs_group: zarr.Group | None = None
        self._index: _ChunkAppender | None = None
        self._cols: dict[str, _ObsColumn] = {}
        self._has_batch: bool | None = None
        # per donor (global donor code): seen with cells, and each covariate's value
        self._donor_seen = np.zeros(0, bool)
        self._donor_cov: dict[str, np.ndarray] = {}
        zkw = _fs.zarr_kwargs(study.url, study.storage_options)
        state = self._resume_state() if resume_key else None
        if state is not None:
            self._group = zarr.open_group(store=study.group_url(self._tmp), mode="r+",
                                          zarr_format=3, **zkw)
            self._restore(state)
            return
        n_genes = len(self.gene_names)
        self._group = zarr.open_group(store=study.group_url(self._tmp), mode="w", zarr_format=3,
                                      **zkw)
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

    # ---- resuming -----------------------------------------------------------------------
    def _marker_url(self) -> str:
        return self.study.group_url(self._tmp)

    def _resume_state(self) -> dict | None:
        """The newest state marker of an interrupted writer with this key, if any."""
        url, so = self._marker_url(), self.study.storage_options
        done = [c for c in markers.done_set(url, storage_options=so) if c.startswith("upto-")]
        if not done:
            return None
        meta = markers.read_marker(url, max(done), storage_options=so)["meta"]
        if meta.get("chunk_cells") != self.chunk_cells or meta.get("count_dtype") != str(
                self.count_dtype) or meta.get("covariates") != self.covariates:
            return None  # written with other parameters: start again
        return meta

    def _appenders(self) -> dict[str, _ChunkAppender]:
        """Every array the writer appends to, by name (X's three, obs index and columns)."""
        out = dict(zip(("data", "indices", "indptr"), self._out))
        if self._index is not None:
            out["_index"] = self._index
            out.update({f"obs/{k}": c.out for k, c in self._cols.items()})
        return out

    def _save_state(self) -> None:
        """Record (after the block's data) how far the writer got and what it has seen."""
        state = {"n_cells": self.n_cells, "nnz": self.nnz, "chunk_cells": self.chunk_cells,
                 "count_dtype": str(self.count_dtype), "covariates": self.covariates,
                 "has_batch": self._has_batch,
                 "sizes": {k: a.size for k, a in self._appenders().items()},  # durable lengths
                 "categories": {k: c.cats.labels.tolist() for k, c in self._cols.items()
                                if c.categorical},
                 "donor_seen": np.flatnonzero(self._donor_seen).tolist(),
                 "donor_cov": {k: v.tolist() for k, v in self._donor_cov.items()}}
        markers.mark_done(self._marker_url(), f"upto-{self.n_cells:015d}", state,
                          storage_options=self.study.storage_options)

    def _restore(self, state: dict) -> None:
        """Reopen the arrays and continue after the last cell whose data is all durable."""
        g = self._group
        x = g["X"]
        self._data, self._indices, self._indptr = x["data"], x["indices"], x["indptr"]
        self._out = [_ChunkAppender(a) for a in (self._data, self._indices, self._indptr)]
        self._has_batch = state["has_batch"]
        if self._has_batch is not None:
            self._obs_group = og = g["obs"]
            self._index = _ChunkAppender(og["_index"])
            cats = state["categories"]
            for name in (*OBS_STANDARD, *self.covariates):
                self._cols[name] = _ObsColumn.reopen(og, name, sort_categories=name in self.covariates,
                                                     labels=cats.get(name))
        n_donors = len(self._cols[layout.OBS_DONOR].cats) if self._cols else 0
        self._donor_seen = np.zeros(n_donors, bool)
        self._donor_seen[state["donor_seen"]] = True
        for c, v in state["donor_cov"].items():
            col = self._cols[c]
            self._donor_cov[c] = np.asarray(v, dtype=OBS_CODES_DTYPE if col.categorical else col.dtype)
        sizes = state["sizes"]
        apps = self._appenders()
        # cells whose every value lies in the durable prefix of every array
        last = min(sizes["indptr"] - 1, *(sizes[k] for k in apps if k.startswith(("_index", "obs/"))))
        durable_nnz = min(sizes["data"], sizes["indices"])
        ip, step = self._indptr, self._indptr.chunks[0]
        stop = last + 1
        while True:  # scan indptr backwards a chunk at a time for the last start <= durable nnz
            a = (stop - 1) // step * step
            k = int(np.searchsorted(ip[a:stop], durable_nnz, side="right"))
            if k:
                start = a + k - 1
                break
            stop = a
        nnz = int(ip[start:start + 1][0])
        for name, app in apps.items():
            app.truncate(start + 1 if name == "indptr" else nnz if name in ("data", "indices")
                         else start)
        self.n_cells, self.nnz = start, nnz
        # markers past `start` describe arrays longer than they now are: keep only this state
        markers.clear_markers(self._marker_url(), storage_options=self.study.storage_options)
        self._save_state()

    # ---- context manager ----------------------------------------------------------------
    def __enter__(self) -> "CellWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self._fail(exc)

    def _fail(self, exc: BaseException) -> None:
        """Discard the temporary group, or keep it for a resume (not after bad input)."""
        if self.resume_key and not isinstance(exc, InputError):
            self._closed = True  # what is marked stays for the next writer with this key
        else:
            self.abort()

    # ---- writing ------------------------------------------------------------------------
    def append(self, counts, obs: pd.DataFrame) -> None:
        """Append a block of cells: ``counts`` (cells × genes) and its ``obs`` rows."""
        if self._closed:
            raise RuntimeError("CellWriter is closed")
        try:
            self._append(counts, obs)
        except BaseException as exc:
            self._fail(exc)
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
        obs_values = self._obs_block(obs)  # checked before anything of this block is written
        data, indices, indptr = self._out
        data.push(m.data.astype(self.count_dtype, copy=False))
        indices.push(m.indices.astype("int32", copy=False))
        indptr.push(m.indptr[1:].astype("int64") + self.nnz)
        for name, values in obs_values.items():
            (self._index if name is None else self._cols[name].out).push(values)
        self.n_cells += n
        self.nnz += m.nnz
        if self.resume_key:
            self._save_state()

    def _obs_block(self, obs: pd.DataFrame) -> dict:
        """Check a block's obs and turn it into the values to append, per column."""
        has_batch = layout.OBS_BATCH in obs.columns
        if self._has_batch is None:
            self._start_obs(obs, has_batch)
        elif has_batch != self._has_batch:
            raise InputError(f"obs column 'batch' is in some blocks but not in this one (cells "
                             f"{self.n_cells}-{self.n_cells + len(obs) - 1})",
                             field=f"obs[{layout.OBS_BATCH!r}]",
                             fix="pass it in every block or in none")
        for c in (layout.OBS_DONOR, layout.OBS_CELLTYPE, *([layout.OBS_BATCH] * has_batch)):
            blank = validate._blank_labels(obs[c])
            if blank.any():
                raise InputError(f"{int(blank.sum())} cells have an empty {c} label (first at "
                                 f"row {self.n_cells + int(np.flatnonzero(blank)[0])})",
                                 field=f"obs[{c!r}]", fix="fill or drop those cells first")
        for c in self.covariates:
            null = pd.isna(obs[c]).to_numpy()
            if null.any():
                raise InputError(f"{int(null.sum())} cells have no value for covariate {c!r}",
                                 field=f"obs[{c!r}]",
                                 fix="fill the missing donor-level values or drop the covariate")
        index = np.asarray(obs.index, dtype=object)
        if pd.api.types.infer_dtype(index, skipna=False) != "string":
            index = index.astype(str).astype(object)
        out: dict = {None: index}
        for name, col in self._cols.items():
            if name == layout.OBS_BATCH and not has_batch:
                out[name] = np.zeros(len(obs), OBS_CODES_DTYPE)
            else:
                out[name] = col.values(obs[name])
        self._check_donor_covariates(out)
        return out

    def _start_obs(self, obs: pd.DataFrame, has_batch: bool) -> None:
        self._has_batch = has_batch
        g = self._group.create_group("obs")
        self._obs_group = g
        c = self.chunk_cells
        idx = g.create_array("_index", shape=(0,), dtype=str, chunks=(c,))
        idx.attrs.update({"encoding-type": "string-array", "encoding-version": "0.2.0"})
        self._index = _ChunkAppender(idx)
        for name in OBS_STANDARD:
            self._cols[name] = _ObsColumn(g, name, None, c, categorical=True)
        if not has_batch:
            self._cols[layout.OBS_BATCH].cats.codes(pd.Categorical([DEFAULT_BATCH]))
        for name in self.covariates:
            # label covariates: used labels only, sorted (as pd.Categorical of the whole column)
            self._cols[name] = _ObsColumn(g, name, obs[name], c,
                                          categorical=_is_label_column(obs[name]),
                                          sort_categories=True)
        g.attrs.update({"encoding-type": "dataframe", "encoding-version": "0.2.0",
                        "_index": "_index", "column-order": list(self._cols)})

    def _check_donor_covariates(self, values: dict) -> None:
        """Each donor's covariates must be constant: compare with the donor's first value."""
        donors = values[layout.OBS_DONOR]
        n_donors = len(self._cols[layout.OBS_DONOR].cats)
        grow = n_donors - self._donor_seen.size
        if grow > 0:
            self._donor_seen = np.concatenate([self._donor_seen, np.zeros(grow, bool)])
        if donors.size == 0:
            return
        present, first = np.unique(donors, return_index=True)
        new = present[~self._donor_seen[present]]
        first_new = first[~self._donor_seen[present]]
        for c in self.covariates:
            v = values[c]
            ref = self._donor_cov.get(c)
            if ref is None:
                ref = np.zeros(0, v.dtype)
            if ref.size < n_donors:
                ref = np.concatenate([ref, np.zeros(n_donors - ref.size, v.dtype)])
            ref[new] = v[first_new]
            self._donor_cov[c] = ref
            bad = v != ref[donors]
            if bad.any():
                labels = self._cols[layout.OBS_DONOR].cats.labels[np.unique(donors[bad])]
                raise InputError(f"covariate {c!r} is not constant within donor for "
                                 f"{len(labels)} donor(s): {validate._examples(labels)}",
                                 field=f"obs[{c!r}]",
                                 fix="donor covariates must have one value per donor; use a "
                                     "donor-level column (cell-level covariates are not supported)")
        self._donor_seen[present] = True

    def abort(self) -> None:
        """Discard everything written so far; the store is left as it was."""
        if self._closed:
            return
        self._closed = True
        remove_tmp(self.study, self._tmp)

    def close(self) -> None:
        """Finish obs/var/metadata, check there are enough donors, move into ``cells/``."""
        if self._closed:
            return
        try:
            self._finish()
        except BaseException as exc:
            self._fail(exc)
            raise
        self._closed = True
        replace_group(self.study, self._tmp, layout.CELLS)
        self.study._invalidate()

    def _finish(self) -> None:
        if self.n_cells == 0:
            raise InputError("no cells were written", field="obs",
                             fix="pass at least one block of cells")
        n_donors = int(self._donor_seen.sum())
        if n_donors < validate.MIN_DONORS:
            raise InputError(f"only {n_donors} donor(s) found; population methods need at least "
                             f"{validate.MIN_DONORS}", field=f"obs[{layout.OBS_DONOR!r}]",
                             fix="check the donor column names the donor/sample, or add donors")
        for appender in self._out:
            appender.flush()
        self._index.flush()
        for col in self._cols.values():
            col.finish()
        self._make_index_unique()
        if self.resume_key:  # cells/ carries no markers (it is published whole)
            markers.clear_markers(self._marker_url(), storage_options=self.study.storage_options)
        g = self._group
        g["X"].attrs["shape"] = [self.n_cells, len(self.gene_names)]
        _write_elem(g, "var", pd.DataFrame(index=pd.Index(self.gene_names, dtype=object)))
        for k in ("obsm", "varm", "obsp", "varp", "layers", "uns"):
            _write_elem(g, k, {})
        g.attrs.update({"encoding-type": "anndata", "encoding-version": "0.1.0",
                        "source_keys": self.source_keys, "donor_covariates": self.covariates,
                        "chunk_cells": self.chunk_cells, "count_dtype": str(self.count_dtype)})

    def _make_index_unique(self) -> None:
        """Duplicated cell names become 'a', 'a-1', ... (as AnnData.obs_names_make_unique).

        Duplicates are found from 8-byte hashes of the names read back a chunk at a time; only
        when there are some is the whole index loaded and rewritten.
        """
        arr = self._index.arr
        step = arr.chunks[0]
        hashes = np.concatenate([pd.util.hash_array(np.asarray(arr[a:a + step], dtype=object))
                                 for a in range(0, arr.shape[0], step)])
        hashes.sort()
        if not (hashes[1:] == hashes[:-1]).any():
            return
        del hashes
        names = pd.Index(np.asarray(arr[:], dtype=object), dtype=object)
        if names.has_duplicates:
            arr[:] = np.asarray(ad.utils.make_index_unique(names), dtype=object)


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
