"""Runner: execute a job graph stage by stage, skipping what a previous run finished.

The runner decides *what* runs; Dask (and Ray, for Ray stages) decide where and when each
task runs. For each stage in order:

1. ``done``: skipped (logged).
2. ``stale``: ``Stage.reset`` clears its markers (and any partial state), then it runs
   from scratch.
3. ``partial`` / ``pending``: it runs; the stage itself skips chunks already marked done.
4. After the stage returns, the stage-level marker ``__stage__`` is written into each of
   its product groups (after the data), with the config hash and the input hashes that
   later plans compare against. Provenance is added to the store and the run record
   (``_scdist_runs/<run_id>.json``) is updated.

A ``__started__`` marker records the config and inputs a stage's chunk markers belong to,
so an interrupted stage resumed under a different config or inputs is recomputed instead. It is written before the stage
runs when the store exists, and again when a stage fails (the first stage of a run may be
the one creating the store; only a SIGKILL during such a stage leaves it unwritten).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Mapping

from .context import RunContext, new_run_id
from .failures import translate
from .graph import DONE, PARTIAL, STALE, JobGraph, build_graph, product_url
from .lock import StoreLock
from .progress import ProgressFactory, configure_logging
from .runlog import RunRecord
from .spec import Spec, load_spec
from .stage import STAGE_MARKER, STARTED_MARKER
log = logging.getLogger("scdist")


@dataclass
class RunResult:
    """What a run did: ``ran`` and ``skipped`` stage names, seconds per stage that ran."""

    run_id: str
    store: str
    graph: JobGraph
    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)


def plan(spec: "str | Mapping | Spec", **overrides: Any) -> JobGraph:
    """Validate ``spec`` and plan it without doing any work (``scdist plan``).

    ``overrides``: ``store``, ``dask_address``, ``ray_address`` (as the CLI flags).
    """
    return build_graph(load_spec(spec, **overrides))


def run(spec: "str | Mapping | Spec", client=None, *, store: str | None = None,
        dask_address: str | None = None, ray_address: str | None = None,
        rich: bool | None = None, run_id: str | None = None) -> RunResult:
    """Run a pipeline spec (path to YAML, dict, or :class:`Spec`) and return what it did.

    ``client``: a ``distributed.Client`` to use (never closed here). Without it, Dask is
    reached at ``dask_address`` / ``SCDIST_DASK_ADDRESS`` / the spec's ``dask.address``, or
    an embedded LocalCluster is started for the run and stopped after it. Ray is started
    (or connected to) only if a stage with engine ``ray`` runs. All validation (spec keys,
    stage inputs, requirements) happens before any stage starts. A run with work to do holds
    ``<store>.lock`` (:mod:`scdist.plan.lock`); a second one fails fast with StoreLockedError.
    """
    configure_logging()
    spec = load_spec(spec, store=store, dask_address=dask_address, ray_address=ray_address)
    run_id = run_id or new_run_id()
    graph = build_graph(spec)
    lock = StoreLock(spec.store, run_id)
    if any(n.will_run for n in graph):
        try:
            lock.acquire()  # StoreLockedError if another run is writing this store
        except OSError as exc:  # read-only or full volume: say so before any work
            raise (translate(exc, spec.store) or exc) from exc
        graph = build_graph(spec)  # plan again: that run may have finished stages meanwhile
    try:
        return _execute(spec, graph, run_id, client, rich)
    except OSError as exc:  # the store failed outside a stage's own work (e.g. writing markers)
        raise (translate(exc, spec.store) or exc) from exc
    finally:
        lock.release()


def _execute(spec: Spec, graph: JobGraph, run_id: str, client, rich: bool | None) -> RunResult:
    result = RunResult(run_id=run_id, store=spec.store, graph=graph)
    record = RunRecord(spec.store, result.run_id, spec.source, [n.to_dict() for n in graph])
    log.info("run %s on %s: %s", result.run_id, spec.store,
             ", ".join(f"{n.name} [{n.status}]" for n in graph))
    try:
        with RunContext(spec, client=client, run_id=result.run_id,
                        progress=ProgressFactory(rich=rich), log=log) as ctx:
            try:
                record.write()
            except OSError as exc:
                raise (translate(exc, spec.store) or exc) from exc
            _connect_early(ctx, graph)
            for node in graph:
                if node.status == DONE:
                    log.info("stage %s: already done, skipped", node.name)
                    result.skipped.append(node.name)
                    record.stage(node.name, action="skipped")
                    continue
                seconds = _run_stage(ctx, node, record)
                result.ran.append(node.name)
                result.seconds[node.name] = seconds
    except BaseException as exc:
        if record.doc["status"] == "running":  # failed outside a stage (e.g. cluster unreachable)
            record.finish("failed", error=f"{type(exc).__name__}: {exc}")
        raise
    record.finish("succeeded")
    return result


def _connect_early(ctx: RunContext, graph: JobGraph) -> None:
    """Reach clusters given by address before any stage runs, so an unreachable address is
    a ClusterError up front; embedded clusters still start only when a stage needs them."""
    engines = {n.engine for n in graph if n.will_run}
    if ctx.spec.dask.address and "dask" in engines:
        ctx.client()
    if ctx.spec.ray.address and "ray" in engines:
        ctx.ray()


def _run_stage(ctx: RunContext, node, record: RunRecord) -> float:
    """Run one stage that is not done; write its markers and provenance; return seconds."""
    store = ctx.store_url
    if node.status == STALE:
        log.info("stage %s: recomputing (%s)", node.name, node.reason)
        node.stage.reset(store, node.config)
    elif node.status == PARTIAL:
        log.info("stage %s: resuming (%d/%s chunks already done)", node.name,
                 node.done_chunks, node.plan.chunks)
    started_meta = {"stage": node.name, "config_hash": node.spec.config_hash(),
                    "inputs": node.input_hashes, "run_id": ctx.run_id}
    if record.store_exists():
        _mark(store, node.products, STARTED_MARKER, started_meta)
        if not node.planned_on_inputs:
            # planned before an earlier stage of this run wrote its inputs: plan again
            replanned = node.stage.plan(ctx.study, node.config)
            replanned.output_url = replanned.output_url or node.plan.output_url
            node.plan, node.planned_on_inputs = replanned, True
            record.stage(node.name, chunks=replanned.chunks)
    ctx.stage, ctx.plan, ctx.done_chunks = node.name, node.plan, node.done_chunks
    record.stage(node.name, action="running", started=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    t0 = time.perf_counter()
    try:
        node.stage.run(ctx, node.config)
    except BaseException as exc:
        if record.store_exists():  # the stage may have created the store: say whose chunks these are
            _mark(store, node.products, STARTED_MARKER, started_meta)
        # storage / damaged-chunk failures from deep inside the stage, said plainly
        friendly = translate(exc, store, stage=node.name, inputs=tuple(node.deps))
        error = f"{type(friendly or exc).__name__}: {friendly or exc}"
        try:
            record.stage(node.name, action="failed", seconds=round(time.perf_counter() - t0, 3), error=error)
            record.finish("failed", error=f"stage {node.name}: {error}")
        except OSError:
            pass  # the store itself failed (full, read-only): the error raised below says so
        if friendly is not None:
            raise friendly from exc
        raise
    seconds = time.perf_counter() - t0
    ctx.refresh()
    # __started__ again: a stage creating its group may have wiped the first one
    _mark(store, node.products, STARTED_MARKER, started_meta)
    _mark(store, node.products, STAGE_MARKER,
          {**started_meta, "seconds": round(seconds, 3), "chunks": node.plan.chunks})
    _provenance(ctx, node)
    record.stage(node.name, action="ran", seconds=round(seconds, 3))
    log.info("stage %s: done in %.1fs", node.name, seconds)
    return seconds


def _mark(store: str, products, chunk_id: str, meta: dict) -> None:
    """Write a run-level marker into each product group, keeping what the stage's own
    function already recorded in it (e.g. compute_pseudobulk's params)."""
    from ..store.markers import mark_done, read_marker

    for product in products:
        url = product_url(store, product)
        own = (read_marker(url, chunk_id) or {}).get("meta", {})
        mark_done(url, chunk_id, {**own, **meta})


def _provenance(ctx: RunContext, node) -> None:
    inputs = {p: (d or "store") for p, d in node.deps.items()}
    ctx.study.add_provenance(node.name, {"config": node.spec.config_dict(), "run_id": ctx.run_id,
                                         "config_hash": node.spec.config_hash()}, inputs)
