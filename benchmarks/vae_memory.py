"""Peak memory of streaming training data from the study store, as the cell count grows.

For each N, a simulated study with N cells x G genes is ingested into a store (chunks of
``--chunk`` cells), then a fresh process opens the store, streams one full shuffled epoch of
minibatches through the loader (every chunk is read) and runs ``--steps`` LDVAE training steps,
and reports its peak RSS. Bounded memory means the peak does not grow with N.

    .venv/bin/python benchmarks/vae_memory.py --cells 25000,1000000 --genes 2000

Stores are built with scdist's population simulator (chunks generated on 2 Dask workers) and
kept under benchmarks/out/ for reruns.

Writes benchmarks/out/vae_memory.json.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = HERE / "out"

CHILD = r"""
import json, sys, time, torch
torch.set_num_threads(1)
from scdist.store import open_study
from scdist.vae.data import as_source, CellLoader
from scdist.vae.ldvae import LDVAEModule
url, steps = sys.argv[1], int(sys.argv[2])


def status_mib(field):
    # VmHWM: peak of this process image (ru_maxrss would carry over the parent's peak across
    # fork+exec); VmRSS: now
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024


src = as_source(open_study(url))
loader = CellLoader(src, {}, batch_size=256, buffer_chunks=4, seed=0)
module = LDVAEModule(src.n_genes, 10)
opt = torch.optim.Adam(module.parameters(), lr=1e-3)
rss_open = status_mib("VmRSS")
t0 = time.perf_counter(); n = 0
for i, b in enumerate(loader):
    if i < steps:
        out = module(b); opt.zero_grad(); out["loss"].backward(); opt.step()
    if i == steps:
        rss_steps = status_mib("VmRSS")
    n += b["x"].shape[0]
dt = time.perf_counter() - t0
print(json.dumps({"cells_streamed": n, "seconds": dt, "rss_open_mib": rss_open, "rss_after_steps_mib": rss_steps,
                  "rss_end_mib": status_mib("VmRSS"), "peak_rss_mib": status_mib("VmHWM")}))
"""


def make_study(url: str, n_cells: int, n_genes: int, chunk: int) -> None:
    """scdist's population simulator, chunks generated on a 2-worker Dask cluster (memory per
    chunk, not per study; the same generator for every size)."""
    from scdist.engines.dask import dask_client
    from scdist.simulate import simulate_study
    with dask_client(n_workers=2) as client:
        simulate_study(url, n_donors=20, n_cells=n_cells, n_genes=n_genes, n_celltypes=4, n_batches=2, seed=0,
                       chunk_cells=chunk, overwrite=True, client=client)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cells", default="50000,200000")
    ap.add_argument("--genes", type=int, default=2000)
    ap.add_argument("--chunk", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--child-env", action="append", default=[], metavar="KEY=VALUE",
                    help="environment for the measured process (e.g. MALLOC_ARENA_MAX=1)")
    ap.add_argument("--out", default=str(OUT / "vae_memory.json"))
    args = ap.parse_args()
    OUT.mkdir(exist_ok=True)
    rows = []
    for n in [int(c) for c in args.cells.split(",")]:
        url = str(OUT / f"vae_mem_sim_{n}_{args.genes}_{args.chunk}.zarr")
        t0 = time.perf_counter()
        if not Path(url, "zarr.json").exists():
            make_study(url, n, args.genes, args.chunk)
        built = time.perf_counter() - t0
        env = dict(os.environ, OMP_NUM_THREADS="1", **dict(kv.split("=", 1) for kv in args.child_env))
        res = subprocess.run([sys.executable, "-c", CHILD, url, str(args.steps)], capture_output=True, text=True,
                             env=env, check=True)
        row = {"cells": n, "genes": args.genes, "chunk": args.chunk, "build_s": built, "child_env": args.child_env,
               **json.loads(res.stdout.strip().splitlines()[-1])}
        rows.append(row)
        print(f"{n:>9,} cells: peak RSS {row['peak_rss_mib']:.0f} MiB, streamed {row['cells_streamed']:,} cells "
              f"in {row['seconds']:.1f} s ({row['cells_streamed'] / row['seconds']:.0f} cells/s incl. {args.steps} "
              f"train steps)")
    Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
