"""A study store: one Zarr v3 group holding cells, pseudobulk, bulk, truth and results.

``create_study`` / ``open_study`` accept a local path, a ``file://`` URL or any fsspec URL
(``memory://``, ``s3://``, ``gs://`` ...; credentials through ``storage_options``). Local
paths go to zarr's LocalStore, URLs to its FsspecStore, through the same ``zarr.open_group``
call. Group names come from :mod:`scdist.store.layout`.
"""
from __future__ import annotations

import datetime as _dt
import json
from typing import Any, Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp
import zarr

from .. import errors
from . import _fs, layout


def _scdist_version() -> str:
    try:
        from importlib.metadata import version

        return version("scdist")
    except Exception:  # not installed (running from a source tree)
        return "unknown"


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _jsonable(x: Any) -> Any:
    """``x`` as plain JSON types (numpy scalars/arrays, paths and other objects → str/list)."""
    def default(o):
        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
        if isinstance(o, (set, tuple)):
            return list(o)
        return str(o)

    return json.loads(json.dumps(x, default=default))


def _open_root(url: str, mode: str, storage_options: dict | None) -> zarr.Group:
    return zarr.open_group(store=url, mode=mode, zarr_format=3,
                           **_fs.zarr_kwargs(url, storage_options))


def _exists(url: str, storage_options: dict | None) -> bool:
    fs, path = _fs.filesystem(url, storage_options)
    return fs.exists(f"{path}/zarr.json")


class Study:
    """An open study store. Build it with :func:`create_study` or :func:`open_study`.

    Cheap to pickle (re-opens by URL on the other side), so it can be shipped to Dask
    workers and Ray tasks; ``memory://`` stores are only visible inside one process.
    """

    def __init__(self, url: str, root: zarr.Group, storage_options: dict | None = None):
        self.url = url
        self.root = root
        self.storage_options = dict(storage_options or {})
        self._cells = None

    def __reduce__(self):
        return (_reopen, (self.url, self.storage_options))

    def __repr__(self) -> str:
        parts = [f"url={self.url!r}"]
        if self.has(layout.CELLS):
            parts.append(f"n_cells={self.n_cells}, n_genes={self.n_genes}")
        return f"Study({', '.join(parts)})"

    # ---- generic access ---------------------------------------------------------------
    def _fresh_root(self) -> zarr.Group:
        # zarr caches a group's attributes when it is opened; other writers (a planner's
        # own Study object, another process) may have appended since.
        mode = "r" if self.root.read_only else "r+"
        self.root = _open_root(self.url, mode, self.storage_options)
        return self.root

    @property
    def attrs(self) -> dict:
        """Root attributes, read fresh from the store."""
        return dict(self._fresh_root().attrs)

    @property
    def schema_version(self) -> int:
        return int(self.root.attrs[layout.ATTR_SCHEMA])

    @property
    def provenance(self) -> list[dict]:
        """Provenance records (oldest first), read fresh from the store."""
        return list(self._fresh_root().attrs.get(layout.ATTR_PROVENANCE, []))

    def group_url(self, path: str) -> str:
        """URL (or local path) of ``path`` inside the store, for xarray/fsspec/markers."""
        return _fs.join(self.url, path)

    def has(self, path: str) -> bool:
        """Whether a group or array exists at ``path``."""
        fs, p = _fs.filesystem(self.group_url(path), self.storage_options)
        return fs.exists(f"{p}/zarr.json")

    def group(self, path: str, *, create: bool = False) -> zarr.Group:
        """The zarr group at ``path`` (``create=True`` makes it and its parents if missing)."""
        if create and not self.has(path):
            return self.root.require_group(path)
        try:
            node = self.root[path]
        except KeyError:
            raise errors.InputError(f"the store has no group {path!r}", field=path,
                                    fix="run the stage that writes it first") from None
        return node

    def clean_tmp(self) -> list[str]:
        """Remove temporary groups left by writers that were killed (``_scdist_tmp/``).

        Call only while no writer is active on this store (e.g. under the planner's store
        lock). Returns the names removed.
        """
        from .cells import TMP_DIR

        fs, root = _fs.filesystem(self.url, self.storage_options)
        t = f"{root}/{TMP_DIR}"
        try:
            names = [n.rstrip("/").rsplit("/", 1)[-1] for n in fs.ls(t, detail=False)]
        except FileNotFoundError:
            return []
        fs.rm(t, recursive=True)
        return sorted(n for n in names if n != "zarr.json")

    def result_url(self, method: str, run: str) -> str:
        """URL of ``results/<method>/<run>`` (the Dataset a method run writes)."""
        for name, v in (("method", method), ("run", run)):
            if not v or "/" in v or v.startswith("__"):
                raise errors.InputError(f"{name} {v!r} is not a valid group name", field=name,
                                        fix="use a non-empty name without '/' or a leading '__'")
        return self.group_url(f"{layout.RESULTS}/{method}/{run}")

    def add_provenance(self, stage: str, params: dict | None = None,
                       inputs: Sequence[str] | dict | None = None) -> dict:
        """Append a provenance record (stage, params, inputs, time, scdist version) to the root.

        Returns the record. Values are stored as JSON (non-JSON values as strings). The
        list is re-read just before appending; two processes appending at the same instant
        can still lose one record (attributes are one JSON document), so stages record
        provenance from the driver, not from workers.
        """
        rec = _jsonable({"stage": stage, "params": params or {}, "inputs": inputs or [],
                         "time": _now(), "scdist_version": _scdist_version()})
        prov = self.provenance + [rec]
        self.root.attrs[layout.ATTR_PROVENANCE] = prov
        return rec

    def open_dataset(self, path: str, *, chunks: Any = None):
        """Lazy ``xarray.Dataset`` at ``path`` (``open_zarr``, ``consolidated=False``)."""
        from .results import open_result

        if not self.has(path):
            raise errors.InputError(f"the store has no dataset {path!r}", field=path,
                                    fix="run the stage that writes it first")
        return open_result(self.group_url(path), storage_options=self.storage_options,
                           chunks=chunks)

    def pseudobulk(self):
        """The pseudobulk cube (dims donor, celltype, gene), lazy."""
        if not self.has(layout.PSEUDOBULK):
            raise errors.InputError("the store has no pseudobulk cube", field=layout.PSEUDOBULK,
                                    fix="run the pseudobulk stage (`scdist run` with a "
                                        "`pseudobulk:` stage) first")
        return self.open_dataset(layout.PSEUDOBULK)

    def bulk(self):
        """The bulk counts Dataset (bulk_sample, gene), or None if none was ingested."""
        return self.open_dataset(layout.BULK) if self.has(layout.BULK) else None

    def truth(self):
        """The simulator's ground truth Dataset, or None for real studies."""
        return self.open_dataset(layout.TRUTH) if self.has(layout.TRUTH) else None

    # ---- cells/ -----------------------------------------------------------------------
    def _reader(self):
        if self._cells is None:
            from .cells import CellsReader

            if not self.has(layout.CELLS):
                raise errors.InputError("the store has no cells", field=layout.CELLS,
                                        fix="ingest an AnnData (scdist ingest) or simulate a study")
            self._cells = CellsReader(self.group(layout.CELLS))
        return self._cells

    def _invalidate(self) -> None:
        self._cells = None

    @property
    def n_cells(self) -> int:
        return self._reader().n_cells

    @property
    def n_genes(self) -> int:
        return self._reader().n_genes

    @property
    def gene_names(self) -> np.ndarray:
        return self._reader().gene_names

    @property
    def donor_covariates(self) -> list[str]:
        return self._reader().donor_covariates

    @property
    def source_keys(self) -> dict[str, str]:
        return self._reader().source_keys

    @property
    def cell_chunks(self) -> list[tuple[int, int]]:
        return self._reader().cell_chunks

    def obs(self) -> pd.DataFrame:
        """Cell metadata: donor, celltype, batch (categorical) and the covariate columns."""
        return self._reader().obs()

    def read_counts(self, start: int, stop: int, genes=None) -> sp.csr_matrix:
        """Counts of cells ``start:stop`` (CSR, cells × genes), optionally only ``genes``.

        ``genes``: integer positions, a boolean mask or gene names. Reads only the indptr
        slice and the matching data/indices range, so memory is bounded by the slice.
        """
        return self._reader().read_counts(start, stop, genes)


def _reopen(url: str, storage_options: dict) -> Study:
    return open_study(url, storage_options=storage_options)


def create_study(url: str, overwrite: bool = False, *, exist_ok: bool = False,
                 storage_options: dict | None = None) -> Study:
    """Create an empty study store at ``url`` (local path or fsspec URL).

    An existing store is an error unless ``overwrite=True`` (delete and recreate) or
    ``exist_ok=True`` (open it, checking its schema version).
    """
    loc = _fs.normalize(url)
    if _exists(loc, storage_options):
        if exist_ok and not overwrite:
            return open_study(loc, storage_options=storage_options)
        if not overwrite:
            raise errors.InputError(f"a store already exists at {loc}", field="store",
                                    fix="open it with open_study(), pass overwrite=True to "
                                        "replace it, or choose another path")
    root = _open_root(loc, "w", storage_options)
    root.attrs.update({layout.ATTR_SCHEMA: layout.SCHEMA_VERSION,
                       layout.ATTR_VERSION: _scdist_version(),
                       layout.ATTR_CREATED: _now(),
                       layout.ATTR_PROVENANCE: []})
    return Study(loc, root, storage_options)


def open_study(url: str, *, mode: str = "r+", storage_options: dict | None = None) -> Study:
    """Open the study store at ``url``; SchemaError if it is not one or has another schema."""
    loc = _fs.normalize(url)
    if not _exists(loc, storage_options):
        fs, path = _fs.filesystem(loc, storage_options)
        if fs.exists(f"{path}/.zgroup"):
            raise errors.SchemaError(f"{loc} is a Zarr v2 group; study stores are Zarr v3",
                                     field="store", fix="point at a study store created by scdist, "
                                                        "or ingest your data into a new one")
        raise errors.SchemaError(f"no study store at {loc}", field="store",
                                 fix="check the path, or create one with `scdist ingest` / "
                                     "`scdist simulate` / create_study()")
    try:
        root = _open_root(loc, mode, storage_options)
    except (ValueError, TypeError) as exc:  # an array, or Zarr v2 metadata
        raise errors.SchemaError(f"{loc} is not a Zarr v3 group ({exc})", field="store",
                                 fix="point at a study store created by scdist") from exc
    found = root.attrs.get(layout.ATTR_SCHEMA)
    if found is None:
        raise errors.SchemaError(
            f"{loc} is a Zarr group but not a scdist study (no {layout.ATTR_SCHEMA} attribute)",
            field=layout.ATTR_SCHEMA,
            fix="point at a study store created by scdist, or ingest your data into a new one")
    if found != layout.SCHEMA_VERSION:
        wrote = root.attrs.get(layout.ATTR_VERSION, "unknown")
        raise errors.SchemaError(
            f"store {loc} has schema version {found} (written by scdist {wrote}); this scdist "
            f"reads schema version {layout.SCHEMA_VERSION}", field=layout.ATTR_SCHEMA,
            fix=f"re-create the store with this scdist (re-run ingest/simulate), or install "
                f"scdist {wrote} to read it")
    return Study(loc, root, storage_options)
