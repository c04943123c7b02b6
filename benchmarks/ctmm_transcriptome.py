"""CTMM at the paper's transcriptome scale on the embedded LocalCluster: wall time, peak memory,
and the 1-worker vs 2-worker speed-up (issue 3's "transcriptome scale" target: < 5 min).

Study: a CTP pseudobulk cube simulated from the Free model (scdist.ctmm.simulate_ctp) at the
Cuomo et al. size of the CTMM paper: G = 11,231 genes, N = 94 donors, C = 4 cell types, chunked
by 256 genes. Work, through ``scdist.run`` as a user runs it, one stage run after the other:

1. ``ctmm`` REML, Hom + Free, tests LRT + Wald + jackknife (run ``reml``);
2. ``ctmm`` HE, Hom + Free, HE's Wald and jackknife tests (run ``he``);

on CTP and, unless ``--no-op``, on the overall pseudobulk (OP) the cube carries.

Each worker count gets its own LocalCluster (n x 1 thread, BLAS threads 1) and a fresh copy of the
study. Memory: the resident set of the driver and of every process it started (nannies, workers),
sampled every 0.25 s; reported as the peak of the sum and the peak of one worker.

    python benchmarks/ctmm_transcriptome.py [--genes 11231] [--workers 2 1]

Writes benchmarks/results/ctmm_transcriptome.json.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

for v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(v, "1")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ctmm_bench_common import STAGES, transcriptome_runs, write_result  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--genes", type=int, default=11231)
    ap.add_argument("--chunk", type=int, default=256)
    ap.add_argument("--workers", type=int, nargs="+", default=[2, 1])
    ap.add_argument("--name", default="ctmm_transcriptome", help="results/<name>.json")
    ap.add_argument("--no-op", action="store_true",
                    help="CTP only (stage key op: false); by default the stage also fits the "
                         "overall pseudobulk the simulated cube carries")
    args = ap.parse_args(argv)
    stages = {k: dict(v, op=False) if args.no_op else v for k, v in STAGES.items()}
    with tempfile.TemporaryDirectory() as tmp:
        out = transcriptome_runs(args.genes, args.chunk, args.workers, tmp, stages)
    write_result(args.name, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
