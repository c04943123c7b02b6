"""An interrupted .h5ad ingest resumes after its last complete chunk, byte for byte."""
from __future__ import annotations

import pytest

from scdist.errors import InputError
from scdist.store import ingest_h5ad, open_study
from scdist.store.cells import CellWriter
from scdist.store.testing import write_synthetic_h5ad

from test_store_cells import snapshot

KEYS = dict(donor_key="individual", celltype_key="cell_type", batch_key="lane",
            covariates=["age", "sex"], chunk_cells=500)


class Crash(RuntimeError):
    pass


def crash_after(monkeypatch, blocks: int):
    """Make CellWriter.append fail on its (blocks+1)-th call, after `blocks` chunks were written."""
    calls = []
    real = CellWriter.append

    def append(self, counts, obs):
        calls.append(len(obs))
        if len(calls) > blocks:
            raise Crash("injected interruption")
        real(self, counts, obs)

    monkeypatch.setattr(CellWriter, "append", append)
    return calls


def interrupted_ingest(monkeypatch, url, h5ad, blocks: int, **kw):
    """Run an ingest that crashes after `blocks` chunks were written."""
    with monkeypatch.context() as m:
        crash_after(m, blocks)
        with pytest.raises(Crash):
            ingest_h5ad(url, h5ad, **{**KEYS, **kw})


def cells_files(url):
    return {k: v for k, v in snapshot(url).items() if k.startswith("/cells/")}


@pytest.fixture(scope="module")
def h5ad(tmp_path_factory):
    # 6,000 cells x 2,000 genes at 10 %: ~1.2M stored counts, i.e. X/data spans 3 chunks of
    # 2^19, so an interruption leaves counts buffered that are not on disk yet
    p = tmp_path_factory.mktemp("resume") / "s.h5ad"
    write_synthetic_h5ad(p, 6000, 2000, n_donors=12, density=0.1, seed=4)
    return p


def test_interrupted_ingest_resumes_to_the_same_bytes(tmp_path, h5ad, monkeypatch):
    ref = ingest_h5ad(str(tmp_path / "ref.zarr"), h5ad, **KEYS)
    url = str(tmp_path / "s.zarr")
    interrupted_ingest(monkeypatch, url, h5ad, 9)
    assert not open_study(url).has("cells")
    # a second interruption, before the resumed run got as far as the first
    firsts = []
    interrupted_ingest(monkeypatch, url, h5ad, 2, progress=firsts.append)
    assert 0 < firsts[0] < 9 * 500, firsts  # resumed after the last durable cell, not at 0
    seen = []
    st = ingest_h5ad(url, h5ad, progress=seen.append, **KEYS)
    assert 0 < seen[0] < firsts[0] + 2 * 500 and sum(seen) == 6000
    assert cells_files(url) == cells_files(ref.url)  # every chunk and metadata file
    assert not (tmp_path / "s.zarr" / "_scdist_tmp").exists()
    assert not (tmp_path / "s.zarr" / "cells" / "_scdist_done").exists()
    assert st.obs().equals(ref.obs())


def test_resume_off_and_bad_input_start_again(tmp_path, h5ad, monkeypatch):
    url = str(tmp_path / "s.zarr")
    interrupted_ingest(monkeypatch, url, h5ad, 4)
    seen = []
    ingest_h5ad(url, h5ad, progress=seen.append, resume=False, overwrite=True, **KEYS)
    assert seen[0] == 500  # from the first cell
    # other parameters (chunk size) are another ingest: its leftovers are not reused
    url2 = str(tmp_path / "t.zarr")
    interrupted_ingest(monkeypatch, url2, h5ad, 4)
    seen = []
    ingest_h5ad(url2, h5ad, progress=seen.append, **{**KEYS, "chunk_cells": 1000})
    assert seen[0] == 1000
    # bad input discards the partial copy instead of keeping it for a resume
    url3 = str(tmp_path / "u.zarr")
    real = CellWriter.append

    def bad(self, counts, obs):
        if self.n_cells >= 1000:
            counts = counts.copy()
            counts.data[0] = -1
        real(self, counts, obs)

    monkeypatch.setattr(CellWriter, "append", bad)
    with pytest.raises(InputError):
        ingest_h5ad(url3, h5ad, **KEYS)
    assert not (tmp_path / "u.zarr").exists()
