"""Ingest throughput (cells/s) and peak RSS for a synthetic .h5ad, streamed vs in-memory.

Writes synthetic h5ad files (default 100k and 300k cells × 2,000 genes, 10% non-zero;
uncompressed unless ``--compression gzip``),
then ingests each in a fresh subprocess, so the peak RSS reported is the ingest's own:

* ``scdist``  — ``scdist.store.ingest_h5ad`` (blocks of ``--chunk-cells`` cells);
* ``anndata`` — the in-memory way: ``anndata.read_h5ad`` then ``write_zarr`` (Zarr v3),
  the baseline a user would otherwise run.

Each run is repeated ``--repeats`` times (median reported; the machine is shared, so
compare the two side by side rather than across sessions). Usage::

    .venv/bin/python benchmarks/bench_ingest.py                  # full
    .venv/bin/python benchmarks/bench_ingest.py --cells 20000 --repeats 1   # quick
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

CHILD = r"""
import json, sys, time
kind, src, dst, chunk = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])

def hwm_mb():  # this process's peak RSS (VmHWM; ru_maxrss would carry the parent's over exec)
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024

import anndata as ad
from scdist.store import ingest_h5ad
from scdist.store import ingest as _load_ingest  # imports before the baseline
base = hwm_mb()
t = time.perf_counter()
if kind == "scdist":
    st = ingest_h5ad(dst, src, donor_key="individual", celltype_key="cell_type",
                     batch_key="lane", covariates=["age", "sex"], chunk_cells=chunk)
    n = st.n_cells
else:
    with ad.settings.override(zarr_write_format=3, auto_shard_zarr_v3=False):
        a = ad.read_h5ad(src)
        a.write_zarr(dst)
    n = a.n_obs
dt = time.perf_counter() - t
print(json.dumps({"seconds": dt, "n_cells": n, "rss_import_mb": base,
                  "peak_rss_mb": hwm_mb()}))
"""


def run_child(kind: str, src: str, dst: str, chunk: int) -> dict:
    shutil.rmtree(dst, ignore_errors=True)
    out = subprocess.run([sys.executable, "-c", CHILD, kind, src, dst, str(chunk)],
                         check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cells", type=int, nargs="+", default=[100_000, 300_000])
    ap.add_argument("--genes", type=int, default=2000)
    ap.add_argument("--density", type=float, default=0.1)
    ap.add_argument("--chunk-cells", type=int, default=10_000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--compression", default=None, help="h5py filter for the input X, e.g. gzip")
    ap.add_argument("--no-reference", action="store_true", help="skip the anndata baseline")
    ap.add_argument("--workdir", default=None, help="where the files go (default: a temp dir)")
    args = ap.parse_args()

    from scdist.store.testing import write_synthetic_h5ad

    work = args.workdir or tempfile.mkdtemp(prefix="scdist-bench-ingest-")
    os.makedirs(work, exist_ok=True)
    rows = []
    try:
        for n in args.cells:
            src = os.path.join(work, f"synthetic_{n}.h5ad")
            t = time.perf_counter()
            info = write_synthetic_h5ad(src, n, args.genes, density=args.density, n_donors=50,
                                        seed=0, compression=args.compression)
            size_mb = os.path.getsize(src) / 2**20
            print(f"# wrote {src}: {n} cells x {args.genes} genes, {info['nnz']:,} counts, "
                  f"{size_mb:.0f} MiB, in {time.perf_counter() - t:.1f}s", flush=True)
            kinds = ["scdist"] + ([] if args.no_reference else ["anndata"])
            for kind in kinds:
                res = [run_child(kind, src, os.path.join(work, f"out_{kind}_{n}.zarr"),
                                 args.chunk_cells) for _ in range(args.repeats)]
                sec = statistics.median(r["seconds"] for r in res)
                row = {"method": kind, "n_cells": n, "n_genes": args.genes,
                       "file_mib": round(size_mb), "seconds": round(sec, 2),
                       "cells_per_s": round(n / sec),
                       "peak_rss_mib": round(max(r["peak_rss_mb"] for r in res)),
                       "rss_after_imports_mib": round(res[0]["rss_import_mb"])}
                rows.append(row)
                print(json.dumps(row), flush=True)
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    print("\n| method | cells | file (MiB) | seconds (median) | cells/s | peak RSS (MiB) "
          "| RSS after imports (MiB) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['n_cells']:,} | {r['file_mib']} | {r['seconds']} | "
              f"{r['cells_per_s']:,} | {r['peak_rss_mib']} | {r['rss_after_imports_mib']} |")


if __name__ == "__main__":
    main()
