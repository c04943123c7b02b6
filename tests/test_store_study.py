"""Study store: create/open on local paths, file:// and memory://, schema checks, provenance."""
from __future__ import annotations

import json
import pickle
import uuid

import pytest
import zarr

from scdist.errors import InputError, SchemaError
from scdist.store import Study, create_study, open_study
from scdist.store import layout

from url_kinds import KINDS, url_of_kind


def _mem() -> str:
    return f"memory://{uuid.uuid4().hex}/study.zarr"


@pytest.fixture(params=KINDS)
def any_url(request, tmp_path):
    return url_of_kind(request.param, tmp_path, "s.zarr")


def test_create_then_open_has_schema_attrs(any_url):
    st = create_study(any_url)
    assert isinstance(st, Study)
    again = open_study(any_url)
    assert again.schema_version == layout.SCHEMA_VERSION
    attrs = again.attrs
    assert attrs[layout.ATTR_VERSION]
    assert attrs[layout.ATTR_CREATED].startswith("20")
    assert attrs[layout.ATTR_PROVENANCE] == []
    assert not again.url.startswith("file://")  # file:// is normalised to a local path
    assert again.bulk() is None and again.truth() is None
    with pytest.raises(InputError, match="pseudobulk"):
        again.pseudobulk()
    with pytest.raises(InputError, match="cells"):
        _ = again.n_cells


def test_provenance_appends_records(any_url):
    st = create_study(any_url)
    st.add_provenance("ingest", {"donor_key": "indiv", "n": 3}, ["/data/a.h5ad"])
    rec = st.add_provenance("pseudobulk", {"min_cells": 10, "tuple": (1, 2)}, {"cells": "ingest"})
    prov = open_study(any_url).provenance
    assert [p["stage"] for p in prov] == ["ingest", "pseudobulk"]
    assert prov[0]["params"] == {"donor_key": "indiv", "n": 3}
    assert prov[0]["inputs"] == ["/data/a.h5ad"]
    assert prov[1]["params"]["tuple"] == [1, 2]
    assert rec["time"] and rec["scdist_version"]
    json.dumps(prov)  # plain JSON


def test_existing_store_needs_overwrite_or_exist_ok(tmp_store):
    st = create_study(tmp_store)
    st.add_provenance("x", {}, [])
    with pytest.raises(InputError) as e:
        create_study(tmp_store)
    assert e.value.field == "store" and "overwrite=True" in str(e.value)
    assert len(create_study(tmp_store, exist_ok=True).provenance) == 1
    assert create_study(tmp_store, overwrite=True).provenance == []


def test_open_missing_and_non_study_raise_schema_error(tmp_path):
    with pytest.raises(SchemaError, match="no study store"):
        open_study(str(tmp_path / "nothing.zarr"))
    zarr.open_group(str(tmp_path / "v2.zarr"), mode="w", zarr_format=2)
    with pytest.raises(SchemaError, match="Zarr v2"):
        open_study(str(tmp_path / "v2.zarr"))
    zarr.open_group(str(tmp_path / "plain.zarr"), mode="w", zarr_format=3)
    with pytest.raises(SchemaError) as e:
        open_study(str(tmp_path / "plain.zarr"))
    assert e.value.field == layout.ATTR_SCHEMA and "not a scdist study" in str(e.value)


@pytest.mark.parametrize("mem", [False, True])
def test_schema_version_mismatch_names_versions_and_fix(tmp_store, mem):
    url = _mem() if mem else tmp_store
    st = create_study(url)
    st.root.attrs[layout.ATTR_SCHEMA] = layout.SCHEMA_VERSION + 41
    with pytest.raises(SchemaError) as e:
        open_study(url)
    msg = str(e.value)
    assert f"schema version {layout.SCHEMA_VERSION + 41}" in msg
    assert f"reads schema version {layout.SCHEMA_VERSION}" in msg
    assert "Fix:" in msg and e.value.field == layout.ATTR_SCHEMA


def test_result_url_group_and_pickle(tmp_store):
    st = create_study(tmp_store)
    assert st.result_url("ctmm", "default") == f"{st.url}/results/ctmm/default"
    for bad in ("", "a/b", "__x"):
        with pytest.raises(InputError):
            st.result_url(bad, "r")
    g = st.group("results/ctmm", create=True)
    assert isinstance(g, zarr.Group) and st.has("results/ctmm")
    with pytest.raises(InputError):
        st.group("nope")
    st2 = pickle.loads(pickle.dumps(st))
    assert st2.url == st.url and st2.schema_version == layout.SCHEMA_VERSION


def test_memory_urls_are_separate_stores():
    a, b = _mem(), _mem()
    create_study(a).add_provenance("a", {}, [])
    create_study(b)
    assert len(open_study(a).provenance) == 1 and open_study(b).provenance == []


def test_provenance_from_two_handles_keeps_both(any_url):
    a = create_study(any_url)
    b = open_study(any_url)
    a.add_provenance("ingest", {}, [])
    b.add_provenance("pseudobulk", {}, [])  # b was opened before a's record existed
    assert [p["stage"] for p in open_study(any_url).provenance] == ["ingest", "pseudobulk"]
    ro = open_study(any_url, mode="r")
    assert len(ro.provenance) == 2
