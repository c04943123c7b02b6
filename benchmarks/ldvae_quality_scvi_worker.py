"""Runs inside benchmarks/.venv-scvi (scvi-tools 1.4.2): LinearSCVI on an h5ad's training cells,
then its loadings, and held-out reconstruction / ELBO on the masked cells. Called by
ldvae_quality_scvi.py.

Usage: python ldvae_quality_scvi_worker.py H5AD VAL_MASK.npy EPOCHS BATCH_KEY OUT.npz SEED JSON_OPTIONS
JSON_OPTIONS: {"model": {...LinearSCVI kwargs}, "plan": {...plan_kwargs}} (empty: scvi-tools' defaults).
"""
from __future__ import annotations

import json
import os
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")


def main(h5ad, val_mask, epochs, batch_key, out, seed, options):
    import anndata as ad
    import numpy as np
    import torch
    import scvi

    torch.set_num_threads(1)
    scvi.settings.seed = seed
    scvi.settings.dl_num_workers = 0
    adata = ad.read_h5ad(h5ad)
    val = np.load(val_mask)
    train = adata[~val].copy()
    held = adata[val].copy()
    scvi.model.LinearSCVI.setup_anndata(train, batch_key=batch_key or None)
    m = scvi.model.LinearSCVI(train, n_latent=10, **options.get("model", {}))
    t0 = time.perf_counter()
    m.train(max_epochs=epochs, batch_size=256, train_size=1.0, early_stopping=False, accelerator="cpu",
            devices=1, enable_progress_bar=False, logger=False, enable_checkpointing=False,
            plan_kwargs=options.get("plan") or None)
    train_s = time.perf_counter() - t0
    W = m.get_loadings()  # DataFrame gene x factor (batch-norm scale folded in when used)
    rec = m.get_reconstruction_error(held)  # setup transferred from the training AnnData
    res = {"recon": float(list(rec.values())[0]) if isinstance(rec, dict) else float(rec),
           "nelbo": -float(m.get_elbo(held)), "train_s": train_s, "n_train": int(train.n_obs),
           "scvi": scvi.__version__, "options": options}
    np.savez(out, loadings=W.to_numpy(), genes=np.asarray(W.index, dtype=str), meta=json.dumps(res))


if __name__ == "__main__":
    a = sys.argv[1:]
    main(a[0], a[1], int(a[2]), a[3], a[4], int(a[5]), json.loads(a[6]))
