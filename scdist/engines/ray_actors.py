"""Ray adapter for URSM: (chain, block) Gibbs samplers held by long-lived Ray actors.

Placement only: the data go into Ray's object store once; each actor owns a fixed set of
(chain, kind, block) samplers (their chain state stays in the actor across EM iterations),
receives the small broadcast θ each EM iteration, runs all B + T sweeps locally and returns the
blocks' sufficient statistics. The driver reduces them in key order (``scdist.ursm.em.pool``),
so results equal the in-process executor's for the same seed and block layout, whatever the
number of actors. Numerics live in ``scdist.ursm``; nothing here computes.

Killed actors. An E-step of EM iteration t is a pure function of (θ_t, t, the chains' Gibbs state
at the end of iteration t − 1): every block draws from its own stream
``block_rng(seed, chain, kind, block, t)``, created afresh for each iteration, so there is no RNG
state to carry, only the Gibbs state (cells: S, κ, τ; bulk: Σ_i Z̃). Each ``run`` therefore also
returns the state it ends in as a second object (``num_returns=2``) that the driver keeps in
Ray's object store without fetching it; the next call gets the previous iteration's state refs
(nested in a list, so Ray does not resolve them unless needed). Actors are created with Ray's
``max_restarts`` / ``max_task_retries``: when one dies, Ray restarts it (the constructor rebuilds
its samplers from the data refs) and resubmits the interrupted call; the fresh actor sees that
it holds no state for iteration t − 1, fetches the driver's copy and reruns the E-step, which
yields exactly the statistics the dead actor would have returned. Results stay bit-identical to
an undisturbed run. The state objects live in the object store of the node that ran the actor:
losing a whole node loses them with the actor, and the run then fails with a ``ClusterError``
(rerun the stage) rather than continuing from a wrong state.
"""
from __future__ import annotations

import contextlib
import os

from ..errors import ClusterError, InputError
from .ray import ray_session

DEFAULT_MAX_ACTOR_RESTARTS = 3

# The chain state of each sampler kind (attributes of scdist.ursm.gibbs' samplers that the sweeps
# update in place and that warm starts carry to the next EM iteration).
_STATE = {0: ("S", "kappa", "tau"), 1: ("n",)}


class BlockActor:
    """Holds the samplers of its assigned (chain, kind, block) keys (wrapped by ``ray.remote``)."""

    def __init__(self, Y, G, X, K, layout, settings, keys):
        from ..ursm.em import CELL, make_sampler

        self.settings = settings
        self.samplers = {}
        self.done_iter = -1          # EM iteration whose end state the samplers hold (-1: none)
        # The samplers get private copies of their blocks (one per block, shared by its chains):
        # arguments resolved from the object store are read-only views of shared memory, and a
        # sampler must not depend on that memory's lifetime.
        blocks = {}
        for key in keys:
            _, kind, b = key
            if (kind, b) not in blocks:
                if kind == CELL:
                    a, z = layout.cell_blocks[b]
                    blocks[kind, b] = (Y[a:z].copy(), G[a:z].copy())
                else:
                    a, z = layout.bulk_blocks[b]
                    blocks[kind, b] = (X[a:z].copy(), None)
            self.samplers[key] = make_sampler(kind, *blocks[kind, b], K, settings)

    def run(self, theta, em_iter, burnin, cold_sc, prev=None):
        """E-step of ``em_iter`` for every held block → (statistics by key, end state by key).

        ``prev``: ``[ref]`` to the state returned by iteration ``em_iter - 1`` (None at the start);
        used only when this actor does not hold that state itself (it was restarted)."""
        from ..ursm.em import run_block

        if prev is not None and self.done_iter != em_iter - 1:
            import ray

            self.restore(ray.get(prev[0], timeout=600))
        theta = theta.copy()
        stats = {key: run_block(sm, key, theta, self.settings, em_iter, burnin, cold_sc)
                 for key, sm in self.samplers.items()}
        self.done_iter = em_iter
        return stats, self.state()

    def state(self) -> dict:
        return {key: {a: getattr(sm, a) for a in _STATE[key[1]]} for key, sm in self.samplers.items()}

    def restore(self, state: dict) -> None:
        for key, values in state.items():
            for a, v in values.items():
                setattr(self.samplers[key], a, None if v is None else v.copy())   # store objects are read-only

    def pid(self):
        return os.getpid()


class RayBlockExecutor:
    """E-step executor for :class:`scdist.ursm.em.GibbsEM` on Ray actors.

    ``n_actors`` defaults to min(#(chain, block) keys, cluster CPUs); each actor asks for
    ``actor_cpus`` (default: cluster CPUs / n_actors, capped at 1, so actors never wait
    forever for whole CPUs on a small node). Every ``ray.get`` has ``timeout`` seconds.
    ``max_actor_restarts``: how often Ray may restart each actor (and retry its interrupted
    E-step) after its process died; 0 makes the first death fail the run.
    """

    name = "ray"

    def __init__(self, Y, G, X, K, layout, settings, *, address=None, n_actors=None, actor_cpus=None,
                 timeout: float = 600.0, max_actor_restarts: int = DEFAULT_MAX_ACTOR_RESTARTS):
        if isinstance(max_actor_restarts, bool) or not isinstance(max_actor_restarts, int) or max_actor_restarts < 0:
            raise InputError(f"must be an integer >= 0, got {max_actor_restarts!r}", field="max_actor_restarts",
                             fix="pass how many times each Ray actor may be restarted (default "
                                 f"{DEFAULT_MAX_ACTOR_RESTARTS}; 0: fail on the first lost actor)")
        import ray

        self._stack = contextlib.ExitStack()
        self._stack.enter_context(ray_session(address))
        self.timeout = timeout
        self.max_actor_restarts = max_actor_restarts
        keys = layout.tasks(settings.chains)
        total = float(ray.cluster_resources().get("CPU", 1.0))
        n = int(n_actors or max(1, min(len(keys), int(total))))
        n = min(n, len(keys))
        cpus = float(actor_cpus) if actor_cpus is not None else min(1.0, total / n)
        refs = [ray.put(x) if x is not None else None for x in (Y, G, X)]   # data into the store once
        self._data = refs    # held for the executor's lifetime: a restarted actor is rebuilt from them
        remote = ray.remote(num_cpus=cpus, max_restarts=max_actor_restarts,
                            max_task_retries=max_actor_restarts)(BlockActor)
        self.assignment = [keys[i::n] for i in range(n)]
        self.actors = [remote.remote(*refs, K, layout, settings, ks) for ks in self.assignment]
        self._states = [None] * n     # per actor: ref to its blocks' state after the last E-step
        self._ray = ray

    def estep(self, theta, em_iter, burnin, cold_sc):
        ray = self._ray
        theta_ref = ray.put(theta)
        calls = [a.run.options(num_returns=2).remote(theta_ref, em_iter, burnin, cold_sc,
                                                     None if st is None else [st])
                 for a, st in zip(self.actors, self._states)]
        try:
            parts = ray.get([c[0] for c in calls], timeout=self.timeout)
        except ray.exceptions.GetTimeoutError as exc:
            raise ClusterError(f"URSM E-step on Ray actors took longer than {self.timeout} s", field="ray_timeout",
                               fix="raise ray_timeout, add CPUs, or use smaller blocks") from exc
        except ray.exceptions.RayActorError as exc:
            raise ClusterError(f"a URSM Ray actor died in EM iteration {em_iter} and could not be restarted "
                               f"(max_actor_restarts={self.max_actor_restarts}): {exc}", field="max_actor_restarts",
                               fix="raise max_actor_restarts, check the nodes' memory (OOM kills) and rerun") from exc
        except ray.exceptions.ObjectLostError as exc:
            raise ClusterError(f"the Gibbs state of a URSM chain was lost with its node in EM iteration {em_iter}: "
                               f"{exc}", field="ray.address",
                               fix="rerun the stage (it starts the fit again)") from exc
        self._states = [c[1] for c in calls]
        out = {}
        for p in parts:
            out.update(p)
        return out

    def close(self):
        for a in getattr(self, "actors", []):
            with contextlib.suppress(Exception):
                self._ray.kill(a)
        self.actors = []
        self._states = []
        self._data = []
        self._stack.close()
