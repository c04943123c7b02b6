"""Shared fixtures: one Dask LocalCluster and one local Ray per test session."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
DATA = SHARED / "data"


def shared_file(*parts: str) -> Path:
    """Path of a file in ../shared/data, skipping the test cleanly when it is absent."""
    p = DATA.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"{p} not available (../shared is absent)")
    return p


@pytest.fixture(scope="session")
def dask_client():
    """A real LocalCluster: 2 worker processes × 1 thread."""
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                      dashboard_address=None, memory_limit="4GiB",
                      preload=["scdist.engines.dask_preload"]) as cluster, Client(cluster) as client:
        yield client


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray instance for the whole session (ray.init costs 5-12 s)."""
    ray = pytest.importorskip("ray")
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
                 ignore_reinit_error=True)
    yield ray
    ray.shutdown()


@pytest.fixture
def tmp_store(tmp_path):
    """A fresh path for a study store."""
    return str(tmp_path / "study.zarr")


@pytest.fixture(scope="module")
def torch_one_thread():
    """Torch on one intra-op thread for a whole test module (its module-scoped training fixtures
    included): two busy shared cores run one thread much faster than two contending ones.
    Use with ``pytestmark = pytest.mark.usefixtures("torch_one_thread")``."""
    torch = pytest.importorskip("torch")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
