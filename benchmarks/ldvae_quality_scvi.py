"""LDVAE loading precision side by side with scvi-tools' LinearSCVI on scdist's semi-synthetic study.

    .venv/bin/python benchmarks/ldvae_quality_scvi.py [--cells 20000] [--genes 500] [--epochs 40] [--scvi]
        [--variants 'default={}' 'latent={"library": "latent"}' 'nobn={"decoder_batch_norm": false}']
        [--scvi-options '{"plan": {"n_epochs_kl_warmup": 10}}']

Study: ``mrvi_quality.build_study`` (40 donors in 2 batches, 500 genes, 4 cell types, design tag
``MRVI_DESIGN_VERSION``; ``--genes`` other than 500 builds the same design with that many genes,
store ``mrvi_quality_<cells>_v<design>_g<genes>``), the same cells for both sides: LinearSCVI
(benchmarks/.venv-scvi, 1.4.2, 10 factors, batch_key = batch, minibatch 256, its own defaults otherwise) is trained on
exactly the cells scdist trains on (scdist's validation split given to it as a mask) and both are
evaluated on the held-out 10%. Both run ``--epochs`` epochs without early stopping, one torch thread
each (scvi-tools in a subprocess while scdist's variants train here, one after the other).

Scoring (the same code for every model): for each factor, the ``--top`` genes by |loading|;
"relevant" = a true cell-type marker in any type (``truth/marker``) or a MrVI DE gene
(``truth/mrvi_gene``), the issue's "true markers or DE genes". Reported per model: mean and
per-factor precision, the share of markers / DE genes in the top lists, and how large the true
cell-type deviation max_c |beta_cg - mean_c beta_cg| of the *non-relevant* top genes is
compared with all non-relevant genes (do the "misses" carry real cell-type differences?); as a
sensitivity figure (``precision_mean_dev1``), the precision when genes with a true cell-type
deviation >= 1 (e-fold) also count.
Every loading matrix is scored three ways: as the model gives it; column-centred (softmax(W z)
does not change when a constant c_k is added to factor k's loadings, so only the centred
loadings are identified -- scdist's ``loadings()`` returns them centred, LinearSCVI's
``get_loadings`` does not); centred and varimax-rotated (a normal-prior LDVAE's factors are
identifiable only up to rotation: z -> R^T z, W -> W R leaves the likelihood and the N(0, I)
prior unchanged). Also scored: the *oracle*, the 10 leading principal axes of the true log
means ``eta`` (donor x cell type, cell-weighted, each row's mean over genes removed) -- a
noiseless rank-10 linear model of the truth, about what a perfect linear factor model can
reach on this design.
``--oracle-only`` builds the study and scores the oracle without training anything.
Results: benchmarks/out/ldvae_quality_<cells>_v<design>[_g<genes>]_s<seed>_<epochs>.json.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from mrvi_quality import OUT, build_study, design_tag  # noqa: E402


def study_for(cells: int, genes: int, seed: int, design: dict):
    """The MrVI quality study (``mrvi_quality.build_study``) at 500 genes; at another gene count
    the same simulator call (same donors, cell types, ``MRVI_STUDY_DESIGN`` and ``design`` knobs)
    with ``n_genes=genes``, in its own store. Returns (study, tag naming design and genes)."""
    from scdist.simulate.population import MRVI_DESIGN_VERSION
    tag = f"v{MRVI_DESIGN_VERSION}" + (f"_{design_tag(design)}" if design else "") + (
        f"_g{genes}" if genes != 500 else "") + f"_s{seed}"
    if genes == 500:
        return build_study(cells, seed, design), tag
    from scdist.simulate import simulate_study
    from scdist.simulate.population import MRVI_STUDY_DESIGN
    from scdist.store import open_study
    url = OUT / f"mrvi_quality_{cells}_{tag}.zarr"
    if not (url / "zarr.json").exists():
        simulate_study(str(url), n_donors=40, n_cells=cells, n_genes=genes, n_celltypes=4, seed=seed,
                       chunk_cells=4096, overwrite=True, **{**MRVI_STUDY_DESIGN, **design})
    return open_study(str(url)), tag


def varimax(W: np.ndarray, iters: int = 500, tol: float = 1e-8) -> np.ndarray:
    """Varimax rotation of loadings W (genes x factors): W R with R orthogonal maximising the
    variance of the squared loadings per factor (Kaiser 1958)."""
    p, k = W.shape
    R = np.eye(k)
    last = 0.0
    for _ in range(iters):
        L = W @ R
        u, s, vt = np.linalg.svd(W.T @ (L ** 3 - L @ np.diag((L ** 2).sum(0)) / p))
        R = u @ vt
        if s.sum() < last * (1 + tol):
            break
        last = s.sum()
    return W @ R


def score(W: np.ndarray, truth, tops) -> dict:
    """Loading precision of W (genes x factors, genes in truth order) at each top-k."""
    marker = truth["marker"].values.any(0)
    de = truth["mrvi_gene"].values.astype(bool)
    relevant = marker | de
    beta = truth["beta"].values
    ctdev = np.abs(beta - beta.mean(0)).max(0)
    wide = relevant | (ctdev >= 1.0)  # sensitivity: also any gene with a true e-fold cell-type deviation
    out = {}
    for k in tops:
        top = np.argsort(-np.abs(W), axis=0, kind="stable")[:k]
        pf = relevant[top].mean(0)
        miss = top[~relevant[top]]
        out[str(k)] = {"precision_mean": float(pf.mean()),
                       "precision_mean_dev1": float(wide[top].mean()),
                       "precision_per_factor": [round(float(p), 3) for p in pf],
                       "marker_share": float(marker[top].mean()), "de_share": float(de[top].mean()),
                       "misses_celltype_dev_median": float(np.median(ctdev[miss])) if miss.size else None}
    out["nonrelevant_celltype_dev_median"] = float(np.median(ctdev[~relevant]))
    out["base_rate"] = float(relevant.mean())
    out["base_rate_dev1"] = float(wide.mean())
    return out


def centre(W: np.ndarray) -> np.ndarray:
    """W with each factor's mean over genes removed: softmax(W z) is unchanged by W[:, k] + c_k
    (every logit of a cell moves by c_k z_k), so only the centred loadings are identified."""
    return W - W.mean(0)


def score_all(W: np.ndarray, truth, tops) -> dict:
    """Scores of W as given, column-centred, and centred + varimax-rotated."""
    return {"as_given": score(W, truth, tops), "centred": score(centre(W), truth, tops),
            "varimax": score(varimax(centre(W)), truth, tops)}


def oracle_loadings(truth, k: int = 10) -> np.ndarray:
    """Leading k principal axes (scaled by their singular values) of the true log means, after
    removing what a softmax decoder cannot see (each (donor, type)'s mean over genes, a library
    effect) and each gene's cell-weighted mean."""
    eta = truth["eta"].values.astype(np.float64)
    eta = eta - eta.mean(-1, keepdims=True)
    w = truth["n_cells"].values.astype(np.float64)
    w = w / w.sum()
    X = (eta - (eta * w[..., None]).sum((0, 1))) * np.sqrt(w)[..., None]
    _, s, vt = np.linalg.svd(X.reshape(-1, eta.shape[-1]), full_matrices=False)
    return (vt[:k] * s[:k, None]).T


def run_scvi(h5ad: Path, mask: Path, epochs: int, seed: int, options: dict, out: Path):
    from vae_scvi_env import scvi_python
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return subprocess.Popen([str(scvi_python()), str(HERE / "ldvae_quality_scvi_worker.py"), str(h5ad), str(mask),
                             str(epochs), "batch", str(out), str(seed), json.dumps(options)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


# "" = the code before decoder batch norm became the default (models cached under those hashes);
# "bn-default-v1": decoder batch norm on by default, its offsets started at the log gene shares,
# bias-corrected running statistics, encoder batch norm on; "bn-default-v2": the same with the
# encoder batch norm off by default (when the decoder's is on)
MODEL_CODE = "bn-default-v2"


def _commit() -> str:
    try:
        return subprocess.run(["git", "describe", "--always", "--dirty"], cwd=HERE, capture_output=True, text=True,
                              timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def ours(study, epochs: int, seed: int, options: dict, cells: int, tag: str):
    """Train (or reload) scdist's LDVAE with ``options`` and model seed ``seed``; returns
    (the decoder's uncentred effective loadings, figures)."""
    from scdist.vae import LDVAE, train_ldvae
    # MODEL_CODE names the LDVAE defaults / initialisation: a model trained under older ones is never reloaded
    h = hashlib.sha1(json.dumps({"options": options, "code": MODEL_CODE} if MODEL_CODE else options,
                                sort_keys=True).encode()).hexdigest()[:8] + (f"_t{seed}" if seed else "")
    mdir = OUT / f"ldvae_quality_model_{cells}_{tag}_{epochs}_{h}"
    if (mdir / "config.json").exists():
        model = LDVAE.load(str(mdir))
    else:
        model = train_ldvae(study, "batch", 10, seed=seed, max_epochs=epochs, early_stopping=False,
                            run_name=f"ldvae_quality_{tag}_{epochs}_{h}", **options)
        model.save(str(mdir))
    W = model.loadings()
    assert list(W["gene"].values) == [str(g) for g in study.gene_names]
    # the decoder's own (uncentred) effective loadings, what LinearSCVI's get_loadings reports
    mod = model.module
    raw = mod.decoder.weight.detach()[:, : mod.n_latent].double()
    if mod.decoder_bn is not None:
        bn = mod.decoder_bn
        raw = raw * (bn.weight.detach() / (bn.running_var + bn.eps).sqrt()).double().unsqueeze(-1)
    raw = raw.numpy()
    assert np.allclose(centre(raw), W.values, atol=1e-5)
    z = model.latent(study).values
    res = {"model_code": MODEL_CODE, "commit": _commit(),
           "train_epoch_s": float(sum(model.history.seconds)), "epochs_run": len(model.history.epoch),
           "heldout": {k: float(v) for k, v in model.evaluate(study).items()},
           "latent_sd_per_factor": [round(float(v), 3) for v in z.std(0)]}
    return raw, res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cells", type=int, default=20_000)
    ap.add_argument("--genes", type=int, default=500, help="genes of the study (500: the MrVI quality study itself)")
    ap.add_argument("--oracle-only", action="store_true", help="score the oracle only (no training)")
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0, help="the study's seed (and the models' by default)")
    ap.add_argument("--train-seed", type=int, default=None, help="model seed of both sides (default: --seed)")
    ap.add_argument("--design", default="{}")
    ap.add_argument("--top", default="100,50,20")
    ap.add_argument("--variants", nargs="*", default=["default={}"], help="NAME=JSON of train_ldvae options")
    ap.add_argument("--scvi", action="store_true", help="also run LinearSCVI (its own venv)")
    ap.add_argument("--scvi-options", default="{}", help='JSON {"model": {...}, "plan": {...}} for LinearSCVI')
    a = ap.parse_args()
    import torch
    torch.set_num_threads(1)
    from mrvi_quality_scvi import export_h5ad

    from scdist.simulate.population import MRVI_DESIGN_VERSION
    from scdist.vae.data import validation_mask

    design = json.loads(a.design)
    tops = [int(t) for t in a.top.split(",")]
    study, tag = study_for(a.cells, a.genes, a.seed, design)
    tseed = a.seed if a.train_seed is None else a.train_seed
    truth = study.truth()
    genes = list(truth["gene"].values)
    result = {"cells": a.cells, "genes": int(study.n_genes), "epochs": a.epochs, "seed": a.seed,
              "design_version": MRVI_DESIGN_VERSION,
              "design": design, "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "models": {},
              "loadavg_start": [round(v, 2) for v in os.getloadavg()]}
    Wo = oracle_loadings(truth)
    result["models"]["oracle_pca"] = {"score": score_all(Wo, truth, tops)}

    if a.oracle_only:
        a.scvi, a.variants = False, []
    proc = None
    if a.scvi:
        h5ad = OUT / f"mrvi_quality_{a.cells}_{tag}.h5ad"
        if not h5ad.exists():
            export_h5ad(study, h5ad)
        mask = OUT / f"ldvae_quality_valmask_{a.cells}_{tag}_t{tseed}.npy"
        np.save(mask, validation_mask(np.arange(study.n_cells), 0.1, tseed))  # scdist's held-out cells (split seed = model seed)
        sopt = json.loads(a.scvi_options)
        sh = hashlib.sha1(json.dumps(sopt, sort_keys=True).encode()).hexdigest()[:8] + (
            f"_t{tseed}" if tseed != a.seed else "")
        snpz = OUT / f"ldvae_quality_scvi_{a.cells}_{tag}_{a.epochs}_{sh}.npz"
        if not snpz.exists():
            proc = run_scvi(h5ad, mask, a.epochs, tseed, sopt, snpz)

    for spec in a.variants:
        name, _, opts = spec.partition("=")
        W, res = ours(study, a.epochs, tseed, json.loads(opts or "{}"), a.cells, tag)
        res["options"] = json.loads(opts or "{}")
        res["score"] = score_all(W, truth, tops)
        result["models"][f"scdist_{name}" + (f"_t{tseed}" if tseed != a.seed else "")] = res
        print(name, res["score"]["as_given"][str(tops[0])]["precision_mean"], res["heldout"], flush=True)

    if a.scvi:
        if proc is not None:
            _, err = proc.communicate()
            if proc.returncode:
                raise RuntimeError(err[-3000:])
        z = np.load(snpz)
        meta = json.loads(str(z["meta"]))
        assert list(z["genes"]) == [str(g) for g in genes]
        W = z["loadings"]
        meta["score"] = score_all(W, truth, tops)
        result["models"]["linearscvi" + (f"_{sh}" if sopt or tseed != a.seed else "")] = meta

    result["loadavg_end"] = [round(v, 2) for v in os.getloadavg()]
    OUT.mkdir(exist_ok=True)
    path = OUT / (f"ldvae_quality_{a.cells}_{tag}_oracle.json" if a.oracle_only
                  else f"ldvae_quality_{a.cells}_{tag}_{a.epochs}.json")
    if path.exists():  # keep models measured by earlier invocations (other variants)
        old = json.loads(path.read_text())
        old["models"].update(result["models"])
        for key in ("when", "loadavg_start", "loadavg_end", "genes"):
            old[key] = result[key]
        result = old
    path.write_text(json.dumps(result, indent=1))
    t0 = str(tops[0])
    print(f"| model | top {' / '.join(map(str, tops))} as given | centred | centred + varimax (top {t0}) "
          f"| held-out recon / -ELBO per cell |")
    print("|---|---|---|---|---|")
    for name, r in result["models"].items():
        sc = r["score"]
        p = lambda key: " / ".join(f"{sc[key][str(t)]['precision_mean']:.1%}" for t in tops)  # noqa: E731
        ho = r.get("heldout", r)
        rec = f"{ho['recon']:.1f} / {ho['nelbo']:.1f}" if "recon" in ho else ""
        print(f"| {name} | {p('as_given')} | {p('centred')} | {sc['varimax'][t0]['precision_mean']:.1%} | {rec} |")


if __name__ == "__main__":
    main()
