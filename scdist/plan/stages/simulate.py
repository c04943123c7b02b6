"""Stage ``simulate``: a seeded multi-donor study with known truth, into a new store.

Calls :func:`scdist.simulate.simulate_study`, which draws the design (CTMM Eq 1 variance
components per gene, MrVI donor groups, cell type proportions, optional URSM bulk mixtures)
and writes ``cells/`` chunk by chunk (chunks generated on the Dask workers), ``truth/`` and,
with ``bulk_samples > 0``, ``bulk/``. The store is (re)created, so this stage refuses to run
on a store whose cells did not come from the simulator.
"""
from __future__ import annotations

from typing import Any

from pydantic import Field

from ...errors import InputError
from ..stage import Stage, StageConfig, StagePlan


class SimulateConfig(StageConfig):
    n_donors: int = Field(40, ge=2, description="Donors D")
    n_cells: int = Field(20_000, ge=2, description="Cells in total")
    n_genes: int = Field(500, ge=1, description="Genes G")
    n_celltypes: int = Field(4, ge=1, description="Cell types C")
    n_batches: int = Field(2, ge=1, description="Batches B")
    seed: int = Field(0, description="Random seed (same seed and parameters give an identical store)")
    chunk_cells: int = Field(10_000, ge=1, description="Cells per stored chunk of cells/X")
    bulk_samples: int = Field(0, ge=0, description="Bulk samples mixed from the cell type profiles")
    design: dict[str, Any] = Field(default_factory=dict, description=(
        "Model knobs of scdist.simulate.make_design, e.g. model_mix, hom2_range, v_range, "
        "n_groups, da_fold"))


class SimulateStage(Stage):
    name = "simulate"
    Config = SimulateConfig
    requires = ()
    engine = "dask"

    def products(self, cfg: SimulateConfig) -> tuple[str, ...]:
        return ("cells", "truth", "bulk") if cfg.bulk_samples else ("cells", "truth")

    def check(self, cfg: SimulateConfig, study) -> None:
        import inspect

        from ...simulate import make_design

        known = set(inspect.signature(make_design).parameters) - set(SimulateConfig.model_fields)
        unknown = sorted(set(cfg.design) - known)
        if unknown:
            raise InputError(f"unknown design knob(s) {unknown}; allowed: {', '.join(sorted(known))}",
                             field=f"stages.simulate.design.{unknown[0]}",
                             fix="use the parameter names of scdist.simulate.make_design")
        if cfg.n_batches > cfg.n_donors:
            raise InputError(f"n_batches={cfg.n_batches} exceeds n_donors={cfg.n_donors}",
                             field="stages.simulate.n_batches", fix="use at most one batch per donor")
        if cfg.n_cells < cfg.n_donors:
            raise InputError(f"n_cells={cfg.n_cells} is fewer than n_donors={cfg.n_donors}",
                             field="stages.simulate.n_cells", fix="simulate at least one cell per donor")
        if study is not None and study.has("cells"):
            from ...store.markers import read_marker

            marker = read_marker(study.group_url("cells"), "__stage__")
            simulated = (marker or {}).get("meta", {}).get("stage") == "simulate" or study.has("truth")
            if not simulated:
                raise InputError(f"{study.url} holds cells that were not simulated; simulating would "
                                 "replace the whole store", field="store",
                                 fix="point the spec's `store` at a new path, or delete the store first")

    def plan(self, study, cfg: SimulateConfig) -> StagePlan:
        n_chunks = -(-cfg.n_cells // cfg.chunk_cells)
        bulk = f", {cfg.bulk_samples} bulk samples" if cfg.bulk_samples else ""
        return StagePlan(
            chunks=n_chunks,
            chunk_desc=(f"{cfg.n_donors} donors x {cfg.n_celltypes} cell types, {cfg.n_cells:,} cells x "
                        f"{cfg.n_genes:,} genes{bulk}: {n_chunks} chunk(s) of {cfg.chunk_cells:,} cells "
                        "generated on workers, written in order"),
            resources={"task": "1 core per cell chunk", "memory": "~2 chunks per worker"},
            notes=["(re)creates the store"])

    def run(self, ctx, cfg: SimulateConfig) -> None:
        from ...simulate import simulate_study

        with ctx.progress("simulate", 1) as bar:
            simulate_study(ctx.store_url, n_donors=cfg.n_donors, n_cells=cfg.n_cells,
                           n_genes=cfg.n_genes, n_celltypes=cfg.n_celltypes,
                           n_batches=cfg.n_batches, seed=cfg.seed, chunk_cells=cfg.chunk_cells,
                           bulk_samples=cfg.bulk_samples, overwrite=True, client=ctx.client(),
                           **cfg.design)
            bar.update(1)
