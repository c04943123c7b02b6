"""Ingest from .h5ad / .zarr / in-memory AnnData and bulk counts; validation before any write."""
from __future__ import annotations

import uuid

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from conftest import shared_file
from scdist.errors import InputError, SchemaError
from scdist.store import (create_study, ingest_anndata, ingest_bulk, ingest_h5ad, ingest_zarr,
                          open_study)

from test_store_cells import snapshot

KEYS = dict(donor_key="indiv", celltype_key="cell_type", batch_key="lane",
            covariates=["age", "sex"])


def make_adata(n=600, g=40, donors=6, seed=0) -> ad.AnnData:
    rng = np.random.default_rng(seed)
    x = sp.random(n, g, density=0.2, format="csr", random_state=seed,
                  data_rvs=lambda k: rng.negative_binomial(2, 0.2, k) + 1).astype(np.int32)
    d = rng.integers(0, donors, n)
    obs = pd.DataFrame({"indiv": pd.Categorical([f"SAMP{i}" for i in d]),
                        "cell_type": rng.choice(["cd4", "bmem", "mono"], n),
                        "lane": [f"L{i % 2}" for i in d],
                        "age": (20 + 7 * d).astype(np.int64),
                        "sex": pd.Categorical(np.where(d % 2, "M", "F")),
                        "qc": rng.normal(size=n)},  # cell-level column, not ingested
                       index=[f"AAAC-{i}" for i in range(n)])
    a = ad.AnnData(x.astype(np.float32), obs=obs, var=pd.DataFrame(index=[f"ENSG{j:04d}" for j in range(g)]))
    a.layers["counts"] = x
    a.X = sp.csr_matrix(np.log1p(x.toarray()).astype(np.float32))  # normalised X, raw in layer
    return a


def assert_same_cells(st, a: ad.AnnData, layer="counts"):
    ref = sp.csr_matrix(a.layers[layer] if layer else a.X)
    assert (st.n_cells, st.n_genes) == a.shape
    assert (st.read_counts(0, st.n_cells) != ref).nnz == 0
    assert list(st.gene_names) == list(a.var_names)
    o = st.obs()
    assert list(o.index) == list(a.obs_names)
    np.testing.assert_array_equal(o["donor"].astype(str), a.obs["indiv"].astype(str))
    np.testing.assert_array_equal(o["celltype"].astype(str), a.obs["cell_type"].astype(str))
    np.testing.assert_array_equal(o["batch"].astype(str), a.obs["lane"].astype(str))
    np.testing.assert_array_equal(o["age"], a.obs["age"])
    assert st.donor_covariates == ["age", "sex"]
    assert st.source_keys == {"donor": "indiv", "celltype": "cell_type", "batch": "lane"}


def test_h5ad_in_chunks_equals_in_memory(tmp_path):
    a = make_adata()
    p = tmp_path / "a.h5ad"
    a.write_h5ad(p)
    done = []
    s1 = ingest_h5ad(str(tmp_path / "s1.zarr"), p, layer="counts", chunk_cells=64,
                     progress=done.append, **KEYS)
    assert sum(done) == 600 and len(done) == 10
    s2 = ingest_anndata(f"memory://{uuid.uuid4().hex}.zarr", a, layer="counts", **KEYS)
    assert_same_cells(s1, a)
    assert_same_cells(s2, a)
    assert len(s1.cell_chunks) == 10 and len(s2.cell_chunks) == 1
    assert (s1.read_counts(0, 600) != s2.read_counts(0, 600)).nnz == 0
    prov = open_study(s1.url).provenance
    assert prov[-1]["stage"] == "ingest" and prov[-1]["inputs"] == [str(p)]
    assert prov[-1]["params"]["layer"] == "counts"
    # argument order (adata, store) also accepted; file:// URL
    s3 = ingest_anndata(a, f"file://{tmp_path}/s3.zarr", layer="counts", **KEYS)
    assert_same_cells(s3, a)


@pytest.mark.parametrize("fmt", [2, 3])
def test_zarr_source(tmp_path, fmt):
    a = make_adata(n=300)
    with ad.settings.override(zarr_write_format=fmt):
        a.write_zarr(tmp_path / "a.zarr")
    st = ingest_zarr(str(tmp_path / "s.zarr"), tmp_path / "a.zarr", layer="counts",
                     chunk_cells=50, **KEYS)
    assert_same_cells(st, a)


def test_zarr_source_from_fsspec_url():
    import zarr
    from anndata.io import write_elem

    a = make_adata(n=120)
    src = f"memory://{uuid.uuid4().hex}/a.zarr"
    write_elem(zarr.open_group(src, mode="w", zarr_format=3), "/", a)
    st = ingest_zarr(f"memory://{uuid.uuid4().hex}/s.zarr", src, layer="counts", chunk_cells=50,
                     **KEYS)
    assert_same_cells(st, a)


@pytest.mark.parametrize("kind", ["dense", "csc"])
def test_dense_and_csc_h5ad(tmp_path, kind):
    a = make_adata(n=200)
    x = a.layers["counts"]
    b = ad.AnnData(x.toarray() if kind == "dense" else sp.csc_matrix(x), obs=a.obs, var=a.var)
    b.write_h5ad(tmp_path / "b.h5ad")
    st = ingest_h5ad(str(tmp_path / "s.zarr"), tmp_path / "b.h5ad", chunk_cells=64, **KEYS)
    assert_same_cells(st, b, layer=None)


def test_raw_x(tmp_path):
    a = make_adata(n=150)
    full = ad.AnnData(a.layers["counts"], obs=a.obs, var=a.var)
    b = full[:, :25].copy()  # X: a gene subset (as after HVG selection); raw: all genes
    b.X = sp.csr_matrix(np.log1p(b.X.toarray()))
    b.raw = full
    b.write_h5ad(tmp_path / "b.h5ad")
    for st in (ingest_h5ad(str(tmp_path / "s.zarr"), tmp_path / "b.h5ad", layer="raw.X", **KEYS),
               ingest_anndata(f"memory://{uuid.uuid4().hex}", b, layer="raw.X", **KEYS)):
        assert_same_cells(st, full, layer=None)
    with pytest.raises(InputError) as e:
        ingest_anndata(str(tmp_path / "t.zarr"), a, layer="raw.X", **KEYS)
    assert e.value.field == "raw.X"


def test_lazy_dask_x(tmp_path):
    da = pytest.importorskip("dask.array")
    a = make_adata(n=130)
    b = ad.AnnData(da.from_array(a.layers["counts"].toarray(), chunks=(40, 40)), obs=a.obs,
                   var=a.var)
    st = ingest_anndata(str(tmp_path / "s.zarr"), b, chunk_cells=50, **KEYS)
    assert_same_cells(st, a)


def test_backed_anndata_streams(tmp_path):
    a = make_adata(n=200)
    b = ad.AnnData(a.layers["counts"], obs=a.obs, var=a.var)
    b.write_h5ad(tmp_path / "b.h5ad")
    backed = ad.read_h5ad(tmp_path / "b.h5ad", backed="r")
    st = ingest_anndata(str(tmp_path / "s.zarr"), backed, chunk_cells=64, **KEYS)
    assert_same_cells(st, b, layer=None)


# ---- bad input: each names its field and leaves an existing store untouched ----------------
def _bad_nan_donor(a):
    a.obs["indiv"] = a.obs["indiv"].astype(object)
    a.obs.iloc[7, a.obs.columns.get_loc("indiv")] = None


def _bad_empty_donor(a):
    a.obs["indiv"] = a.obs["indiv"].astype(str)
    a.obs.iloc[3, a.obs.columns.get_loc("indiv")] = ""


def _bad_one_donor(a):
    a.obs["indiv"] = "SAMP0"
    a.obs["age"] = 20
    a.obs["sex"] = "F"


def _bad_negative_last_chunk(a):
    x = a.layers["counts"].tolil()
    x[a.n_obs - 1, 0] = -3
    a.layers["counts"] = x.tocsr()


def _bad_nan_counts(a):
    x = a.layers["counts"].astype(np.float64)
    x.data[5] = np.nan
    a.layers["counts"] = x


def _bad_fraction(a):
    x = a.layers["counts"].astype(np.float64)
    x.data[200] = 2.5
    a.layers["counts"] = x


def _bad_dup_genes(a):
    a.var_names = ["ENSG0001"] + list(a.var_names[1:])  # same as gene 1


def _bad_covariate_varies(a):
    a.obs["age"] = np.arange(a.n_obs)


def _bad_covariate_nan(a):
    a.obs["age"] = a.obs["age"].astype(float)
    a.obs.iloc[0, a.obs.columns.get_loc("age")] = np.nan


def _bad_cov_named_batch(a):
    a.obs["batch"] = a.obs["lane"].to_numpy()


def _bad_bool_counts(a):
    a.layers["counts"] = a.layers["counts"].astype(bool)


BAD = {
    "missing donor key": (None, {"donor_key": "donor"}, "obs['donor']"),
    "missing celltype key": (None, {"celltype_key": "celltype"}, "obs['celltype']"),
    "missing batch key": (None, {"batch_key": "batch"}, "obs['batch']"),
    "missing covariate": (None, {"covariates": ["bmi"]}, "obs['bmi']"),
    "missing layer": (None, {"layer": "raw_counts"}, "layers['raw_counts']"),
    "normalised X": (None, {"layer": None}, "X"),
    "NaN donor": (_bad_nan_donor, {}, "obs['indiv']"),
    "empty donor": (_bad_empty_donor, {}, "obs['indiv']"),
    "one donor": (_bad_one_donor, {}, "obs['indiv']"),
    "negative counts (last chunk)": (_bad_negative_last_chunk, {}, "layers['counts']"),
    "NaN counts": (_bad_nan_counts, {}, "layers['counts']"),
    "non-integer counts": (_bad_fraction, {}, "layers['counts']"),
    "boolean counts": (_bad_bool_counts, {}, "layers['counts']"),
    "duplicate genes": (_bad_dup_genes, {}, "var_names"),
    "covariate varies within donor": (_bad_covariate_varies, {}, "obs['age']"),
    "covariate missing": (_bad_covariate_nan, {}, "obs['age']"),
    "covariate named like a standard column": (_bad_cov_named_batch, {"covariates": ["batch"]},
                                                "obs['batch']"),
}


@pytest.fixture(scope="module")
def good_store(tmp_path_factory):
    """A store with cells already ingested, and the h5ad path of the good data."""
    d = tmp_path_factory.mktemp("good")
    a = make_adata(n=300)
    url = str(d / "s.zarr")
    ingest_anndata(url, a, layer="counts", chunk_cells=64, **KEYS)
    return url, a


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_names_field_and_leaves_store_untouched(good_store, tmp_path, case):
    url, good = good_store
    mutate, kw, field = BAD[case]
    a = good.copy()
    if mutate:
        mutate(a)
    before = snapshot(url)
    args = {**KEYS, "layer": "counts", "chunk_cells": 64, **kw}
    with pytest.raises(InputError) as e:
        ingest_anndata(url, a, overwrite=True, **args)
    assert e.value.field == field, str(e.value)
    assert "Fix:" in str(e.value)
    assert snapshot(url) == before
    # the same through an .h5ad into a fresh location: no store is left behind
    p = tmp_path / "bad.h5ad"
    a.write_h5ad(p)
    new = tmp_path / "new.zarr"
    with pytest.raises(InputError) as e2:
        ingest_h5ad(str(new), p, **args)
    assert e2.value.field == field
    assert not new.exists()


def test_existing_cells_need_overwrite(good_store):
    url, a = good_store
    before = snapshot(url)
    with pytest.raises(InputError) as e:
        ingest_anndata(url, a, layer="counts", **KEYS)
    assert e.value.field == "cells" and "overwrite=True" in str(e.value)
    assert snapshot(url) == before


def test_not_a_study_or_missing_file(tmp_path):
    import zarr

    zarr.open_group(str(tmp_path / "other.zarr"), mode="w", zarr_format=3)
    a = make_adata(n=50)
    with pytest.raises(SchemaError):
        ingest_anndata(str(tmp_path / "other.zarr"), a, layer="counts", **KEYS)
    with pytest.raises(InputError) as e:
        ingest_h5ad(str(tmp_path / "s.zarr"), tmp_path / "missing.h5ad", **KEYS)
    assert e.value.field == "path"
    (tmp_path / "junk.h5ad").write_text("not hdf5")
    with pytest.raises(InputError, match="not a readable"):
        ingest_h5ad(str(tmp_path / "s.zarr"), tmp_path / "junk.h5ad", **KEYS)
    assert not (tmp_path / "s.zarr").exists()


# ---- bulk -------------------------------------------------------------------------------------
@pytest.fixture
def sc_store(tmp_path):
    a = make_adata(n=200, g=30)
    return ingest_anndata(str(tmp_path / "s.zarr"), a, layer="counts", **KEYS)


def _bulk_table(sc_genes, seed=0):
    rng = np.random.default_rng(seed)
    genes = list(sc_genes[5:]) + ["ENSGX1", "ENSGX2"]  # 5 sc genes missing, 2 bulk-only genes
    return pd.DataFrame(rng.integers(0, 1000, (len(genes), 4)), index=genes,
                        columns=[f"bulk{i}" for i in range(4)])


@pytest.mark.parametrize("form", ["csv", "tsv.gz", "samples_x_genes", "anndata", "h5ad"])
def test_bulk_ingest_intersects_genes_with_report(sc_store, tmp_path, form):
    table = _bulk_table(sc_store.gene_names)  # genes x samples
    kw = {}
    if form == "csv":
        src = tmp_path / "b.csv"
        table.to_csv(src)
    elif form == "tsv.gz":
        src = tmp_path / "b.tsv.gz"
        table.to_csv(src, sep="\t")
    elif form == "samples_x_genes":
        src, kw = table.T, {"orientation": "samples_x_genes"}
    else:
        src = ad.AnnData(table.T.to_numpy(), obs=pd.DataFrame(index=table.columns),
                         var=pd.DataFrame(index=table.index))
        if form == "h5ad":
            src.write_h5ad(tmp_path / "b.h5ad")
            src = tmp_path / "b.h5ad"
    w = pd.DataFrame(np.full((4, 3), 1 / 3), index=table.columns, columns=["cd4", "bmem", "mono"])
    rep = ingest_bulk(sc_store, src, true_W=w, **kw)
    assert rep["n_kept"] == 25 and rep["n_dropped_sc"] == 5 and rep["n_dropped_bulk"] == 2
    assert rep["dropped_sc"] == list(sc_store.gene_names[:5])
    assert rep["dropped_bulk"] == ["ENSGX1", "ENSGX2"]
    ds = open_study(sc_store.url).bulk()
    assert dict(ds.sizes) == {"bulk_sample": 4, "gene": 25, "celltype": 3}
    assert ds["counts"].dtype == np.int64
    assert list(ds.gene.values) == list(sc_store.gene_names[5:])
    np.testing.assert_array_equal(ds["counts"].values, table.loc[ds.gene.values].T.to_numpy())
    np.testing.assert_allclose(ds["true_W"].values, 1 / 3)
    assert ds.attrs["gene_report"]["n_dropped_bulk"] == 2
    assert open_study(sc_store.url).provenance[-1]["stage"] == "ingest_bulk"


def _neg(t):
    t.iloc[0, 0] = -1
    return t


def _frac(t):
    return t.astype(float).add(0.5)


def _dup_samples(t):
    t.columns = ["a", "a", "b", "c"]
    return t


def _disjoint(t):
    t.index = [f"OTHER{i}" for i in range(len(t))]
    return t


@pytest.mark.parametrize("mutate,field", [(_neg, "bulk counts"), (_frac, "bulk counts"),
                                          (_dup_samples, "bulk samples"),
                                          (_disjoint, "bulk genes")])
def test_bad_bulk_leaves_store_untouched(sc_store, mutate, field):
    ingest_bulk(sc_store, _bulk_table(sc_store.gene_names))
    before = snapshot(sc_store.url)
    with pytest.raises(InputError) as e:
        ingest_bulk(sc_store, mutate(_bulk_table(sc_store.gene_names, seed=1)))
    assert e.value.field == field
    assert snapshot(sc_store.url) == before


def test_bulk_needs_cells_and_known_orientation(tmp_path):
    st = create_study(str(tmp_path / "e.zarr"))
    with pytest.raises(InputError) as e:
        ingest_bulk(st, pd.DataFrame({"s": [1]}, index=["g"]))
    assert e.value.field == "cells"


# ---- real data --------------------------------------------------------------------------------
def test_onek1k_real_file_ingests(tmp_path):
    p = shared_file("onek1k_scdesignpop", "onek1k_4celltypes_40donors.h5ad")
    st = ingest_h5ad(str(tmp_path / "onek1k.zarr"), p, donor_key="donor",
                     celltype_key="cell_type", covariates=["sex", "age"], chunk_cells=1000)
    assert (st.n_cells, st.n_genes) == (7811, 1000)
    o = st.obs()
    assert o["donor"].nunique() == 40
    assert set(o["celltype"].cat.categories) == {"cd4nc", "bmem", "monoc", "mononc"}
    assert st.donor_covariates == ["sex", "age"]
    assert (o.groupby("donor", observed=True)[["sex", "age"]].nunique() == 1).all().all()
    with h5py.File(p) as f:
        data = f["X/data"][:]
        total = int(data.sum())
        ip = f["X/indptr"][:]
    assert int(st.read_counts(0, st.n_cells).sum()) == total
    m = st.read_counts(3000, 4000)
    assert m.nnz == ip[4000] - ip[3000]
    assert str(st.gene_names[0]).startswith("ENSG")


@pytest.mark.parametrize("folder,name,keys,n_donors", [
    ("kang2018_muscat", "kang2018_ctrl_8donors.h5ad",
     dict(donor_key="donor", celltype_key="cell_type"), 8),
    ("kang2018_muscat", "kang2018_ctrl_stim_2donors.h5ad",  # samples as donors, condition per sample
     dict(donor_key="sample_id", celltype_key="cell_type", covariates=["condition"]), 4),
    ("onek1k_scdesignpop", "onek1k_bcells_100donors.h5ad",
     dict(donor_key="donor", celltype_key="cell_type", covariates=["sex", "age"]), 100),
])
def test_other_real_files_ingest(tmp_path, folder, name, keys, n_donors):
    p = shared_file(folder, name)
    st = ingest_h5ad(str(tmp_path / "s.zarr"), p, chunk_cells=2000, **keys)
    with h5py.File(p) as f:
        total, shape = int(f["X/data"][:].sum()), tuple(f["X"].attrs["shape"])
    assert (st.n_cells, st.n_genes) == shape
    assert int(st.read_counts(0, st.n_cells).sum()) == total
    assert st.obs()["donor"].nunique() == n_donors
