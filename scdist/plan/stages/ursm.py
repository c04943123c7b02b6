"""Stage ``ursm``: fit URSM to the store's ``cells/`` (counts + cell type labels) and ``bulk/``
counts; write the result Dataset to ``results/ursm/<run>``.

URSM is one global fit (the profile matrix A couples every cell and bulk sample), so the
restartable unit is the whole run: the Dataset is written chunk-aligned along ``cell`` once the
fit has finished, each cell chunk's marker after its data, then the planner's stage marker.
Chains / blocks run on Ray actors with ``engine: ray`` (``ray.address`` of the spec, or local).
"""
from __future__ import annotations

from typing import Any, Literal

import numpy as np
from pydantic import Field

from ..stage import Stage, StageConfig, StagePlan


def _names(values) -> np.ndarray:
    """Labels as an object array of Python str (stores may hand back numpy StringDType)."""
    return np.array([str(v) for v in values], dtype=object)


class UrsmConfig(StageConfig):
    run: str = Field("default", description="Run name: results/ursm/<run>")
    use_bulk: bool = Field(True, description="Use bulk/ when present (False: single-cell-only submodel)")
    use_cells: bool = Field(True, description="Use cells/ (False: bulk-only submodel, needs markers)")
    n_types: int | None = Field(None, ge=1, description="K (default: single-cell types; K = max(K_sc, K_bulk))")
    markers: dict[str, list[str]] = Field(default_factory=dict, description="Marker genes per cell type (§4.5)")
    em_iters: int = Field(50, ge=1, description="EM iterations (the maximum with a stop_rule)")
    stop_rule: Literal["none", "crossfit", "ascent"] = Field(
        "none", description="MC-error-aware stopping: 'crossfit' or 'ascent' (grows the kept sweeps first)")
    burnin: int = Field(50, ge=0, description="Gibbs burn-in sweeps per EM iteration")
    samples: int = Field(100, ge=1, description="Kept Gibbs sweeps per EM iteration")
    warm_burnin: int | None = Field(None, ge=0, description="Burn-in after the first EM iteration")
    chains: int = Field(1, ge=1, description="Independent chains (split R-hat when > 1)")
    map_w: bool = Field(False, description="MAP-W variant of §4.5 instead of bulk Gibbs")
    seed: int = Field(0, ge=0, description="Random seed")
    engine: Literal["local", "ray"] = Field("local", description="'ray': chains/blocks on Ray actors")
    cell_block_size: int = Field(4096, ge=1, description="Cells per sampler block (one RNG stream each)")
    bulk_block_size: int = Field(4096, ge=1, description="Bulk samples per sampler block")
    n_actors: int | None = Field(None, ge=1, description="Ray actors (default: min(blocks, CPUs))")
    options: dict[str, Any] = Field(default_factory=dict, description="Further scdist.ursm.fit options")


class UrsmStage(Stage):
    name = "ursm"
    Config = UrsmConfig
    requires = ("cells",)
    engine = "ray"

    def products(self, cfg: UrsmConfig) -> tuple[str, ...]:
        return (f"results/ursm/{cfg.run}",)

    def needs(self, cfg: UrsmConfig) -> tuple[str, ...]:
        # bulk/ is optional with cells (absent → single-cell-only submodel); required without them
        return ("cells",) if cfg.use_cells else ("bulk",)

    def check(self, cfg: UrsmConfig, study) -> None:
        import inspect

        from ...errors import InputError
        from ...ursm import fit

        allowed = set(inspect.signature(fit).parameters) - set(UrsmConfig.model_fields) - {
            "sc_counts", "cell_types", "bulk_counts", "ray_address", "callback", "progress", "theta0"}
        unknown = sorted(set(cfg.options) - allowed)
        if unknown:
            raise InputError(f"unknown URSM option(s) {unknown}; allowed: {', '.join(sorted(allowed))}",
                             field=f"stages.ursm.options.{unknown[0]}", fix="use scdist.ursm.fit's keyword names")
        if not cfg.use_cells and not cfg.markers:
            raise InputError("the bulk-only submodel needs marker genes", field="stages.ursm.markers",
                             fix="give markers: {celltype: [gene, ...]} (paper Remark 2)")
        if study is not None and cfg.use_bulk and not cfg.use_cells and not study.has("bulk"):
            raise InputError("the store has no bulk/ counts", field="stages.ursm.use_cells",
                             fix="ingest bulk counts (`scdist ingest --bulk`) or use the cells")

    def plan(self, study, cfg: UrsmConfig) -> StagePlan:
        url = study.result_url("ursm", cfg.run) if study is not None else None
        res = {"engine": cfg.engine, "chains": cfg.chains}
        if study is None or not study.has("cells"):
            return StagePlan(chunk_desc="one global Gibbs-EM fit", resources=res, output_url=url)
        bulk = study.bulk() if (cfg.use_bulk and study.has("bulk")) else None
        m = 0 if bulk is None else bulk.sizes["bulk_sample"]
        nb = -(-study.n_cells // cfg.cell_block_size) + (-(-m // cfg.bulk_block_size) if m and not cfg.map_w else 0)
        return StagePlan(chunks=1, chunk_desc=(
            f"Gibbs-EM on {study.n_cells:,} cells x {study.n_genes:,} genes, {m} bulk samples: "
            f"{cfg.em_iters} EM iterations x {cfg.burnin + cfg.samples} sweeps, {cfg.chains} chain(s) x {nb} block(s)"),
            resources=res, output_url=url)

    def run(self, ctx, cfg: UrsmConfig) -> None:
        from ...store.markers import mark_done
        from ...store.results import write_region, write_template
        from ...ursm import fit

        study = ctx.study
        genes = _names(study.gene_names)
        Y = ct = X = bulk_names = None
        if cfg.use_cells:
            Y = study.read_counts(0, study.n_cells)
            obs = study.obs()
            ct = obs["celltype"].astype(str).to_numpy()
            cells = _names(obs.index)
        bulk = study.bulk() if cfg.use_bulk else None
        if bulk is not None:
            keep = np.isin(genes, _names(bulk.gene.values))
            genes_b = genes[keep]
            X = bulk["counts"].sel(gene=genes_b).values
            bulk_names = _names(bulk.bulk_sample.values)
            if Y is not None and not keep.all():
                Y = Y[:, np.flatnonzero(keep)]
            genes = genes_b
        if cfg.engine == "ray":
            ctx.ray()
        import pandas as pd

        bk = pd.DataFrame(X, index=bulk_names, columns=genes) if X is not None else None
        with ctx.progress("ursm EM iterations", cfg.em_iters) as bar:
            ds = fit(Y, ct, bk, n_types=cfg.n_types, markers=cfg.markers or None, gene_names=genes,
                     em_iters=cfg.em_iters, stop_rule=cfg.stop_rule, burnin=cfg.burnin, samples=cfg.samples,
                     warm_burnin=cfg.warm_burnin,
                     chains=cfg.chains, map_w=cfg.map_w, seed=cfg.seed, engine=cfg.engine,
                     ray_address=ctx.spec.ray.address, cell_block_size=cfg.cell_block_size,
                     bulk_block_size=cfg.bulk_block_size, n_actors=cfg.n_actors, progress=bar, **cfg.options)
        if Y is not None:
            # per-cell labels become a data variable so they are chunked (and written) with the cells
            ds = ds.assign_coords(cell=cells).reset_coords("cell_type")
        ds.attrs.update(run=cfg.run, run_id=ctx.run_id)
        url = study.result_url("ursm", cfg.run)
        chunks = {"cell": int(study.cell_chunks[0][1] - study.cell_chunks[0][0])} if Y is not None else {}
        write_template(ds.chunk(), url, chunks)
        small = ds.drop_dims("cell") if "cell" in ds.dims else ds
        write_region(small, url, {d: slice(0, n) for d, n in small.sizes.items()})
        if Y is not None:
            for i, (a, b) in enumerate(study.cell_chunks):
                write_region(ds[[k for k, v in ds.data_vars.items() if "cell" in v.dims]].isel(cell=slice(a, b)),
                             url, {"cell": slice(a, b)})
                mark_done(url, f"cells-{i:06d}", {"cells": [int(a), int(b)]})
        study.add_provenance("ursm", cfg.model_dump(), ["cells"] + (["bulk"] if X is not None else []))
