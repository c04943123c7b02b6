"""Streaming minibatches of cells from a count source (in-memory AnnData / CSR, or a study store).

The count matrix X (cells x genes, integer counts) is never loaded whole: a source exposes
row ranges (``chunks``) and reads one range at a time as CSR. A :class:`CellLoader` gives each
data-parallel worker (``rank`` of ``world_size``) its own shard of chunks, in an order shuffled
per epoch from ``(seed, epoch)``; it reads ``buffer_chunks`` chunks at a time, mixes their
cells and cuts minibatches of ``batch_size``. Memory is bounded by
``buffer_chunks * chunk_size * n_genes`` sparse entries plus one dense minibatch, whatever
the number of cells.

Train / validation split: a cell is in validation when a hash of its global index (and the
split seed) falls below ``val_fraction`` -- deterministic, independent of chunking, workers
and epochs, and needing no stored mask.

A batch is a dict of torch tensors:
``x`` (float32 counts, B x G), ``library`` (log total count, B x 1), ``batch``, ``sample``,
``label`` (int64 category codes, B), ``index`` (int64 global cell index, B), and the
nonzero counts as a list -- ``nz_rows``, ``nz_cols``, ``nz_flat`` (= row * G + col, int64),
``nz_vals`` (float32), counts <= SMALL_COUNT first (``nz_nsmall`` of them) -- with
``log_xfact`` (sum_g log x_ng!, B) for likelihood terms that vanish at zero counts.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from scipy.special import gammaln

from ..errors import InputError

DEFAULT_CHUNK = 4096
SMALL_COUNT = 16  # counts up to this use a per-gene table in the likelihood
COVARIATES = ("batch", "sample", "label")
_LOG_FACT_MAX = 1 << 16  # integer counts below this read log x! from a table
_log_fact_table: np.ndarray | None = None


def _log_factorial(vals: np.ndarray) -> np.ndarray:
    """log(x!) of nonnegative counts, float64: a table lookup for integer counts below
    _LOG_FACT_MAX (gammaln over every nonzero was a third of a minibatch's loading time),
    gammaln otherwise. Same values either way: the table holds gammaln(k + 1)."""
    global _log_fact_table
    vi = vals.astype(np.int64)
    if vi.size and 0 <= int(vi.min()) and int(vi.max()) < _LOG_FACT_MAX and np.array_equal(vi, vals):
        if _log_fact_table is None:
            _log_fact_table = gammaln(np.arange(_LOG_FACT_MAX, dtype=np.float64) + 1.0)
        return _log_fact_table[vi]
    return gammaln(vals.astype(np.float64) + 1.0)


# ----------------------------------------------------------------------------------------
# Covariates: per-cell category codes with their labels
# ----------------------------------------------------------------------------------------
@dataclass
class Categorical:
    """Integer codes (n_cells,) of one obs column and the category labels they index."""

    codes: np.ndarray
    categories: list[str]

    @property
    def n(self) -> int:
        return len(self.categories)

    @classmethod
    def constant(cls, n_cells: int, label: str = "all") -> "Categorical":
        return cls(np.zeros(n_cells, dtype=np.int64), [label])

    @classmethod
    def from_column(cls, values: pd.Series | np.ndarray, key: str,
                    categories: Sequence[str] | None = None) -> "Categorical":
        """Codes of ``values``; with ``categories`` given (a loaded model), unknown labels fail."""
        s = pd.Series(np.asarray(values)).astype(str)
        if s.isna().any() or (s == "nan").any():
            raise InputError(f"obs column {key!r} has missing values", field=key,
                             fix=f"fill or drop cells with missing {key!r} before training")
        if categories is None:
            cats = sorted(s.unique().tolist())
        else:
            cats = [str(c) for c in categories]
            unknown = sorted(set(s.unique()) - set(cats))
            if unknown:
                raise InputError(f"obs column {key!r} has labels unseen in training: {unknown[:5]}",
                                 field=key, fix="use data with the training categories only")
        codes = pd.Categorical(s, categories=cats).codes.astype(np.int64)
        return cls(codes, cats)


# ----------------------------------------------------------------------------------------
# Count sources
# ----------------------------------------------------------------------------------------
class CountSource:
    """Row-chunked read access to a cells x genes count matrix plus its obs table.

    Subclasses set ``n_cells``, ``n_genes``, ``gene_names``, ``chunks`` and implement
    :meth:`read` (CSR rows ``start:stop``) and :meth:`obs_column`.
    """

    n_cells: int
    n_genes: int
    gene_names: np.ndarray
    chunks: list[tuple[int, int]]

    def read(self, start: int, stop: int) -> sp.csr_matrix:  # pragma: no cover - abstract
        raise NotImplementedError

    def obs_columns(self) -> list[str]:  # pragma: no cover - abstract
        raise NotImplementedError

    def obs_column(self, key: str) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def categorical(self, key: str | None, categories: Sequence[str] | None = None) -> Categorical:
        """Category codes of obs column ``key`` (a single category "all" when ``key`` is None)."""
        if key is None:
            return Categorical.constant(self.n_cells)
        if key not in self.obs_columns():
            raise InputError(f"obs has no column {key!r}", field=key,
                             fix=f"use one of {self.obs_columns()}")
        return Categorical.from_column(self.obs_column(key), key, categories)


def csr_rows(X: sp.csr_matrix, start: int, stop: int) -> sp.csr_matrix:
    """Rows ``start:stop`` of a CSR matrix as a view of its arrays (no copy; do not modify).

    scipy's row slicing copies every row through a per-entry column check, which costs as
    much as encoding the block in the analyses.
    """
    p0, p1 = int(X.indptr[start]), int(X.indptr[stop])
    return sp.csr_matrix((X.data[p0:p1], X.indices[p0:p1], X.indptr[start:stop + 1] - p0),
                         shape=(stop - start, X.shape[1]), copy=False)


def _regular_chunks(n: int, size: int) -> list[tuple[int, int]]:
    return [(s, min(s + size, n)) for s in range(0, n, size)]


class MatrixSource(CountSource):
    """An in-memory AnnData (raw counts in X, or in ``layer``) or a CSR/dense matrix + obs."""

    def __init__(self, X, obs: pd.DataFrame | None = None, gene_names=None,
                 chunk_size: int | None = None):
        if not sp.issparse(X):
            X = sp.csr_matrix(np.asarray(X))
        self.X = X.tocsr()
        self.n_cells, self.n_genes = self.X.shape
        self.obs = obs if obs is not None else pd.DataFrame(index=np.arange(self.n_cells).astype(str))
        if len(self.obs) != self.n_cells:
            raise InputError(f"obs has {len(self.obs)} rows for {self.n_cells} cells", field="obs",
                             fix="pass an obs table with one row per cell")
        self.gene_names = np.asarray(gene_names if gene_names is not None
                                     else [f"g{i}" for i in range(self.n_genes)], dtype=object)
        if chunk_size is None:  # enough chunks to shuffle well and to shard across workers
            chunk_size = int(max(256, min(DEFAULT_CHUNK, -(-self.n_cells // 32))))
        self.chunks = _regular_chunks(self.n_cells, chunk_size)

    @classmethod
    def from_anndata(cls, adata, layer: str | None = None, chunk_size: int | None = None):
        X = adata.layers[layer] if layer else adata.X
        if X is None:
            raise InputError("AnnData has no X", field="X", fix="put raw counts in X or pass layer=")
        return cls(X, adata.obs, adata.var_names.to_numpy(), chunk_size)

    def read(self, start, stop):
        return csr_rows(self.X, start, stop)

    def obs_columns(self):
        return list(self.obs.columns)

    def obs_column(self, key):
        return self.obs[key].to_numpy()


class StudySource(CountSource):
    """The ``cells/`` group of a study store, read chunk by chunk (``Study.read_counts``)."""

    def __init__(self, study):
        self.study = study
        self.url = study.url
        self.n_cells, self.n_genes = int(study.n_cells), int(study.n_genes)
        self.gene_names = np.asarray(study.gene_names, dtype=object)
        self.chunks = [(int(a), int(b)) for a, b in study.cell_chunks]
        self._obs = None

    def __getstate__(self):  # ship the URL to Ray workers, reopen there
        return {"url": self.url}

    def __setstate__(self, state):
        from ..store import open_study
        self.__init__(open_study(state["url"]))

    def _obs_frame(self) -> pd.DataFrame:
        if self._obs is None:
            self._obs = self.study.obs()
        return self._obs

    def read(self, start, stop):
        return sp.csr_matrix(self.study.read_counts(start, stop))

    def obs_columns(self):
        return list(self._obs_frame().columns)

    def obs_column(self, key):
        return self._obs_frame()[key].to_numpy()


def as_source(data, *, layer: str | None = None, chunk_size: int | None = None) -> CountSource:
    """Wrap ``data`` (AnnData, study, study URL, CountSource) as a :class:`CountSource`."""
    if isinstance(data, CountSource):
        return data
    if hasattr(data, "read_counts") and hasattr(data, "cell_chunks"):
        return StudySource(data)
    if isinstance(data, str):
        from ..store import open_study
        return StudySource(open_study(data))
    if hasattr(data, "obs") and hasattr(data, "X") and hasattr(data, "var_names"):
        return MatrixSource.from_anndata(data, layer=layer, chunk_size=chunk_size)
    if sp.issparse(data) or isinstance(data, np.ndarray):
        return MatrixSource(data, chunk_size=chunk_size)
    raise InputError(f"cannot read counts from a {type(data).__name__}", field="data",
                     fix="pass an AnnData with raw counts in X, a scdist Study, or a study URL")


def check_counts(source: CountSource, max_chunks: int = 2) -> None:
    """Fail early when X does not look like raw counts (checks the first chunks only)."""
    if source.n_cells == 0 or source.n_genes == 0:
        raise InputError(f"count matrix is empty ({source.n_cells} x {source.n_genes})", field="X",
                         fix="pass data with at least one cell and one gene")
    for start, stop in source.chunks[:max_chunks]:
        d = source.read(start, stop).data
        if d.size and (not np.all(np.isfinite(d)) or d.min() < 0 or np.any(d != np.round(d))):
            raise InputError("X does not hold raw counts (negative, non-integer or non-finite values)",
                             field="X", fix="pass raw integer UMI counts (e.g. adata.layers['counts'])")


# ----------------------------------------------------------------------------------------
# Split and loader
# ----------------------------------------------------------------------------------------
def _splitmix64(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.uint64)
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def validation_mask(index: np.ndarray, val_fraction: float, seed: int = 0) -> np.ndarray:
    """True for cells whose global ``index`` hashes into the validation fraction."""
    if val_fraction <= 0:
        return np.zeros(len(index), dtype=bool)
    h = _splitmix64(np.asarray(index, dtype=np.uint64) ^ np.uint64(seed * 0x2545F4914F6CDD1D % 2**64))
    return (h >> np.uint64(11)).astype(np.float64) / float(2**53) < val_fraction


@dataclass
class CellLoader:
    """Iterable of minibatches over one worker's shard of a :class:`CountSource`.

    ``split``: "train", "val" or "all". ``shuffle``: shuffle chunk order (per epoch, seeded)
    and cells inside the buffer; unshuffled iteration visits every cell of the split once in
    index order (for inference). With ``n_steps`` set, a shuffled epoch yields exactly that many
    full minibatches, cycling over the shard if needed -- DDP needs the same count on every rank.
    """

    source: CountSource
    covariates: dict[str, Categorical]
    batch_size: int = 256
    split: str = "train"
    val_fraction: float = 0.1
    split_seed: int = 0
    seed: int = 0
    shuffle: bool = True
    buffer_chunks: int = 4
    rank: int = 0
    world_size: int = 1
    n_steps: int | None = None
    epoch: int = 0
    chunk_ids: Sequence[int] | None = None  # restrict to these chunks of the source
    cell_mask: np.ndarray | None = None     # restrict to these cells (bool over all cells)
    _split_counts: np.ndarray | None = field(default=None, repr=False)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    # --- split bookkeeping (hash of indices only: no count data is read) ---
    def _keep(self, start: int, stop: int) -> np.ndarray:
        idx = np.arange(start, stop)
        if self.cell_mask is not None:
            idx = idx[self.cell_mask[start:stop]]
        if self.split == "all":
            return idx
        val = validation_mask(idx, self.val_fraction, self.split_seed)
        return idx[val] if self.split == "val" else idx[~val]

    def split_counts(self) -> np.ndarray:
        """Number of cells of this split in each chunk of the source."""
        if self._split_counts is None:
            self._split_counts = np.array([len(self._keep(a, b)) for a, b in self.source.chunks])
        return self._split_counts

    def n_cells(self) -> int:
        return int(self.split_counts().sum())

    def steps_per_epoch(self) -> int:
        """Full minibatches per worker per epoch, equal on every rank."""
        return max(1, self.n_cells() // (self.batch_size * self.world_size))

    def _chunk_order(self) -> list[int]:
        n = len(self.source.chunks)
        order = np.arange(n) if self.chunk_ids is None else np.asarray(self.chunk_ids, dtype=np.int64)
        if self.shuffle:
            order = order[np.random.default_rng([self.seed, self.epoch, 7]).permutation(len(order))]
        return [int(c) for c in order[self.rank::self.world_size] if self.split_counts()[c] > 0]

    def _batch(self, X: sp.csr_matrix, idx: np.ndarray) -> dict[str, torch.Tensor]:
        X = X.tocsr()
        x = torch.from_numpy(X.toarray().astype(np.float32, copy=False))
        lib = torch.log(x.sum(1, keepdim=True).clamp_min(1.0))
        # Nonzero list and per-cell log x! straight from the CSR block (for the sparse
        # likelihood), small counts (<= SMALL_COUNT) first so the likelihood can use a table.
        X.sum_duplicates()
        X.eliminate_zeros()
        rows = np.repeat(np.arange(X.shape[0], dtype=np.int64), np.diff(X.indptr))
        cols = X.indices.astype(np.int64)
        vals = X.data.astype(np.float32)
        log_xfact = np.bincount(rows, _log_factorial(vals), minlength=X.shape[0])
        small = vals <= SMALL_COUNT
        n_small = int(np.count_nonzero(small))
        if n_small < len(vals):  # small counts first, order kept (a stable partition, no sort)
            order = np.concatenate([np.flatnonzero(small), np.flatnonzero(~small)])
            rows, cols, vals = rows[order], cols[order], vals[order]
        out = {"x": x, "library": lib, "index": torch.from_numpy(idx.astype(np.int64)),
               "nz_rows": torch.from_numpy(rows), "nz_cols": torch.from_numpy(cols),
               "nz_flat": torch.from_numpy(rows * X.shape[1] + cols), "nz_vals": torch.from_numpy(vals),
               "nz_nsmall": torch.tensor([n_small]),
               "log_xfact": torch.from_numpy(log_xfact.astype(np.float32))}
        for name in COVARIATES:
            cat = self.covariates.get(name)
            codes = cat.codes[idx] if cat is not None else np.zeros(len(idx), dtype=np.int64)
            out[name] = torch.from_numpy(np.ascontiguousarray(codes, dtype=np.int64))
        return out

    def _read_kept(self, c: int) -> tuple[sp.csr_matrix, np.ndarray]:
        a, b = self.source.chunks[c]
        keep = self._keep(a, b)
        X = self.source.read(a, b)
        if len(keep) != b - a:
            X = X[keep - a]
        return X, keep

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        if not self.shuffle:
            yield from self._iter_ordered()
        else:
            yield from self._iter_shuffled()

    def _iter_ordered(self):
        for c in self._chunk_order():
            X, idx = self._read_kept(c)
            for s in range(0, len(idx), self.batch_size):
                yield self._batch(X[s:s + self.batch_size], idx[s:s + self.batch_size])

    def _iter_shuffled(self):
        rng = np.random.default_rng([self.seed, self.epoch, self.rank, 11])
        order = self._chunk_order()
        if not order:
            raise InputError(f"worker {self.rank} of {self.world_size} has no cells", field="num_workers",
                             fix="use fewer workers or smaller cell chunks")
        n_steps = self.n_steps
        done, pos = 0, 0
        carry_X, carry_idx = None, np.empty(0, dtype=np.int64)
        while n_steps is None or done < n_steps:
            if n_steps is None and pos >= len(order):
                break
            parts, idxs = ([carry_X], [carry_idx]) if carry_X is not None else ([], [])
            for _ in range(self.buffer_chunks):
                if n_steps is None and pos >= len(order):
                    break
                X, idx = self._read_kept(order[pos % len(order)])
                pos += 1
                parts.append(X)
                idxs.append(idx)
            X = sp.vstack(parts, format="csr") if len(parts) > 1 else parts[0]
            idx = np.concatenate(idxs)
            perm = rng.permutation(len(idx))
            n_full = len(idx) // self.batch_size
            for k in range(n_full):
                if n_steps is not None and done >= n_steps:
                    break
                sel = perm[k * self.batch_size:(k + 1) * self.batch_size]
                yield self._batch(X[sel], idx[sel])
                done += 1
            rest = perm[n_full * self.batch_size:]
            carry_X, carry_idx = X[rest], idx[rest]
            if n_steps is None and pos >= len(order) and len(rest):
                yield self._batch(carry_X, carry_idx)  # last partial batch of a free-running epoch
                break
