"""LDVAE decoder batch norm in short training: why the held-out ELBO of tests/test_vae_ray.py's
run got worse over its first epochs with ``decoder_batch_norm=True``, and what each part of the
fix does.

    .venv/bin/python benchmarks/ldvae_quality_scvi_bn_diag.py [--epochs 3] [--ray]

Study and settings of ``test_ldvae_two_ray_workers``: ``gene_programs(n_cells=2000, n_genes=100,
n_types=3, n_markers=10, seed=0)``, 3 factors, ``n_hidden=32``, batch = batch, seed 0, one torch
thread, no early stopping. In-process runs with batch 256 (7 steps per epoch) and batch 512 (3
steps per epoch: the step count of 2 DDP workers x 256). After every epoch the held-out 10% is
scored three ways, each as -ELBO = reconstruction NLL + KL per cell (the same posterior noise
for every way; training's random stream untouched):

- ``running``: eval mode, the running statistics (what training's ``evaluate`` reports);
- ``batch``: eval mode except the decoder BN, which normalises with the held-out minibatch's own
  statistics (as in training);
- ``exact``: the decoder BN's statistics replaced by one pass over the training cells with the
  model as it is (eval-mode encoder, posterior samples): the held-out figure of the current
  model with statistics that match its own encoder.

Variants (``VARIANTS``): the plain linear decoder; the decoder batch norm as it was (offsets
beta_g = 0, BatchNorm's moving average started at mean 0 / variance 1, encoder batch norm on;
also at other learning rates and without KL warm-up); each part of the fix added in turn
(offsets started at the log gene shares, bias-corrected running statistics, encoder batch norm
off = today's default); the encoder batch norm with bias-corrected faster statistics instead of
off; the default with ``decoder_bn_scale=0.5``.
``--ray`` adds the Ray Train run of the test (2 workers) for the default and the plain linear
decoder: per-epoch held-out -ELBO and reconstruction as training reports them.
Results: benchmarks/results/ldvae_bn_diag_<epochs>.json.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import time
import types
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"

# name -> (module options, emulation of the former batch norm: {"zero_offsets", "plain_ema",
# "encoder_bc_momentum": m (encoder batch norms replaced by bias-corrected ones, base momentum m)},
# training options, batch sizes)
VARIANTS = {
    "linear": ({"decoder_batch_norm": False}, {}, {}, (256, 512)),
    "bn_before": ({"encoder_batch_norm": True}, {"zero_offsets", "plain_ema"}, {}, (256, 512)),
    "bn_before_no_warmup": ({"encoder_batch_norm": True}, {"zero_offsets", "plain_ema"},
                            {"kl_warmup_epochs": 0}, (512,)),
    "bn_before_lr3e-3": ({"encoder_batch_norm": True}, {"zero_offsets", "plain_ema"}, {"lr": 3e-3}, (512,)),
    "bn_before_lr1e-2": ({"encoder_batch_norm": True}, {"zero_offsets", "plain_ema"}, {"lr": 1e-2}, (512,)),
    "bn_offsets": ({"encoder_batch_norm": True}, {"plain_ema"}, {}, (256, 512)),
    "bn_offsets_biascorr": ({"encoder_batch_norm": True}, set(), {}, (256, 512)),
    "bn_offsets_biascorr_encoder_bc0.3": ({"encoder_batch_norm": True}, {"encoder_bc_momentum"}, {}, (256, 512)),
    "default": ({}, set(), {}, (256, 512)),
    "default_scale0.5": ({"decoder_bn_scale": 0.5}, set(), {}, (256, 512)),
}


def _score(module, val_loader, mode: str, train_loader=None) -> dict:
    import torch
    with torch.random.fork_rng():  # training's random stream is left as it was
        return _score_inner(module, val_loader, mode, train_loader)


def _score_inner(module, val_loader, mode, train_loader):
    import torch
    m = copy.deepcopy(module).eval()
    bn = m.decoder_bn
    if bn is not None and mode == "batch":
        bn.train()  # normalises with the held-out minibatch's statistics (buffers of the copy only)
    if bn is not None and mode == "exact":
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average over the pass (DecoderBatchNorm: the same below 100 batches)
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


def _emulate(module, emulate: set, encoder_momentum: float = 0.3):
    import torch
    from scdist.vae.ldvae import DecoderBatchNorm
    bn = module.decoder_bn
    if bn is not None and "zero_offsets" in emulate:
        with torch.no_grad():
            bn.bias.zero_()
    if bn is not None and "plain_ema" in emulate:
        bn.forward = types.MethodType(torch.nn.BatchNorm1d.forward, bn)
    if "encoder_bc_momentum" in emulate:
        def swap(mod):
            for name, child in list(mod.named_children()):
                if type(child) is torch.nn.BatchNorm1d:
                    setattr(mod, name, DecoderBatchNorm(child.num_features, momentum=encoder_momentum, eps=child.eps))
                else:
                    swap(child)
        swap(module.encoder)


def in_process(adata, *, module_opts: dict, emulate: set, train_opts: dict, batch_size: int, epochs: int,
               seed: int = 0) -> dict:
    from scdist.vae.base import build_module, make_loaders
    from scdist.vae.data import as_source
    from scdist.vae.ldvae import _prepare
    from scdist.vae.train import TrainConfig, fit

    src = as_source(adata)
    cats = {"batch": src.categorical("batch"), "sample": src.categorical(None), "label": src.categorical(None)}
    kwargs = _prepare(src, cats, dict(n_genes=src.n_genes, n_latent=3, n_batch=cats["batch"].n, n_hidden=32,
                                      **module_opts))
    cfg = TrainConfig(max_epochs=epochs, seed=seed, batch_size=batch_size, early_stopping=False, **train_opts)
    tr, va = make_loaders(src, cats, cfg.resolve(1800))
    cfg = cfg.resolve(tr.n_cells())
    module = build_module("scdist.vae.ldvae:LDVAEModule", kwargs, seed)
    _emulate(module, emulate)
    bn = module.decoder_bn is not None
    rows = []

    def report(metrics, _path):
        row = {"epoch": metrics["epoch"], "val_nelbo_fit": metrics["val_nelbo"]}
        for mode in (("running", "batch", "exact") if bn else ("running",)):
            row[mode] = _score(module, va, mode, tr)
        rows.append(row)

    fit(module, tr, va, cfg, report=report)
    return {"module_options": module_opts, "emulate": sorted(emulate), "train_options": train_opts,
            "batch_size": batch_size, "lr": cfg.lr, "kl_warmup_epochs": cfg.kl_warmup_epochs,
            "encoder_batch_norm": kwargs["encoder_batch_norm"], "steps_per_epoch": tr.steps_per_epoch(),
            "epochs": rows}


def ray_run(adata, *, opts: dict, epochs: int, tmp: str) -> dict:
    import ray
    from scdist.vae import train_ldvae
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    tag = time.time_ns()
    m = train_ldvae(adata, "batch", n_latent=3, seed=0, max_epochs=epochs, n_hidden=32, num_workers=2,
                    timeout_s=900, ray_storage=f"{tmp}/ray", run_name=f"diag-{tag}", checkpoint_dir=f"{tmp}/ck-{tag}",
                    **opts)
    h = m.history
    return {"options": opts, "val_nelbo": h.val_nelbo, "val_recon": h.val_recon,
            "val_kl": [a - b for a, b in zip(h.val_nelbo, h.val_recon)]}


def _fmt(r: dict) -> str:
    return f"{r['nelbo']:.1f} ({r['recon']:.1f} + {r['kl']:.1f})"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--variants", nargs="*", default=list(VARIANTS))
    ap.add_argument("--ray", action="store_true")
    a = ap.parse_args()
    import tempfile

    import torch
    torch.set_num_threads(1)
    from scdist.vae.simulate import gene_programs

    adata, _ = gene_programs(n_cells=2000, n_genes=100, n_types=3, n_markers=10, seed=0)
    out = {"epochs": a.epochs, "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "loadavg_start": [round(v, 2) for v in os.getloadavg()], "in_process": {}, "ray": {}}
    print("held-out -ELBO per cell after each epoch: recon + KL")
    for name in a.variants:
        mod, emulate, train, sizes = VARIANTS[name]
        for bs in sizes:
            r = in_process(adata, module_opts=mod, emulate=emulate, train_opts=train, batch_size=bs, epochs=a.epochs)
            out["in_process"][f"{name}/batch{bs}"] = r
            for mode in ("running", "batch", "exact"):
                if mode in r["epochs"][0]:
                    print(f"{name:34} batch {bs} {mode:7}: " + " | ".join(_fmt(e[mode]) for e in r["epochs"]),
                          flush=True)
    if a.ray:
        with tempfile.TemporaryDirectory() as tmp:
            for name, opts in (("default", {}), ("linear", {"decoder_batch_norm": False})):
                r = ray_run(adata, opts=opts, epochs=a.epochs, tmp=tmp)
                out["ray"][name] = r
                print(f"ray 2 workers {name}: " + " | ".join(
                    f"{n:.1f} ({c:.1f} + {k:.1f})" for n, c, k in zip(r["val_nelbo"], r["val_recon"], r["val_kl"])),
                    flush=True)
    out["loadavg_end"] = [round(v, 2) for v in os.getloadavg()]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"ldvae_bn_diag_{a.epochs}.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
