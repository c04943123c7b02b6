"""Pipeline stages ``ldvae`` and ``mrvi``: ingest -> train -> results in the store (xarray,
per-chunk markers, saved model), rerun skips, spec errors name the key, CLI verbs exist."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import xarray as xr

from scdist.errors import ScdistError
from scdist.vae.simulate import sample_effects


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def h5ad(tmp_path_factory):
    a, _ = sample_effects(n_cells=1200, n_genes=120, n_samples=4, n_types=2, n_markers=20, seed=3)
    p = tmp_path_factory.mktemp("vae") / "sim.h5ad"
    a.write_h5ad(p)
    return str(p), a


def test_stages_write_results(h5ad, tmp_store, dask_client):
    from scdist.plan.runner import run
    from scdist.store.markers import done_set
    from scdist.vae import MrVI

    path, a = h5ad
    spec = {"store": tmp_store, "stages": {
        "ingest": {"path": path, "donor_key": "sample", "celltype_key": "celltype", "chunk_cells": 400},
        "ldvae": {"n_latent": 4, "max_epochs": 2, "batch_key": "batch", "options": {"n_hidden": 32}},
        "mrvi": {"max_epochs": 2, "run": "r1", "n_latent": 8, "n_latent_u": 4}}}
    res = run(spec, client=dask_client)
    assert res.ran == ["ingest", "ldvae", "mrvi"]
    ld = xr.open_zarr(f"{tmp_store}/results/ldvae/default", consolidated=False)
    assert ld.z.dims == ("cell", "latent") and ld.z.shape == (1200, 4)
    assert ld.loadings.dims == ("gene", "latent") and list(ld.gene.values[:2]) == ["gene0", "gene1"]
    assert not np.isnan(ld.z.values).any() and not np.isnan(ld.loadings.values).any()
    hist = xr.open_zarr(f"{tmp_store}/results/ldvae/default/history", consolidated=False)
    assert hist.sizes["epoch"] == 2
    assert {"cells-000000", "cells-000001", "cells-000002"} <= done_set(f"{tmp_store}/results/ldvae/default")
    mr = xr.open_zarr(f"{tmp_store}/results/mrvi/r1", consolidated=False)
    assert mr.u.shape == (1200, 4) and mr.z.shape == (1200, 8)
    model = MrVI.load(f"{tmp_store}/results/mrvi/r1/model")
    from scdist.store import open_study
    study = open_study(tmp_store)
    np.testing.assert_allclose(model.latent("u", study).values, mr.u.values, rtol=1e-5, atol=1e-6)
    assert sorted(model.samples) == sorted(a.obs["sample"].unique())
    assert os.path.exists(f"{tmp_store}/results/mrvi/r1/checkpoints/latest.json")
    again = run(spec, client=dask_client)
    assert again.ran == [] and set(again.skipped) == {"ingest", "ldvae", "mrvi"}

    # an interrupted stage (one latent chunk lost, no stage marker) resumes: the saved model
    # is reused (no retraining) and only the missing chunk is rewritten
    from scdist.store.markers import clear_markers
    url = f"{tmp_store}/results/ldvae/default"
    before = ld.z.values.copy()
    clear_markers(url, ["cells-000001", "__stage__"])
    ck = f"{url}/checkpoints/latest.json"
    mtime = os.path.getmtime(ck)
    resumed = run(spec, client=dask_client)
    assert resumed.ran == ["ldvae"]
    assert os.path.getmtime(ck) == mtime  # no training happened
    np.testing.assert_array_equal(xr.open_zarr(url, consolidated=False).z.values, before)


def test_spec_errors_name_the_key(h5ad, tmp_store, dask_client):
    from scdist.plan.runner import run

    path, _ = h5ad
    base = {"ingest": {"path": path, "donor_key": "sample", "celltype_key": "celltype"}}
    with pytest.raises(ScdistError, match="n_latnt"):
        run({"store": tmp_store, "stages": {**base, "ldvae": {"n_latnt": 3}}}, client=dask_client)


def test_cli_verbs_registered():
    from typer.testing import CliRunner
    from scdist.cli import app

    for verb, flag in (("ldvae", "--n-latent"), ("mrvi", "--sample-key")):
        out = CliRunner().invoke(app, [verb, "--help"], env={"COLUMNS": "200"})
        assert out.exit_code == 0 and flag in out.output
