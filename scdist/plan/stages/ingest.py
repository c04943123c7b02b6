"""Stage ``ingest``: an AnnData (.h5ad / .zarr) into ``cells/``, optional bulk counts into ``bulk/``.

Calls :func:`scdist.store.ingest_h5ad` / :func:`~scdist.store.ingest_zarr` and
:func:`~scdist.store.ingest_bulk`. They validate before writing and publish each group
atomically (written beside, then moved into place), so an interrupted ingest leaves no
half group behind and simply runs again. Runs in the driver process, streaming blocks of
``chunk_cells`` cells (memory bounded by one block plus obs).
"""
from __future__ import annotations

import os
from typing import Literal

from pydantic import Field

from ...errors import InputError
from ..stage import Stage, StageConfig, StagePlan

DEFAULT_CHUNK_CELLS = 10_000  # same default as scdist.store.cells (not imported: keeps plans light)


class IngestConfig(StageConfig):
    path: str = Field(description="AnnData to ingest: a .h5ad file or an AnnData .zarr directory/URL")
    donor_key: str = Field(description="obs column with the donor (sample) id")
    celltype_key: str = Field(description="obs column with the cell type")
    batch_key: str | None = Field(None, description="obs column with the batch (default: one batch)")
    covariates: list[str] = Field(default_factory=list, description="Donor-level obs columns to keep")
    layer: str | None = Field(None, description="Layer holding raw counts (default X)")
    chunk_cells: int = Field(DEFAULT_CHUNK_CELLS, ge=1, description="Cells per block read and per stored chunk")
    bulk: str | None = Field(None, description="Bulk counts (CSV/TSV, .h5ad) to ingest into bulk/")
    bulk_orientation: Literal["genes_x_samples", "samples_x_genes"] = Field(
        "genes_x_samples", description="Rows of the bulk table are genes or samples")


def _kind(path: str) -> str:
    low = path.rstrip("/").lower()
    if low.endswith(".h5ad"):
        return "h5ad"
    if low.endswith(".zarr"):
        return "zarr"
    raise InputError(f"cannot tell the format of {path!r}", field="stages.ingest.path",
                     fix="name a .h5ad file or an AnnData .zarr directory")


class IngestStage(Stage):
    name = "ingest"
    Config = IngestConfig
    requires = ()
    provides = ("cells",)
    engine = "local"

    def products(self, cfg: IngestConfig) -> tuple[str, ...]:
        return ("cells", "bulk") if cfg.bulk else ("cells",)

    def check(self, cfg: IngestConfig, study) -> None:
        _kind(cfg.path)
        for field, p in (("path", cfg.path), ("bulk", cfg.bulk)):
            if p and "://" not in p and not os.path.exists(p):
                raise InputError(f"no such file or directory: {p}", field=f"stages.ingest.{field}",
                                 fix="check the path (relative paths are relative to the current directory)")

        _preflight(cfg)

    def reset(self, store_url: str, cfg: IngestConfig) -> None:
        # Nothing to clear: ingest publishes cells/ (and bulk/) whole, markers and all, so until
        # the new group is in place the old one stays complete and marked. Clearing its markers
        # first would make a failed ingest (bad input) cost every downstream result.
        return None

    def plan(self, study, cfg: IngestConfig) -> StagePlan:
        what = f"{_kind(cfg.path)} {cfg.path}" + (f" + bulk {cfg.bulk}" if cfg.bulk else "")
        return StagePlan(chunk_desc=f"stream {what} in blocks of {cfg.chunk_cells:,} cells "
                                    "(published atomically)",
                         resources={"process": "driver (no cluster)"})

    def run(self, ctx, cfg: IngestConfig) -> None:
        from ...store import ingest_bulk, ingest_h5ad, ingest_zarr

        fn = ingest_h5ad if _kind(cfg.path) == "h5ad" else ingest_zarr
        with ctx.progress("ingest", 2 if cfg.bulk else 1) as bar:
            study = fn(ctx.store_url, cfg.path, donor_key=cfg.donor_key, celltype_key=cfg.celltype_key,
                       batch_key=cfg.batch_key, covariates=cfg.covariates, layer=cfg.layer,
                       chunk_cells=cfg.chunk_cells, overwrite=True)
            bar.update(1)
            if cfg.bulk:
                report = ingest_bulk(study, cfg.bulk, orientation=cfg.bulk_orientation)
                ctx.log.info("bulk genes: kept %d, dropped %d single-cell-only and %d bulk-only",
                             report["n_kept"], report["n_dropped_sc"], report["n_dropped_bulk"])
                bar.update(1)


def _preflight(cfg: IngestConfig) -> None:
    """The checks ingest makes on obs, var and the bulk genes, done when the run is planned
    (reads obs and var only, not X), so bad metadata fails before any stage writes."""
    if "://" in cfg.path or cfg.layer is not None:
        return  # remote inputs and layers: checked by ingest itself, still before it writes
    from anndata.io import read_elem

    from ...store import validate

    if _kind(cfg.path) == "h5ad":
        import h5py

        try:
            f = h5py.File(cfg.path, "r")
        except OSError as exc:
            raise InputError(f"{cfg.path} is not a readable .h5ad (HDF5) file: {exc}",
                             field="stages.ingest.path", fix="pass an AnnData .h5ad file") from exc
        with f:
            obs, var = read_elem(f["obs"]), read_elem(f["var"])
    else:
        import zarr

        root = zarr.open_group(cfg.path, mode="r")
        obs, var = read_elem(root["obs"]), read_elem(root["var"])
    genes = validate.check_gene_names(var.index.to_numpy())
    donors = obs[cfg.donor_key] if cfg.donor_key in obs else None
    if donors is not None and hasattr(donors, "cat"):
        empty = sorted(set(map(str, donors.cat.categories)) - set(map(str, donors.unique())))
        if empty:  # a listed donor without cells would enter every per-donor table as all-missing
            raise InputError(f"{len(empty)} donor(s) are listed but have no cells: {empty[:5]}",
                             field=f"obs[{cfg.donor_key!r}]",
                             fix=f"drop them first: adata.obs[{cfg.donor_key!r}] = "
                                 f"adata.obs[{cfg.donor_key!r}].cat.remove_unused_categories()")
    validate.check_obs(obs, donor_key=cfg.donor_key, celltype_key=cfg.celltype_key,
                       batch_key=cfg.batch_key, covariates=cfg.covariates)
    if cfg.bulk and "://" not in cfg.bulk:
        from ...store.ingest import _read_bulk_table  # the parser ingest_bulk itself uses

        _, _, bulk_genes = _read_bulk_table(cfg.bulk, cfg.bulk_orientation, None)
        validate.intersect_genes(list(genes), [str(g) for g in bulk_genes])
