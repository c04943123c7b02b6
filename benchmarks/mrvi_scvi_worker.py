"""Runs inside benchmarks/.venv-scvi (scvi-tools 1.4.2, torch MRVI): the post-training analyses
of MRVI timed in CPU seconds on one thread, written to JSON. Called by mrvi_analysis_bench.py.

Usage: python mrvi_scvi_worker.py H5AD WHAT N_CELLS OUT.json [REPEATS]
WHAT: distances | distances_norm | de | da. Each runs in its own process so its peak RSS is its own.
"""
from __future__ import annotations

import json
import sys

from mrvi_bench_common import record, reset_peak_rss, timed_repeats


def main(h5ad, what, n_cells, out, repeats=1):
    import anndata as ad
    import torch
    import scvi
    from scvi.external import MRVI

    torch.set_num_threads(1)
    scvi.settings.seed = 0
    scvi.settings.dl_num_workers = 0
    adata = ad.read_h5ad(h5ad)
    MRVI.setup_anndata(adata, sample_key="sample")
    m = MRVI(adata)
    m.train(max_epochs=1, batch_size=256, accelerator="cpu", devices=1, train_size=0.9,
            enable_progress_bar=False, logger=False, enable_checkpointing=False)
    sub = adata[:n_cells].copy()
    run = {"distances": lambda: m.get_local_sample_distances(sub, keep_cell=False, groupby="celltype",
                                                             batch_size=256),
           # its normalisation draws mc_samples states per cell and sample (use_mean=False)
           "distances_norm": lambda: m.get_local_sample_distances(sub, keep_cell=False, groupby="celltype",
                                                                  batch_size=256, use_mean=False,
                                                                  normalize_distances=True, mc_samples=10),
           "de": lambda: m.differential_expression(sub, sample_cov_keys=["group"], store_lfc=True,
                                                   filter_inadmissible_samples=True),
           "da": lambda: m.differential_abundance(sub, sample_cov_keys=["group"], compute_log_enrichment=True)}
    if what not in run:
        raise SystemExit(f"unknown {what}")
    reset_peak_rss()
    res = record(f"scvi-tools {scvi.__version__} MRVI", what, sub.n_obs, adata.obs["sample"].nunique(),
                 *timed_repeats(run[what], repeats))
    with open(out, "w") as f:
        json.dump(res, f)


if __name__ == "__main__":
    a = sys.argv[1:]
    main(a[0], a[1], int(a[2]), a[3], int(a[4]) if len(a) > 4 else 1)
