"""Completion markers on local paths, file:// and memory:// (and from concurrent writers)."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from scdist.store import CellWriter, create_study
from scdist.store.markers import STAGE, clear_markers, done_set, is_done, mark_done, read_marker

from url_kinds import KINDS, url_of_kind


@pytest.fixture(params=KINDS)
def group_url(request, tmp_path):
    return url_of_kind(request.param, tmp_path, "g")


def test_mark_query_clear(group_url):
    assert done_set(group_url) == set() and not is_done(group_url, "a")
    ids = ["genes-0-100", "genes-100-200", STAGE, "odd/id with space", "a.tmp-1@tmp-2", "ü"]
    for i in ids[:-1]:
        mark_done(group_url, i, {"rows": 5, "arr": np.int64(3)})
    assert done_set(group_url) == set(ids[:-1])
    assert all(is_done(group_url, i) for i in ids[:-1]) and not is_done(group_url, ids[-1])
    assert read_marker(group_url, "genes-0-100")["meta"] == {"rows": 5, "arr": "3"}
    assert read_marker(group_url, "missing") is None
    mark_done(group_url, "genes-0-100")  # idempotent
    clear_markers(group_url, ["genes-0-100", "never-marked"])
    assert done_set(group_url) == set(ids[1:-1])
    clear_markers(group_url)
    assert done_set(group_url) == set()


def test_invalid_chunk_id(group_url):
    for bad in ("", None, "zarr.json"):
        with pytest.raises(ValueError):
            mark_done(group_url, bad)


def test_concurrent_writers_each_own_a_key(tmp_path):
    url = str(tmp_path / "g")
    with ThreadPoolExecutor(8) as ex:
        list(ex.map(lambda i: mark_done(url, f"c{i}", {"i": i}), range(200)))
    assert done_set(url) == {f"c{i}" for i in range(200)}


@pytest.mark.filterwarnings("ignore:Object at _scdist_done")  # zarr notes the non-Zarr folder
def test_marked_cells_group_still_reads_with_anndata(tmp_store):
    # The planner marks product groups, cells/ included; anndata must still read cells/.
    st = create_study(tmp_store)
    obs = pd.DataFrame({"donor": ["a", "b", "a"], "celltype": ["T", "T", "B"]})
    with CellWriter(st, ["g1", "g2"]) as w:
        w.append(np.array([[1, 0], [0, 2], [3, 4]]), obs)
    mark_done(st.group_url("cells"), STAGE)
    a = ad.read_zarr(st.group_url("cells"))
    np.testing.assert_array_equal(a.X.toarray(), [[1, 0], [0, 2], [3, 4]])
    assert st.n_cells == 3 and list(st.obs()["donor"]) == ["a", "b", "a"]
