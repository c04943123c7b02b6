"""Where a CTMM stage's time goes on the cluster: each block task's phases, timed on the workers.

A study like the transcriptome benchmark's (``ctmm_bench_common.make_study``: N = 94 donors,
C = 4, chunks of 256 genes) is fitted through ``scdist.run`` with one ``ctmm`` stage (default:
HE, Hom + Free, Wald + jackknife) on a fresh LocalCluster per worker count. On every worker the
block task is replaced by an instrumented copy of ``scdist.ctmm.distributed._block_task`` that
times its phases -- open the study, load the block, fit, write the region, write the marker --
(wall and process CPU seconds, summed over tasks); in the driver the result template (probe
fit), writing it, and the whole stage are timed.

``--load-scheduler default`` loads the block as the task did before the eighth pass (a plain
``load()``: inside a worker that submits the reads to the cluster and waits to rejoin);
``synchronous`` as it does now.

    python benchmarks/ctmm_task_phases.py --genes 4096 --workers 1 2 \
        --load-scheduler default synchronous
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_v, "1")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ctmm_bench_common import STAGES, make_study, write_result  # noqa: E402


def _instrument(scheduler):
    """Run on each worker: replace the block task by a timed copy (phases into a list)."""
    import builtins
    import time as _t

    import scdist.ctmm.distributed as D

    log = builtins.__dict__.setdefault("_ctmm_phase_log", [])

    def block_task(item, *, store_url, result_url, cfg):
        from scdist.store import open_study
        from scdist.store.markers import mark_done
        from scdist.store.results import write_region

        marks = [(_t.perf_counter(), _t.process_time())]
        s, e = item
        pb = open_study(store_url, mode="r").pseudobulk()
        marks.append((_t.perf_counter(), _t.process_time()))
        block = pb.isel(gene=slice(s, e)).load(**({} if scheduler is None else
                                                   {"scheduler": scheduler}))
        marks.append((_t.perf_counter(), _t.process_time()))
        res = D.fit_block(block, cfg)
        marks.append((_t.perf_counter(), _t.process_time()))
        write_region(res, result_url, {"gene": slice(s, e)})
        marks.append((_t.perf_counter(), _t.process_time()))
        n_conv = int(res["converged"].sum())
        mark_done(result_url, f"genes_{s}_{e}", {"genes": e - s, "converged": n_conv})
        marks.append((_t.perf_counter(), _t.process_time()))
        for name, a, b in zip(("open", "load", "fit", "write", "marker"), marks, marks[1:]):
            log.append((name, b[0] - a[0], b[1] - a[1]))
        return n_conv

    D._block_task = block_task
    return True


def _collect():
    import builtins

    log = builtins.__dict__.get("_ctmm_phase_log", [])
    out = list(log)
    log.clear()
    return out


def run_one(store: str, n_workers: int, stage: dict, scheduler) -> dict:
    from distributed import Client, LocalCluster

    import scdist
    import scdist.ctmm.distributed as D
    import scdist.store.results as R

    driver = {}

    def timed(mod, name):
        f = getattr(mod, name)

        def g(*a, **k):
            t = time.perf_counter()
            try:
                return f(*a, **k)
            finally:
                driver[name] = driver.get(name, 0.0) + time.perf_counter() - t
        setattr(mod, name, g)
        return f

    saved = [(D, "_template", timed(D, "_template")),
             (R, "write_template", timed(R, "write_template"))]
    try:
        with LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True,
                          dashboard_address=None, memory_limit="8GiB") as cl, Client(cl) as client:
            client.run(_instrument, scheduler)
            load0 = os.getloadavg()
            t = time.perf_counter()
            scdist.run({"store": store, "stages": {"ctmm": stage}}, client=client, rich=False)
            wall = time.perf_counter() - t
            logs = client.run(_collect)
    finally:
        for mod, name, f in saved:
            setattr(mod, name, f)
    phases = {}
    for rows in logs.values():
        for name, w, c in rows:
            p = phases.setdefault(name, {"tasks": 0, "wall_s": 0.0, "cpu_s": 0.0})
            p["tasks"] += 1
            p["wall_s"] += w
            p["cpu_s"] += c
    return {"workers": n_workers, "load_scheduler": scheduler or "default", "stage_wall_s": wall,
            "driver_s": driver, "task_phases": phases, "load": [load0, os.getloadavg()]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--genes", type=int, default=2048)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--stage", choices=sorted(STAGES), default="he")
    ap.add_argument("--load-scheduler", nargs="+", default=["default", "synchronous"])
    ap.add_argument("--name", default="ctmm_task_phases", help="results/<name>.json")
    a = ap.parse_args(argv)
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "src")
        make_study(src, a.genes, 256)
        for sched in a.load_scheduler:
            for n in a.workers:
                store = os.path.join(tmp, f"{sched}_{n}")
                shutil.copytree(src, store)
                row = run_one(store, n, STAGES[a.stage], None if sched == "default" else sched)
                print(json.dumps(row), flush=True)
                runs.append(row)
    write_result(a.name, {"genes": a.genes, "stage": STAGES[a.stage], "runs": runs})
    return 0


if __name__ == "__main__":
    sys.exit(main())
