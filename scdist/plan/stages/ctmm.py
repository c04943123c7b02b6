"""Stage ``ctmm``: fit CTMM to ``pseudobulk/`` and write ``results/ctmm/<run>/``.

Calls :func:`scdist.ctmm.fit` on the run's Dask client. Each gene block (whole chunks of the
stored cube) is one task that writes its region of the result and then its marker, so an
interrupted run resumes at the missing blocks.
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from ..stage import Stage, StageConfig, StagePlan


class CtmmConfig(StageConfig):
    run: str = Field("default", description="Run name: results/ctmm/<run>")
    models: list[Literal["hom", "iid", "free", "full"]] = Field(
        default_factory=lambda: ["hom", "free"], description="Covariance models of V")
    method: Literal["reml", "ml", "he"] = Field("reml", description="Fitting method")
    tests: list[Literal["lrt", "wald", "jackknife"]] = Field(
        default_factory=lambda: ["lrt", "wald", "jackknife"], description="Tests to compute")
    covariates: list[str] | None = Field(
        None, description="Donor covariates as fixed effects (names in pseudobulk covariate; ['all'] for all)")
    random_effects: list[str] = Field(default_factory=list,
                                      description="Donor-level factors as random effects, e.g. ['batch']")
    missing: Literal["drop", "impute"] = Field("drop", description="Missing donor x cell type pairs")
    op: bool | None = Field(None, description="Also fit overall pseudobulk (default: when present)")
    gene_block: int | None = Field(None, ge=1, description="Genes per task (whole stored chunks)")
    n_restarts: int = Field(10, ge=0, description="Random restarts for failed fits")
    seed: int = Field(0, ge=0, description="Random seed of restarts")
    jk_rule: Literal["regular", "edge", "drop", "all"] = Field(
        "regular", description="Which leave-one-out refits a jackknife test may use")


class CtmmStage(Stage):
    name = "ctmm"
    Config = CtmmConfig
    requires = ("pseudobulk",)
    engine = "dask"

    def products(self, cfg: CtmmConfig) -> tuple[str, ...]:
        return (f"results/ctmm/{cfg.run}",)

    def _kwargs(self, cfg: CtmmConfig) -> dict:
        return dict(models=tuple(cfg.models), method=cfg.method, tests=tuple(cfg.tests),
                    covariates=cfg.covariates, random_effects=cfg.random_effects, op=cfg.op,
                    n_restarts=cfg.n_restarts, seed=cfg.seed, jk_rule=cfg.jk_rule)

    def check(self, cfg: CtmmConfig, study) -> None:
        if study is None or not study.has("pseudobulk"):
            return  # made by an earlier stage of this run; fit() validates again then
        from ...ctmm.api import make_config

        make_config(study.pseudobulk(), **self._kwargs(cfg))

    def plan(self, study, cfg: CtmmConfig) -> StagePlan:
        res = {"task": "1 core per gene block (batched fits, jackknife inside the task)"}
        if study is None or not study.has("pseudobulk"):
            return StagePlan(chunk_desc="gene blocks of pseudobulk/ (known once it exists)",
                             resources=res)
        from ...ctmm.distributed import _blocks

        pb = study.pseudobulk()
        chunks = pb["mean"].chunks[pb["mean"].dims.index("gene")] if pb["mean"].chunks else (pb.sizes["gene"],)
        spans = _blocks(tuple(chunks), cfg.gene_block)
        return StagePlan(chunks=len(spans), output_url=study.result_url("ctmm", cfg.run),
                         chunk_desc=(f"{len(spans)} gene block(s) of ~{spans[0][1] - spans[0][0]} genes "
                                     f"({pb.sizes['gene']:,} genes x {pb.sizes['donor']} donors x "
                                     f"{pb.sizes['celltype']} cell types)"),
                         resources=res)

    def run(self, ctx, cfg: CtmmConfig) -> None:
        from ...ctmm import fit

        with ctx.progress("ctmm gene blocks", ctx.plan.chunks if ctx.plan else None) as bar:
            bar.update(ctx.done_chunks)
            fit(ctx.study, client=ctx.client(), run=cfg.run, gene_block=cfg.gene_block,
                missing=cfg.missing, overwrite=True, progress=bar, **self._kwargs(cfg))
