"""LDVAE loading precision on the semi-synthetic study of mrvi_quality.py (issue 5: "78% of
LDVAE's top-100 loading genes per factor are true markers or DE genes").

    .venv/bin/python benchmarks/mrvi_quality_ldvae.py [--cells 20000] [--epochs 40] [--top 100]

Same study as mrvi_quality.py (``build_study``: 40 donors, 500 genes, 4 cell types). LDVAE with
defaults (10 factors, NB, batch = batch), one torch thread, ``--epochs`` epochs. For each factor,
the ``--top`` genes by |loading|; reported: the share of them that are true cell-type markers
(``truth/marker``, any type) or MrVI DE genes (``truth/mrvi_gene``), per factor and on average,
next to the share such genes have among all genes (what random loadings would give), plus the
held-out negative ELBO / reconstruction. Results: benchmarks/out/mrvi_quality_ldvae_<...>.json.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from mrvi_quality import OUT, build_study  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cells", type=int, default=20_000)
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--top", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    import torch
    torch.set_num_threads(1)
    from scdist.simulate.population import MRVI_DESIGN_VERSION
    from scdist.vae import LDVAE, train_ldvae

    study = build_study(a.cells, a.seed)
    truth = study.truth()
    run = f"ldvae_q{MRVI_DESIGN_VERSION}_{a.epochs}_{a.seed}"
    mdir = OUT / f"mrvi_quality_model_{a.cells}_{run}"
    t0 = time.perf_counter()
    if (mdir / "config.json").exists():
        model = LDVAE.load(str(mdir))
    else:
        model = train_ldvae(study, "batch", 10, seed=a.seed, max_epochs=a.epochs, run_name=run)
        model.save(str(mdir))
    train_s = time.perf_counter() - t0
    W = model.loadings()
    genes = list(truth["gene"].values)
    assert list(W["gene"].values) == genes
    marker = truth["marker"].values.any(0)
    de = truth["mrvi_gene"].values.astype(bool)
    relevant = marker | de
    top = np.argsort(-np.abs(W.values), axis=0, kind="stable")[: a.top]  # top x factor
    per_factor = relevant[top].mean(0)
    res = {"cells": a.cells, "epochs": a.epochs, "top": a.top, "train_s": train_s,
           "epochs_run": len(model.history.epoch), "precision_mean": float(per_factor.mean()),
           "precision_per_factor": [round(float(p), 3) for p in per_factor],
           "marker_share_of_top": float(marker[top].mean()), "de_share_of_top": float(de[top].mean()),
           "base_rate": float(relevant.mean()), "n_relevant": int(relevant.sum()), "n_genes": len(genes),
           "heldout": {k: float(v) for k, v in model.evaluate(study).items()}}
    OUT.mkdir(exist_ok=True)
    (OUT / f"mrvi_quality_ldvae_{a.cells}_{run}_top{a.top}.json").write_text(json.dumps(res, indent=1))
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
