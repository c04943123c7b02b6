"""examples/onek1k.yaml on real OneK1K cells through the planner: ingest + pseudobulk."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import xarray as xr
import yaml

import scdist
from conftest import shared_file

REPO = Path(__file__).resolve().parents[1]


def test_onek1k_example_ingest_and_pseudobulk(tmp_path, dask_client):
    h5ad = shared_file("onek1k_scdesignpop", "onek1k_4celltypes_40donors.h5ad")
    spec = yaml.safe_load((REPO / "examples" / "onek1k.yaml").read_text())
    assert Path(spec["stages"]["ingest"]["path"]).name == h5ad.name
    spec["stages"]["ingest"]["path"] = str(h5ad)
    spec["store"] = str(tmp_path / "onek1k.zarr")

    res = scdist.run(spec, client=dask_client, rich=False)
    assert res.ran == ["ingest", "pseudobulk"]
    pb = xr.open_zarr(tmp_path / "onek1k.zarr" / "pseudobulk", consolidated=False).load()
    assert dict(pb.sizes)["donor"] == 40 and dict(pb.sizes)["gene"] == 1000
    assert sorted(pb.celltype.values) == ["bmem", "cd4nc", "monoc", "mononc"]
    assert int(pb["n_cells"].sum()) == 7811
    np.testing.assert_array_equal(pb["observed"].values, pb["n_cells"].values > 10)
    assert (~pb["observed"].values).any()  # real data: some donor x type pairs are too small
    assert list(pb.covariate.values) == ["sex", "age"]

    again = scdist.run(spec, client=dask_client, rich=False)
    assert again.ran == [] and again.skipped == ["ingest", "pseudobulk"]
