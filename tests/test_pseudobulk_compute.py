"""compute_pseudobulk on a real store and the session LocalCluster, against a dense reference."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import xarray as xr

from scdist.errors import InputError
from scdist.pseudobulk import compute as PB
from scdist.pseudobulk import compute_pseudobulk
from scdist.pseudobulk import kernel as K
from scdist.store import CellWriter, create_study
from scdist.store.markers import STAGE, clear_markers, done_set, is_done

from test_pseudobulk_kernel import _dense_reference, _toy

DONORS = np.array([f"d{i:02d}" for i in range(6)], dtype=object)
CELLTYPES = np.array(["B", "Mono", "NK", "T"], dtype=object)


def _make_study(url, chunk_cells=97, seed=1):
    counts, donor, ct, D, C = _toy(seed=seed)
    genes = [f"g{j}" for j in range(counts.shape[1])]
    rng = np.random.default_rng(seed)
    sex = np.array(["F", "M"])[rng.integers(0, 2, D)]
    age = rng.uniform(20, 80, D).round(1)
    obs = pd.DataFrame({"donor": DONORS[donor], "celltype": CELLTYPES[ct],
                        "batch": np.where(donor < 3, "b0", "b1"), "sex": sex[donor],
                        "age": age[donor]})
    study = create_study(url)
    with CellWriter(study, genes, chunk_cells=chunk_cells, covariates=["sex", "age"]) as w:
        for a in range(0, counts.shape[0], 250):  # append blocks unaligned to chunk_cells
            w.append(counts[a:a + 250], obs.iloc[a:a + 250])
    return study, counts, donor, ct, D, C, sex, age


def _check_against_reference(ds, counts, donor, ct, D, C, min_cells=10):
    ref = _dense_reference(counts, donor, ct, D, C, min_cells)
    np.testing.assert_array_equal(ds["n_cells"].values, ref["n"])
    np.testing.assert_array_equal(ds["observed"].values, ref["n"] > min_cells)
    np.testing.assert_array_equal(ds["counts"].values, ref["raw"])
    for name in ("mean", "var", "nu"):
        np.testing.assert_allclose(ds[name].values, ref[name], rtol=1e-10, atol=1e-12,
                                   equal_nan=True, err_msg=name)
    np.testing.assert_allclose(ds["P"].values, ref["P"], rtol=1e-12)
    np.testing.assert_allclose(ds["op_mean"].values, ref["op_mean"], rtol=1e-10)
    np.testing.assert_allclose(ds["op_nu"].values, ref["op_nu"], rtol=1e-10, atol=1e-14)


def test_dask_cube_matches_dense_and_opens_with_xarray(tmp_path, dask_client, monkeypatch):
    url = str(tmp_path / "s.zarr")
    study, counts, donor, ct, D, C, sex, age = _make_study(url)
    assert len(study.cell_chunks) > 5  # chunks of 97 cells split donors
    monkeypatch.setattr(PB, "BLOCK_BYTES", 8 * D * C * 8)  # several gene blocks
    out = compute_pseudobulk(study, client=dask_client, gene_chunk=8)
    ds = xr.open_zarr(url + "/pseudobulk", consolidated=False)
    assert out.endswith("pseudobulk")
    assert dict(ds.sizes) == {"donor": D, "celltype": C, "gene": counts.shape[1], "covariate": 2}
    for v in ("mean", "var", "nu", "counts"):
        assert ds[v].dims == ("donor", "celltype", "gene")
        assert ds[v].encoding["chunks"][2] == 8
    assert ds["op_mean"].dims == ("donor", "gene")
    assert list(ds["donor"].values) == list(DONORS)
    assert list(ds["celltype"].values) == list(CELLTYPES)
    assert ds["gene"].values[3] == "g3"
    assert ds.attrs["min_cells"] == 10 and ds.attrs["normalization"] == "log1p_cp10k"
    np.testing.assert_array_equal(ds["batch"].values, np.where(np.arange(D) < 3, "b0", "b1"))
    assert list(ds["covariate"].values) == ["sex_M", "age"]
    np.testing.assert_allclose(ds["covariates"].sel(covariate="age").values, age)
    np.testing.assert_array_equal(ds["covariates"].sel(covariate="sex_M").values,
                                  (sex == "M").astype(float))
    _check_against_reference(ds, counts, donor, ct, D, C)
    # The in-process kernel over the whole matrix gives the same cube.
    cube = K.finalize(K.chunk_stats(counts, donor, ct, C), D, C)
    np.testing.assert_allclose(ds["mean"].values, cube.mean, rtol=1e-12, equal_nan=True)
    np.testing.assert_allclose(ds["op_nu"].values, cube.op_nu, rtol=1e-12)
    assert is_done(out, STAGE)
    assert len(done_set(out)) == 1 + len(PB.gene_blocks(counts.shape[1], 8, D * C))
    assert not study.has(PB.SCRATCH)  # partials removed after success


def test_rerun_skips_and_resume_uses_saved_partials(tmp_path, dask_client, monkeypatch):
    url = str(tmp_path / "s.zarr")
    study, counts, donor, ct, D, C, *_ = _make_study(url, chunk_cells=150)
    monkeypatch.setattr(PB, "BLOCK_BYTES", 16 * D * C * 8)
    out = compute_pseudobulk(study, client=dask_client, gene_chunk=8, keep_partials=True)
    before = xr.open_zarr(out, consolidated=False).load()
    # Same parameters: nothing is recomputed, even the template is left alone.
    mtime = (tmp_path / "s.zarr/pseudobulk/zarr.json").stat().st_mtime_ns
    compute_pseudobulk(study, client=dask_client, gene_chunk=8)
    assert (tmp_path / "s.zarr/pseudobulk/zarr.json").stat().st_mtime_ns == mtime
    # Simulate a crash after the first gene block: stage marker and one block marker gone,
    # that block's data garbled, and X overwritten so that re-reading counts would differ.
    blocks = PB.gene_blocks(counts.shape[1], 8, D * C)
    a, b = blocks[1]
    clear_markers(out, [STAGE, f"genes-{a}-{b}"])
    import zarr
    g = zarr.open_group(out, mode="r+")
    g["mean"][:, :, a:b] = 0.0
    study.root["cells/X/data"][...] = 1
    compute_pseudobulk(study, client=dask_client, gene_chunk=8, keep_partials=True)
    after = xr.open_zarr(out, consolidated=False).load()
    xr.testing.assert_identical(before, after)
    # A different min_cells is a different cube: recomputed from the saved partials too.
    compute_pseudobulk(study, client=dask_client, gene_chunk=8, min_cells=30)
    ds = xr.open_zarr(out, consolidated=False)
    assert ds.attrs["min_cells"] == 30
    ref = _dense_reference(counts, donor, ct, D, C, 30)
    np.testing.assert_allclose(ds["var"].values, ref["var"], rtol=1e-10, equal_nan=True)
    assert not study.has(PB.SCRATCH)


def test_bad_parameters_fail_before_any_write(tmp_path):
    url = str(tmp_path / "s.zarr")
    study, *_ = _make_study(url, chunk_cells=300)
    for kw, field in [({"min_cells": 0}, "min_cells"), ({"normalization": "cpm"}, "normalization"),
                      ({"layer": "logcounts"}, "layer"), ({"gene_chunk": 0}, "gene_chunk")]:
        with pytest.raises(InputError) as e:
            compute_pseudobulk(study, **kw)
        assert e.value.field == field and e.value.fix
    assert not study.has("pseudobulk")


def test_user_layer(tmp_path, dask_client):
    """A stored normalised layer is used as y_ics instead of normalising the counts."""
    import anndata as ad
    from anndata.io import write_elem

    url = str(tmp_path / "s.zarr")
    study, counts, donor, ct, D, C, *_ = _make_study(url, chunk_cells=200)
    layer = sp.csr_matrix(np.sqrt(counts.toarray()))
    with ad.settings.override(zarr_write_format=3):
        write_elem(study.root["cells/layers"], "sqrt", layer)
    compute_pseudobulk(study, client=dask_client, layer="sqrt")
    ds = study.pseudobulk()
    assert ds.attrs["normalization"] == "layer:sqrt"
    cube = K.finalize(K.chunk_stats(counts, donor, ct, C, values=layer), D, C)
    np.testing.assert_allclose(ds["var"].values, cube.var, rtol=1e-10, equal_nan=True)
    np.testing.assert_allclose(ds["op_mean"].values, cube.op_mean, rtol=1e-10)


def test_simulated_study_end_to_end(tmp_path, dask_client):
    """simulate_study -> compute_pseudobulk: labels, counts and donor table match the truth."""
    from scdist.simulate import simulate_study

    s = simulate_study(str(tmp_path / "sim.zarr"), n_donors=12, n_cells=3000, n_genes=40,
                       n_celltypes=3, n_batches=3, seed=5, chunk_cells=400)
    compute_pseudobulk(s, client=dask_client)
    ds, t = s.pseudobulk().load(), s.truth().load()
    assert list(ds["donor"].values) == list(t["donor"].values)
    assert list(ds["gene"].values) == list(t["gene"].values)
    np.testing.assert_array_equal(ds["n_cells"].values, t["n_cells"].values)
    np.testing.assert_array_equal(ds["batch"].values, t["donor_batch"].values)
    np.testing.assert_array_equal(ds["covariates"].sel(covariate="sex_M").values,
                                  (t["sex"].values == "M").astype(float))
    np.testing.assert_allclose(ds["covariates"].sel(covariate="age").values, t["age"].values)
    np.testing.assert_allclose(ds["P"].values, t["n_cells"].values / t["n_cells"].values.sum(
        1, keepdims=True))
    # The CTP mean tracks the true log mean where cells are plenty (monotone link).
    ok = ds["observed"].values
    r = np.corrcoef(ds["mean"].values[ok].ravel(), t["eta"].values[ok].ravel())[0, 1]
    assert r > 0.8


def test_reingested_cells_are_not_taken_as_done(tmp_path, dask_client):
    url = str(tmp_path / "s.zarr")
    study, counts, donor, ct, D, C, *_ = _make_study(url, chunk_cells=300)
    compute_pseudobulk(study, client=dask_client)
    # New cells of the same shape and labels (different counts) replace cells/.
    counts2, *_ = _toy(seed=9)
    obs = study.obs()
    with CellWriter(study, list(study.gene_names), chunk_cells=300,
                    covariates=["sex", "age"]) as w:
        w.append(counts2, obs)
    compute_pseudobulk(study, client=dask_client)
    ds = study.pseudobulk()
    ref = _dense_reference(counts2, donor, ct, D, C, 10)
    np.testing.assert_allclose(ds["mean"].values, ref["mean"], rtol=1e-10, equal_nan=True)
