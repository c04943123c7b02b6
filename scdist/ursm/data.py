"""Input checking and preparation for URSM (all checks run before any work starts).

Orientation follows scdist's convention (observations × genes): single-cell counts Y are given
as cells × genes (the paper's Y^T, N × L), bulk counts X as bulk samples × genes (the paper's
X^T, N × M).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp

from ..errors import InputError


@dataclass
class UrsmData:
    """Validated inputs. ``Y`` (L × N) and ``X`` (M × N) are dense int64 (or None)."""

    Y: np.ndarray | None
    G: np.ndarray | None              # (L,) type index of each cell in 0..K-1
    X: np.ndarray | None
    K: int
    gene_names: np.ndarray
    celltype_names: np.ndarray
    cell_names: np.ndarray
    bulk_names: np.ndarray
    markers: dict = field(default_factory=dict)   # type index -> gene indices

    @property
    def N(self) -> int:
        return len(self.gene_names)

    @property
    def L(self) -> int:
        return 0 if self.Y is None else self.Y.shape[0]

    @property
    def M(self) -> int:
        return 0 if self.X is None else self.X.shape[0]


def _as_counts(x, name: str):
    """(dense int64 array, row names or None, column names or None) from numpy / sparse / pandas / AnnData."""
    rows = cols = None
    if hasattr(x, "X") and hasattr(x, "obs_names") and hasattr(x, "var_names"):   # AnnData
        rows, cols = np.asarray(x.obs_names, dtype=object), np.asarray(x.var_names, dtype=object)
        x = x.X
    elif hasattr(x, "to_numpy") and hasattr(x, "columns"):                      # DataFrame
        rows, cols = np.asarray(x.index, dtype=object), np.asarray(x.columns, dtype=object)
        x = x.to_numpy()
    if sp.issparse(x):
        x = x.toarray()
    try:
        arr = np.asarray(x)
    except Exception as exc:  # noqa: BLE001 - report any conversion failure as bad input
        raise InputError(f"cannot read {type(x).__name__} as a count matrix: {exc}", field=name,
                         fix="pass a numpy array, scipy.sparse matrix, pandas DataFrame or AnnData") from exc
    if arr.ndim != 2:
        raise InputError(f"must be 2-dimensional, got shape {arr.shape}", field=name,
                         fix="pass an observations × genes matrix")
    if arr.dtype.kind not in "iufb":
        raise InputError(f"has non-numeric dtype {arr.dtype}", field=name, fix="pass raw integer counts")
    if arr.dtype.kind == "f":
        if not np.isfinite(arr).all():
            raise InputError("contains NaN or infinite values", field=name,
                             fix="remove or zero-fill missing entries before fitting")
        if (arr != np.round(arr)).any():
            raise InputError("contains non-integer values; URSM models raw read/UMI counts", field=name,
                             fix="pass raw integer counts (not normalised or log-transformed data)")
    if (arr < 0).any():
        raise InputError("contains negative values", field=name, fix="pass raw non-negative counts")
    return arr.astype(np.int64), rows, cols


def prepare(sc_counts, cell_types, bulk_counts, *, n_types=None, markers=None, gene_names=None,
            celltype_names=None) -> UrsmData:
    """Check and convert the user's inputs; raises :class:`InputError` naming the bad field."""
    if sc_counts is None and bulk_counts is None:
        raise InputError("no data given", field="sc_counts",
                         fix="pass single-cell counts, bulk counts, or both")
    Y = G = cell_names = None
    labels = []
    genes = None
    if sc_counts is not None:
        Y, cell_names, genes = _as_counts(sc_counts, "sc_counts")
        if Y.shape[0] == 0 or Y.shape[1] == 0:
            raise InputError(f"is empty (shape {Y.shape})", field="sc_counts", fix="pass at least one cell and gene")
        if cell_types is None and hasattr(sc_counts, "obs"):
            raise InputError("missing", field="cell_types",
                             fix="pass one label per cell, e.g. adata.obs['cell_type']")
        if cell_types is None:
            raise InputError("missing", field="cell_types", fix="pass one cell type label per cell")
        ct = np.asarray(cell_types)
        if ct.ndim != 1 or len(ct) != Y.shape[0]:
            raise InputError(f"has {ct.size} labels for {Y.shape[0]} cells", field="cell_types",
                             fix="pass exactly one label per row of sc_counts")
        if ct.dtype.kind == "f" and not np.isfinite(ct).all() or ct.dtype.kind == "O" and any(
                v is None or (isinstance(v, float) and np.isnan(v)) for v in ct):
            raise InputError("contains missing labels", field="cell_types",
                             fix="drop unlabelled cells before fitting")
        if ct.dtype.kind in "iu":
            if (ct < 0).any():
                raise InputError("integer labels must be 0..K-1", field="cell_types",
                                 fix="use labels 0..K-1 or strings")
            k_sc = int(ct.max()) + 1
            G = ct.astype(np.int64)
            labels = [str(k) for k in range(k_sc)]
        elif ct.dtype.kind == "f":
            if (ct != np.round(ct)).any() or (ct < 0).any():
                raise InputError("float labels must be whole numbers 0..K-1", field="cell_types",
                                 fix="use labels 0..K-1 or strings")
            G = ct.astype(np.int64)
            labels = [str(k) for k in range(int(G.max()) + 1)]
        else:
            s = ct.astype(str)
            cats = getattr(getattr(cell_types, "cat", None), "categories", None)
            labels = [str(c) for c in cats] if cats is not None else sorted(set(s.tolist()))
            lookup = {c: i for i, c in enumerate(labels)}
            G = np.array([lookup[v] for v in s], dtype=np.int64)
    X = bulk_names = None
    if bulk_counts is not None:
        X, bulk_names, bgenes = _as_counts(bulk_counts, "bulk_counts")
        if X.shape[0] == 0:
            raise InputError("has no samples", field="bulk_counts", fix="pass at least one bulk sample")
        if Y is not None and X.shape[1] != Y.shape[1]:
            raise InputError(f"has {X.shape[1]} genes but sc_counts has {Y.shape[1]}", field="bulk_counts",
                             fix="subset both matrices to the same genes in the same order")
        if genes is not None and bgenes is not None and not np.array_equal(genes.astype(str), bgenes.astype(str)):
            raise InputError("gene names differ from sc_counts' (or are in another order)", field="bulk_counts",
                             fix="reindex bulk columns to the single-cell genes, e.g. bulk[adata.var_names]")
        genes = genes if genes is not None else bgenes
    N = (Y if Y is not None else X).shape[1]
    if gene_names is not None:
        genes = np.asarray(gene_names, dtype=object)
        if len(genes) != N:
            raise InputError(f"has {len(genes)} names for {N} genes", field="gene_names",
                             fix="pass one name per column of the count matrices")
    if genes is None:
        genes = np.array([f"gene{i}" for i in range(N)], dtype=object)
    genes = np.asarray(genes, dtype=object).astype(str).astype(object)
    gene_pos = {g: i for i, g in enumerate(genes)}

    # types: single-cell labels first, then bulk-only types named by markers / celltype_names
    names = list(labels)
    if celltype_names is not None:
        extra = [str(c) for c in celltype_names if str(c) not in names]
        names += extra
    mk: dict[int, np.ndarray] = {}
    if markers:
        for t in markers:
            if str(t) not in names:
                if isinstance(t, (int, np.integer)) and 0 <= int(t) < max(len(names), n_types or 0):
                    continue
                names.append(str(t))
    K = max(len(names), n_types or 0)
    if n_types is not None and n_types < len(labels):
        raise InputError(f"n_types={n_types} is smaller than the {len(labels)} single-cell types",
                         field="n_types", fix=f"use n_types >= {len(labels)} (K = max(K_sc, K_bulk))")
    int_labels = Y is None or labels == [str(k) for k in range(len(labels))]
    while len(names) < K:
        names.append(str(len(names)) if int_labels else f"bulk_type{len(names)}")
    if markers:
        for t, gl in markers.items():
            k = names.index(str(t)) if str(t) in names else int(t)
            idx = []
            for g in np.atleast_1d(gl):
                if isinstance(g, (int, np.integer)):
                    if not 0 <= int(g) < N:
                        raise InputError(f"gene index {g} out of range for type {t!r}", field="markers",
                                         fix=f"use gene indices 0..{N - 1} or gene names")
                    idx.append(int(g))
                elif str(g) in gene_pos:
                    idx.append(gene_pos[str(g)])
                else:
                    raise InputError(f"unknown gene {g!r} for type {t!r}", field="markers",
                                     fix="use gene names present in the count matrices")
            mk[k] = np.array(sorted(set(idx)), dtype=np.int64)
    k_sc = len(labels)
    if K > k_sc:
        if X is None:
            raise InputError(f"K={K} types but only {k_sc} have cells and there is no bulk data",
                             field="n_types", fix="pass bulk_counts or reduce n_types")
        missing = [names[k] for k in range(k_sc, K) if k not in mk or len(mk[k]) == 0]
        if missing:
            raise InputError(f"types {missing} have no cells and no marker genes; deconvolution is not "
                                 "identifiable without them (paper Remark 2, Section 4.5)", field="markers",
                                 fix="pass markers={type: [genes expressed only in that type], ...}")
    cell_names = (np.asarray(cell_names, dtype=object) if cell_names is not None
                  else np.array([f"cell{i}" for i in range(0 if Y is None else Y.shape[0])], dtype=object))
    bulk_names = (np.asarray(bulk_names, dtype=object) if bulk_names is not None
                  else np.array([f"bulk{j}" for j in range(0 if X is None else X.shape[0])], dtype=object))
    return UrsmData(Y=Y, G=G, X=X, K=K, gene_names=genes,
                    celltype_names=np.array(names, dtype=object),
                    cell_names=cell_names.astype(str).astype(object),
                    bulk_names=bulk_names.astype(str).astype(object), markers=mk)
