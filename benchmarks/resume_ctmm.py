"""Resume a half-finished transcriptome-scale CTMM run vs running it from scratch, and the
cost of completion tracking.

Study: a CTP pseudobulk cube simulated from the Free model (scdist.ctmm.simulate_ctp) at the
Cuomo et al. size used in the CTMM paper (G = 11,231 genes, N = 94 donors, C = 4 cell types),
stored chunked by 256 genes (44 gene blocks), with its stage marker. Stage: ``ctmm`` with Hom +
Free REML, LRT + Wald, through ``scdist.run`` on a LocalCluster of 2 workers x 1 thread.

1. From scratch: the stage's wall time (``RunResult.seconds['ctmm']``).
2. Half-finished: the completion markers of every other gene block (and the stage marker) are
   removed, which is exactly the store an interrupted run leaves behind (blocks whose marker
   is missing are recomputed whatever their data say); the same spec is run again and timed.
3. Tracking overhead: the time of one chunk marker write (``mark_done``, write-beside and
   rename) and one ``done_set`` listing, measured in-process (medians of 200), times the
   markers a run writes and reads, as a share of the from-scratch stage time.

    python benchmarks/resume_ctmm.py [--genes 11231] [--repeats 2]

Writes benchmarks/results/resume_ctmm.json.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

for v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(v, "1")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ctmm_bench_common import make_study, write_result  # noqa: E402


def _marker_costs(tmp: str, n: int = 200) -> dict:
    from scdist.store.markers import done_set, mark_done

    url = os.path.join(tmp, "markers.zarr", "g")
    os.makedirs(url)
    t = []
    for i in range(n):
        t0 = time.perf_counter()
        mark_done(url, f"genes_{i}_{i + 1}", {"genes": 256, "converged": 250})
        t.append(time.perf_counter() - t0)
    lst = []
    for _ in range(20):
        t0 = time.perf_counter()
        done_set(url)
        lst.append(time.perf_counter() - t0)
    return {"mark_done_s": statistics.median(t), "done_set_s_200_markers": statistics.median(lst)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--genes", type=int, default=11231)
    ap.add_argument("--chunk", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args(argv)

    import shutil

    from distributed import Client, LocalCluster

    import scdist
    from scdist.store.markers import STAGE, clear_markers, done_set

    spec_cfg = {"models": ["hom", "free"], "tests": ["lrt", "wald"], "n_restarts": 0}
    out = {"genes": args.genes, "donors": 94, "celltypes": 4, "chunk": args.chunk,
           "stage": spec_cfg, "workers": "2 x 1 thread", "scratch_s": [], "resume_s": [],
           "resumed_blocks": []}
    with tempfile.TemporaryDirectory() as tmp, \
            LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                         memory_limit="6GiB") as cl, Client(cl) as client:
        base = os.path.join(tmp, "base.zarr")
        make_study(base, args.genes, args.chunk)
        for r in range(args.repeats):
            store = os.path.join(tmp, f"run{r}.zarr")
            shutil.rmtree(store, ignore_errors=True)
            shutil.copytree(base, store)
            spec = {"store": store, "stages": {"ctmm": spec_cfg}}
            res = scdist.run(spec, client=client, rich=False)
            out["scratch_s"].append(res.seconds["ctmm"])
            url = f"{store}/results/ctmm/default"
            blocks = sorted(c for c in done_set(url) if not c.startswith("__"))
            out["n_blocks"] = len(blocks)
            lost = blocks[::2]  # every other block, as if the driver died half-way
            clear_markers(url, lost + [STAGE])
            res = scdist.run(spec, client=client, rich=False)
            out["resume_s"].append(res.seconds["ctmm"])
            out["resumed_blocks"].append(len(lost))
            print(f"repeat {r}: scratch {out['scratch_s'][-1]:.1f}s, resume of {len(lost)}/{len(blocks)} "
                  f"blocks {out['resume_s'][-1]:.1f}s", flush=True)
        costs = _marker_costs(tmp)
    scratch = statistics.median(out["scratch_s"])
    resume = statistics.median(out["resume_s"])
    n = out["n_blocks"]
    # a run writes one marker per block plus __started__ twice and __stage__, and lists once
    tracking = (n + 3) * costs["mark_done_s"] + costs["done_set_s_200_markers"]
    out.update(costs, scratch_median_s=scratch, resume_median_s=resume,
               resume_over_scratch=resume / scratch, tracking_s=tracking,
               tracking_share=tracking / scratch)
    write_result("resume_ctmm", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
