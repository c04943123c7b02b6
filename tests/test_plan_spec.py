"""Pipeline spec validation: every error names the bad key and what is allowed there."""
from __future__ import annotations

import os

import pytest

from scdist.errors import SpecError
from scdist.plan.spec import load_spec


def spec(**over):
    base = {"store": "s.zarr", "stages": {"pseudobulk": {"min_cells": 5}}}
    base.update(over)
    return base


def test_valid_spec_fills_defaults_and_makes_store_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("SCDIST_DASK_ADDRESS", raising=False)
    s = load_spec(spec())
    assert s.store == str(tmp_path / "s.zarr")
    assert s.dask.address is None and s.dask.threads_per_worker == 1
    assert [st.name for st in s.stages] == ["pseudobulk"]
    assert s.stage("pseudobulk").config.min_cells == 5
    assert s.stage("pseudobulk").config.normalization == "log1p_cp10k"


def test_url_store_is_kept():
    assert load_spec(spec(store="memory://x/study.zarr/")).store == "memory://x/study.zarr"


def test_unknown_top_level_key_names_it_and_lists_allowed():
    with pytest.raises(SpecError) as ei:
        load_spec(spec(stagez={}))
    assert ei.value.field == "stagez"
    msg = str(ei.value)
    for allowed in ("store", "dask", "ray", "stages"):
        assert allowed in msg


def test_unknown_nested_key_names_dotted_path():
    with pytest.raises(SpecError) as ei:
        load_spec(spec(dask={"adress": "tcp://x:1"}))
    assert ei.value.field == "dask.adress"
    assert "address" in str(ei.value) and "n_workers" in str(ei.value)


def test_wrong_type_names_key():
    with pytest.raises(SpecError) as ei:
        load_spec(spec(dask={"n_workers": "two"}))
    assert ei.value.field == "dask.n_workers"
    assert "'two'" in str(ei.value)


def test_missing_store():
    raw = spec()
    del raw["store"]
    with pytest.raises(SpecError) as ei:
        load_spec(raw)
    assert ei.value.field == "store" and "required" in str(ei.value)


def test_unknown_stage_lists_registered_ones():
    with pytest.raises(SpecError) as ei:
        load_spec(spec(stages={"pseudobulks": {}}))
    assert ei.value.field == "stages.pseudobulks"
    assert "pseudobulk" in str(ei.value) and "simulate" in str(ei.value)


def test_stage_config_unknown_key_lists_stage_keys():
    with pytest.raises(SpecError) as ei:
        load_spec(spec(stages={"pseudobulk": {"min_cell": 3}}))
    assert ei.value.field == "stages.pseudobulk.min_cell"
    assert "min_cells" in str(ei.value) and "normalization" in str(ei.value)


def test_stage_config_bad_value_names_key():
    with pytest.raises(SpecError) as ei:
        load_spec(spec(stages={"pseudobulk": {"min_cells": 0}}))
    assert ei.value.field == "stages.pseudobulk.min_cells"


def test_empty_stage_block_means_defaults():
    s = load_spec(spec(stages={"pseudobulk": None}))
    assert s.stage("pseudobulk").config.min_cells == 10


def test_yaml_file_and_missing_file(tmp_path):
    p = tmp_path / "p.yaml"
    p.write_text("store: a.zarr\nstages:\n  pseudobulk: {min_cells: 3}\n")
    assert load_spec(p).stage("pseudobulk").config.min_cells == 3
    with pytest.raises(SpecError) as ei:
        load_spec(tmp_path / "nope.yaml")
    assert ei.value.field == "spec"
    p.write_text("- just\n- a list\n")
    with pytest.raises(SpecError):
        load_spec(p)


def test_address_precedence_flag_over_env_over_file(monkeypatch):
    raw = spec(dask={"address": "tcp://file:1"}, ray={"address": "file:2"})
    monkeypatch.delenv("SCDIST_DASK_ADDRESS", raising=False)
    monkeypatch.delenv("SCDIST_RAY_ADDRESS", raising=False)
    assert load_spec(raw).dask.address == "tcp://file:1"
    monkeypatch.setenv("SCDIST_DASK_ADDRESS", "tcp://env:1")
    monkeypatch.setenv("SCDIST_RAY_ADDRESS", "env:2")
    s = load_spec(raw)
    assert (s.dask.address, s.ray.address) == ("tcp://env:1", "env:2")
    s = load_spec(raw, dask_address="tcp://flag:1", ray_address="flag:2")
    assert (s.dask.address, s.ray.address) == ("tcp://flag:1", "flag:2")


def test_config_hash_is_stable_and_config_sensitive():
    a = load_spec(spec()).stage("pseudobulk")
    b = load_spec(spec()).stage("pseudobulk")
    c = load_spec(spec(stages={"pseudobulk": {"min_cells": 6}})).stage("pseudobulk")
    assert a.config_hash() == b.config_hash() != c.config_hash()


def test_store_override(tmp_path):
    s = load_spec(spec(), store=str(tmp_path / "other.zarr"))
    assert s.store == os.path.join(str(tmp_path), "other.zarr")
