"""The quickstart end to end, as a user runs it: `scdist run examples/quickstart.yaml` in a
fresh directory (embedded LocalCluster started and stopped by scdist), then plain xarray.

The quickstart runs all four methods (CTMM, URSM, LDVAE, MrVI with its analyses) at demo size."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "examples" / "quickstart.yaml"
METHODS = ("ctmm", "ursm", "ldvae", "mrvi")


def scdist_cmd() -> list[str]:
    exe = Path(sys.executable).with_name("scdist")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "scdist.cli"]


def run_cli(args, cwd, timeout=900):
    env = {**os.environ, "CI": "true"}
    env.pop("SCDIST_DASK_ADDRESS", None)
    proc = subprocess.run(scdist_cmd() + list(args), cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, f"scdist {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


@pytest.mark.slow
def test_quickstart_end_to_end(tmp_path):
    first = run_cli(["run", str(QUICKSTART)], cwd=tmp_path)
    assert "ran simulate" in first.stdout and "pseudobulk" in first.stdout
    for stage in METHODS:
        assert f"{stage} (" in first.stdout, first.stdout
    assert "embedded LocalCluster" in first.stderr

    store = tmp_path / "quickstart.zarr"
    assert store.is_dir()
    pb = xr.open_zarr(store / "pseudobulk", consolidated=False)
    assert {"donor", "celltype", "gene"} <= set(pb.dims)
    assert pb.sizes["donor"] == 30 and pb.sizes["celltype"] == 4 and pb.sizes["gene"] == 200
    for var in ("mean", "nu", "n_cells", "var", "observed", "op_mean", "op_nu", "P", "counts"):
        assert var in pb
    assert pb["mean"].dims == ("donor", "celltype", "gene")
    assert pb["n_cells"].dims == ("donor", "celltype")
    pb = pb.load()
    assert int(pb["n_cells"].sum()) == 6000
    observed = pb["observed"].values
    np.testing.assert_array_equal(observed, pb["n_cells"].values > 10)
    assert observed.any() and np.isnan(pb["mean"].values[~observed]).all()
    nu = pb["var"] / pb["n_cells"]
    np.testing.assert_allclose(pb["nu"].values[observed], nu.values[observed], rtol=1e-12)

    # one donor x cell type pair against a direct computation from the stored counts
    from scdist.store import open_study

    study = open_study(str(store))
    obs = study.obs()
    d, c = np.argwhere(observed)[0]
    donor, celltype = str(pb.donor.values[d]), str(pb.celltype.values[c])
    rows = np.flatnonzero((obs["donor"].astype(str) == donor).to_numpy()
                          & (obs["celltype"].astype(str) == celltype).to_numpy())
    x = np.vstack([study.read_counts(r, r + 1).toarray() for r in rows]).astype(float)
    y = np.log1p(x / x.sum(1, keepdims=True) * 1e4)
    np.testing.assert_allclose(pb["mean"].values[d, c], y.mean(0), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(pb["var"].values[d, c], y.var(0, ddof=1), rtol=1e-8, atol=1e-12)

    # each method's results open with plain xarray, with the labels of the study
    res = {m: xr.open_zarr(store / "results" / m / "default", consolidated=False) for m in METHODS}
    assert res["ctmm"].sizes["gene"] == 200 and set(res["ctmm"]["model"].values) == {"hom", "free"}
    hom2 = res["ctmm"]["hom2"].sel(model="hom").values
    assert np.isfinite(hom2).mean() > 0.9 and (hom2[np.isfinite(hom2)] >= 0).all()
    W = res["ursm"]["W"].values            # bulk_sample x celltype proportions
    assert W.shape == (20, 4) and np.allclose(W.sum(1), 1.0, atol=1e-6)
    assert res["ldvae"]["z"].shape == (6000, 5) and res["ldvae"]["loadings"].shape == (200, 5)
    assert res["mrvi"]["u"].shape == (6000, 10) and np.isfinite(res["mrvi"]["z"].values).all()
    for analysis in ("distances", "sample_clusters", "de", "da"):
        assert (store / "results" / "mrvi" / "default" / analysis / "zarr.json").exists(), analysis

    # the same command again does no work and starts no cluster
    again = run_cli(["run", str(QUICKSTART)], cwd=tmp_path)
    assert "ran nothing; skipped simulate, pseudobulk, ctmm, ursm, ldvae, mrvi" in again.stdout
    assert "LocalCluster" not in again.stderr

    info = run_cli(["info", "quickstart.zarr"], cwd=tmp_path).stdout
    assert "cells: 6,000" in info and "genes: 200" in info and "donors: 30" in info
    assert "cell types (4)" in info and "pseudobulk" in info and "by simulate" in info

    status = run_cli(["status", "quickstart.zarr"], cwd=tmp_path).stdout
    assert "runs (2)" in status
    assert status.count("succeeded") == 2
    assert "pseudobulk  ran" in status and "pseudobulk  skipped" in status
