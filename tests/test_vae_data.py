"""Streaming cell loader: sharding, per-epoch shuffling, the hash split, bounded memory,
reading from a real study store, and early errors on bad input."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from scdist.errors import InputError
from scdist.vae.data import (Categorical, CellLoader, MatrixSource, StudySource, as_source, check_counts,
                             validation_mask)


def _source(n=5000, g=20, chunk=300, seed=0):
    rng = np.random.default_rng(seed)
    X = sp.random(n, g, density=0.3, random_state=seed, format="csr", data_rvs=lambda k: rng.integers(1, 9, k))
    obs = pd.DataFrame({"b": rng.choice(["x", "y"], n), "s": rng.choice(["s1", "s2", "s3"], n)})
    return MatrixSource(X, obs, chunk_size=chunk)


def _cats(src):
    return {"batch": src.categorical("b"), "sample": src.categorical("s")}


def _cells(loader):
    return np.concatenate([b["index"].numpy() for b in loader])


def test_shards_are_disjoint_and_cover_the_split():
    src = _source()
    seen = []
    for rank in range(3):
        ld = CellLoader(src, _cats(src), batch_size=64, split="train", rank=rank, world_size=3, seed=1)
        seen.append(_cells(ld))
    allc = np.concatenate(seen)
    assert len(allc) == len(np.unique(allc))  # no cell in two shards
    expected = np.flatnonzero(~validation_mask(np.arange(src.n_cells), 0.1, 0))
    assert np.array_equal(np.sort(allc), expected)


def test_shuffle_is_seeded_per_epoch_and_batches_mix_chunks():
    src = _source()
    a = CellLoader(src, _cats(src), batch_size=64, seed=3)
    e0 = _cells(a)
    assert np.array_equal(e0, _cells(CellLoader(src, _cats(src), batch_size=64, seed=3)))  # same seed, same order
    a.set_epoch(1)
    e1 = _cells(a)
    assert not np.array_equal(e0, e1) and np.array_equal(np.sort(e0), np.sort(e1))
    first = next(iter(CellLoader(src, _cats(src), batch_size=256, seed=3, buffer_chunks=4)))["index"].numpy()
    starts = np.array([c[0] for c in src.chunks])
    assert len(np.unique(np.searchsorted(starts, first, side="right"))) >= 3  # a batch mixes several chunks


def test_fixed_steps_equal_on_every_rank():
    src = _source(n=4000, chunk=700)
    counts = []
    for rank in range(2):
        ld = CellLoader(src, _cats(src), batch_size=128, rank=rank, world_size=2)
        ld.n_steps = ld.steps_per_epoch()
        batches = list(ld)
        counts.append(len(batches))
        assert all(b["x"].shape[0] == 128 for b in batches)
    assert counts[0] == counts[1] == (src.n_cells - int(validation_mask(np.arange(4000), 0.1).sum())) // 256


def test_split_is_deterministic_and_independent_of_chunking():
    m = validation_mask(np.arange(100_000), 0.1, seed=0)
    assert abs(m.mean() - 0.1) < 0.005
    src1, src2 = _source(chunk=300), _source(chunk=1111)
    v1 = _cells(CellLoader(src1, _cats(src1), split="val", shuffle=False))
    v2 = _cells(CellLoader(src2, _cats(src2), split="val", shuffle=False))
    assert np.array_equal(v1, v2) and np.array_equal(v1, np.flatnonzero(validation_mask(np.arange(5000), 0.1)))
    assert not np.array_equal(m, validation_mask(np.arange(100_000), 0.1, seed=1))


def test_batch_contents():
    src = _source()
    b = next(iter(CellLoader(src, _cats(src), batch_size=32, shuffle=False, split="all")))
    idx = b["index"].numpy()
    dense = src.X[idx].toarray()
    assert np.array_equal(b["x"].numpy(), dense) and b["x"].dtype == torch.float32
    assert np.allclose(b["library"].numpy()[:, 0], np.log(np.maximum(dense.sum(1), 1)), atol=1e-5)
    assert np.array_equal(b["sample"].numpy(), _cats(src)["sample"].codes[idx])
    assert set(b) == {"x", "library", "index", "batch", "sample", "label", "nz_rows", "nz_cols", "nz_flat", "nz_vals", "nz_nsmall", "log_xfact"}
    assert torch.equal(b["x"][b["nz_rows"], b["nz_cols"]], b["nz_vals"]) and int((b["x"] > 0).sum()) == len(b["nz_vals"])


class _CountingSource(MatrixSource):
    """Tracks how many rows were read since the loader last started a buffer."""

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.reads = []

    def read(self, start, stop):
        self.reads.append(stop - start)
        return super().read(start, stop)


@pytest.mark.parametrize("n_cells", [4000, 16000])
def test_memory_bounded_by_buffer(n_cells):
    """Rows read per buffer refill stay at buffer_chunks * chunk, whatever the cell count."""
    src = _CountingSource(sp.random(n_cells, 10, density=0.2, format="csr", random_state=0) * 5, chunk_size=250)
    src.X.data = np.ceil(src.X.data)
    ld = CellLoader(src, {}, batch_size=100, buffer_chunks=3)
    it = iter(ld)
    peak = 0
    for _ in it:
        peak = max(peak, sum(src.reads[-3:]))
    assert peak <= 3 * 250
    assert sum(src.reads) == n_cells  # each chunk read once per epoch, never the whole matrix at once


def test_categorical_and_errors():
    c = Categorical.from_column(np.array(["b", "a", "b"]), "k")
    assert c.categories == ["a", "b"] and c.codes.tolist() == [1, 0, 1]
    with pytest.raises(InputError, match=r"\[k\].*unseen"):
        Categorical.from_column(np.array(["a", "z"]), "k", categories=["a", "b"])
    src = _source()
    with pytest.raises(InputError, match=r"\[nope\]"):
        src.categorical("nope")
    with pytest.raises(InputError, match=r"\[X\]"):
        check_counts(MatrixSource(sp.csr_matrix(np.full((5, 3), 0.5))))
    with pytest.raises(InputError, match=r"\[data\]"):
        as_source(object())


def test_study_source_streams_from_the_store(tmp_store):
    ad = pytest.importorskip("anndata")
    from scdist.store.ingest import ingest_anndata

    rng = np.random.default_rng(0)
    X = sp.csr_matrix(rng.poisson(2.0, (900, 15)).astype(np.float32))
    obs = pd.DataFrame({"donor": rng.choice(["d1", "d2"], 900), "ct": rng.choice(["A", "B"], 900)},
                       index=[f"c{i}" for i in range(900)])
    a = ad.AnnData(X, obs=obs)
    a.var_names = [f"g{i}" for i in range(15)]
    study = ingest_anndata(tmp_store, a, donor_key="donor", celltype_key="ct", chunk_cells=200)
    src = as_source(study)
    assert isinstance(src, StudySource) and len(src.chunks) == 5
    cats = {"sample": src.categorical("donor")}
    idx = []
    for b in CellLoader(src, cats, batch_size=64, split="all", shuffle=False):
        i = b["index"].numpy()
        assert np.array_equal(b["x"].numpy(), X[i].toarray())
        idx.append(i)
    assert np.array_equal(np.concatenate(idx), np.arange(900))
    import pickle
    assert pickle.loads(pickle.dumps(src)).n_cells == 900  # ships to Ray workers by URL


def test_csr_rows_is_a_view_with_the_same_rows():
    import scipy.sparse as sp

    from scdist.vae.data import csr_rows
    X = sp.random(50, 30, density=0.2, format="csr", random_state=0, dtype=np.float32)
    for a, b in [(0, 50), (7, 19), (49, 50), (10, 10)]:
        R = csr_rows(X, a, b)
        assert R.shape == (b - a, 30)
        np.testing.assert_array_equal(R.toarray(), X[a:b].toarray())
    assert np.shares_memory(csr_rows(X, 0, 50).data, X.data)
