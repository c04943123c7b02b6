"""Stage ``ldvae``: train LDVAE on ``cells/`` and store latent factors and gene loadings.

Training checkpoints go to ``results/ldvae/<run>/checkpoints`` (a rerun resumes from the last
epoch); in-process by default, Ray Train (``TorchTrainer``, DDP) when ``num_workers`` > 1 or
``use_gpu``. The results Dataset ``results/ldvae/<run>`` holds ``z(cell, latent)`` (the latent factors)
written per cell chunk (each chunk's completion marker after its data), ``loadings(gene,
latent)`` and the training history; the fitted model is saved under ``<run>/model``.
"""
from __future__ import annotations

from typing import Any

import numpy as np
from pydantic import Field

from ..stage import Stage, StageConfig, StagePlan


class VaeTrainConfig(StageConfig):
    run: str = Field("default", description="Run name: results/<method>/<run>")
    seed: int = Field(0, description="Seed of initialisation, shuffling and sampling")
    max_epochs: int | None = Field(None, ge=1, description="Epochs (default: scVI heuristic from the cell count)")
    batch_size: int = Field(256, ge=8, description="Minibatch size")
    lr: float = Field(1e-3, gt=0, description="Learning rate")
    val_fraction: float = Field(0.1, ge=0, lt=1, description="Held-out cells for validation / early stopping")
    patience: int = Field(10, ge=1, description="Early-stopping patience (epochs)")
    num_workers: int = Field(1, ge=1, description="Data-parallel workers (> 1: Ray Train)")
    use_gpu: bool = Field(False, description="Train on GPUs under Ray Train")
    timeout_s: float | None = Field(None, gt=0, description="Fail if Ray Train takes longer")
    options: dict[str, Any] = Field(default_factory=dict, description="Further model options")


class LdvaeConfig(VaeTrainConfig):
    """``options`` are train_ldvae's: e.g. ``decoder_batch_norm`` (default true, the paper's variant;
    false gives the plain linear decoder), ``likelihood``, ``library``, ``n_hidden``."""

    batch_key: str | None = Field(None, description="obs column of the batch covariate (e.g. 'batch')")
    n_latent: int = Field(10, ge=1, description="Number of factors K")


def train_kwargs(cfg: VaeTrainConfig, checkpoint_dir: str) -> dict:
    kw = dict(max_epochs=cfg.max_epochs, batch_size=cfg.batch_size, lr=cfg.lr, val_fraction=cfg.val_fraction,
              patience=cfg.patience, num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
              checkpoint_dir=checkpoint_dir, run_name=f"{cfg.run}")
    if cfg.timeout_s:
        kw["timeout_s"] = cfg.timeout_s
    return {**kw, **cfg.options}


def vae_plan(study, cfg: VaeTrainConfig, method: str) -> StagePlan:
    res = {"workers": cfg.num_workers, "engine": "ray-train" if cfg.num_workers > 1 or cfg.use_gpu else "local",
           "gpu": cfg.use_gpu}
    url = study.result_url(method, cfg.run) if study is not None else None
    if study is None or not study.has("cells"):
        return StagePlan(chunk_desc="training, then one latent block per cell chunk", resources=res, output_url=url)
    n = len(study.cell_chunks)
    return StagePlan(chunks=n, chunk_desc=f"train on {study.n_cells:,} cells, then write latents of {n} cell chunks",
                     resources=res, output_url=url)


def prepare_results(ctx, method: str, run: str, cell_vars: dict[str, tuple[int, str]],
                    gene_vars: dict[str, tuple[int, str]] | None = None) -> str:
    """Write the template of ``results/<method>/<run>`` once, before training, so that the
    checkpoints written into its ``checkpoints/`` survive; a rerun keeps both."""
    import dask.array as da
    import xarray as xr

    from ...store.markers import is_done, mark_done
    from ...store.results import write_template

    study = ctx.study
    url = study.result_url(method, run)
    if is_done(url, "__template__"):
        return url
    chunks = study.cell_chunks
    csize = int(chunks[0][1] - chunks[0][0])
    cells = np.asarray(study.obs().index.astype(str), dtype=object)
    genes = np.asarray(study.gene_names, dtype=object)
    data = {}
    for name, (n_lat, lat_dim) in cell_vars.items():
        data[name] = xr.DataArray(da.full((study.n_cells, n_lat), np.nan, dtype=np.float32, chunks=(csize, n_lat)),
                                  dims=("cell", lat_dim))
    for name, (n_lat, lat_dim) in (gene_vars or {}).items():
        data[name] = xr.DataArray(da.full((study.n_genes, n_lat), np.nan, dtype=np.float32), dims=("gene", lat_dim))
    lat_dims = {d: n for n, d in list(cell_vars.values()) + list((gene_vars or {}).values())}
    coords = {"cell": cells, **({"gene": genes} if gene_vars else {}),
              **{d: np.array([str(i) for i in range(n)], dtype=object) for d, n in lat_dims.items()}}
    tmpl = xr.Dataset(data, coords=coords, attrs={"method": method, "run": run})
    write_template(tmpl, url, {"cell": csize})
    mark_done(url, "__template__")
    return url


def write_vae_results(ctx, model, url: str, latent_fns: dict, gene_vars: dict | None = None) -> None:
    """Fill the template: gene-indexed results, the saved model (``model/``), the training
    history (``history/``), then per-cell latents chunk by chunk, each chunk's marker after it."""
    import xarray as xr

    from ...store.markers import done_set, mark_done
    from ...store.results import write_region

    study = ctx.study
    chunks = [(int(a), int(b)) for a, b in study.cell_chunks]
    cells = np.asarray(study.obs().index.astype(str), dtype=object)
    done = done_set(url)
    if "__model__" not in done:
        if gene_vars:
            write_region(xr.Dataset(gene_vars), url, {"gene": slice(0, study.n_genes)})
        h = model.history
        hist = xr.Dataset({"train_loss": ("epoch", np.asarray(h.train_loss, float)),
                           "val_nelbo": ("epoch", np.asarray(h.val_nelbo or [np.nan] * len(h.epoch), float)),
                           "epoch_seconds": ("epoch", np.asarray(h.seconds, float))},
                          coords={"epoch": np.asarray(h.epoch, int)},
                          attrs={"best_epoch": int(h.best_epoch), "stopped_early": bool(h.stopped_early)})
        hist.to_zarr(f"{url}/history", mode="w", consolidated=False, zarr_format=3)
        model.save(f"{url}/model")
        mark_done(url, "__model__", {"best_epoch": int(h.best_epoch), "epochs": len(h.epoch)})
    with ctx.progress(f"{model.method} latent chunks", len(chunks)) as bar:
        for i, (a, b) in enumerate(chunks):
            cid = f"cells-{i:06d}"
            if cid in done:
                bar.update()
                continue
            block = xr.Dataset({name: xr.DataArray(fn(np.arange(a, b)), dims=("cell", lat_dim))
                                for name, (fn, lat_dim) in latent_fns.items()}, coords={"cell": cells[a:b]})
            write_region(block, url, {"cell": slice(a, b)})
            mark_done(url, cid, {"cells": [a, b]})
            bar.update()


def trained_model(url: str, cls, train):
    """The model saved by an earlier, interrupted run of this stage, or a newly trained one."""
    from ...store.markers import is_done

    if is_done(url, "__model__"):
        return cls.load(f"{url}/model")
    return train()


class LdvaeStage(Stage):
    name = "ldvae"
    Config = LdvaeConfig
    requires = ("cells",)
    engine = "ray"

    def products(self, cfg: LdvaeConfig) -> tuple[str, ...]:
        return (f"results/ldvae/{cfg.run}",)

    def check(self, cfg: LdvaeConfig, study) -> None:
        from ...errors import SpecError
        if study is not None and study.has("cells") and cfg.batch_key and cfg.batch_key not in study.obs().columns:
            raise SpecError(f"batch_key {cfg.batch_key!r} is not an obs column", field="ldvae.batch_key",
                            fix=f"use one of {list(study.obs().columns)} or null")

    def plan(self, study, cfg: LdvaeConfig) -> StagePlan:
        return vae_plan(study, cfg, "ldvae")

    def run(self, ctx, cfg: LdvaeConfig) -> None:
        from ...vae import LDVAE, train_ldvae

        study = ctx.study
        url = prepare_results(ctx, "ldvae", cfg.run, {"z": (cfg.n_latent, "latent")},
                              {"loadings": (cfg.n_latent, "latent")})
        if cfg.num_workers > 1 or cfg.use_gpu:
            ctx.ray()
        model = trained_model(url, LDVAE, lambda: train_ldvae(
            study, cfg.batch_key, cfg.n_latent, seed=cfg.seed, **train_kwargs(cfg, f"{url}/checkpoints")))
        write_vae_results(ctx, model, url, {"z": (lambda idx: model.latent(study, cells=idx).values, "latent")},
                          gene_vars={"loadings": model.loadings().drop_vars(["gene", "latent"])})
