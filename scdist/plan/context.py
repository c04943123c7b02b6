"""RunContext: what a running stage gets from the runner.

Engines are started lazily and only once per run: a spec whose stages all ran already
starts nothing, and Ray is started only when a Ray stage asks for it. What the context
started it stops in :meth:`RunContext.close`; a user's client or an existing cluster
reached by address is never shut down.
"""
from __future__ import annotations

import contextlib
import logging
import secrets
import time

from .progress import ProgressFactory, log as _log
from .spec import Spec


def new_run_id() -> str:
    """Sortable, unique enough for concurrent runs: ``20260101T120000Z-a1b2c3``."""
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + secrets.token_hex(3)


class RunContext:
    """Handed to :meth:`Stage.run`.

    Attributes: ``spec``, ``store_url``, ``run_id``, ``log``, ``stage`` (name of the
    running stage), ``plan`` (its StagePlan), ``done_chunks`` (chunks already done). Methods: :meth:`client`, :meth:`ray`, :meth:`progress`; property
    :attr:`study` (opened on first use, reopened after a stage rewrites the store).
    """

    def __init__(self, spec: Spec, *, client=None, run_id: str | None = None,
                 progress: ProgressFactory | None = None, log: logging.Logger | None = None):
        self.spec = spec
        self.store_url = spec.store
        self.run_id = run_id or new_run_id()
        self.log = log or _log
        self.stage: str | None = None
        self.plan = None  # StagePlan of the running stage
        self.done_chunks = 0  # chunks of the running stage a previous run finished
        self._user_client = client
        self._client = None
        self._ray_started = False
        self._study = None
        self._progress = progress or ProgressFactory(logger=self.log)
        self._stack = contextlib.ExitStack()

    @property
    def study(self):
        """The study store (:class:`scdist.store.Study`), opened on first use."""
        if self._study is None:
            from ..store import open_study

            self._study = open_study(self.store_url)
        return self._study

    def refresh(self) -> None:
        """Forget the opened study (a stage created or rewrote it)."""
        self._study = None

    def client(self):
        """The run's ``distributed.Client``: the user's, one connected by address, or an
        embedded LocalCluster started now (stopped when the run ends)."""
        if self._client is None:
            from ..engines.dask import dask_client

            d = self.spec.dask
            self._client = self._stack.enter_context(dask_client(
                d.address, client=self._user_client, n_workers=d.n_workers,
                threads_per_worker=d.threads_per_worker, memory_limit=d.memory_limit,
                dashboard=d.dashboard))
            where = ("user's client" if self._user_client is not None else
                     f"scheduler {d.address}" if d.address else "embedded LocalCluster")
            self.log.info("dask: %s (%d workers)", where, len(self._client.scheduler_info()["workers"]))
            if d.dashboard or d.address:
                link = getattr(self._client, "dashboard_link", None)
                if link:
                    self.log.info("dask dashboard: %s", link)
        return self._client

    def ray(self):
        """Make sure Ray is initialised (an existing head by address, or a local one started
        now and shut down when the run ends); returns a context manager yielding ``ray`` so
        both ``ctx.ray()`` and ``with ctx.ray() as ray:`` work."""
        import ray

        if not self._ray_started:
            from ..engines.ray import ray_session

            r = self.spec.ray
            where = ("already initialised in this process" if ray.is_initialized() else
                     f"head at {r.address}" if r.address else "local instance")
            self._stack.enter_context(ray_session(r.address, num_cpus=r.num_cpus))
            self._ray_started = True
            self.log.info("ray: %s", where)

        return contextlib.nullcontext(ray)

    def progress(self, label: str, total: int | None):
        """Progress of ``label`` over ``total`` chunks: ``.update(n=1)``, ``.close()``."""
        return self._progress(label, total)

    def close(self) -> None:
        self._progress.close()
        self._stack.close()
        self._client = None
        self._ray_started = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
