"""The same spec on clusters scdist did not start (issue 6, item 3), which it must leave running.

* Dask: a separately started ``dask scheduler`` + ``dask worker`` (processes on loopback),
  given by the spec's ``dask.address`` and by ``--dask-address`` (the environment variable is
  covered in test_cli_cluster.py).
* Ray: a separately started ``ray start --head --block`` on loopback, given by
  ``--ray-address``, running the ``ursm`` stage on Ray actors.

Each cluster is stopped in the fixture's teardown by terminating the processes the fixture
started (never ``ray stop``, which would stop every Ray on the machine).
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import xarray as xr
import yaml

BIN = Path(sys.executable).parent
SIM = {"n_donors": 8, "n_cells": 2000, "n_genes": 40, "n_celltypes": 3, "chunk_cells": 1000}


def _cmd():
    exe = BIN / "scdist"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "scdist.cli"]


def _run(args, cwd, env=None, timeout=600):
    env = {**os.environ, "CI": "true", **(env or {})}
    for k in ("SCDIST_DASK_ADDRESS", "SCDIST_RAY_ADDRESS"):
        env.pop(k, None)
    proc = subprocess.run(_cmd() + args, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def _stop(procs):
    for p in reversed(procs):
        p.terminate()
    for p in reversed(procs):
        try:
            p.wait(timeout=60)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(timeout=30)


@pytest.fixture
def dask_cluster(tmp_path):
    if not (BIN / "dask").exists():
        pytest.skip("the `dask` command is not installed beside this Python")
    sched = tmp_path / "scheduler.json"
    procs = [subprocess.Popen([str(BIN / "dask"), "scheduler", "--host", "127.0.0.1", "--port", "0",
                               "--no-dashboard", "--scheduler-file", str(sched)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    try:
        t0 = time.monotonic()
        while not sched.exists():
            assert time.monotonic() - t0 < 60, "scheduler did not start"
            time.sleep(0.2)
        procs.append(subprocess.Popen([str(BIN / "dask"), "worker", "--scheduler-file", str(sched),
                                       "--nworkers", "2", "--nthreads", "1", "--no-dashboard",
                                       "--memory-limit", "2GiB"],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        address = json.loads(sched.read_text())["address"]
        from distributed import Client

        with Client(address, timeout="30s") as c:
            c.wait_for_workers(2, timeout=60)
        yield address
    finally:
        _stop(procs)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ray_head(tmp_path):
    if not (BIN / "ray").exists():
        pytest.skip("the `ray` command is not installed beside this Python")
    import shutil
    import tempfile

    port = _free_port()
    address = f"127.0.0.1:{port}"
    import secrets

    temp = tempfile.mkdtemp(prefix="scdist-ray-", dir="/tmp")  # Ray's socket paths must stay short
    # Ray 2.5x heads may require a token: give head and driver the same one explicitly
    env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    proc = subprocess.Popen([str(BIN / "ray"), "start", "--head", "--block", f"--port={port}",
                             "--node-ip-address=127.0.0.1", "--num-cpus=2", "--include-dashboard=false",
                             f"--temp-dir={temp}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, **env})
    try:
        t0 = time.monotonic()
        while True:
            assert proc.poll() is None, "ray head exited"
            assert time.monotonic() - t0 < 120, "ray head did not start"
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                time.sleep(0.5)
        yield address, proc, env
    finally:
        _stop([proc])
        shutil.rmtree(temp, ignore_errors=True)


@pytest.mark.slow
def test_dask_cluster_by_spec_address_and_cli_flag(tmp_path, dask_cluster):
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({"store": "s.zarr", "dask": {"address": dask_cluster},
                                    "stages": {"simulate": SIM, "pseudobulk": {"min_cells": 5}}}))
    first = _run(["run", str(spec)], cwd=tmp_path)
    assert f"scheduler {dask_cluster}" in first.stderr and "LocalCluster" not in first.stderr
    # the same stages by flag on another store: --dask-address wins over nothing in the spec
    spec2 = tmp_path / "spec2.yaml"
    spec2.write_text(yaml.safe_dump({"store": "t.zarr", "stages": {"simulate": SIM, "pseudobulk": {"min_cells": 5}}}))
    second = _run(["run", str(spec2), "--dask-address", dask_cluster], cwd=tmp_path)
    assert f"scheduler {dask_cluster}" in second.stderr
    a = xr.open_zarr(tmp_path / "s.zarr" / "pseudobulk", consolidated=False).load()
    b = xr.open_zarr(tmp_path / "t.zarr" / "pseudobulk", consolidated=False).load()
    xr.testing.assert_equal(a, b)  # same seed, same cluster: same cube (attrs hold write times)
    from distributed import Client

    with Client(dask_cluster, timeout="30s") as c:  # scdist left the cluster running
        assert len(c.scheduler_info()["workers"]) == 2


@pytest.mark.slow
@pytest.mark.ray
def test_ursm_on_a_separately_started_ray_head(tmp_path, ray_head):
    address, head, env = ray_head
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({"store": "s.zarr", "stages": {
        "simulate": SIM,
        "ursm": {"engine": "ray", "use_bulk": False, "em_iters": 2, "burnin": 2, "samples": 2,
                 "n_actors": 2, "cell_block_size": 500}}}))
    proc = _run(["run", str(spec), "--ray-address", address], cwd=tmp_path, env=env, timeout=900)
    assert f"head at {address}" in proc.stderr
    res = xr.open_zarr(tmp_path / "s.zarr" / "results" / "ursm" / "default", consolidated=False)
    assert "A" in res and res.sizes["gene"] == SIM["n_genes"]
    assert head.poll() is None  # scdist did not stop the head it was given
    with socket.create_connection(("127.0.0.1", int(address.rsplit(":", 1)[1])), timeout=5):
        pass  # and it still answers
