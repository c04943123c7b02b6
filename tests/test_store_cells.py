"""cells/: CellWriter round trips, bounded reads, atomic publish, anndata compatibility."""
from __future__ import annotations

import hashlib
import uuid

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from scdist.errors import InputError
from scdist.store import CellWriter, create_study, open_study
from scdist.store import _fs


def snapshot(url: str) -> dict[str, str]:
    """Every object under a store with a hash of its bytes (to prove a store is untouched)."""
    fs, root = _fs.filesystem(url)
    files = fs.find(root)
    return {f[len(root):]: hashlib.sha1(fs.cat_file(f)).hexdigest() for f in files}


def toy(n=523, g=37, donors=5, seed=0):
    rng = np.random.default_rng(seed)
    x = sp.random(n, g, density=0.15, format="csr", random_state=seed,
                  data_rvs=lambda k: rng.integers(1, 200, k)).astype(np.int64)
    d = rng.integers(0, donors, n)
    obs = pd.DataFrame({"donor": [f"D{i}" for i in d],
                        "celltype": rng.choice(["T", "B", "NK"], n),
                        "batch": [f"b{i % 2}" for i in d],
                        "age": (30 + 5 * d).astype(float), "sex": np.array(["F", "M"])[d % 2]},
                       index=[f"cell{i}" for i in range(n)])
    genes = [f"G{j}" for j in range(g)]
    return x, obs, genes


def write(study, x, obs, genes, *, chunk_cells=64, step=100, covariates=("age", "sex")):
    with CellWriter(study, genes, chunk_cells=chunk_cells, covariates=covariates,
                    source_keys={"donor": "indiv", "celltype": "cell_type"}) as w:
        for a in range(0, x.shape[0], step):
            w.append(x[a:a + step], obs.iloc[a:a + step])


@pytest.mark.parametrize("where", ["path", "memory"])
def test_round_trip_and_partial_reads(tmp_store, where):
    url = tmp_store if where == "path" else f"memory://{uuid.uuid4().hex}.zarr"
    x, obs, genes = toy()
    write(create_study(url), x, obs, genes)
    st = open_study(url)
    assert (st.n_cells, st.n_genes) == x.shape
    assert list(st.gene_names) == genes
    assert st.donor_covariates == ["age", "sex"]
    assert st.source_keys == {"donor": "indiv", "celltype": "cell_type"}
    chunks = st.cell_chunks
    assert chunks[0] == (0, 64) and chunks[-1][1] == x.shape[0]
    assert all(b == c for (_, b), (c, _) in zip(chunks, chunks[1:]))
    full = st.read_counts(0, st.n_cells)
    assert full.dtype.kind == "i" and (full != x).nnz == 0
    for a, b in [(0, 1), (63, 65), (100, 523), (200, 200), chunks[3]]:
        assert (st.read_counts(a, b) != x[a:b]).nnz == 0
    idx = [5, 0, 36]
    assert (st.read_counts(10, 90, genes=idx) != x[10:90][:, idx]).nnz == 0
    mask = np.zeros(37, bool)
    mask[[1, 2]] = True
    assert (st.read_counts(10, 90, genes=mask) != x[10:90][:, [1, 2]]).nnz == 0
    assert (st.read_counts(10, 90, genes=["G3", "G4"]) != x[10:90][:, [3, 4]]).nnz == 0
    with pytest.raises(InputError):
        st.read_counts(0, 10, genes=["nope"])
    with pytest.raises(InputError):
        st.read_counts(500, 600)
    o = st.obs()
    assert list(o.columns) == ["donor", "celltype", "batch", "age", "sex"]
    for c in ("donor", "celltype", "batch", "sex"):
        assert isinstance(o[c].dtype, pd.CategoricalDtype)
    pd.testing.assert_frame_equal(o.astype({c: str for c in ("donor", "celltype", "batch", "sex")}),
                                  obs.astype({"sex": str}), check_names=False)


def test_anndata_reads_cells_group(tmp_store):
    x, obs, genes = toy(n=150)
    st = create_study(tmp_store)
    write(st, x, obs, genes)
    a = ad.read_zarr(st.group_url("cells"))
    assert (a.X != x).nnz == 0 and list(a.var_names) == genes
    assert list(a.obs_names) == list(obs.index)
    from anndata.io import read_elem
    assert (read_elem(st.group("cells/X")) != x).nnz == 0


def test_reads_touch_only_the_slice(tmp_store, monkeypatch):
    x, obs, genes = toy(n=2000, g=50)
    st = create_study(tmp_store)
    write(st, x, obs, genes, chunk_cells=100, step=500)
    reader = open_study(tmp_store)._reader()
    seen = []

    class Spy:
        def __init__(self, arr):
            self.arr = arr

        def __getitem__(self, sl):
            seen.append(sl.stop - sl.start)
            return self.arr[sl]

    for name in ("_data", "_indices", "_indptr"):
        monkeypatch.setattr(reader, name, Spy(getattr(reader, name)))
    m = reader.read_counts(1000, 1100)
    assert (m != x[1000:1100]).nnz == 0
    assert seen[0] == 101 and max(seen[1:]) == x[1000:1100].nnz < x.nnz / 10


def test_dense_and_float_integer_blocks_accepted(tmp_store):
    x, obs, genes = toy(n=80)
    st = create_study(tmp_store)
    with CellWriter(st, genes, covariates=("age", "sex")) as w:
        w.append(x[:40].toarray().astype(np.float32), obs.iloc[:40])
        w.append(x[40:].astype(np.float64), obs.iloc[40:])
    assert (st.read_counts(0, 80) != x).nnz == 0


def test_failure_inside_writer_leaves_existing_cells_untouched(tmp_store):
    x, obs, genes = toy(n=200)
    st = create_study(tmp_store)
    write(st, x, obs, genes)
    before = snapshot(tmp_store)
    with pytest.raises(RuntimeError, match="boom"):
        with CellWriter(st, genes, covariates=("age", "sex")) as w:
            w.append(x[:100] * 2, obs.iloc[:100])
            raise RuntimeError("boom")
    assert snapshot(tmp_store) == before
    bad = x[100:].astype(np.float64)
    bad.data[3] = -1
    with pytest.raises(InputError) as e:
        with CellWriter(st, genes, covariates=("age", "sex"), field="layers['counts']") as w:
            w.append(x[:100], obs.iloc[:100])
            w.append(bad, obs.iloc[100:])
    assert e.value.field == "layers['counts']" and "negative" in str(e.value)
    assert "cells 100-199" in str(e.value)
    assert snapshot(tmp_store) == before
    assert (open_study(tmp_store).read_counts(0, 200) != x).nnz == 0


def test_close_checks_donor_covariates_before_publishing():
    url = f"memory://{uuid.uuid4().hex}.zarr"
    x, obs, genes = toy(n=100)
    obs = obs.copy()
    obs.iloc[0, obs.columns.get_loc("age")] = 99.0  # one cell disagrees with its donor
    st = create_study(url)
    before = snapshot(url)
    with pytest.raises(InputError) as e:
        write(st, x, obs, genes)
    assert e.value.field == "obs['age']" and "constant within donor" in str(e.value)
    assert snapshot(url) == before and not st.has("cells")
    fs, root = _fs.filesystem(url)
    assert not fs.exists(f"{root}/_scdist_tmp")


def test_writer_argument_errors(tmp_store):
    st = create_study(tmp_store)
    with pytest.raises(InputError, match="not unique"):
        CellWriter(st, ["a", "a"])
    with pytest.raises(InputError) as e:
        CellWriter(st, ["a", "b"], covariates=["batch"])
    assert e.value.field == "covariates"
    with CellWriter(st, ["a", "b"]) as w:
        with pytest.raises(InputError, match="3 genes"):
            w.append(np.ones((2, 3)), pd.DataFrame({"donor": ["x", "y"], "celltype": ["t", "t"]}))
    assert not st.has("cells")
    with pytest.raises(InputError, match="no cells"):
        with CellWriter(st, ["a", "b"]):
            pass
    # a missing batch column becomes one batch
    with CellWriter(st, ["a", "b"]) as w:
        w.append(np.eye(2, dtype=int), pd.DataFrame({"donor": ["x", "y"], "celltype": ["t", "t"]}))
    assert list(st.obs()["batch"]) == ["batch0", "batch0"]


def test_batch_in_some_blocks_only_is_an_error(tmp_store):
    st = create_study(tmp_store)
    with_batch = pd.DataFrame({"donor": ["x", "y"], "celltype": ["t", "t"], "batch": ["a", "b"]})
    with pytest.raises(InputError) as e:
        with CellWriter(st, ["a", "b"]) as w:
            w.append(np.eye(2, dtype=int), with_batch)
            w.append(np.eye(2, dtype=int), with_batch.drop(columns="batch"))
    assert e.value.field == "obs['batch']" and not st.has("cells")


def test_streamed_obs_matches_whole_table_and_is_chunked(tmp_store):
    """obs written block by block equals the concatenated table (categories in union order,
    label covariates sorted, unused covariate labels dropped) and is stored in chunks."""
    x, obs, genes = toy(n=523)
    obs = obs.copy()
    # blocks whose categoricals list categories in different orders, one with an unused one
    obs["celltype"] = pd.Categorical(obs["celltype"], categories=["T", "NK", "B", "unused"])
    obs["sex"] = obs["sex"].map({"F": "female", "M": "male"})
    st = create_study(tmp_store)
    with CellWriter(st, genes, chunk_cells=64, covariates=("age", "sex")) as w:
        for a in range(0, 523, 100):
            part = obs.iloc[a:a + 100].copy()
            if a == 200:  # one block with its own category order
                part["celltype"] = part["celltype"].cat.reorder_categories(["B", "unused", "NK", "T"])
            if a == 0:  # labels first seen in unsorted order; plain strings in this block
                part["sex"] = part["sex"].astype(object)
            w.append(x[a:a + 100], part)
    o = open_study(tmp_store).obs()
    assert list(o["celltype"].cat.categories) == ["T", "NK", "B", "unused"]
    assert list(o["sex"].cat.categories) == ["female", "male"]
    # plain string labels: each block's sorted labels, new ones appended (union_categoricals)
    union = pd.api.types.union_categoricals(
        [pd.Categorical(obs["donor"].iloc[a:a + 100]) for a in range(0, 523, 100)])
    assert list(o["donor"].cat.categories) == list(union.categories)
    for c in ("donor", "celltype", "batch", "sex"):
        assert o[c].astype(str).tolist() == obs[c].astype(str).tolist()
    np.testing.assert_array_equal(o["age"].to_numpy(), obs["age"].to_numpy())
    assert list(o.index) == list(obs.index)
    # anndata's own readers see the same table; arrays are chunked by chunk_cells
    a = ad.read_zarr(st.group_url("cells"))
    pd.testing.assert_frame_equal(a.obs, o)
    from anndata.io import read_elem
    pd.testing.assert_frame_equal(read_elem(st.group("cells/obs")), o)
    g = st.group("cells/obs")
    assert g["_index"].chunks == (64,) and g["age"].chunks == (64,)
    assert g["donor/codes"].chunks == (64,) and g["donor/codes"].shape == (523,)


def test_duplicated_cell_names_made_unique_and_covariates_checked_across_blocks(tmp_store):
    x, obs, genes = toy(n=300)
    obs = obs.copy()
    obs.index = [f"c{i % 250}" for i in range(300)]  # cells 250-299 repeat names of 0-49
    st = create_study(tmp_store)
    write(st, x, obs, genes)
    names = list(open_study(tmp_store).obs().index)
    assert names[:250] == [f"c{i}" for i in range(250)]
    assert names[250:] == [f"c{i}-1" for i in range(50)] and len(set(names)) == 300
    # a donor whose covariate changes between blocks (each block alone is consistent)
    bad = obs.copy()
    d0 = bad["donor"].iloc[0]
    late = (bad["donor"] == d0).to_numpy() & (np.arange(300) >= 200)
    bad.loc[late, "age"] = 77.0
    before = snapshot(tmp_store)
    with pytest.raises(InputError) as e:
        write(st, x, bad, genes, step=100, chunk_cells=100)
    assert e.value.field == "obs['age']" and d0 in str(e.value)
    assert snapshot(tmp_store) == before


def test_blank_labels_and_too_few_donors_rejected(tmp_store):
    x, obs, genes = toy(n=200)
    st = create_study(tmp_store)
    blank = obs.copy()
    blank.iloc[150, blank.columns.get_loc("celltype")] = ""
    with pytest.raises(InputError) as e:
        write(st, x, blank, genes)
    assert e.value.field == "obs['celltype']" and "row 150" in str(e.value)
    one = obs.assign(donor="D0", age=30.0, sex="F")
    with pytest.raises(InputError) as e:
        write(st, x, one, genes)
    assert e.value.field == "obs['donor']" and "only 1 donor" in str(e.value)
    assert not st.has("cells")
