"""The core stages through the planner on small data: ingest (with bulk, without covariates),
pseudobulk against a direct numpy computation, and the pseudobulk stage's reset."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import xarray as xr

import scdist
from scdist.errors import InputError, SpecError
from scdist.plan.graph import STALE


@pytest.fixture
def data(tmp_path):
    import anndata as ad

    rng = np.random.default_rng(11)
    n, g = 900, 25
    obs = pd.DataFrame({"indiv": rng.choice([f"d{i}" for i in range(6)], n),
                        "ct": rng.choice(["T", "B", "NK"], n, p=[0.6, 0.3, 0.1])},
                       index=[f"c{i}" for i in range(n)])
    genes = [f"g{i}" for i in range(g)]
    x = rng.poisson(2.0, (n, g))
    ad.AnnData(sp.csr_matrix(x.astype(np.float32)), obs=obs,
               var=pd.DataFrame(index=genes)).write_h5ad(tmp_path / "cells.h5ad")
    bulk = pd.DataFrame(rng.poisson(50, (g + 3, 4)), index=genes + ["x1", "x2", "x3"],
                        columns=[f"s{j}" for j in range(4)])
    bulk.to_csv(tmp_path / "bulk.csv")
    return tmp_path, x, obs


def _spec(tmp_path, **pb):
    return {"store": str(tmp_path / "st.zarr"), "stages": {
        "ingest": {"path": str(tmp_path / "cells.h5ad"), "donor_key": "indiv", "celltype_key": "ct",
                   "chunk_cells": 200, "bulk": str(tmp_path / "bulk.csv")},
        "pseudobulk": {"min_cells": 10, **pb}}}


def test_ingest_and_pseudobulk_match_numpy(data, dask_client):
    tmp_path, x, obs = data
    res = scdist.run(_spec(tmp_path), client=dask_client, rich=False)
    assert res.ran == ["ingest", "pseudobulk"]
    store = tmp_path / "st.zarr"
    bulk = xr.open_zarr(store / "bulk", consolidated=False)
    assert bulk.sizes["bulk_sample"] == 4 and bulk.sizes["gene"] == 25  # x1..x3 dropped
    pb = xr.open_zarr(store / "pseudobulk", consolidated=False).load()
    assert pb.sizes["covariate"] == 0  # no donor covariates given
    y = np.log1p(x / x.sum(1, keepdims=True) * 1e4)
    for d in pb.donor.values:
        for c in pb.celltype.values:
            m = ((obs["indiv"] == d) & (obs["ct"] == c)).to_numpy()
            assert int(pb["n_cells"].sel(donor=d, celltype=c)) == m.sum()
            if m.sum() > 10:
                np.testing.assert_allclose(pb["mean"].sel(donor=d, celltype=c), y[m].mean(0), rtol=1e-10)
                np.testing.assert_allclose(pb["nu"].sel(donor=d, celltype=c),
                                           y[m].var(0, ddof=1) / m.sum(), rtol=1e-8)
            else:
                assert np.isnan(pb["mean"].sel(donor=d, celltype=c)).all()


def test_changed_min_cells_recomputes_pseudobulk_only(data, dask_client):
    tmp_path, _, _ = data
    scdist.run(_spec(tmp_path), client=dask_client, rich=False)
    graph = scdist.plan(_spec(tmp_path, min_cells=200))
    assert [n.status for n in graph] == ["done", STALE]
    res = scdist.run(_spec(tmp_path, min_cells=200), client=dask_client, rich=False)
    assert res.ran == ["pseudobulk"] and res.skipped == ["ingest"]
    pb = xr.open_zarr(tmp_path / "st.zarr" / "pseudobulk", consolidated=False)
    np.testing.assert_array_equal(pb["observed"].values, pb["n_cells"].values > 200)


def test_pseudobulk_reset_drops_scratch_partials(data, dask_client):
    from scdist.plan.stages.pseudobulk import PseudobulkConfig, PseudobulkStage
    from scdist.pseudobulk.compute import SCRATCH

    tmp_path, _, _ = data
    scdist.run(_spec(tmp_path), client=dask_client, rich=False)
    scratch = tmp_path / "st.zarr" / SCRATCH / "leftover"
    scratch.mkdir(parents=True)
    (scratch / "zarr.json").write_text("{}")
    PseudobulkStage().reset(str(tmp_path / "st.zarr"), PseudobulkConfig())
    assert not (tmp_path / "st.zarr" / SCRATCH).exists()
    assert scdist.plan(_spec(tmp_path)).node("pseudobulk").status == "pending"


def test_ingest_input_errors_before_any_work(data, dask_client):
    tmp_path, _, _ = data
    spec = _spec(tmp_path)
    spec["stages"]["ingest"]["path"] = str(tmp_path / "missing.h5ad")
    with pytest.raises(InputError) as ei:
        scdist.run(spec, client=dask_client, rich=False)
    assert ei.value.field == "stages.ingest.path"
    spec["stages"]["ingest"]["path"] = str(tmp_path / "cells.csv")
    with pytest.raises(InputError, match="format"):
        scdist.plan(spec)
    spec["stages"]["ingest"]["path"] = str(tmp_path / "cells.h5ad")
    spec["stages"]["ingest"]["chunk_cells"] = "many"
    with pytest.raises(SpecError) as ei:
        scdist.plan(spec)
    assert ei.value.field == "stages.ingest.chunk_cells"
    assert not (tmp_path / "st.zarr").exists()


def test_stage_after_a_rerunning_input_is_planned_on_the_new_input(data, dask_client):
    from scdist.plan.runlog import list_runs

    tmp_path, _, _ = data
    scdist.run(_spec(tmp_path), client=dask_client, rich=False)
    spec = _spec(tmp_path)
    spec["stages"]["ingest"]["chunk_cells"] = 300
    graph = scdist.plan(spec)
    ingest, pb = graph.node("ingest"), graph.node("pseudobulk")
    assert ingest.status == STALE and "config" in ingest.reason
    assert pb.status == STALE and "cells" in pb.reason  # its input changes
    assert pb.plan.chunks is None and not pb.planned_on_inputs  # the old cells/ say nothing
    res = scdist.run(spec, client=dask_client, rich=False)
    assert res.ran == ["ingest", "pseudobulk"]
    stages = {s["stage"]: s for s in list_runs(str(tmp_path / "st.zarr"))[-1]["stages"]}
    assert stages["pseudobulk"]["chunks"] == 1  # planned again once the new cells existed
