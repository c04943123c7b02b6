"""The run pod's contract, played locally: what `scdist submit` puts in a Job is enough to run.

The Job manifest is taken as built (args, env, workingDir, mounted ConfigMap); only the two
mount points are mapped onto temporary directories, since no kubelet runs here. The pipeline
must then connect to the Dask scheduler named in SCDIST_DASK_ADDRESS (not start its own), write
its store on the "volume" (the working directory), and a second run, as the CronJob's next
schedule would make, must skip everything already done.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytest.importorskip("kubernetes")

from typer.testing import CliRunner  # noqa: E402

from scdist.cli import app  # noqa: E402

SPEC = """\
store: atlas.zarr
stages:
  simulate: {n_donors: 6, n_cells: 1200, n_genes: 40, n_celltypes: 2, chunk_cells: 600, seed: 3}
  pseudobulk: {min_cells: 5}
"""


def _pod(doc):
    if doc["kind"] == "CronJob":
        return doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    return doc["spec"]["template"]["spec"]


def play_pod(manifests, mounts: dict[str, Path]) -> subprocess.CompletedProcess:
    """Run the run pod's container as the kubelet would, with ``mounts`` for its volumes."""
    cm = next(d for d in manifests if d["kind"] == "ConfigMap")
    pod = _pod(next(d for d in manifests if d["kind"] in ("Job", "CronJob")))
    (c,) = pod["containers"]
    for m in c["volumeMounts"]:
        volume = next(v for v in pod["volumes"] if v["name"] == m["name"])
        if "configMap" in volume:
            assert volume["configMap"]["name"] == cm["metadata"]["name"]
            for key, text in cm["data"].items():
                (mounts[m["mountPath"]] / key).write_text(text)

    def local(path: str) -> str:
        for mount, where in mounts.items():
            if path == mount or path.startswith(mount + "/"):
                return str(where) + path[len(mount):]
        return path

    env = {k: v for k, v in os.environ.items() if not k.startswith("SCDIST_")}
    env.update({e["name"]: local(e["value"]) for e in c.get("env", [])})
    # The image's entrypoint is `scdist`; here it is this environment's CLI.
    cmd = [sys.executable, "-m", "scdist.cli", *[local(a) for a in c["args"]]]
    return subprocess.run(cmd, cwd=local(c["workingDir"]), env=env, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.slow
def test_scheduled_run_uses_the_given_dask_cluster_writes_to_the_volume_and_resumes(tmp_path, dask_client):
    spec = tmp_path / "atlas.yaml"
    spec.write_text(SPEC)
    address = dask_client.scheduler.address
    res = CliRunner().invoke(app, ["submit", str(spec), "--dry-run", "--pvc", "atlas-store",
                                   "--schedule", "@weekly", "--dask-address", address])
    assert res.exit_code == 0, res.output
    manifests = [d for d in yaml.safe_load_all(res.output) if d]
    pvc, etc, tmp = tmp_path / "pvc", tmp_path / "etc-scdist", tmp_path / "tmp"
    for d in (pvc, etc, tmp):
        d.mkdir()
    mounts = {"/data": pvc, "/etc/scdist": etc, "/tmp": tmp}

    before = dask_client.run_on_scheduler(lambda dask_scheduler: dask_scheduler.transition_counter)
    first = play_pod(manifests, mounts)
    assert first.returncode == 0, first.stdout + first.stderr
    after = dask_client.run_on_scheduler(lambda dask_scheduler: dask_scheduler.transition_counter)
    assert after > before, "the run did not use the Dask scheduler named in SCDIST_DASK_ADDRESS"
    assert (pvc / "atlas.zarr" / "pseudobulk").is_dir()        # relative store landed on the volume
    assert "ran simulate" in first.stdout and "pseudobulk" in first.stdout

    second = play_pod(manifests, mounts)                       # the next scheduled run
    assert second.returncode == 0, second.stdout + second.stderr
    assert "ran nothing" in second.stdout, second.stdout
    assert "simulate" in second.stdout and "pseudobulk" in second.stdout
