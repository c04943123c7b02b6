"""Side-by-side benchmark: scdist LDVAE / MrVI vs scvi-tools LinearSCVI / MRVI (1.4.2, own venv).

Same simulated data (scdist.vae.simulate.sample_effects: cell types, samples, one cell type
with a sample-group effect), same held-out cells, same architecture sizes (LDVAE: 1 x 128
hidden, 10 factors, NB; MrVI: 2 x 128 encoder, u 10, z 30, K 20), same minibatch size, one
CPU thread each, run one after the other in one invocation. Reports training throughput
(train cells per second of epoch time, median over epochs after the first), held-out
reconstruction (NLL per cell) at equal epochs, and the LDVAE paper's anchor (seconds per
1,000 cells per 10 epochs).

    .venv/bin/python benchmarks/vae_benchmark.py --cells 20000 --genes 2000 --epochs 5

Writes benchmarks/out/vae_benchmark.json and prints a Markdown table.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
HERE = Path(__file__).resolve().parent
OUT = HERE / "out"


def _median(x):
    import numpy as np
    x = list(x[1:]) if len(x) > 1 else list(x)
    return float(np.median(x))


def ours(model_name: str, adata, epochs: int, batch_size: int) -> dict:
    import torch

    from scdist.vae import train_ldvae, train_mrvi
    torch.set_num_threads(1)
    common = dict(seed=0, max_epochs=epochs, batch_size=batch_size, early_stopping=False, val_fraction=0.1)
    t0 = time.perf_counter()
    if model_name == "ldvae":
        # LinearSCVI's settings: latent library size, 10 factors, 128 hidden, NB, dropout 0.1
        m = train_ldvae(adata, None, n_latent=10, library="latent", **common)
    else:
        m = train_mrvi(adata, "sample", **common)
    wall = time.perf_counter() - t0
    h = m.history
    res = {"model": model_name, "n_train": h.train_cells[0], "epoch_seconds": h.seconds, "wall_s": wall,
           "n_params": int(sum(p.numel() for p in m.module.parameters()))}
    if model_name == "ldvae":
        ev = m.evaluate(split="val")
        res.update(recon=ev["recon"], nelbo=ev["nelbo"])
    return res


def scvi(model_name: str, h5ad: Path, mask: Path, epochs: int, batch_size: int) -> dict:
    sys.path.insert(0, str(HERE))
    from vae_scvi_env import scvi_python
    py = scvi_python()
    out = OUT / f"scvi_{model_name}.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    subprocess.run([str(py), str(HERE / "vae_scvi_worker.py"), model_name, str(h5ad), str(mask), str(epochs),
                    str(batch_size), str(out)], check=True, env=env)
    return json.loads(out.read_text())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cells", type=int, default=20000)
    ap.add_argument("--genes", type=int, default=2000)
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--models", default="ldvae,mrvi")
    args = ap.parse_args()

    import numpy as np

    from scdist.vae.data import validation_mask
    from scdist.vae.simulate import sample_effects

    OUT.mkdir(exist_ok=True)
    adata, _ = sample_effects(n_cells=args.cells, n_genes=args.genes, n_types=5, n_samples=args.samples,
                              n_markers=50, n_effect_genes=50, seed=0)
    h5ad = OUT / f"vae_bench_{args.cells}x{args.genes}.h5ad"
    adata.write_h5ad(h5ad)
    mask = OUT / "vae_bench_valmask.npy"
    np.save(mask, validation_mask(np.arange(adata.n_obs), 0.1, 0))  # our held-out cells, given to scvi too

    rows = []
    pairs = {"ldvae": "linearscvi", "mrvi": "mrvi"}
    for name in args.models.split(","):
        a = ours(name, adata, args.epochs, args.batch_size)
        b = scvi(pairs[name], h5ad, mask, args.epochs, args.batch_size)
        ra = a["n_train"] / _median(a["epoch_seconds"])
        rb = b["n_train"] / _median(b["epoch_seconds"])
        row = {"model": name, "ours_cells_per_s": ra, "scvi_cells_per_s": rb, "speedup": ra / rb,
               "ours": a, "scvi": b}
        if name == "ldvae":
            row["s_per_1000_cells_per_10_epochs"] = 10 * 1000 / ra
        rows.append(row)
    result = {"args": vars(args), "rows": rows, "torch_threads": 1,
              "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    (OUT / "vae_benchmark.json").write_text(json.dumps(result, indent=1))
    print(f"| model | scdist cells/s | scvi-tools cells/s | ratio | held-out recon NLL/cell (scdist / scvi) |")
    print("|---|---|---|---|---|")
    for r in rows:
        rec = ""
        if r["model"] == "ldvae":
            rec = f"{r['ours']['recon']:.1f} / {r['scvi']['recon']:.1f}"
        print(f"| {r['model']} | {r['ours_cells_per_s']:.0f} | {r['scvi_cells_per_s']:.0f} | "
              f"{r['speedup']:.2f}x | {rec} |")
    for r in rows:
        if "s_per_1000_cells_per_10_epochs" in r:
            print(f"LDVAE: {r['s_per_1000_cells_per_10_epochs']:.2f} s per 1,000 cells per 10 epochs (paper: 5 s)")


if __name__ == "__main__":
    main()
