"""Side-by-side benchmark: scdist LDVAE / MrVI vs scvi-tools LinearSCVI / MRVI (1.4.2, own venv).

Same simulated data (scdist.vae.simulate.sample_effects: cell types, samples, one cell type
with a sample-group effect), same held-out cells, same architecture sizes (LDVAE: 1 x 128
hidden, 10 factors, NB; MrVI: 2 x 128 encoder, u 10, z 30, K 20), same minibatch size, one
CPU thread each (torch, OMP and MKL), run ALTERNATING in one invocation (ours, scvi-tools,
ours, scvi-tools, ... for ``--rounds`` rounds, a fresh training run each) so that load drift on a
shared machine hits both sides. Reports training throughput as the issue defines it, train cells
per CPU-second of the training process per epoch (``time.process_time`` around each epoch's
training batches, validation excluded, both sides), and the same per wall-second; medians over
all rounds' epochs after each run's first. Also held-out reconstruction (NLL per cell) at equal
epochs, the LDVAE paper's anchor (seconds per 1,000 cells per 10 epochs), load averages around
every block and the commit measured.

    .venv/bin/python benchmarks/vae_benchmark.py --cells 20000 --genes 2000 --epochs 4 --rounds 2

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
os.environ.setdefault("MKL_NUM_THREADS", "1")
HERE = Path(__file__).resolve().parent
OUT = HERE / "out"


def _median(x):
    import numpy as np
    x = list(x[1:]) if len(x) > 1 else list(x)
    return float(np.median(x))


def _pooled_median(runs: list[list[float]]) -> float:
    """Median over all runs' epochs, each run's first epoch (warm-up) dropped."""
    import numpy as np
    return float(np.median([v for r in runs for v in (r[1:] if len(r) > 1 else r)]))


def _commit() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "scdist/vae", "benchmarks/vae_benchmark.py",
                                "benchmarks/vae_scvi_worker.py"], cwd=HERE.parent, capture_output=True,
                               text=True).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


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
    res = {"model": model_name, "n_train": h.train_cells[0], "epoch_seconds": h.seconds,
           "epoch_cpu_seconds": h.cpu_seconds, "wall_s": wall, "torch_threads": torch.get_num_threads(),
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
    ap.add_argument("--rounds", type=int, default=2, help="alternating ours / scvi-tools runs per model")
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
        runs_a, runs_b, loads = [], [], []
        for r in range(args.rounds):  # alternate, so load drift on a shared machine hits both sides
            loads.append({"round": r, "before_ours": os.getloadavg()})
            runs_a.append(ours(name, adata, args.epochs, args.batch_size))
            loads[-1]["before_scvi"] = os.getloadavg()
            runs_b.append(scvi(pairs[name], h5ad, mask, args.epochs, args.batch_size))
            loads[-1]["after"] = os.getloadavg()
        a, b = runs_a[0], runs_b[0]
        cpu_a = a["n_train"] / _pooled_median([x["epoch_cpu_seconds"] for x in runs_a])
        cpu_b = b["n_train"] / _pooled_median([x["epoch_cpu_seconds"] for x in runs_b])
        wall_a = a["n_train"] / _pooled_median([x["epoch_seconds"] for x in runs_a])
        wall_b = b["n_train"] / _pooled_median([x["epoch_seconds"] for x in runs_b])
        per_round = [{"cpu_ratio": (x["n_train"] / _median(x["epoch_cpu_seconds"]))
                      / (y["n_train"] / _median(y["epoch_cpu_seconds"])),
                      "wall_ratio": (x["n_train"] / _median(x["epoch_seconds"]))
                      / (y["n_train"] / _median(y["epoch_seconds"]))} for x, y in zip(runs_a, runs_b)]
        row = {"model": name, "ours_cells_per_cpu_s": cpu_a, "scvi_cells_per_cpu_s": cpu_b,
               "speedup_cpu": cpu_a / cpu_b, "ours_cells_per_s": wall_a, "scvi_cells_per_s": wall_b,
               "speedup": wall_a / wall_b, "per_round": per_round, "loadavg": loads,
               "ours": a, "scvi": b, "ours_runs": runs_a, "scvi_runs": runs_b}
        if name == "ldvae":
            row["s_per_1000_cells_per_10_epochs"] = 10 * 1000 / wall_a
            row["cpu_s_per_1000_cells_per_10_epochs"] = 10 * 1000 / cpu_a
        rows.append(row)
    result = {"args": vars(args), "rows": rows, "torch_threads": 1, "commit": _commit(),
              "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    (OUT / "vae_benchmark.json").write_text(json.dumps(result, indent=1))
    print("| model | scdist cells/CPU-s | scvi-tools cells/CPU-s | CPU ratio | scdist cells/s (wall) | "
          "scvi-tools cells/s (wall) | wall ratio | per-round CPU ratios | load avg (1 min) | "
          "held-out recon NLL/cell (scdist / scvi) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        rec = ""
        if r["model"] == "ldvae":
            rec = f"{r['ours']['recon']:.1f} / {r['scvi']['recon']:.1f}"
        la = [v[0] for x in r["loadavg"] for k, v in x.items() if k != "round"]
        rounds = ", ".join(f"{p['cpu_ratio']:.2f}x" for p in r["per_round"])
        print(f"| {r['model']} | {r['ours_cells_per_cpu_s']:.0f} | {r['scvi_cells_per_cpu_s']:.0f} | "
              f"{r['speedup_cpu']:.2f}x | {r['ours_cells_per_s']:.0f} | {r['scvi_cells_per_s']:.0f} | "
              f"{r['speedup']:.2f}x | {rounds} | {min(la):.1f}-{max(la):.1f} | {rec} |")
    print(f"commit {result['commit']}")
    for r in rows:
        if "s_per_1000_cells_per_10_epochs" in r:
            print(f"LDVAE: {r['s_per_1000_cells_per_10_epochs']:.2f} s (wall), "
                  f"{r['cpu_s_per_1000_cells_per_10_epochs']:.2f} CPU-s per 1,000 cells per 10 epochs (paper: 5 s)")

if __name__ == "__main__":
    main()
