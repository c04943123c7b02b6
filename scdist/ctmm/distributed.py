"""Dask placement of the CTMM block kernel (imports Dask only inside functions).

For a study: the gene axis of ``pseudobulk/`` is cut into blocks of whole stored chunks; each
task reads its block from the store, runs :func:`~.kernel.fit_block`, writes its region of
``results/ctmm/<run>/`` (template written first, chunked like the blocks) and then its
completion marker. A rerun with the same settings skips blocks whose marker exists; other
settings need ``overwrite=True`` (or another run name).
"""
from __future__ import annotations

import json

import numpy as np
import xarray as xr

from ..errors import InputError
from .kernel import FitConfig, fit_block

CONFIG_ATTR = "ctmm_config"


def fit_in_memory(client, ds: xr.Dataset, slices, cfg: FitConfig, *, progress=None) -> list:
    """Fit the blocks of an in-memory Dataset on ``client``; results in gene order."""
    from ..engines.dask import map_blocks

    # the blocks go to the workers by scatter, not inside the task graph: embedded, a
    # transcriptome-sized cube made an ~80 MiB graph ("Sending large graph" warning)
    # hash=False: fresh keys, so refitting the same data (e.g. REML then HE) never reuses a
    # key that the previous fit is still releasing (that race left tasks waiting forever)
    blocks = client.scatter([ds.isel(gene=sl) for sl in slices], hash=False)
    order = {b.key: i for i, b in enumerate(blocks)}
    out = [None] * len(blocks)
    for b, res in map_blocks(client, fit_block, blocks, progress=progress, cfg=cfg):
        out[order[b.key]] = res
    return out


def _blocks(chunks: tuple[int, ...], gene_block: int | None) -> list[tuple[int, int]]:
    """Gene blocks made of whole stored chunks (about ``gene_block`` genes each)."""
    sizes = list(chunks)
    per = max(1, int(round((gene_block or sizes[0]) / max(sizes[0], 1))))
    edges = np.concatenate([[0], np.cumsum(sizes)])
    out = []
    for i in range(0, len(sizes), per):
        out.append((int(edges[i]), int(edges[min(len(sizes), i + per)])))
    return out


def _template(cfg: FitConfig, ds: xr.Dataset, chunk: int) -> xr.Dataset:
    """Lazy all-NaN Dataset with the result layout of :func:`fit_block` for all genes."""
    import dask.array as da

    probe = fit_block(_probe_block(ds, cfg), cfg)
    G = ds.sizes["gene"]
    data = {}
    for name, var in probe.data_vars.items():
        shape = tuple(G if d == "gene" else probe.sizes[d] for d in var.dims)
        chunks = tuple(chunk if d == "gene" else probe.sizes[d] for d in var.dims)
        fill = False if var.dtype == bool else (0 if var.dtype.kind == "i" else np.nan)
        data[name] = (var.dims, da.full(shape, fill, dtype=var.dtype, chunks=chunks))
    coords = {k: v.values for k, v in probe.coords.items() if k != "gene"}
    coords["gene"] = np.asarray(ds["gene"].values).astype(object)
    return xr.Dataset(data, coords=coords)


def _probe_block(ds: xr.Dataset, cfg: FitConfig) -> xr.Dataset:
    """A tiny synthetic block with the cube's donors/cell types (to learn the result layout)."""
    N, C = ds.sizes["donor"], ds.sizes["celltype"]
    rng = np.random.default_rng(0)
    b = ds.isel(gene=slice(0, 1)).load().copy()
    b["mean"] = (("donor", "celltype", "gene"), rng.normal(size=(N, C, 1)))
    b["nu"] = (("donor", "celltype", "gene"), np.full((N, C, 1), 0.1))
    if cfg.op:
        b["op_mean"] = (("donor", "gene"), rng.normal(size=(N, 1)))
        b["op_nu"] = (("donor", "gene"), np.full((N, 1), 0.1))
    return b


def _block_task(item, *, store_url: str, result_url: str, cfg: FitConfig):
    """Fit genes ``item = (start, stop)`` (read from the store) or an imputed in-memory block
    (a Dataset whose ``attrs['gene_span']`` is ``(start, stop)``, scattered to the workers)
    and write them; returns the number of converged fits."""
    from ..store import open_study
    from ..store.markers import mark_done
    from ..store.results import write_region

    if isinstance(item, xr.Dataset):
        s, e = item.attrs["gene_span"]
        block = item
    else:
        s, e = item
        # the local synchronous scheduler: inside a worker, dask's default is the cluster
        # itself, so a plain load() submitted the block's reads as new tasks, seceded and
        # waited to rejoin behind other blocks' fits (HE, 2,048 genes, 1 worker: 24.6 of the
        # tasks' 42.5 s wall; 0.3 s now)
        block = (open_study(store_url, mode="r").pseudobulk().isel(gene=slice(s, e))
                 .load(scheduler="synchronous"))
    res = fit_block(block, cfg)
    write_region(res, result_url, {"gene": slice(s, e)})
    n_conv = int(res["converged"].sum())
    mark_done(result_url, f"genes_{s}_{e}", {"genes": e - s, "converged": n_conv})
    return n_conv


def fit_study(study, ds: xr.Dataset, cfg: FitConfig, *, client=None, gene_block=None,
              missing: str = "drop", run: str = "default", overwrite: bool = False,
              progress=None, n_workers=None, subset: bool = False) -> xr.Dataset:
    """Fit every gene block of ``study``'s cube on Dask, writing ``results/ctmm/<run>/``."""
    from ..engines.dask import dask_client, map_blocks
    from ..store.markers import STAGE, clear_markers, done_set, mark_done
    from ..store.results import open_result, write_template
    from .api import check_values, result_attrs, _impute

    if subset:
        raise InputError("a study fit covers all genes", field="genes",
                         fix="fit a subset in memory: scdist.ctmm.fit(study.pseudobulk().sel(gene=...))")
    url = study.result_url("ctmm", run)
    attrs = result_attrs(cfg, missing)
    cfg_json = json.dumps({k: v for k, v in attrs.items() if k != "scdist_version"}, sort_keys=True)
    gene_chunks = ds["mean"].chunks[ds["mean"].dims.index("gene")] if ds["mean"].chunks else (ds.sizes["gene"],)
    spans = _blocks(tuple(gene_chunks), gene_block)
    chunk = spans[0][1] - spans[0][0]
    data_blocks = None
    if missing == "impute":
        full = ds.load()
        check_values(full)
        full = _impute(full, cfg.seed)
        data_blocks = {}
        for sp in spans:
            b = full.isel(gene=slice(*sp))
            b.attrs = {"gene_span": sp}
            data_blocks[sp] = b
    existing = None
    if study.has(f"results/ctmm/{run}"):
        existing = open_result(url).attrs.get(CONFIG_ATTR)
    if existing is not None and existing != cfg_json and not overwrite:
        raise InputError(f"results/ctmm/{run} was written with other settings", field="run",
                         fix="pass overwrite=True to replace it, or choose another run name")
    if existing != cfg_json:
        tmpl = _template(cfg, ds, chunk)
        tmpl.attrs.update(attrs)
        tmpl.attrs[CONFIG_ATTR] = cfg_json
        clear_markers(url)
        write_template(tmpl, url, {"gene": chunk})
        done = set()
    else:  # same settings: resume, skipping blocks whose marker exists
        done = done_set(url)
    todo = [sp for sp in spans if f"genes_{sp[0]}_{sp[1]}" not in done]
    if todo:
        if data_blocks is None:
            # value checks on the first block before any task writes (cheap, early errors)
            check_values(ds.isel(gene=slice(*todo[0])).load())
            items = todo
        else:
            items = None
        with dask_client(client=client, n_workers=n_workers) as c:
            if items is None:   # imputed blocks travel by scatter, not inside the graph
                items = c.scatter([data_blocks[sp] for sp in todo], hash=False)
            for _ in map_blocks(c, _block_task, items, progress=progress, store_url=study.url,
                                result_url=url, cfg=cfg):
                pass
    mark_done(url, STAGE, {"blocks": len(spans)})
    study.add_provenance("ctmm", {k: v for k, v in attrs.items()}, ["pseudobulk"])
    return open_result(url).load()
