"""Chunk-aligned xarray writes into a study store (templates, region writes, reading back).

The protocol every stage follows (see docs/CONTRACT.md, "Chunk-aligned writes"):

1. :func:`write_template` once: the full Dataset's metadata and coordinates with the final
   chunking (data variables lazy, nothing computed);
2. :func:`write_region` per block, from any worker, each block covering whole chunks;
3. :func:`scdist.store.markers.mark_done` for the block, after its data.

Concurrent writers are only safe when each owns whole chunks, so :func:`write_region`
refuses a region whose edges are not chunk edges. String coordinates are stored as object
dtype (fixed-width ``<U`` has no Zarr v3 spec); metadata is never consolidated.
"""
from __future__ import annotations

import warnings
from typing import Any, Mapping

import numpy as np
import xarray as xr
import zarr

from . import _fs
from .markers import NOT_ZARR_WARNING


def strings_to_object(ds: xr.Dataset) -> xr.Dataset:
    """Copy of ``ds`` whose fixed-width unicode variables and coordinates are object dtype."""
    def conv(v):
        return v.astype(object) if v.dtype.kind == "U" else v

    data_vars = {k: conv(v.variable) for k, v in ds.data_vars.items()}
    coords = {k: conv(v.variable) for k, v in ds.coords.items()}
    return xr.Dataset(data_vars, coords=coords, attrs=ds.attrs)


def write_template(ds_template: xr.Dataset, url: str, chunks: Mapping[str, int], *,
                   storage_options: dict | None = None, mode: str = "w",
                   encoding: dict | None = None) -> str:
    """Write ``ds_template``'s metadata, coordinates and chunk grid to ``url``; compute nothing.

    ``chunks`` maps dimension → chunk length (dimensions not named are one chunk). Data
    variables should be lazy (e.g. ``dask.array.full``); they are not written, so each
    region is later filled by :func:`write_region`. Object (string) variables are the
    exception: they are computed and written with the template. ``mode="w"`` replaces what is at ``url``.
    Returns ``url``.
    """
    ds = strings_to_object(ds_template)
    full = {d: int(chunks.get(d, n)) or max(n, 1) for d, n in ds.sizes.items()}  # empty dims: chunk 1
    for d, c in full.items():
        if c <= 0:
            raise ValueError(f"chunk length for {d!r} must be positive, got {c}")
    ds = ds.chunk({d: c for d, c in full.items()})
    for name, var in ds.data_vars.items():
        # Object (string) variables cannot be written lazily (zarr needs their values to pick
        # an encoding): they are small labels, so they are written with the template.
        if var.dtype == object:
            ds[name] = var.compute()
    enc: dict[str, dict[str, Any]] = {}
    for name, var in ds.data_vars.items():
        e = {"chunks": tuple(min(full[d], max(ds.sizes[d], 1)) for d in var.dims)}
        if var.dtype.kind == "f":
            e["fill_value"] = np.nan
        enc[name] = e
    for name, e in (encoding or {}).items():
        enc.setdefault(name, {}).update(e)
    ds.to_zarr(_fs.normalize(url), mode=mode, compute=False, consolidated=False, zarr_format=3,
               encoding=enc, **_fs.zarr_kwargs(url, storage_options))
    return url


def _stored_sizes(group: zarr.Group) -> dict[str, int]:
    sizes: dict[str, int] = {}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=NOT_ZARR_WARNING)
        arrays = list(group.arrays())
    for _, arr in arrays:
        for d, n in zip(arr.metadata.dimension_names or (), arr.shape):
            if d is not None:
                sizes[d] = int(n)
    return sizes


def _normalize_region(region: Mapping[str, Any], sizes: Mapping[str, int]) -> dict[str, slice]:
    out = {}
    for d, r in region.items():
        if d not in sizes:
            raise ValueError(f"region names dimension {d!r}, which the stored dataset lacks "
                             f"(it has {sorted(sizes)})")
        if isinstance(r, tuple) and len(r) == 2:
            r = slice(int(r[0]), int(r[1]))
        if not isinstance(r, slice):
            raise ValueError(f"region for {d!r} must be a slice or (start, stop), got {r!r}")
        start, stop, step = r.indices(sizes[d])
        if step != 1:
            raise ValueError(f"region for {d!r} must be a contiguous slice, got {r!r}")
        out[d] = slice(start, stop)
    return out


def _check_aligned(group: zarr.Group, ds_block: xr.Dataset, region: dict[str, slice]) -> None:
    for name, var in ds_block.variables.items():
        if name not in group or not set(var.dims) & set(region):
            continue
        arr = group[name]
        dims = arr.metadata.dimension_names or var.dims
        for axis, d in enumerate(dims):
            if d not in region:
                continue
            c, n = arr.chunks[axis], arr.shape[axis]
            s = region[d]
            if s.stop - s.start != var.sizes[d]:
                raise ValueError(f"region {d}={s.start}:{s.stop} has length {s.stop - s.start} "
                                 f"but the block has {var.sizes[d]} along {d!r}")
            if s.start % c or (s.stop % c and s.stop != n):
                raise ValueError(
                    f"region {d}={s.start}:{s.stop} of {name!r} is not aligned to its chunks of "
                    f"{c} (length {n}); concurrent partial-chunk writes lose data. Use blocks "
                    f"whose edges are multiples of {c}")


def write_region(ds_block: xr.Dataset, url: str, region: Mapping[str, Any], *,
                 storage_options: dict | None = None, check_alignment: bool = True) -> None:
    """Write ``ds_block`` into the template at ``url`` at ``region`` (dim → slice or (start, stop)).

    Variables that do not span any region dimension are dropped (they were written with
    the template). Region edges must be chunk edges (checked unless ``check_alignment=False``).
    """
    kw = _fs.zarr_kwargs(url, storage_options)
    group = zarr.open_group(store=_fs.normalize(url), mode="r", zarr_format=3, **kw)
    reg = _normalize_region(region, _stored_sizes(group))
    block = strings_to_object(ds_block)
    drop = [k for k, v in block.variables.items() if not set(v.dims) & set(reg)]
    # Index labels along the region were written with the template (one chunk, shared by
    # all writers): check the block's labels match them instead of rewriting them.
    for d, r in reg.items():
        if d in block.sizes and block.sizes[d] != r.stop - r.start:
            raise ValueError(f"region {d}={r.start}:{r.stop} has length {r.stop - r.start} "
                             f"but the block has {block.sizes[d]} along {d!r}")
        if d in block.indexes and d in group:
            stored = np.asarray(group[d][reg[d]]).tolist()
            mine = block.indexes[d].to_numpy().tolist()
            if stored != mine:
                raise ValueError(f"block labels along {d!r} do not match the template at "
                                 f"{reg[d].start}:{reg[d].stop} (first stored {stored[:1]!r}, "
                                 f"block {mine[:1]!r})")
            drop.append(d)
    block = block.drop_vars(sorted(set(drop)))
    if check_alignment:
        _check_aligned(group, block, reg)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=NOT_ZARR_WARNING)
        block.to_zarr(_fs.normalize(url), region=reg, consolidated=False, zarr_format=3, **kw)


def open_result(url: str, *, storage_options: dict | None = None, chunks: Any = None
                ) -> xr.Dataset:
    """Open a Dataset written by :func:`write_template` / :func:`write_region`.

    Lazy, with dask chunks equal to the stored chunks unless ``chunks`` says otherwise.
    """
    chunks = {} if chunks is None else chunks
    kw = _fs.zarr_kwargs(url, storage_options)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=NOT_ZARR_WARNING)
        return xr.open_zarr(_fs.normalize(url), consolidated=False, zarr_format=3,
                            chunks=chunks, **kw)
