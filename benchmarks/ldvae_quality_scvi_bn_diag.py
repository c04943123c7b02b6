"""LDVAE decoder batch norm in short training: why the held-out ELBO of tests/test_vae_ray.py's
run got worse over its first epochs with ``decoder_batch_norm=True``.

    .venv/bin/python benchmarks/ldvae_quality_scvi_bn_diag.py [--epochs 3] [--ray]

Study and settings of ``test_ldvae_two_ray_workers``: ``gene_programs(n_cells=2000, n_genes=100,
n_types=3, n_markers=10, seed=0)``, 3 factors, ``n_hidden=32``, batch = batch, seed 0, one torch
thread. In-process runs with batch 256 (7 steps per epoch) and batch 512 (3 steps per epoch: the
step count of 2 DDP workers x 256). After every epoch the held-out set (the same 10%) is scored
four ways, each as -ELBO = reconstruction NLL + KL per cell:

- ``running``: eval mode, the decoder BN's running statistics (what ``evaluate`` reports);
- ``batch``: eval mode except the decoder BN, which normalises with the held-out minibatch's own
  statistics (what training sees);
- ``exact``: running statistics replaced by the exact mean / variance of the decoder logits over
  all training cells (posterior samples, one pass, no gradient);
- ``running`` again with the KL weight schedule off (``kl_warmup_epochs=0``) and at other
  learning rates (``--lrs``).

``--ray`` adds the Ray Train run of the test (2 workers) with its per-epoch held-out -ELBO and
reconstruction. Results: benchmarks/results/ldvae_bn_diag.json.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import time
from pathlib import Path

from scdist.vae.base import build_module

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"


def _score(module, val_loader, mode: str, train_loader=None) -> dict:
    import torch
    with torch.random.fork_rng():  # training's random stream is left as it was
        return _score_inner(module, val_loader, mode, train_loader)


def _score_inner(module, val_loader, mode, train_loader):
    import torch
    m = copy.deepcopy(module).eval()
    bn = m.decoder_bn
    if bn is not None and mode == "batch":
        bn.train()
        bn.momentum = 0.0  # batch statistics, buffers left alone
    if bn is not None and mode == "exact":
        # one pass over the training cells: mean / var of the logits W z (+ B s) under q(z | x)
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average = the exact pass mean of per-batch statistics
        bn.train()
        with torch.no_grad():
            for b in train_loader:
                z, _, _ = m.encode(b["x"], b["batch"])
                bn(m.decoder(m._with_batch(z, b["batch"])))
        bn.eval()
    nelbo = recon = kl = n = 0.0
    torch.manual_seed(1234)  # the same posterior noise for every mode
    with torch.no_grad():
        for b in val_loader:
            out = m(b, kl_weight=1.0)
            nelbo += float(out["nelbo"])
            recon += float(out["recon"])
            kl += float(out["kl"])
            n += b["x"].shape[0]
    return {"nelbo": nelbo / n, "recon": recon / n, "kl": kl / n}


def in_process(adata, *, bn: bool, batch_size: int, epochs: int, lr: float, warmup, scale: float = 1.0,
               seed: int = 0) -> dict:
    from scdist.vae.base import make_loaders
    from scdist.vae.data import as_source
    from scdist.vae.train import TrainConfig, fit

    src = as_source(adata)
    cats = {"batch": src.categorical("batch"), "sample": src.categorical(None), "label": src.categorical(None)}
    kwargs = dict(n_genes=src.n_genes, n_latent=3, n_batch=cats["batch"].n, n_hidden=32,
                  decoder_batch_norm=bn, **({"decoder_bn_scale": scale} if bn else {}))
    cfg = TrainConfig(max_epochs=epochs, seed=seed, batch_size=batch_size, lr=lr, kl_warmup_epochs=warmup,
                      early_stopping=False)
    tr, va = make_loaders(src, cats, cfg.resolve(1800))
    cfg = cfg.resolve(tr.n_cells())
    module = build_module("scdist.vae.ldvae:LDVAEModule", kwargs, seed)
    rows = []

    def report(metrics, _path):
        row = {"epoch": metrics["epoch"], "val_nelbo_fit": metrics["val_nelbo"]}
        modes = ("running", "batch", "exact") if bn else ("running",)
        for mode in modes:
            row[mode] = _score(module, va, mode, tr)
        if bn:
            b = module.decoder_bn
            row["bn_running_var_median"] = float(b.running_var.median())
            row["bn_weight_median"] = float(b.weight.detach().median())
        rows.append(row)

    fit(module, tr, va, cfg, report=report)
    return {"bn": bn, "batch_size": batch_size, "lr": lr, "kl_warmup_epochs": cfg.kl_warmup_epochs,
            "steps_per_epoch": tr.steps_per_epoch(), "decoder_bn_scale": scale if bn else None, "epochs": rows}


def ray_run(adata, *, bn: bool, epochs: int, tmp: str) -> dict:
    import ray
    from scdist.vae import train_ldvae
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    m = train_ldvae(adata, "batch", n_latent=3, seed=0, max_epochs=epochs, n_hidden=32, num_workers=2,
                    timeout_s=600, ray_storage=f"{tmp}/ray", run_name=f"diag-{int(bn)}-{time.time_ns()}",
                    decoder_batch_norm=bn, checkpoint_dir=f"{tmp}/ck-{int(bn)}-{time.time_ns()}")
    h = m.history
    return {"bn": bn, "val_nelbo": h.val_nelbo, "val_recon": h.val_recon,
            "val_kl": [a - b for a, b in zip(h.val_nelbo, h.val_recon)]}


def _fmt(r: dict) -> str:
    return f"{r['nelbo']:.1f} ({r['recon']:.1f} + {r['kl']:.1f})"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--lrs", type=float, nargs="+", default=[1e-3, 3e-3, 1e-2])
    ap.add_argument("--ray", action="store_true")
    a = ap.parse_args()
    import tempfile

    import torch
    torch.set_num_threads(1)
    from scdist.vae.simulate import gene_programs

    adata, _ = gene_programs(n_cells=2000, n_genes=100, n_types=3, n_markers=10, seed=0)
    out = {"when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "loadavg_start": [round(v, 2) for v in os.getloadavg()], "in_process": [], "ray": []}
    runs = []
    for bs in (256, 512):
        for bn in (False, True):
            runs.append(dict(bn=bn, batch_size=bs, lr=1e-3, warmup=None))
    for bn in (False, True):
        runs.append(dict(bn=bn, batch_size=512, lr=1e-3, warmup=0))
        for lr in a.lrs:
            if lr != 1e-3:
                runs.append(dict(bn=bn, batch_size=512, lr=lr, warmup=None))
    print("held-out -ELBO per cell (recon + KL) after each epoch")
    for kw in runs:
        r = in_process(adata, epochs=a.epochs, **kw)
        out["in_process"].append(r)
        label = f"bn={kw['bn']!s:5} batch={kw['batch_size']} lr={kw['lr']:g} warmup={r['kl_warmup_epochs']}"
        for mode in ("running", "batch", "exact"):
            if mode in r["epochs"][0]:
                print(f"{label} {mode:7}: " + " | ".join(_fmt(e[mode]) for e in r["epochs"]), flush=True)
    if a.ray:
        with tempfile.TemporaryDirectory() as tmp:
            for bn in (False, True):
                r = ray_run(adata, bn=bn, epochs=a.epochs, tmp=tmp)
                out["ray"].append(r)
                print(f"ray 2 workers bn={bn}: " + " | ".join(
                    f"{n:.1f} ({c:.1f} + {k:.1f})" for n, c, k in zip(r["val_nelbo"], r["val_recon"], r["val_kl"])),
                    flush=True)
    out["loadavg_end"] = [round(v, 2) for v in os.getloadavg()]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "ldvae_bn_diag.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
