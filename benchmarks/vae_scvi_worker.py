"""Runs inside benchmarks/.venv-scvi (scvi-tools 1.4.2): trains LinearSCVI or MRVI on an h5ad and
writes per-epoch training seconds (wall and process CPU) and held-out reconstruction to JSON. Called by vae_benchmark.py.

Usage: python vae_scvi_worker.py MODEL H5AD VAL_MASK.npy EPOCHS BATCH_SIZE OUT.json
"""
from __future__ import annotations

import json
import os
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")


def main(model_name, h5ad, val_mask, epochs, batch_size, out):
    import anndata as ad
    import numpy as np
    import torch
    import lightning.pytorch as pl
    import scvi

    torch.set_num_threads(1)
    scvi.settings.seed = 0
    scvi.settings.dl_num_workers = 0
    adata = ad.read_h5ad(h5ad)
    val = np.load(val_mask)
    train = adata[~val].copy()
    held = adata[val].copy()
    times, cpu_times = [], []

    class Timer(pl.Callback):  # training batches only (validation runs inside the epoch hooks)
        def on_train_epoch_start(self, trainer, module):
            self.t0 = self.t1 = time.perf_counter()
            self.c0 = self.c1 = time.process_time()  # CPU seconds of this process (all its threads)

        def on_train_batch_end(self, *args, **kwargs):
            self.t1, self.c1 = time.perf_counter(), time.process_time()

        def on_train_epoch_end(self, trainer, module):
            times.append(self.t1 - self.t0)
            cpu_times.append(self.c1 - self.c0)

    kw = dict(max_epochs=epochs, batch_size=batch_size, train_size=1.0, accelerator="cpu", devices=1,
              callbacks=[Timer()], enable_progress_bar=False, logger=False, enable_checkpointing=False)
    if model_name == "linearscvi":
        scvi.model.LinearSCVI.setup_anndata(train)
        m = scvi.model.LinearSCVI(train, n_latent=10)
        m.train(early_stopping=False, plan_kwargs={"lr": 1e-3}, **kw)
        scvi.model.LinearSCVI.setup_anndata(held)
        rec = m.get_reconstruction_error(held)
        elbo = -m.get_elbo(held)  # get_elbo returns the ELBO (higher is better)
        res = {"recon": float(list(rec.values())[0]) if isinstance(rec, dict) else float(rec),
               "nelbo": float(elbo)}
    else:
        from scvi.external import MRVI
        MRVI.setup_anndata(train, sample_key="sample")
        m = MRVI(train)
        kw["train_size"] = 0.9  # MRVI's trainer needs a validation loader
        m.train(**kw)
        res = {"n_train_used": int(len(m.train_indices)) if getattr(m, "train_indices", None) is not None else None}
    n_train = res.pop("n_train_used", None) or int(train.n_obs)
    res.update(model=model_name, n_train=n_train, epoch_seconds=times, epoch_cpu_seconds=cpu_times,
               torch_threads=torch.get_num_threads(), scvi=scvi.__version__,
               n_params=int(sum(p.numel() for p in m.module.parameters())))
    with open(out, "w") as f:
        json.dump(res, f)


if __name__ == "__main__":
    a = sys.argv[1:]
    main(a[0], a[1], a[2], int(a[3]), int(a[4]), a[5])
