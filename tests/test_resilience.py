"""Runs that survive real kills (issue 6, items 1 and 2), on the real stages.

* The driver (`scdist run` as a subprocess, its cluster given by address) is SIGKILLed in
  the middle of the ctmm stage; the same command run again finishes the run, recomputes only
  the gene blocks that had no marker (the finished blocks' markers are untouched), and the
  results equal, bit for bit, those of an uninterrupted run on a copy of the same store.
* A Dask worker process is SIGKILLed while ctmm and while pseudobulk run (in-process
  ``scdist.run`` on the session LocalCluster): the nanny restarts it, Dask reruns its tasks
  and the results equal the undisturbed ones.

Everything runs on the session LocalCluster (``dask_client``); nothing here starts its own.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

import scdist
from scdist.plan.runlog import list_runs
from scdist.store.markers import done_set

pytestmark = [pytest.mark.resilience, pytest.mark.slow]

SIM = {"n_donors": 16, "n_celltypes": 3, "n_cells": 3000, "n_genes": 64, "n_batches": 2,
       "chunk_cells": 250, "seed": 3}
PB = {"min_cells": 5, "gene_chunk": 4}
CTMM = {"models": ["hom", "free"], "tests": ["lrt", "wald"], "n_restarts": 0, "gene_block": 4}
N_BLOCKS = SIM["n_genes"] // PB["gene_chunk"]  # ctmm gene blocks


def _scdist_cmd() -> list[str]:
    exe = Path(sys.executable).with_name("scdist")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "scdist.cli"]


def _chunk_markers(url: str) -> set[str]:
    return {c for c in done_set(url) if not c.startswith("__")}


def _marker_mtimes(url: str) -> dict[str, int]:
    d = Path(url) / "_scdist_done"
    return {p.name: p.stat().st_mtime_ns for p in d.iterdir() if not p.name.startswith("__")}


def _executing(dask_worker) -> int:
    return dask_worker.state.executing_count


def _wait_idle(client, timeout=120):
    """Until no task is queued or executing anywhere: tasks of a killed driver's client keep
    running (and write their chunk and marker) until the scheduler forgets them."""
    t0 = time.monotonic()
    client.wait_for_workers(2, timeout=timeout)
    while any(client.processing().values()) or any(client.run(_executing).values()):
        assert time.monotonic() - t0 < timeout, "cluster did not go idle"
        time.sleep(0.2)


def _assert_same(a: xr.Dataset, b: xr.Dataset):
    assert set(a.data_vars) == set(b.data_vars)
    for v in a.data_vars:
        x, y = a[v].values, b[v].values
        assert x.shape == y.shape, v
        if x.dtype.kind == "f":
            np.testing.assert_array_equal(np.isnan(x), np.isnan(y), err_msg=v)
            assert np.array_equal(x, y, equal_nan=True), f"{v} differs"
        else:
            assert np.array_equal(x, y), f"{v} differs"


@pytest.fixture(scope="module")
def studies(tmp_path_factory, dask_client):
    """A simulated store with pseudobulk, and the undisturbed ctmm result on a copy of it."""
    d = tmp_path_factory.mktemp("resilience")
    store = str(d / "study.zarr")
    res = scdist.run({"store": store, "stages": {"simulate": SIM, "pseudobulk": PB}},
                     client=dask_client, rich=False)
    assert res.ran == ["simulate", "pseudobulk"]
    ref = str(d / "reference.zarr")
    shutil.copytree(store, ref)
    scdist.run({"store": ref, "stages": {"ctmm": CTMM}}, client=dask_client, rich=False)
    return d, store, ref


class Killer(threading.Thread):
    """Once ``ready()`` is true, SIGKILL one Dask worker process (what the OOM killer or a
    preempted node does); ``killed`` holds its pid."""

    def __init__(self, client, ready, timeout=300):
        super().__init__(daemon=True)
        self.client, self.ready, self.timeout = client, ready, timeout
        self.killed: int | None = None

    def run(self):
        pids = self.client.run(os.getpid)  # {worker address: pid}
        t0 = time.monotonic()
        while time.monotonic() - t0 < self.timeout:
            if self.ready():
                pid = sorted(pids.values())[0]
                os.kill(pid, signal.SIGKILL)
                self.killed = pid
                return
            time.sleep(0.01)


def test_driver_sigkilled_mid_ctmm_resumes_without_recomputing(studies, dask_client, tmp_path):
    d, store0, ref = studies
    store = str(tmp_path / "study.zarr")
    shutil.copytree(store0, store)
    spec = tmp_path / "ctmm.yaml"
    import yaml

    spec.write_text(yaml.safe_dump({"store": store, "stages": {"ctmm": CTMM}}))
    url = f"{store}/results/ctmm/default"
    cmd = _scdist_cmd() + ["run", str(spec), "--dask-address", dask_client.scheduler.address]
    env = {**os.environ, "CI": "true"}

    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            stdin=subprocess.DEVNULL)
    try:
        t0 = time.monotonic()
        while len(_chunk_markers(url)) < 3:
            assert proc.poll() is None, "the run ended before it could be killed"
            assert time.monotonic() - t0 < 240
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=30)
    # tasks already handed to workers still finish (and mark) after the driver is gone: wait
    # until the cluster is idle and the markers have stopped changing
    finished = None
    while finished != _chunk_markers(url):
        finished = _chunk_markers(url)
        _wait_idle(dask_client)
        time.sleep(2)
    assert 3 <= len(finished) < N_BLOCKS, f"{len(finished)} of {N_BLOCKS} blocks done at the kill"
    before = _marker_mtimes(url)
    assert list_runs(store)[-1]["status"] == "interrupted"
    status = subprocess.run(_scdist_cmd() + ["status", store], capture_output=True, text=True,
                            env=env, timeout=120)
    assert "interrupted" in status.stdout
    assert f"{len(finished)}/{N_BLOCKS} chunks" in status.stdout

    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600,
                           stdin=subprocess.DEVNULL)
    assert again.returncode == 0, again.stderr
    assert f"resuming ({len(finished)}/{N_BLOCKS} chunks already done)" in again.stderr
    after = _marker_mtimes(url)
    assert len(after) == N_BLOCKS
    # the finished blocks were not recomputed: their markers are the very same files
    assert {k: after[k] for k in before} == before
    recomputed = [k for k in after if k not in before]
    assert len(recomputed) == N_BLOCKS - len(finished)

    _assert_same(xr.open_zarr(url, consolidated=False).load(),
                 xr.open_zarr(f"{ref}/results/ctmm/default", consolidated=False).load())
    assert [r["status"] for r in list_runs(store)][-2:] == ["interrupted", "succeeded"]


def test_dask_worker_sigkilled_during_ctmm(studies, dask_client, tmp_path):
    _, store0, ref = studies
    store = str(tmp_path / "study.zarr")
    shutil.copytree(store0, store)
    url = f"{store}/results/ctmm/default"
    killer = Killer(dask_client, lambda: len(_chunk_markers(url)) >= 2)
    killer.start()
    res = scdist.run({"store": store, "stages": {"ctmm": CTMM}}, client=dask_client, rich=False)
    killer.join(timeout=5)
    assert killer.killed is not None, "no worker was killed during the stage"
    assert res.ran == ["ctmm"]
    _wait_idle(dask_client)
    assert killer.killed not in dask_client.run(os.getpid).values()  # really a new process
    _assert_same(xr.open_zarr(url, consolidated=False).load(),
                 xr.open_zarr(f"{ref}/results/ctmm/default", consolidated=False).load())


def test_dask_worker_sigkilled_during_pseudobulk(studies, dask_client, tmp_path):
    from scdist.pseudobulk.compute import SCRATCH

    _, store0, _ = studies
    store = str(tmp_path / "study.zarr")
    sim = {**SIM}
    import glob

    # per-cell-chunk partials are marked under _scratch/pseudobulk/<key>/: kill after two
    partials = f"{store}/{SCRATCH}/*/_scdist_done/cells-*"
    killer = Killer(dask_client, lambda: len(glob.glob(partials)) >= 2)
    killer.start()
    res = scdist.run({"store": store, "stages": {"simulate": sim, "pseudobulk": PB}},
                     client=dask_client, rich=False)
    killer.join(timeout=5)
    assert killer.killed is not None, "no worker was killed during the stage"
    assert res.ran == ["simulate", "pseudobulk"]
    _wait_idle(dask_client)
    _assert_same(xr.open_zarr(f"{store}/pseudobulk", consolidated=False).load(),
                 xr.open_zarr(f"{store0}/pseudobulk", consolidated=False).load())


def test_two_concurrent_runs_on_one_store_one_refused_no_corruption(studies, dask_client, tmp_path):
    """Two `scdist run` processes on the same store at once: one runs, the other fails fast
    (exit 2, the lock holder named) and writes nothing; the result is the undisturbed one."""
    import yaml

    _, store0, ref = studies
    store = str(tmp_path / "study.zarr")
    shutil.copytree(store0, store)
    spec = tmp_path / "ctmm.yaml"
    spec.write_text(yaml.safe_dump({"store": store, "stages": {"ctmm": CTMM}}))
    cmd = _scdist_cmd() + ["run", str(spec), "--dask-address", dask_client.scheduler.address]
    env = {**os.environ, "CI": "true"}
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              stdin=subprocess.DEVNULL) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, 2], outs
    refused = outs[[p.returncode for p in procs].index(2)][1]
    assert "[store]" in refused and "is writing this store" in refused and "Fix:" in refused
    _assert_same(xr.open_zarr(f"{store}/results/ctmm/default", consolidated=False).load(),
                 xr.open_zarr(f"{ref}/results/ctmm/default", consolidated=False).load())
    assert not os.path.exists(store + ".lock")
