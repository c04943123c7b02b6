"""Chunk-aligned result writes: template, region writes (also concurrent, on a LocalCluster)."""
from __future__ import annotations

import uuid

import dask.array as da
import dask
import numpy as np
import pytest
import xarray as xr
import zarr

from scdist.store import create_study
from scdist.store.markers import done_set, mark_done
from scdist.store.results import open_result, write_region, write_template

G, C, CHUNK = 53, 3, 10
GENES = np.array([f"ENSG{i:05d}" for i in range(G)])
CTS = np.array(["B", "Mono", "T"])


def _template():
    return xr.Dataset(
        {"beta": (("gene", "celltype"), da.zeros((G, C), chunks=(CHUNK, C))),
         "pval": (("gene",), da.zeros(G, chunks=CHUNK)),
         "n_iter": (("gene",), da.zeros(G, dtype="int32", chunks=CHUNK))},
        coords={"gene": GENES, "celltype": CTS}, attrs={"model": "free"})


def _block(a, b):
    g = np.arange(a, b)
    return xr.Dataset({"beta": (("gene", "celltype"), g[:, None] * 10.0 + np.arange(C)),
                       "pval": (("gene",), g / 100.0),
                       "n_iter": (("gene",), (g % 7).astype("int32"))},
                      coords={"gene": GENES[a:b], "celltype": CTS})


def _expected():
    return _block(0, G)


def _write_block(url, a, b):
    write_region(_block(a, b), url, {"gene": slice(a, b)})
    mark_done(url, f"genes-{a}-{b}")
    return a


@pytest.mark.parametrize("where", ["path", "memory"])
def test_template_then_regions_round_trip(tmp_store, where):
    # memory:// lives in this process only: read it back here even when an earlier test left a
    # distributed Client as the default scheduler (its workers would see an empty filesystem).
    with dask.config.set(scheduler="synchronous"):
        _round_trip(tmp_store, where)


def _round_trip(tmp_store, where):
    st = create_study(tmp_store if where == "path" else f"memory://{uuid.uuid4().hex}.zarr")
    url = st.result_url("ctmm", "default")
    write_template(_template(), url, {"gene": CHUNK})
    before = open_result(url)
    assert np.isnan(before["beta"].values).all()  # nothing computed by the template
    for a in range(0, G, CHUNK):
        _write_block(url, a, min(a + CHUNK, G))
    ds = open_result(url)
    xr.testing.assert_equal(ds.compute().drop_attrs(), _expected())
    assert ds.attrs["model"] == "free"
    assert ds["beta"].encoding["chunks"] == (CHUNK, C)
    assert ds.chunks["gene"][0] == CHUNK
    assert len(done_set(url)) == -(-G // CHUNK)
    # strings stored as variable-length strings, not fixed-width <U
    grp = zarr.open_group(url, mode="r") if where == "path" else st.group("results/ctmm/default")
    assert not str(grp["gene"].dtype).startswith("<U")
    xr.testing.assert_equal(st.open_dataset("results/ctmm/default").load().drop_attrs(), _expected())


def test_region_must_be_chunk_aligned_and_match_labels(tmp_store):
    url = create_study(tmp_store).result_url("m", "r")
    write_template(_template(), url, {"gene": CHUNK})
    with pytest.raises(ValueError, match="not aligned"):
        write_region(_block(5, 15), url, {"gene": slice(5, 15)})
    with pytest.raises(ValueError, match="do not match"):
        write_region(_block(0, 10), url, {"gene": slice(10, 20)})
    with pytest.raises(ValueError, match="length"):
        write_region(_block(0, 5), url, {"gene": (0, 10)})
    with pytest.raises(ValueError, match="lacks"):
        write_region(_block(0, 10), url, {"cell": slice(0, 10)})
    write_region(_block(50, 53), url, {"gene": (50, 53)})  # the short last chunk is fine
    np.testing.assert_array_equal(open_result(url)["pval"].values[50:], np.arange(50, 53) / 100)


def test_concurrent_region_writes_from_local_cluster(tmp_store, dask_client):
    url = create_study(tmp_store).result_url("ctmm", "conc")
    write_template(_template(), url, {"gene": CHUNK})
    futs = [dask_client.submit(_write_block, url, a, min(a + CHUNK, G), pure=False)
            for a in range(0, G, CHUNK)]
    assert sorted(dask_client.gather(futs)) == list(range(0, G, CHUNK))
    xr.testing.assert_equal(open_result(url).load().drop_attrs(), _expected())
    assert done_set(url) == {f"genes-{a}-{min(a + CHUNK, G)}" for a in range(0, G, CHUNK)}


def test_string_variables_are_written_with_the_template(tmp_store):
    url = create_study(tmp_store).result_url("pb", "r")
    donors = np.array([f"d{i}" for i in range(4)], dtype=object)
    tmpl = xr.Dataset({"batch": (("donor",), da.from_array(np.array(["b0", "b0", "b1", "b1"],
                                                                   dtype=object), chunks=2)),
                       "mean": (("donor", "gene"), da.zeros((4, G), chunks=(4, CHUNK)))},
                      coords={"donor": donors, "gene": GENES})
    write_template(tmpl, url, {"gene": CHUNK})
    write_region(xr.Dataset({"mean": (("donor", "gene"), np.ones((4, CHUNK)))},
                            coords={"donor": donors, "gene": GENES[:CHUNK]}), url,
                 {"gene": slice(0, CHUNK)})
    ds = open_result(url).compute()
    assert list(ds["batch"].values) == ["b0", "b0", "b1", "b1"]
    assert (ds["mean"].values[:, :CHUNK] == 1).all() and np.isnan(ds["mean"].values[:, CHUNK:]).all()


def test_zero_length_dimension_in_template(tmp_store):
    # e.g. a study without donor covariates: covariates(donor, covariate) with covariate = []
    url = create_study(tmp_store).result_url("pb", "nocov")
    tmpl = xr.Dataset({"covariates": (("donor", "covariate"), np.zeros((3, 0))),
                       "pval": (("gene",), da.zeros(G, chunks=CHUNK))},
                      coords={"donor": np.array(["a", "b", "c"]), "covariate": np.array([], dtype=object),
                              "gene": GENES})
    write_template(tmpl, url, {"gene": CHUNK})
    write_region(_block(0, CHUNK)[["pval"]], url, {"gene": slice(0, CHUNK)})
    ds = open_result(url)
    assert ds.sizes["covariate"] == 0 and ds["covariates"].shape == (3, 0)
    np.testing.assert_array_equal(ds["pval"].values[:CHUNK], np.arange(CHUNK) / 100)
