"""Does LDVAE's default (decoder batch norm, no encoder batch norm) train slower than the former
default (plain linear decoder, encoder batch norm)? Both side by side in one process, alternating,
on the data of benchmarks/vae_benchmark.py (run that first: it writes the h5ad), LinearSCVI's
sizes (10 factors, 128 hidden, NB, latent library), one torch thread, 2 epochs per fit; the
second epoch's train cells per second, median over ``--repeats`` alternating pairs.

    .venv/bin/python benchmarks/ldvae_quality_scvi_default_speed.py [--repeats 3]

Results: benchmarks/results/ldvae_default_speed.json.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--h5ad", default=str(HERE / "out" / "vae_bench_20000x2000.h5ad"))
    a = ap.parse_args()
    import anndata as ad
    import torch
    torch.set_num_threads(1)
    from scdist.vae import train_ldvae

    adata = ad.read_h5ad(a.h5ad)
    variants = {"default": {}, "former_default": {"decoder_batch_norm": False}}
    runs = {k: [] for k in variants}
    load = []
    for _ in range(a.repeats):
        for name, opts in variants.items():
            m = train_ldvae(adata, None, n_latent=10, library="latent", seed=0, max_epochs=2, early_stopping=False,
                            **opts)
            runs[name].append(m.history.train_cells[1] / m.history.seconds[1])
            load.append(round(os.getloadavg()[0], 2))
            print(name, round(runs[name][-1]), "cells/s", flush=True)
    med = {k: float(np.median(v)) for k, v in runs.items()}
    out = {"when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "h5ad": a.h5ad, "cells_per_s": runs,
           "median": med, "ratio_default_over_former": med["default"] / med["former_default"], "loadavg_1min": load}
    print(json.dumps({k: out[k] for k in ("median", "ratio_default_over_former", "loadavg_1min")}))
    (HERE / "results" / "ldvae_default_speed.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
