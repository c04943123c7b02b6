"""Runner on a real LocalCluster: order, skipping, staleness, resume, clusters it must not stop.

Two small test stages (registered for the test only) do chunked work through
``engines.dask.map_blocks`` exactly as real stages do: ``t_a`` writes ``value * (i + 1)``
into chunk ``i`` of a zarr array and marks the chunk; ``t_b`` reads ``t_a`` and writes twice
it. Every executed chunk is counted, so "skipped" means no work was done.
"""
from __future__ import annotations

import collections
import time

import numpy as np
import pytest
import zarr
from pydantic import Field

import scdist
from scdist.engines.dask import map_blocks
from scdist.errors import SpecError
from scdist.plan import registry
from scdist.plan.graph import DONE, PARTIAL, PENDING, STALE
from scdist.plan.runlog import list_runs
from scdist.plan.stage import Stage, StageConfig, StagePlan
from scdist.store import create_study
from scdist.store.markers import done_set, mark_done

WORK: collections.Counter = collections.Counter()


class ChunkConfig(StageConfig):
    n_chunks: int = Field(6, ge=1)
    value: int = 1
    sleep: float = 0.0  # seconds of "work" per chunk


def _write_chunk(i: int, url: str, value: int, src: str | None, sleep: float) -> int:
    time.sleep(sleep)
    arr = zarr.open_array(f"{url}/data", mode="r+")
    base = 2 * zarr.open_array(f"{src}/data", mode="r")[i] if src else (i + 1)
    arr[i] = value * base
    mark_done(url, f"c{i}")
    return i


class _Chunked(Stage):
    engine = "dask"
    source: str | None = None
    fail_after: int | None = None  # raise in the driver after this many chunks (an interruption)

    def plan(self, study, cfg):
        return StagePlan(chunks=cfg.n_chunks, chunk_desc="one element per chunk",
                         resources={"cpu": 1})

    def run(self, ctx, cfg):
        url = f"{ctx.store_url}/{self.products(cfg)[0]}"
        create_study(ctx.store_url, exist_ok=True)
        try:
            zarr.open_array(f"{url}/data", mode="r")
        except (FileNotFoundError, zarr.errors.NodeNotFoundError):
            zarr.create_array(f"{url}/data", shape=(cfg.n_chunks,), chunks=(1,), dtype="int64")
        done = done_set(url)
        todo = [i for i in range(cfg.n_chunks) if f"c{i}" not in done]
        src = f"{ctx.store_url}/{self.source}" if self.source else None
        with ctx.progress(self.name, cfg.n_chunks) as bar:
            for k, _ in enumerate(map_blocks(ctx.client(), _write_chunk, todo, progress=bar,
                                             url=url, value=cfg.value, src=src,
                                             sleep=cfg.sleep), 1):
                WORK[self.name] += 1
                if type(self).fail_after is not None and k >= type(self).fail_after:
                    raise RuntimeError("interrupted")


class StageA(_Chunked):
    name = "t_a"
    Config = ChunkConfig
    provides = ("t_a",)


class StageB(_Chunked):
    name = "t_b"
    Config = ChunkConfig
    requires = ("t_a",)
    provides = ("t_b",)
    source = "t_a"


class RayStage(Stage):
    name = "t_ray"
    Config = StageConfig
    engine = "ray"

    def run(self, ctx, cfg):
        create_study(ctx.store_url, exist_ok=True)
        with ctx.ray() as ray:
            WORK[self.name] += ray.get(ray.remote(lambda: 1).remote(), timeout=120)


@pytest.fixture
def stages(monkeypatch):
    for cls in (StageA, StageB, RayStage):
        monkeypatch.setitem(registry.STAGES, cls.name, f"{__name__}:{cls.__name__}")
    WORK.clear()
    StageA.fail_after = StageB.fail_after = None
    yield
    StageA.fail_after = StageB.fail_after = None


def _spec(store, a=None, b=None):
    stages = {}
    if a is not None:
        stages["t_a"] = a
    if b is not None:
        stages["t_b"] = b
    return {"store": store, "stages": stages}


def _data(store, group):
    return zarr.open_array(f"{store}/{group}/data", mode="r")[:]


def test_run_skip_rerun_and_client_left_open(stages, tmp_store, dask_client):
    res = scdist.run(_spec(tmp_store, a={}, b={}), client=dask_client, rich=False)
    assert res.ran == ["t_a", "t_b"] and res.skipped == []
    assert WORK == {"t_a": 6, "t_b": 6}
    np.testing.assert_array_equal(_data(tmp_store, "t_b"), 2 * np.arange(1, 7))
    # the user's client is untouched
    assert dask_client.status == "running"
    assert dask_client.submit(sum, [1, 2]).result(timeout=30) == 3

    WORK.clear()
    res = scdist.run(_spec(tmp_store, a={}, b={}), client=dask_client, rich=False)
    assert res.ran == [] and res.skipped == ["t_a", "t_b"]
    assert sum(WORK.values()) == 0
    graph = scdist.plan(_spec(tmp_store, a={}, b={}))
    assert [n.status for n in graph] == [DONE, DONE]
    runs = list_runs(tmp_store)
    assert [r["status"] for r in runs] == ["succeeded", "succeeded"]
    assert [s["action"] for s in runs[-1]["stages"]] == ["skipped", "skipped"]


def test_config_change_recomputes_stage_and_its_dependents(stages, tmp_store, dask_client):
    scdist.run(_spec(tmp_store, a={}, b={}), client=dask_client, rich=False)
    WORK.clear()
    graph = scdist.plan(_spec(tmp_store, a={"value": 3}, b={}))
    assert [(n.status, bool(n.reason)) for n in graph] == [(STALE, True), (STALE, True)]
    res = scdist.run(_spec(tmp_store, a={"value": 3}, b={}), client=dask_client, rich=False)
    assert res.ran == ["t_a", "t_b"] and WORK == {"t_a": 6, "t_b": 6}
    np.testing.assert_array_equal(_data(tmp_store, "t_b"), 6 * np.arange(1, 7))


def test_downstream_stale_when_input_changed_in_another_run(stages, tmp_store, dask_client):
    scdist.run(_spec(tmp_store, a={}, b={}), client=dask_client, rich=False)
    scdist.run(_spec(tmp_store, a={"value": 5}), client=dask_client, rich=False)
    graph = scdist.plan(_spec(tmp_store, b={}))
    node = graph.node("t_b")
    assert node.status == STALE and "t_a" in node.reason
    assert node.deps == {"t_a": None}  # met by the store
    WORK.clear()
    scdist.run(_spec(tmp_store, b={}), client=dask_client, rich=False)
    assert WORK == {"t_b": 6}
    np.testing.assert_array_equal(_data(tmp_store, "t_b"), 10 * np.arange(1, 7))


def _wait_idle(client, timeout=30):
    """Cancelled tasks already running still finish (and mark) on their worker; wait for them."""
    def busy():
        running = client.run(lambda dask_worker: len(dask_worker.state.executing))
        return any(client.processing().values()) or any(running.values())

    t0 = time.monotonic()
    while busy():
        assert time.monotonic() - t0 < timeout
        time.sleep(0.05)


def _interrupted_run(stage, spec, client, after):
    """Run `spec` with `stage` failing after `after` chunks; return once its cancelled tasks ended."""
    stage.fail_after = after
    try:
        with pytest.raises(RuntimeError, match="interrupted"):
            scdist.run(spec, client=client, rich=False)
    finally:
        stage.fail_after = None
    _wait_idle(client)


def test_interrupted_stage_resumes_only_missing_chunks(stages, tmp_store, dask_client):
    spec = _spec(tmp_store, a={"n_chunks": 30, "sleep": 0.1}, b={"n_chunks": 30})
    _interrupted_run(StageA, spec, dask_client, 3)
    finished = {c for c in done_set(f"{tmp_store}/t_a") if not c.startswith("__")}
    assert 3 <= len(finished) < 30
    graph = scdist.plan(spec)
    assert graph.node("t_a").status == PARTIAL
    assert graph.node("t_a").done_chunks == len(finished)
    assert graph.node("t_b").status == PENDING
    assert f"{len(finished)}/30 chunks done" in graph.render()
    runs = list_runs(tmp_store)
    assert runs[-1]["status"] == "failed" and "interrupted" in runs[-1]["error"]
    assert [s["action"] for s in runs[-1]["stages"]] == ["failed", None]

    WORK.clear()
    scdist.run(spec, client=dask_client, rich=False)
    assert WORK["t_a"] == 30 - len(finished)
    assert WORK["t_b"] == 30
    np.testing.assert_array_equal(_data(tmp_store, "t_b"), 2 * np.arange(1, 31))


def test_resume_under_a_different_config_recomputes(stages, tmp_store, dask_client):
    _interrupted_run(StageA, _spec(tmp_store, a={"n_chunks": 8, "sleep": 0.1}), dask_client, 1)
    assert scdist.plan(_spec(tmp_store, a={"n_chunks": 8, "sleep": 0.1})).node("t_a").status == PARTIAL
    node = scdist.plan(_spec(tmp_store, a={"n_chunks": 8, "value": 7})).node("t_a")
    assert node.status == STALE and "another config" in node.reason and node.done_chunks == 0
    WORK.clear()
    scdist.run(_spec(tmp_store, a={"n_chunks": 8, "value": 7}), client=dask_client, rich=False)
    assert WORK["t_a"] == 8
    np.testing.assert_array_equal(_data(tmp_store, "t_a"), 7 * np.arange(1, 9))


def test_unmet_requirement_fails_before_any_work(stages, tmp_store, dask_client):
    with pytest.raises(SpecError) as ei:
        scdist.run(_spec(tmp_store, b={}), client=dask_client, rich=False)
    assert ei.value.field == "stages.t_b" and "t_a" in str(ei.value)
    assert sum(WORK.values()) == 0


def test_spec_order_does_not_matter(stages, tmp_store, dask_client):
    spec = {"store": tmp_store, "stages": {"t_b": {"n_chunks": 2}, "t_a": {"n_chunks": 2}}}
    graph = scdist.plan(spec)
    assert [n.name for n in graph] == ["t_a", "t_b"]
    assert graph.node("t_b").deps == {"t_a": "t_a"}


def test_existing_scheduler_by_address_is_not_stopped(stages, tmp_store, dask_client):
    address = dask_client.scheduler.address
    res = scdist.run(_spec(tmp_store, a={"n_chunks": 3}), dask_address=address, rich=False)
    assert res.ran == ["t_a"] and WORK["t_a"] == 3
    assert dask_client.submit(sum, [2, 2]).result(timeout=30) == 4
    assert len(dask_client.scheduler_info()["workers"]) == 2


def test_ray_only_started_for_ray_stages(stages, tmp_store, dask_client, monkeypatch):
    import scdist.engines.ray as ray_engine

    def boom(*a, **k):
        raise AssertionError("Ray must not be started for a spec without Ray stages")

    monkeypatch.setattr(ray_engine, "ray_session", boom)
    scdist.run(_spec(tmp_store, a={"n_chunks": 2}), client=dask_client, rich=False)
    assert WORK["t_a"] == 2


@pytest.mark.ray
def test_ray_stage_runs_on_existing_ray(stages, tmp_store, ray_local):
    res = scdist.run({"store": tmp_store, "stages": {"t_ray": {}}}, rich=False)
    assert res.ran == ["t_ray"] and WORK["t_ray"] == 1
    assert ray_local.is_initialized()  # a Ray scdist did not start is left running


@pytest.mark.resilience
def test_sigkilled_driver_is_reported_and_resumed(stages, tmp_store, dask_client):
    """SIGKILL the driver mid-stage (cluster by address survives), then run the same spec."""
    import os
    import subprocess
    import sys

    create_study(tmp_store)  # so the run record is written when the run starts
    spec = _spec(tmp_store, a={"n_chunks": 40, "sleep": 0.2})
    code = "\n".join([
        "import sys",
        f"sys.path.insert(0, {os.path.dirname(__file__)!r})",
        f"import {__name__} as t",
        "from scdist.plan import registry",
        f"registry.STAGES['t_a'] = '{__name__}:StageA'",
        "import scdist",
        f"scdist.run({spec!r}, dask_address={dask_client.scheduler.address!r}, rich=False)",
    ])
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        t0 = time.monotonic()
        while len(done_set(f"{tmp_store}/t_a") - {"__started__"}) < 4:
            assert proc.poll() is None, "driver ended before it could be killed"
            assert time.monotonic() - t0 < 120
            time.sleep(0.05)
    finally:
        proc.kill()
        proc.wait(timeout=30)
    _wait_idle(dask_client)
    finished = {c for c in done_set(f"{tmp_store}/t_a") if not c.startswith("__")}
    assert 4 <= len(finished) < 40
    assert list_runs(tmp_store)[-1]["status"] == "interrupted"

    WORK.clear()
    res = scdist.run(spec, client=dask_client, rich=False)
    assert res.ran == ["t_a"] and WORK["t_a"] == 40 - len(finished)
    np.testing.assert_array_equal(_data(tmp_store, "t_a"), np.arange(1, 41))
    assert [r["status"] for r in list_runs(tmp_store)] == ["interrupted", "succeeded"]


def test_interrupted_stage_whose_input_changed_is_recomputed(stages, tmp_store, dask_client):
    scdist.run(_spec(tmp_store, a={"n_chunks": 8}), client=dask_client, rich=False)
    _interrupted_run(StageB, _spec(tmp_store, b={"n_chunks": 8, "sleep": 0.1}), dask_client, 1)
    assert scdist.plan(_spec(tmp_store, b={"n_chunks": 8, "sleep": 0.1})).node("t_b").status == PARTIAL
    scdist.run(_spec(tmp_store, a={"n_chunks": 8, "value": 3}), client=dask_client, rich=False)
    node = scdist.plan(_spec(tmp_store, b={"n_chunks": 8, "sleep": 0.1})).node("t_b")
    assert node.status == STALE and "other inputs" in node.reason
    WORK.clear()
    scdist.run(_spec(tmp_store, b={"n_chunks": 8, "sleep": 0.1}), client=dask_client, rich=False)
    assert WORK["t_b"] == 8
    np.testing.assert_array_equal(_data(tmp_store, "t_b"), 6 * np.arange(1, 9))


def _dead_pid() -> int:
    import subprocess
    import sys

    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_store_lock_held_by_a_live_run_fails_fast(stages, tmp_store, dask_client):
    import json
    import os
    import socket

    from scdist.errors import StoreLockedError
    from scdist.plan.lock import lock_url

    holder = {"run_id": "other-run", "host": socket.gethostname(), "pid": os.getpid(), "since": "now"}
    with open(lock_url(tmp_store), "w") as f:
        json.dump(holder, f)
    with pytest.raises(StoreLockedError) as ei:
        scdist.run(_spec(tmp_store, a={"n_chunks": 2}), client=dask_client, rich=False)
    assert ei.value.field == "store" and "other-run" in str(ei.value) and ".lock" in str(ei.value)
    assert sum(WORK.values()) == 0

    holder["pid"] = _dead_pid()  # its driver died: the lock is taken over
    with open(lock_url(tmp_store), "w") as f:
        json.dump(holder, f)
    res = scdist.run(_spec(tmp_store, a={"n_chunks": 2}), client=dask_client, rich=False)
    assert res.ran == ["t_a"] and not os.path.exists(lock_url(tmp_store))


@pytest.mark.resilience
def test_concurrent_run_on_same_store_is_refused_and_first_completes(stages, tmp_store, dask_client):
    import os
    import subprocess
    import sys

    from scdist.errors import StoreLockedError
    from scdist.plan.lock import lock_url

    spec = _spec(tmp_store, a={"n_chunks": 20, "sleep": 0.2})
    code = "\n".join([
        "import sys",
        f"sys.path.insert(0, {os.path.dirname(__file__)!r})",
        "from scdist.plan import registry",
        f"registry.STAGES['t_a'] = '{__name__}:StageA'",
        "import scdist",
        f"scdist.run({spec!r}, dask_address={dask_client.scheduler.address!r}, rich=False)",
    ])
    first = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    try:
        t0 = time.monotonic()
        while not done_set(f"{tmp_store}/t_a") - {"__started__"}:
            assert first.poll() is None, first.stderr.read()
            assert time.monotonic() - t0 < 120
            time.sleep(0.05)
        with pytest.raises(StoreLockedError):
            scdist.run(spec, client=dask_client, rich=False)
        assert WORK["t_a"] == 0
    finally:
        rc = first.wait(timeout=120)
    assert rc == 0
    assert not os.path.exists(lock_url(tmp_store))
    np.testing.assert_array_equal(_data(tmp_store, "t_a"), np.arange(1, 21))
    res = scdist.run(spec, client=dask_client, rich=False)
    assert res.skipped == ["t_a"]


def test_unreachable_scheduler_fails_before_any_stage(stages, tmp_store):
    from scdist.errors import ClusterError

    create_study(tmp_store)
    with pytest.raises(ClusterError) as ei:
        scdist.run(_spec(tmp_store, a={"n_chunks": 2}), dask_address="tcp://127.0.0.1:1", rich=False)
    assert ei.value.field == "dask.address"
    assert sum(WORK.values()) == 0 and not done_set(f"{tmp_store}/t_a")
    assert list_runs(tmp_store)[-1]["status"] == "failed"
