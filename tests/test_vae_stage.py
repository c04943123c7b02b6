"""Pipeline stages ``ldvae`` and ``mrvi``: ingest -> train -> results in the store (xarray,
per-chunk markers, saved model), rerun skips, spec errors name the key, CLI verbs exist."""
from __future__ import annotations

import os

import numpy as np
import pytest
import xarray as xr

from scdist.errors import ScdistError
from scdist.vae.simulate import sample_effects


pytestmark = pytest.mark.usefixtures("torch_one_thread")


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


@pytest.mark.slow
def test_mrvi_stage_runs_analyses_and_resumes(h5ad, tmp_store, dask_client):
    """``analyses`` in the mrvi stage: results in the store with markers; changing one analysis'
    parameters recomputes only that one (the model is not retrained, the others are reused)."""
    import scdist
    from scdist.store.markers import STAGE, read_marker
    from scdist.vae.analysis import read_result

    path, a = h5ad
    analyses = {"distances": {"groupby": "celltype", "min_cells": 1}, "sample_clusters": {"n_clusters": 2},
                "admissibility": {"max_cells": 50},
                "de": {"covariates": "group", "groupby": "celltype", "max_cells": 50},
                "da": {"sample_groups": "group", "groupby": "celltype", "max_cells": 50}}
    spec = {"store": tmp_store, "stages": {
        "ingest": {"path": path, "donor_key": "sample", "celltype_key": "celltype", "chunk_cells": 400,
                   "covariates": ["group"]},
        "mrvi": {"max_epochs": 2, "n_latent": 8, "n_latent_u": 4, "options": {"n_hidden": 32},
                 "analyses": analyses}}}
    res = scdist.run(spec, client=dask_client)
    assert res.ran == ["ingest", "mrvi"]
    from scdist.store import open_study
    study = open_study(tmp_store)
    d = read_result(study, "default", "distances")
    assert d["distance"].dims == ("group", "sample", "sample_b") and list(d["group"].values) == ["t0", "t1"]
    assert sorted(d["sample"].values) == ["s0", "s1", "s2", "s3"] and np.isfinite(d["distance"].values).all()
    sc = read_result(study, "default", "sample_clusters")
    assert set(np.unique(sc["cluster"].values)) <= {1, 2} and sc["linkage"].shape == (2, 3, 4)
    de = read_result(study, "default", "de")
    assert list(de["covariate"].values) == ["group[g1]"] and de.sizes["cell"] == 1200
    assert de["lfc_mean"].dims == ("group", "covariate", "gene")
    da = read_result(study, "default", "da")
    assert list(da["contrast"].values) == ["group=g1"] and np.isfinite(da["log_ratio"].values).all()
    adm = read_result(study, "default", "admissibility")
    np.testing.assert_array_equal(adm["n_admissible"].values, de["n_admissible"].values)  # DE reused it
    root = f"{tmp_store}/results/mrvi/default"
    stamps = {k: read_marker(f"{root}/{k}", STAGE)["time"] for k in analyses}
    ck = os.path.getmtime(f"{root}/checkpoints/latest.json")

    again = scdist.run(spec, client=dask_client)
    assert again.ran == [] and again.skipped == ["ingest", "mrvi"]
    spec["stages"]["mrvi"]["analyses"] = {**analyses, "da": {**analyses["da"], "max_cells": 40}}
    changed = scdist.run(spec, client=dask_client)
    assert changed.ran == ["mrvi"]
    assert os.path.getmtime(f"{root}/checkpoints/latest.json") == ck            # not retrained
    now = {k: read_marker(f"{root}/{k}", STAGE)["time"] for k in analyses}
    assert [k for k in analyses if now[k] != stamps[k]] == ["da"]
    assert read_marker(f"{root}/da", STAGE)["meta"]["params"]["max_cells"] == 40


@pytest.mark.parametrize("analyses, field", [
    ({"umap": {}}, "stages.mrvi.analyses.umap"),
    ({"sample_clusters": {}}, "stages.mrvi.analyses"),
    ({"de": {}}, "stages.mrvi.analyses.de.covariates"),
    ({"da": {"sample_groups": "group", "delta": -1}}, "stages.mrvi.analyses.da.delta"),
    ({"distances": {"groupby": "cell_clusters"}}, "stages.mrvi.analyses"),
    ({"distances": {"groupby": "nope"}}, "mrvi.analyses.distances.groupby"),
    ({"de": {"covariates": ["celltype"]}}, "mrvi.analyses.de.covariates[0]"),
])
def test_mrvi_analyses_spec_errors(h5ad, tmp_store, dask_client, analyses, field):
    """Bad ``analyses`` fail before any work, naming the key (pydantic) or the obs column (check)."""
    import scdist
    from scdist.plan.runner import run

    path, _ = h5ad
    ingest = {"ingest": {"path": path, "donor_key": "sample", "celltype_key": "celltype", "chunk_cells": 400,
                   "covariates": ["group"]}}
    if field.startswith("mrvi."):  # obs columns are checked against an existing study
        run({"store": tmp_store, "stages": ingest}, client=dask_client)
    with pytest.raises(ScdistError) as err:
        scdist.run({"store": tmp_store, "stages": {**ingest, "mrvi": {"max_epochs": 1, "analyses": analyses}}},
                   client=dask_client)
    assert f"[{field}]" in str(err.value), str(err.value)
    assert not os.path.exists(f"{tmp_store}/results/mrvi")
