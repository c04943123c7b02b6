"""LDVAE decoder batch norm on the small gene-program study of the tests: held-out figures at equal
epochs of the default (decoder batch norm, offsets started at the log gene shares, encoder batch
norm off), the plain linear decoder (``decoder_batch_norm=False``) and other initial per-gene
scales (``decoder_bn_scale``).

    .venv/bin/python benchmarks/ldvae_quality_scvi_bn_init.py --epochs 3 40 [--seeds 0 1]
        [--scales 1 0.5]

Study: ``scdist.vae.simulate.gene_programs(n_cells=2400, n_genes=200, n_types=5, n_markers=20,
seed=1)`` (the fixture of tests/test_ldvae.py), 5 factors, batch = batch, no early stopping, one
torch thread; the held-out 10% follows the model seed (compare within a seed). Reported per
model: held-out reconstruction NLL and -ELBO per cell, the learnt BN scales (5 / 50 / 95%
quantiles) and the top-20 program-gene precision of ``loadings()`` (the test's metric).
Results: benchmarks/results/ldvae_bn_init_<epochs>.json (one file per epoch count; their versions
before commit 3398830 hold "default" = the plain linear decoder and "bn_scale<s>" = batch norm
with offsets 0 and the encoder's batch norm on).
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, nargs="+", default=[3, 40])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--scales", type=float, nargs="+", default=[1.0, 0.5])
    a = ap.parse_args()
    import torch
    torch.set_num_threads(1)
    from scdist.vae import train_ldvae
    from scdist.vae.simulate import gene_programs, marker_precision

    adata, markers = gene_programs(n_cells=2400, n_genes=200, n_types=5, n_markers=20, seed=1)
    variants = {"linear": {"decoder_batch_norm": False}} | {
        ("default" if s == 1 else f"bn_scale{s:g}"): ({} if s == 1 else {"decoder_bn_scale": s}) for s in a.scales}
    RESULTS.mkdir(exist_ok=True)
    print("| epochs | model | held-out recon NLL per cell (seed " + " / ".join(map(str, a.seeds))
          + ") | -ELBO | top-20 precision | BN scale quantiles (first seed) |")
    print("|---|---|---|---|---|---|")
    for ep in a.epochs:
        out = {"epochs": ep, "seeds": a.seeds, "code": "decoder batch norm default (bn-default-v2)", "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
               "loadavg_start": [round(v, 2) for v in os.getloadavg()], "models": {}}
        for name, opts in variants.items():
            rows = []
            for seed in a.seeds:
                t0 = time.perf_counter()
                m = train_ldvae(adata, "batch", n_latent=5, seed=seed, max_epochs=ep, early_stopping=False, **opts)
                ev = m.evaluate(adata)
                bn = m.module.decoder_bn
                rows.append({"seed": seed, "recon": float(ev["recon"]), "nelbo": float(ev["nelbo"]),
                             "top20_precision": marker_precision(m.loadings().values, markers, 20),
                             "bn_scale_q05_50_95": None if bn is None else
                             np.quantile(bn.weight.detach().numpy(), [0.05, 0.5, 0.95]).round(3).tolist(),
                             "wall_s": time.perf_counter() - t0})
            out["models"][name] = {"options": opts, "runs": rows}
            f = lambda key, fmt: " / ".join(fmt.format(r[key]) for r in rows)  # noqa: E731
            print(f"| {ep} | {name} | {f('recon', '{:.1f}')} | {f('nelbo', '{:.1f}')} | "
                  f"{f('top20_precision', '{:.0%}')} | {rows[0]['bn_scale_q05_50_95'] or ''} |", flush=True)
        out["loadavg_end"] = [round(v, 2) for v in os.getloadavg()]
        (RESULTS / f"ldvae_bn_init_{ep}.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
