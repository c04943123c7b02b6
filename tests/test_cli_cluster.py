"""`scdist run` on a separately started Dask cluster (`dask scheduler` + `dask worker` on
loopback), reached through SCDIST_DASK_ADDRESS; scdist must leave that cluster running."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import xarray as xr

from test_quickstart import run_cli, scdist_cmd

BIN = Path(sys.executable).parent


@pytest.fixture
def external_cluster(tmp_path):
    dask = str(BIN / "dask") if (BIN / "dask").exists() else None
    if dask is None:
        pytest.skip("the `dask` command is not installed beside this Python")
    sched_file = tmp_path / "scheduler.json"
    procs = [subprocess.Popen([dask, "scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
                               "--scheduler-file", str(sched_file)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    try:
        t0 = time.monotonic()
        while not sched_file.exists():
            assert time.monotonic() - t0 < 60, "scheduler did not start"
            time.sleep(0.2)
        procs.append(subprocess.Popen([dask, "worker", "--scheduler-file", str(sched_file), "--nworkers", "2",
                                       "--nthreads", "1", "--no-dashboard", "--memory-limit", "2GiB"],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        address = json.loads(sched_file.read_text())["address"]
        from distributed import Client

        with Client(address, timeout="30s") as c:
            c.wait_for_workers(2, timeout=60)
        yield address
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in reversed(procs):
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()


@pytest.mark.slow
def test_run_on_existing_scheduler_by_env_var(tmp_path, external_cluster):
    spec = tmp_path / "small.yaml"
    spec.write_text("store: small.zarr\nstages:\n"
                    "  simulate: {n_donors: 8, n_cells: 3000, n_genes: 40, chunk_cells: 1000}\n"
                    "  pseudobulk: {min_cells: 5}\n")
    env = {**os.environ, "CI": "true", "SCDIST_DASK_ADDRESS": external_cluster}
    proc = subprocess.run(scdist_cmd() + ["run", str(spec)], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr
    assert f"scheduler {external_cluster}" in proc.stderr and "LocalCluster" not in proc.stderr
    pb = xr.open_zarr(tmp_path / "small.zarr" / "pseudobulk", consolidated=False)
    assert dict(pb.sizes)["donor"] == 8 and int(pb["n_cells"].sum()) == 3000

    from distributed import Client

    with Client(external_cluster, timeout="30s") as c:  # still there, workers included
        assert len(c.scheduler_info()["workers"]) == 2
    assert "ran nothing" in run_cli(["run", str(spec)], cwd=tmp_path).stdout
