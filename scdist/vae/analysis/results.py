"""Writing analysis results into the study store: ``results/mrvi/<run>/<name>``.

Per-cell variables are written chunk-aligned (a template first, then one region per block of
``cell_chunk`` cells, each block's completion marker after its data); the group's stage
marker goes last, so a reader that sees it sees a complete result.
"""
from __future__ import annotations

import dask.array as dsa  # results writing only: the store's template protocol is lazy
import numpy as np
import xarray as xr

from ...errors import InputError
from ...store.markers import STAGE, clear_markers, mark_done
from ...store.results import open_result, write_region, write_template


def result_url(study, run: str, name: str) -> str:
    if not name or "/" in name or not run:
        raise InputError(f"run={run!r}, name={name!r}", field="name", fix="use non-empty names without '/'")
    return f"{study.result_url('mrvi', run)}/{name}"


def write_result(result, study, run: str, name: str, *, cell_chunk: int | None = None,
                 meta: dict | None = None) -> str:
    """Store ``result`` (Dataset or named DataArray) at ``results/mrvi/<run>/<name>``; returns the URL.

    ``cell_chunk``: rows per chunk along ``cell`` (default: the study's cell chunk length).
    ``meta``: recorded in the stage marker (e.g. the parameters that produced the result).
    Rewrites an existing result of the same name.
    """
    meta = dict(meta or {})
    ds = result.to_dataset(name=result.name or "value") if isinstance(result, xr.DataArray) else result
    url = result_url(study, run, name)
    clear_markers(url)
    if "cell" not in ds.dims:
        tmpl = ds.copy()
        for k, v in ds.data_vars.items():
            tmpl[k] = (v.dims, dsa.zeros(v.shape, dtype=v.dtype, chunks=-1))
        write_template(tmpl, url, {})
        dims = {d: slice(0, n) for d, n in ds.sizes.items()}
        write_region(ds, url, dims)
        mark_done(url, STAGE, {**meta, "kind": "whole"})
        return url
    n = ds.sizes["cell"]
    csize = int(cell_chunk or (study.cell_chunks[0][1] - study.cell_chunks[0][0] if study.cell_chunks else n))
    csize = max(1, min(csize, n)) if n else 1
    tmpl = ds.copy()
    for k, v in ds.data_vars.items():
        tmpl[k] = (v.dims, dsa.zeros(v.shape, dtype=v.dtype, chunks=-1))
    write_template(tmpl, url, {"cell": csize})
    no_cell = [k for k, v in ds.data_vars.items() if "cell" not in v.dims]
    if no_cell:
        sub = ds[no_cell]
        write_region(sub, url, {d: slice(0, sub.sizes[d]) for d in sub.dims})
    cell_vars = [k for k, v in ds.data_vars.items() if "cell" in v.dims]
    for i, a in enumerate(range(0, n, csize)):
        b = min(a + csize, n)
        block = ds[cell_vars].isel(cell=slice(a, b))
        write_region(block, url, {"cell": slice(a, b)})
        mark_done(url, f"cells-{i:06d}", {"cells": [a, b]})
    mark_done(url, STAGE, {**meta, "kind": "cells", "n_cells": int(n)})
    return url


def read_result(study, run: str, name: str) -> xr.Dataset:
    """Open a stored analysis result (lazy)."""
    return open_result(result_url(study, run, name))
