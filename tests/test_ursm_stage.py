"""The ``ursm`` pipeline stage and CLI verb on a simulated study store."""
from __future__ import annotations

import numpy as np
import pytest
import xarray as xr

from scdist.errors import ScdistError
from scdist.ursm import fit
from scdist.ursm.simulate import simulate, write_study

CFG = {"em_iters": 2, "burnin": 3, "samples": 5, "seed": 2}


@pytest.fixture(scope="module")
def study_url(tmp_path_factory):
    sim = simulate(n_genes=100, n_cells=60, n_bulk=40, seed=1)
    url = write_study(sim, str(tmp_path_factory.mktemp("ursm") / "study.zarr"), chunk_cells=25)
    return url, sim


def test_stage_writes_result_equal_to_api_and_skips_rerun(study_url):
    from scdist.plan.runner import run
    from scdist.store import open_study
    from scdist.store.markers import done_set

    url, sim = study_url
    r = run({"store": url, "stages": {"ursm": CFG}})
    assert r.ran == ["ursm"]
    res_url = open_study(url).result_url("ursm", "default")
    ds = xr.open_zarr(res_url, consolidated=False).load()
    names = np.array(["type0", "type1", "type2"], dtype=object)
    ref = fit(sim.Y, names[sim.cell_types], sim.X, **CFG)
    np.testing.assert_array_equal(ds.A.values, ref.A.values)
    np.testing.assert_array_equal(ds.W.values, ref.W.values)
    np.testing.assert_array_equal(ds.dropout_prob.values, ref.dropout_prob.values)
    assert list(ds.celltype.values) == list(names) and ds.sizes["cell"] == 60
    assert {"cells-000000", "cells-000001", "cells-000002", "__stage__"} <= done_set(res_url)
    assert run({"store": url, "stages": {"ursm": CFG}}).ran == []        # same config: skipped


def test_stage_rejects_unknown_option(study_url):
    from scdist.plan.runner import run

    url, _ = study_url
    with pytest.raises(ScdistError) as ei:
        run({"store": url, "stages": {"ursm": {**CFG, "run": "bad", "options": {"nonsense": 1}}}})
    assert "options.nonsense" in str(ei.value)


def test_cli_verb(study_url):
    from typer.testing import CliRunner

    from scdist.cli import app

    url, _ = study_url
    out = CliRunner().invoke(app, ["ursm", url, "--run", "cli", "--em-iters", "1", "--burnin", "1",
                                   "--samples", "2", "--map-w"])
    assert out.exit_code == 0, out.output
    ds = xr.open_zarr(f"{url}/results/ursm/cli", consolidated=False)
    assert ds.attrs["map_w"] == 1 and ds.A.shape == (100, 3)


def test_stage_stopping_rule_result_and_attrs(study_url):
    from scdist.plan.runner import run
    from scdist.store import open_study

    url, sim = study_url
    # a test that fires at once (k huge): EM stops after stop_min_iters = 2 of at most 6 iterations
    cfg = {**CFG, "em_iters": 6, "run": "stop", "stop_rule": "crossfit",
           "options": {"stop_k": 1e9, "stop_patience": 1, "stop_min_iters": 2}}
    assert run({"store": url, "stages": {"ursm": cfg}}).ran == ["ursm"]
    ds = xr.open_zarr(open_study(url).result_url("ursm", "stop"), consolidated=False).load()
    assert ds.attrs["stop_reason"] == "mc_error" and ds.attrs["em_iters_run"] == 2 and ds.sizes["em_iter"] == 2
    names = np.array(["type0", "type1", "type2"], dtype=object)
    ref = fit(sim.Y, names[sim.cell_types], sim.X, **{k: v for k, v in cfg.items() if k not in ("run", "options")},
              **cfg["options"])
    np.testing.assert_array_equal(ds.A.values, ref.A.values)
    np.testing.assert_array_equal(ds.dQ_cv.values, ref.dQ_cv.values)
