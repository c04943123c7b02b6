"""examples/mrvi_analysis.py runs end to end (tiny) and leaves every result readable in the store."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "mrvi_analysis.py"


@pytest.mark.slow
def test_example_writes_all_results(tmp_path):
    torch.set_num_threads(1)
    spec = importlib.util.spec_from_file_location("mrvi_example", EXAMPLE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = mod.run(str(tmp_path / "s.zarr"), n_cells=1500, epochs=2)
    from scdist.store.markers import STAGE, is_done
    from scdist.vae.analysis.results import read_result

    study = out["study"]
    assert set(out["urls"]) == {"distances", "sample_clusters", "cell_clusters", "admissibility", "de", "da"}
    for name, url in out["urls"].items():
        assert is_done(url, STAGE), name
    d = read_result(study, "example", "distances")
    assert d["distance"].dims == ("group", "sample", "sample_b") and d.sizes["sample"] == 16
    assert sorted(d["group"].values) == sorted(set(study.obs()["celltype"].astype(str)))
    de = read_result(study, "example", "de")
    assert de["lfc_mean"].dims == ("group", "covariate", "gene") and de.sizes["cell"] == study.n_cells
    da = read_result(study, "example", "da")
    assert np.isfinite(da["log_ratio"].values).all()
    cc = read_result(study, "example", "cell_clusters")
    assert cc.sizes["cell"] == study.n_cells

    # the pipeline entry point: requested analyses only, a complete result is not recomputed
    from scdist.errors import InputError
    from scdist.vae.analysis import run_analyses

    model = out["model"]
    spec = {"distances": {"groupby": "celltype"}, "sample_clusters": {"n_clusters": 2},
            "da": {"sample_groups": "sex", "groupby": "celltype", "max_cells": 50}}
    urls = run_analyses(model, study, "piped", spec)
    assert set(urls) == set(spec) and all(is_done(u, STAGE) for u in urls.values())
    first = read_result(study, "piped", "da")["log_ratio"].values
    marker = Path(urls["da"].replace("file://", "")) / "_scdist_done"
    stamp = sorted(p.stat().st_mtime_ns for p in marker.iterdir())
    run_analyses(model, study, "piped", spec)
    assert sorted(p.stat().st_mtime_ns for p in marker.iterdir()) == stamp
    np.testing.assert_array_equal(read_result(study, "piped", "da")["log_ratio"].values, first)
    with pytest.raises(InputError, match=r"\[analyses\]"):
        run_analyses(model, study, "piped", {"umap": {}})
    with pytest.raises(InputError, match=r"\[analyses.de.covariates\]"):
        run_analyses(model, study, "piped", {"de": {}})
