"""Ray adapter for URSM: (chain, block) Gibbs samplers held by long-lived Ray actors.

Placement only: the data go into Ray's object store once; each actor owns a fixed set of
(chain, kind, block) samplers (their chain state stays in the actor across EM iterations),
receives the small broadcast θ each EM iteration, runs all B + T sweeps locally and returns the
blocks' sufficient statistics. The driver reduces them in key order (``scdist.ursm.em.pool``),
so results equal the in-process executor's for the same seed and block layout, whatever the
number of actors. Numerics live in ``scdist.ursm``; nothing here computes.
"""
from __future__ import annotations

import contextlib
import os

from ..errors import ClusterError
from .ray import ray_session


class BlockActor:
    """Holds the samplers of its assigned (chain, kind, block) keys (wrapped by ``ray.remote``)."""

    def __init__(self, Y, G, X, K, layout, settings, keys):
        from ..ursm.em import CELL, make_sampler

        self.settings = settings
        self.samplers = {}
        for key in keys:
            _, kind, b = key
            if kind == CELL:
                a, z = layout.cell_blocks[b]
                self.samplers[key] = make_sampler(kind, Y[a:z], G[a:z], K, settings)
            else:
                a, z = layout.bulk_blocks[b]
                self.samplers[key] = make_sampler(kind, X[a:z], None, K, settings)

    def run(self, theta, em_iter, burnin, cold_sc):
        from ..ursm.em import run_block

        return {key: run_block(sm, key, theta, self.settings, em_iter, burnin, cold_sc)
                for key, sm in self.samplers.items()}

    def pid(self):
        return os.getpid()


class RayBlockExecutor:
    """E-step executor for :class:`scdist.ursm.em.GibbsEM` on Ray actors.

    ``n_actors`` defaults to min(#(chain, block) keys, cluster CPUs); each actor asks for
    ``actor_cpus`` (default: cluster CPUs / n_actors, capped at 1, so actors never wait
    forever for whole CPUs on a small node). Every ``ray.get`` has ``timeout`` seconds.
    """

    name = "ray"

    def __init__(self, Y, G, X, K, layout, settings, *, address=None, n_actors=None, actor_cpus=None,
                 timeout: float = 600.0):
        import ray

        self._stack = contextlib.ExitStack()
        self._stack.enter_context(ray_session(address))
        self.timeout = timeout
        keys = layout.tasks(settings.chains)
        total = float(ray.cluster_resources().get("CPU", 1.0))
        n = int(n_actors or max(1, min(len(keys), int(total))))
        n = min(n, len(keys))
        cpus = float(actor_cpus) if actor_cpus is not None else min(1.0, total / n)
        refs = [ray.put(x) if x is not None else None for x in (Y, G, X)]   # data into the store once
        remote = ray.remote(num_cpus=cpus, max_restarts=0)(BlockActor)
        self.assignment = [keys[i::n] for i in range(n)]
        self.actors = [remote.remote(*refs, K, layout, settings, ks) for ks in self.assignment]
        self._ray = ray

    def estep(self, theta, em_iter, burnin, cold_sc):
        ray = self._ray
        theta_ref = ray.put(theta)
        futures = [a.run.remote(theta_ref, em_iter, burnin, cold_sc) for a in self.actors]
        try:
            parts = ray.get(futures, timeout=self.timeout)
        except ray.exceptions.GetTimeoutError as exc:
            raise ClusterError(f"URSM E-step on Ray actors took longer than {self.timeout} s", field="ray_timeout",
                               fix="raise ray_timeout, add CPUs, or use smaller blocks") from exc
        out = {}
        for p in parts:
            out.update(p)
        return out

    def close(self):
        for a in getattr(self, "actors", []):
            with contextlib.suppress(Exception):
                self._ray.kill(a)
        self.actors = []
        self._stack.close()
