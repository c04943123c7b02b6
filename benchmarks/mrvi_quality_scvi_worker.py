"""Runs inside benchmarks/.venv-scvi (scvi-tools 1.4.2, torch MRVI): trains MRVI on the h5ad that
mrvi_quality_scvi.py exported from scdist's semi-synthetic study and writes what the quality
figures need (called by mrvi_quality_scvi.py; not meant to be run by hand).

Usage: python mrvi_quality_scvi_worker.py H5AD EPOCHS OUT.npz [TRAIN_SEED]

Written to OUT.npz: ``samples`` (the model's sample order), ``dist_<celltype>`` (aggregated local
sample distances per cell type, Euclidean between counterfactual means of z, as
``get_local_sample_distances(groupby="celltype")`` returns them), ``log_probs`` (cells x samples,
``differential_abundance``'s per-sample aggregated-posterior log densities), ``de_cells`` / ``lfc``
(``differential_expression(sample_cov_keys=["top_group"], store_lfc=True)`` on a subset of cells:
per-cell LFC of top group 1 vs 0, dims cell x covariate x gene,
on 600 random cells of the DE type), ``u`` (cells x 10, posterior mean of u), ``train_s``, ``epochs_run``.
"""
from __future__ import annotations

import sys
import time

import numpy as np

from mrvi_bench_common import peak_rss_gib  # noqa: F401  (pins OpenMP to one thread)


def main(h5ad: str, epochs: int, out: str, seed: int = 0):
    import anndata as ad
    import torch
    import scvi
    from scvi.external import MRVI

    torch.set_num_threads(1)
    scvi.settings.seed = seed
    scvi.settings.dl_num_workers = 0
    adata = ad.read_h5ad(h5ad)
    MRVI.setup_anndata(adata, sample_key="donor", batch_key="batch")
    m = MRVI(adata)
    t0 = time.perf_counter()
    m.train(max_epochs=epochs, batch_size=256, accelerator="cpu", devices=1, train_size=0.9,
            enable_progress_bar=False, logger=False, enable_checkpointing=False)
    train_s = time.perf_counter() - t0
    res = {"train_s": train_s, "epochs_run": int(m.trainer.current_epoch) if getattr(m, "trainer", None) else epochs}
    res["samples"] = np.asarray(m.sample_order, dtype=str)
    res["u"] = m.get_latent_representation(adata, give_z=False)
    d = m.get_local_sample_distances(adata, keep_cell=False, groupby="celltype", batch_size=256)
    agg = d["celltype"]
    sample_dim = [k for k in agg.dims if k != "celltype_name" and k != "celltype"][0]
    group_dim = [k for k in agg.dims if "celltype" in k][0]
    for ct in agg[group_dim].values:
        res[f"dist_{ct}"] = agg.sel({group_dim: ct}).values
    res["dist_sample_order"] = np.asarray(agg[sample_dim].values, dtype=str)
    da = m.differential_abundance(adata)
    res["log_probs"] = da["log_probs"].values
    res["log_probs_samples"] = np.asarray(da["sample"].values, dtype=str)
    rng = np.random.default_rng(0)
    de_type = adata.uns["mrvi_celltype"]
    in_type = np.flatnonzero(adata.obs["celltype"].astype(str).to_numpy() == de_type)
    de_cells = np.sort(rng.choice(in_type, min(600, in_type.size), replace=False))
    sub = adata[de_cells].copy()
    de = m.differential_expression(sub, sample_cov_keys=["top_group"], store_lfc=True)
    lfc = de["lfc"]
    res["lfc"] = lfc.values
    res["lfc_dims"] = np.asarray(lfc.dims, dtype=str)
    res["lfc_covariate"] = np.asarray(lfc["covariate"].values, dtype=str)
    res["de_cells"] = de_cells
    np.savez(out, **res)


if __name__ == "__main__":
    a = sys.argv[1:]
    main(a[0], int(a[1]), a[2], int(a[3]) if len(a) > 3 else 0)
