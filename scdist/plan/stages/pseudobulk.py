"""Stage ``pseudobulk``: the donor x cell type x gene cube (CTMM Eqs 2-3) from ``cells/``.

Calls :func:`scdist.pseudobulk.compute_pseudobulk` on the run's Dask client. The
computation maps over cell chunks and writes one region of ``pseudobulk/`` per gene block
with its completion marker, so an interrupted run resumes at the missing gene blocks.
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from ..stage import Stage, StageConfig, StagePlan


class PseudobulkConfig(StageConfig):
    min_cells: int = Field(10, ge=1, description="Pairs with n_ic <= min_cells cells are masked as unobserved")
    normalization: Literal["log1p_cp10k", "log1p", "none"] = Field(
        "log1p_cp10k", description="Normalised expression y_ics from counts")
    layer: str | None = Field(None, description="Read y_ics from cells/layers/<layer> instead of normalising")
    gene_chunk: int | None = Field(None, ge=1, description="Chunk length along gene of the stored cube")
    split_every: int = Field(8, ge=2, description="Fan-in of the reduction tree over cell chunks")


class PseudobulkStage(Stage):
    name = "pseudobulk"
    Config = PseudobulkConfig
    requires = ("cells",)
    provides = ("pseudobulk",)
    engine = "dask"

    def plan(self, study, cfg: PseudobulkConfig) -> StagePlan:
        resources = {"task": "1 core per cell chunk, then one reduction per gene block"}
        if study is None or not study.has("cells"):
            return StagePlan(chunk_desc="cell chunks of cells/ -> gene blocks of pseudobulk/ "
                                        "(sizes known once cells/ exists)", resources=resources)
        from ...pseudobulk.compute import DEFAULT_GENE_CHUNK, gene_blocks

        n_genes = study.n_genes
        gene_chunk = min(cfg.gene_chunk or DEFAULT_GENE_CHUNK, n_genes)
        obs = study.obs()
        n_pairs = obs["donor"].nunique() * obs["celltype"].nunique()
        blocks = gene_blocks(n_genes, gene_chunk, n_pairs)  # the units compute_pseudobulk marks
        return StagePlan(
            chunks=len(blocks),
            chunk_desc=(f"{len(study.cell_chunks)} cell chunks ({study.n_cells:,} cells) mapped and "
                        f"reduced into {len(blocks)} gene block(s) of {n_genes:,} genes "
                        f"(stored in chunks of {gene_chunk} genes)"),
            resources=resources)

    def reset(self, store_url: str, cfg: PseudobulkConfig) -> None:
        # per-cell-chunk partials of an interrupted run were computed from the old cells/
        from ...pseudobulk.compute import SCRATCH
        from ...store._fs import filesystem

        super().reset(store_url, cfg)
        fs, path = filesystem(f"{store_url.rstrip('/')}/{SCRATCH}")
        if fs.exists(path):
            fs.rm(path, recursive=True)

    def run(self, ctx, cfg: PseudobulkConfig) -> None:
        from ...pseudobulk import compute_pseudobulk

        with ctx.progress("pseudobulk gene blocks", ctx.plan.chunks) as bar:
            bar.update(ctx.done_chunks)
            compute_pseudobulk(ctx.study, client=ctx.client(), min_cells=cfg.min_cells,
                               normalization=cfg.normalization, layer=cfg.layer,
                               gene_chunk=cfg.gene_chunk, split_every=cfg.split_every, progress=bar)
