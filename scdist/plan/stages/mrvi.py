"""Stage ``mrvi``: train MrVI on ``cells/`` (sample = donor by default), store u and z, and run
the post-training analyses asked for in ``analyses``.

Same store protocol as the ``ldvae`` stage: checkpoints in ``results/mrvi/<run>/checkpoints``
(resume), ``u(cell, latent_u)`` and ``z(cell, latent_z)`` written per cell chunk with
markers, the history, and the model under ``<run>/model``. Each analysis result goes to
``results/mrvi/<run>/<analysis>`` (:func:`scdist.vae.analysis.run_analyses`) with its own
markers; a rerun after a change of ``analyses`` only reuses the trained model and the results
whose parameters did not change.
"""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..stage import STAGE_MARKER, STARTED_MARKER, Stage, StagePlan
from .ldvae import VaeTrainConfig, prepare_results, train_kwargs, trained_model, vae_plan, write_vae_results

TRAINED = "__trained__"   # marker: u / z / model complete, meta = hash of the training config


class _Opts(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DistancesOptions(_Opts):
    groupby: str | None = Field(None, description="obs column grouping the cells, 'cell_clusters', or null (all)")
    samples: list[str] | None = Field(None, min_length=2, description="Samples to compare (default: all)")
    normalize: bool = Field(False, description="Monte Carlo normalisation (z-scores vs same-sample distances)")
    mc_samples: int = Field(20, ge=2, description="Posterior draws for the normalisation")
    min_cells: int = Field(5, ge=1, description="Samples with fewer cells in a group get NaN there")
    seed: int = 0


class SampleClustersOptions(_Opts):
    method: Literal["average", "complete", "single", "weighted", "ward"] = Field(
        "ward", description="Linkage of the hierarchical clustering of samples (Ward: the MrVI paper's)")
    n_clusters: int | None = Field(None, ge=1, description="Cut the dendrogram into this many clusters")


class CellClustersOptions(_Opts):
    n_pcs: int = Field(10, ge=1)
    n_neighbors: int = Field(15, ge=2)
    resolution: float = Field(1.0, gt=0)
    max_fit_cells: int = Field(10_000, ge=10)
    seed: int = 0


class AdmissibilityOptions(_Opts):
    quantile: float = Field(0.05, gt=0, lt=1, description="Reference quantile of the 5% rule")
    max_cells: int = Field(1000, ge=1, description="Cells per sample representing its aggregated posterior")
    seed: int = 0


class DeOptions(_Opts):
    covariates: list[str] = Field(..., min_length=1, description="Sample-level obs columns regressed on")
    groupby: str | None = Field(None, description="obs column / 'cell_clusters' for group-mean LFCs")
    admissible: bool = Field(True, description="Drop out-of-distribution cell-sample pairs first")
    quantile: float = Field(0.05, gt=0, lt=1)
    max_cells: int = Field(1000, ge=1)
    seed: int = 0

    @model_validator(mode="before")
    @classmethod
    def _one_covariate(cls, v):
        if isinstance(v, dict) and isinstance(v.get("covariates"), str):
            v = {**v, "covariates": [v["covariates"]]}
        return v


class DaOptions(_Opts):
    sample_groups: str = Field(..., description="Sample-level obs column: each value against the rest")
    groupby: str | None = Field(None, description="obs column / 'cell_clusters' of the cell groups to test")
    max_cells: int = Field(500, ge=1, description="Cells per sample representing q_s")
    delta: float = Field(0.1, ge=0, description="Composite-null margin of the cluster-level t-test")
    seed: int = 0


class MrviAnalyses(_Opts):
    """Which post-training analyses to run (a key present = run it, with these parameters)."""
    engine: Literal["dask", "local"] = Field("dask", description="Map cell chunks on the run's Dask cluster or in-process")
    distances: DistancesOptions | None = None
    sample_clusters: SampleClustersOptions | None = None
    cell_clusters: CellClustersOptions | None = None
    admissibility: AdmissibilityOptions | None = None
    de: DeOptions | None = None
    da: DaOptions | None = None

    @model_validator(mode="after")
    def _prerequisites(self):
        if self.sample_clusters is not None and self.distances is None:
            raise ValueError("sample_clusters clusters the distances: add 'distances: {}'")
        for name in ("distances", "de", "da"):
            opts = getattr(self, name)
            if opts is not None and opts.groupby == "cell_clusters" and self.cell_clusters is None:
                raise ValueError(f"{name}.groupby 'cell_clusters' needs the cell_clusters analysis: add 'cell_clusters: {{}}'")
        return self

    def requested(self) -> dict[str, dict]:
        """``run_analyses``' argument: analysis name -> keyword arguments."""
        return {k: getattr(self, k).model_dump() for k in ("cell_clusters", "distances", "sample_clusters",
                                                           "admissibility", "de", "da")
                if getattr(self, k) is not None}

    def obs_columns(self) -> dict[str, str]:
        """Dotted spec key -> obs column named there (checked against the study)."""
        out = {}
        for name in ("distances", "de", "da"):
            opts = getattr(self, name)
            if opts is None:
                continue
            if opts.groupby not in (None, "cell_clusters"):
                out[f"{name}.groupby"] = opts.groupby
        if self.de is not None:
            out.update({f"de.covariates[{i}]": c for i, c in enumerate(self.de.covariates)})
        if self.da is not None:
            out["da.sample_groups"] = self.da.sample_groups
        return out


class MrviConfig(VaeTrainConfig):
    sample_key: str = Field("donor", description="obs column of the target sample s_n")
    batch_key: str | None = Field(None, description="obs column of the nuisance covariate b_n")
    labels_key: str | None = Field(None, description="obs column of cell-type labels for the label-informed prior")
    n_latent: int = Field(30, ge=1, description="Dimension of z")
    n_latent_u: int = Field(10, ge=1, description="Dimension of u")
    variant: Literal["attention", "linear"] = Field("attention", description="MrVI (attention) or the linear variant")
    analyses: MrviAnalyses | None = Field(None, description="Post-training analyses (distances, sample_clusters, "
                                                            "cell_clusters, admissibility, de, da)")


def training_hash(cfg: MrviConfig) -> str:
    from ..spec import config_hash
    return config_hash("mrvi", cfg.model_dump(exclude={"analyses"}))


class MrviStage(Stage):
    name = "mrvi"
    Config = MrviConfig
    requires = ("cells",)
    engine = "ray"

    def products(self, cfg: MrviConfig) -> tuple[str, ...]:
        return (f"results/mrvi/{cfg.run}",)

    def check(self, cfg: MrviConfig, study) -> None:
        from ...errors import SpecError
        if study is None or not study.has("cells"):
            return
        obs = study.obs()
        cols = list(obs.columns)
        for key in ("sample_key", "batch_key", "labels_key"):
            val = getattr(cfg, key)
            if val is not None and val not in cols:
                raise SpecError(f"{key} {val!r} is not an obs column", field=f"mrvi.{key}", fix=f"use one of {cols}")
        if cfg.analyses is None:
            return
        for key, col in cfg.analyses.obs_columns().items():
            if col not in cols:
                raise SpecError(f"{col!r} is not an obs column", field=f"mrvi.analyses.{key}", fix=f"use one of {cols}")
        sample_level = cfg.analyses.obs_columns()
        for key, col in sample_level.items():
            if key.startswith(("de.", "da.")) and not key.endswith("groupby"):
                per_sample = obs.groupby(obs[cfg.sample_key].astype(str), observed=True)[col].nunique(dropna=False)
                if (per_sample > 1).any():
                    raise SpecError(f"{col!r} varies within samples ({int((per_sample > 1).sum())} of them)",
                                    field=f"mrvi.analyses.{key}",
                                    fix=f"use a sample-level column (constant within each {cfg.sample_key})")

    def reset(self, store_url: str, cfg: MrviConfig) -> None:
        """Keep the trained model and latents when only ``analyses`` changed (their results carry
        their own fingerprints); otherwise forget everything (default)."""
        from ...store.markers import clear_markers, read_marker
        from ..graph import product_url

        url = product_url(store_url, self.products(cfg)[0])
        if (read_marker(url, TRAINED) or {}).get("meta", {}).get("hash") == training_hash(cfg):
            clear_markers(url, [STAGE_MARKER, STARTED_MARKER])
            return
        super().reset(store_url, cfg)

    def plan(self, study, cfg: MrviConfig) -> StagePlan:
        return vae_plan(study, cfg, "mrvi")

    def run(self, ctx, cfg: MrviConfig) -> None:
        from ...store.markers import mark_done
        from ...vae import MrVI, train_mrvi

        study = ctx.study
        url = prepare_results(ctx, "mrvi", cfg.run, {"u": (cfg.n_latent_u, "latent_u"), "z": (cfg.n_latent, "latent_z")})
        if cfg.num_workers > 1 or cfg.use_gpu:
            ctx.ray()
        kw = train_kwargs(cfg, f"{url}/checkpoints")
        kw.update(n_latent=cfg.n_latent, n_latent_u=cfg.n_latent_u, variant=cfg.variant)
        model = trained_model(url, MrVI, lambda: train_mrvi(study, cfg.sample_key, cfg.batch_key, cfg.labels_key,
                                                            seed=cfg.seed, **kw))
        write_vae_results(ctx, model, url, {
            "u": (lambda idx: model.latent("u", study, cells=idx).values, "latent_u"),
            "z": (lambda idx: model.latent("z", study, cells=idx).values, "latent_z"),
        })
        mark_done(url, TRAINED, {"hash": training_hash(cfg)})
        if cfg.analyses is None:
            return
        from ...vae.analysis import run_analyses

        requested = cfg.analyses.requested()
        client = ctx.client() if cfg.analyses.engine == "dask" else None
        with ctx.progress("mrvi analyses", len(requested)) as bar:
            run_analyses(model, study, cfg.run, requested, client=client, tag=training_hash(cfg),
                         progress=lambda name: bar.update())
