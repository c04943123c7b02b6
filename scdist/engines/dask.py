"""Dask adapter: connect to (or start) a cluster and map block kernels over chunks."""
from __future__ import annotations

import contextlib
import os
import warnings
from typing import Any, Callable, Iterable, Iterator

ENV_DASK_ADDRESS = "SCDIST_DASK_ADDRESS"
# imported by every embedded worker at start-up (see dask_preload.py for why)
WORKER_PRELOAD = "scdist.engines.dask_preload"


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
    with warnings.catch_warnings():
        # the scheduler's HTTP server (health/metrics) falls back to a free port when 8787 is
        # taken, e.g. by another cluster; that is expected here, not worth a warning
        warnings.filterwarnings("ignore", message=r"Port \d+ is already in use", category=UserWarning)
        cluster = LocalCluster(n_workers=n_workers, threads_per_worker=threads_per_worker,
                               processes=processes, memory_limit=memory_limit,
                               dashboard_address=":0" if dashboard else None,
                               preload=[WORKER_PRELOAD])
    with cluster, Client(cluster) as c:
        yield c


def map_blocks(client, fn: Callable, blocks: Iterable, *, retries: int = 2, progress=None,
               **kwargs) -> Iterator[tuple[Any, Any]]:
    """Run ``fn(block, **kwargs)`` for every block on the cluster; yield ``(block, result)``
    in completion order.

    All tasks are submitted before this returns (Dask schedules them; nothing here queues),
    so consuming the iterator only gathers. ``retries`` is Dask's per-task retry count for
    exceptions (a killed worker's tasks are rescheduled by Dask itself). ``progress`` is
    any object with ``update(n=1)`` (``RunContext.progress(...)``), advanced once per
    finished block. Keyword arguments are broadcast parameters: pass large arrays as futures
    from ``client.scatter(x, broadcast=True)`` so they travel once. If a block fails after
    its retries, the remaining tasks are cancelled and the error is raised.

    ``fn`` must be a pure function of its block (plus the broadcast parameters) that writes
    its own chunk-aligned region, or returns a small result: blocks are independent.
    """
    from distributed import as_completed

    blocks = list(blocks)
    futures = [client.submit(fn, b, retries=retries, pure=False, **kwargs) for b in blocks]
    return _gather(client, futures, blocks, progress, as_completed)


def _gather(client, futures, blocks, progress, as_completed):
    index = {f.key: i for i, f in enumerate(futures)}
    try:
        for fut, res in as_completed(futures, with_results=True):
            if progress is not None:
                progress.update(1)
            yield blocks[index[fut.key]], res
    finally:
        client.cancel([f for f in futures if not f.done()])
