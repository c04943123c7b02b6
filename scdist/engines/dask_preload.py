"""Dask worker preload: import the storage stack once, in one thread, when a worker starts.

A worker process that starts mid-run (e.g. the nanny's replacement for a killed worker) can
receive its first messages while the comm layer deserialises a large one in its offload
thread; two threads importing ``zarr`` for the first time at once can see a partially
initialised ``zarr.core.array`` and fail with a circular ImportError, after which the worker
shuts down. Importing here, before the worker connects to the scheduler, removes the race.

Embedded clusters load it automatically; for a cluster you start yourself run
``dask worker --preload scdist.engines.dask_preload <scheduler-address>``.
"""
import numpy  # noqa: F401
import xarray  # noqa: F401
import zarr  # noqa: F401
import zarr.core.array  # noqa: F401

import scdist.store  # noqa: F401


