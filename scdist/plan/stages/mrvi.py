"""Stage ``mrvi``: train MrVI on ``cells/`` (sample = donor by default) and store u and z.

Same store protocol as the ``ldvae`` stage: checkpoints in ``results/mrvi/<run>/checkpoints``
(resume), ``u(cell, latent_u)`` and ``z(cell, latent_z)`` written per cell chunk with
markers, the history, and the model under ``<run>/model`` for the post-training analyses.
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from ..stage import Stage, StagePlan
from .ldvae import VaeTrainConfig, prepare_results, train_kwargs, trained_model, vae_plan, write_vae_results


class MrviConfig(VaeTrainConfig):
    sample_key: str = Field("donor", description="obs column of the target sample s_n")
    batch_key: str | None = Field(None, description="obs column of the nuisance covariate b_n")
    labels_key: str | None = Field(None, description="obs column of cell-type labels for the label-informed prior")
    n_latent: int = Field(30, ge=1, description="Dimension of z")
    n_latent_u: int = Field(10, ge=1, description="Dimension of u")
    variant: Literal["attention", "linear"] = Field("attention", description="MrVI (attention) or the linear variant")


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
        cols = list(study.obs().columns)
        for key in ("sample_key", "batch_key", "labels_key"):
            val = getattr(cfg, key)
            if val is not None and val not in cols:
                raise SpecError(f"{key} {val!r} is not an obs column", field=f"mrvi.{key}", fix=f"use one of {cols}")

    def plan(self, study, cfg: MrviConfig) -> StagePlan:
        return vae_plan(study, cfg, "mrvi")

    def run(self, ctx, cfg: MrviConfig) -> None:
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
