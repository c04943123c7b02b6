"""Dask adapter: connect to (or start) a cluster and map block kernels over chunks."""
from __future__ import annotations

import contextlib
import os
from typing import Iterator

ENV_DASK_ADDRESS = "SCDIST_DASK_ADDRESS"


@contextlib.contextmanager
def dask_client(address: str | None = None, *, client=None, n_workers: int | None = None,
                threads_per_worker: int = 1, memory_limit: str | None = "auto",
                processes: bool = True, dashboard: bool = False) -> Iterator["distributed.Client"]:
    """Yield a ``distributed.Client``.

    Precedence: an explicit ``client`` (used as is, never closed), then ``address`` or the
    ``SCDIST_DASK_ADDRESS`` environment variable (connect; the cluster is not ours to stop),
    else an embedded ``LocalCluster`` that is started here and shut down on exit.
    """
    from distributed import Client, LocalCluster

    from ..errors import ClusterError

    if client is not None:
        yield client
        return
    address = address or os.environ.get(ENV_DASK_ADDRESS) or None
    if address:
        try:
            c = Client(address, timeout="10s")
        except (OSError, TimeoutError) as exc:
            raise ClusterError(f"cannot reach Dask scheduler at {address!r}: {exc}",
                               field="dask.address",
                               fix="start the scheduler (`dask scheduler`) or correct the address") from exc
        try:
            yield c
        finally:
            c.close()
        return
    n_workers = n_workers or min(2, os.cpu_count() or 1)
    with LocalCluster(n_workers=n_workers, threads_per_worker=threads_per_worker,
                      processes=processes, memory_limit=memory_limit,
                      dashboard_address=":0" if dashboard else None) as cluster, Client(cluster) as c:
        yield c
