"""Job graph: the spec's stages in dependency order, each with its plan and what is already done.

A stage's requirements (store products such as ``cells`` or ``pseudobulk``) are met by the
stage of the spec that produces them (at most one may), or else by a previous run that left
the product complete in the store. Stages are ordered topologically, keeping the spec's
order among independent stages.

Status of a stage, read from its stage-level markers (``__stage__`` in each product group):

``done``     every product is marked by this stage type with the same config hash, and the
             inputs it was computed from are the inputs this run will use: skipped.
``stale``    marked (or interrupted) under another config or from other inputs, or an input
             is recomputed in this run: recomputed from scratch.
``partial``  some chunk markers but no stage marker (an interrupted run under the same
             config and inputs): resumed, only missing chunks run.
``pending``  nothing yet.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..errors import SpecError
from .spec import Spec, StageSpec
from .stage import STAGE_MARKER, STARTED_MARKER, Stage, StagePlan

DONE, STALE, PARTIAL, PENDING = "done", "stale", "partial", "pending"


def product_url(store: str, product: str) -> str:
    return f"{store.rstrip('/')}/{product.strip('/')}"


@dataclass
class StageNode:
    """One stage of the job graph."""

    spec: StageSpec
    stage: Stage
    needs: tuple[str, ...]
    products: tuple[str, ...]
    deps: dict[str, str | None]  # product -> producing stage of this spec (None: from the store)
    plan: StagePlan
    status: str = PENDING
    reason: str = ""
    done_chunks: int = 0
    input_hashes: dict[str, str | None] = field(default_factory=dict)
    planned_on_inputs: bool = False  # planned seeing the inputs it will read (else re-plan before running)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def config(self):
        return self.spec.config

    @property
    def engine(self) -> str:
        return self.stage.engine_for(self.config)

    @property
    def will_run(self) -> bool:
        return self.status != DONE

    def to_dict(self) -> dict[str, Any]:
        return {
            "stage": self.name, "engine": self.engine, "status": self.status, "reason": self.reason,
            "needs": {p: (d or "store") for p, d in self.deps.items()}, "products": list(self.products),
            "chunks": self.plan.chunks, "chunk_desc": self.plan.chunk_desc,
            "done_chunks": self.done_chunks, "resources": self.plan.resources,
            "output_url": self.plan.output_url, "config_hash": self.spec.config_hash(),
            "notes": list(self.plan.notes),
        }


@dataclass
class JobGraph:
    """The planned run: stages in execution order."""

    spec: Spec
    nodes: list[StageNode]
    study_exists: bool

    def __iter__(self):
        return iter(self.nodes)

    def node(self, name: str) -> StageNode:
        for n in self.nodes:
            if n.name == name:
                return n
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        return {"store": self.spec.store, "study_exists": self.study_exists,
                "dask": self.spec.dask.model_dump(), "ray": self.spec.ray.model_dump(),
                "stages": [n.to_dict() for n in self.nodes]}

    def render(self) -> str:
        """Plain-text description for ``scdist plan``."""
        d = self.spec.dask
        where = (f"Dask scheduler at {d.address}" if d.address else
                 f"embedded LocalCluster ({d.n_workers or 'auto'} workers x {d.threads_per_worker} threads)")
        lines = [f"store: {self.spec.store}" + ("" if self.study_exists else "  (not created yet)"),
                 f"dask:  {where}"]
        if any(n.engine == "ray" for n in self.nodes):
            r = self.spec.ray
            lines.append(f"ray:   {('head at ' + r.address) if r.address else 'local ray.init'}"
                         f"{'' if r.num_cpus is None else f' (num_cpus={r.num_cpus})'}")
        lines.append(f"stages ({len(self.nodes)}, in execution order):")
        for i, n in enumerate(self.nodes, 1):
            chunks = "?" if n.plan.chunks is None else str(n.plan.chunks)
            done = f"{n.done_chunks}/{chunks} chunks done" if n.status == PARTIAL else n.status
            lines.append(f"  {i}. {n.name:<11} engine={n.engine:<5} chunks={chunks:<5} [{done}]"
                         + (f" - {n.reason}" if n.reason else ""))
            if n.deps:
                needs = ", ".join(f"{p} <- {d or 'store (previous run)'}" for p, d in n.deps.items())
                lines.append(f"       needs: {needs}")
            lines.append(f"       writes: {', '.join(n.products)}")
            if n.plan.chunk_desc:
                lines.append(f"       chunking: {n.plan.chunk_desc}")
            if n.plan.resources:
                res = ", ".join(f"{k}={v}" for k, v in n.plan.resources.items())
                lines.append(f"       resources: {res}")
            for note in n.plan.notes:
                lines.append(f"       note: {note}")
        return "\n".join(lines)


def group_exists(store: str) -> bool:
    """Whether a Zarr group (a study store, or a group inside one) exists at ``store``."""
    from ..store._fs import filesystem

    fs, path = filesystem(store)
    return fs.exists(f"{path.rstrip('/')}/zarr.json")


def _open_study_or_none(store: str, exists: bool):
    if not exists:
        return None
    from ..store import open_study

    return open_study(store)


def _stage_marker(store: str, product: str) -> dict | None:
    from ..store.markers import read_marker

    return read_marker(product_url(store, product), STAGE_MARKER)


# Groups that only ever appear complete (ingest writes cells/ and bulk/ beside and moves them into
# place), so a store made through the Python API without the planner still satisfies them.
ATOMIC_PRODUCTS = ("cells", "bulk")


def _available(store: str, product: str) -> dict | None:
    """The product's stage marker, ``{}`` for a complete unmarked atomic group, else None."""
    marker = _stage_marker(store, product)
    if marker is None and product in ATOMIC_PRODUCTS and group_exists(product_url(store, product)):
        return {}
    return marker


def _status(node: StageNode, store: str) -> tuple[str, str]:
    from ..store.markers import done_set, read_marker

    want = node.spec.config_hash()
    markers = [_stage_marker(store, p) for p in node.products]
    metas = [(m or {}).get("meta", {}) for m in markers]
    if markers and all(m is not None for m in markers) and all(m.get("stage") == node.name for m in metas):
        if any(m.get("config_hash") != want for m in metas):
            return STALE, "config changed since it was computed"
        recorded = metas[0].get("inputs", {})
        for product, h in node.input_hashes.items():
            if recorded.get(product) != h:
                return STALE, f"input {product!r} changed since it was computed"
        return DONE, ""
    if any(m is not None for m in markers):
        return STALE, "its products were written by another stage or config"
    if node.products:
        ids = done_set(product_url(store, node.products[0]))
        node.done_chunks = sum(not i.startswith("__") for i in ids)  # "__x__": run-level markers
    if not node.done_chunks:
        return PENDING, ""
    # chunks of an interrupted run: reusable only under the same config and inputs
    started = (read_marker(product_url(store, node.products[0]), STARTED_MARKER) or {}).get("meta", {})
    if started and started.get("config_hash") != want:
        node.done_chunks = 0
        return STALE, "interrupted run had another config"
    if started and started.get("inputs", node.input_hashes) != node.input_hashes:
        node.done_chunks = 0
        return STALE, "interrupted run had other inputs"
    return PARTIAL, "resuming an interrupted run"


def build_graph(spec: Spec, *, check: bool = True) -> JobGraph:
    """Plan ``spec``: resolve requirements, order the stages, read what is already done.

    Raises :class:`~scdist.errors.SpecError` before any work when a requirement is met
    neither by a stage of the spec nor by the store, and (``check=True``) runs each stage's
    input checks for the stages that will run.
    """
    from .registry import stage_class

    exists = group_exists(spec.store)
    study = _open_study_or_none(spec.store, exists)

    stages = [(s, stage_class(s.name)()) for s in spec.stages]
    producer: dict[str, StageSpec] = {}
    for s, stage in stages:
        for product in stage.products(s.config):
            if product in producer:
                raise SpecError(
                    f"{product!r} would be written by both {producer[product].name!r} and {s.name!r}",
                    field=f"stages.{s.name}", fix="keep only one stage that writes it")
            producer[product] = s

    nodes: list[StageNode] = []
    for s, stage in stages:
        needs = tuple(stage.needs(s.config))
        deps: dict[str, str | None] = {}
        input_hashes: dict[str, str | None] = {}
        for product in needs:
            if product in producer and producer[product] is not s:
                deps[product] = producer[product].name
                input_hashes[product] = producer[product].config_hash()
                continue
            marker = _available(spec.store, product) if exists else None
            if marker is None:
                makers = _makers_of(product)
                raise SpecError(
                    f"stage {s.name!r} needs {product!r}, which no stage of the spec produces "
                    f"and the store {spec.store} does not hold (complete)",
                    field=f"stages.{s.name}",
                    fix=(f"add a stage producing it ({' or '.join(makers)})" if makers
                         else "run the stage producing it first"))
            deps[product] = None
            input_hashes[product] = marker.get("meta", {}).get("config_hash")
        nodes.append(StageNode(spec=s, stage=stage, needs=needs, products=tuple(stage.products(s.config)),
                               deps=deps, plan=StagePlan(), input_hashes=input_hashes))

    order = _toposort(nodes)
    if exists:
        for node in order:
            node.status, node.reason = _status(node, spec.store)
    by_name = {n.name: n for n in order}
    for node in order:
        upstream_runs = any(d is not None and by_name[d].will_run for d in node.deps.values())
        # A stage reading a product that this run (re)computes is recomputed too, even when
        # its recorded input hash matches: the data under that hash is being rewritten.
        if node.status == DONE and upstream_runs:
            node.status, node.reason = STALE, "an input is recomputed in this run"
        # ... and is planned and checked without the store's current content, which it will
        # not see (the runner plans it again once its inputs exist).
        view = None if upstream_runs else study
        node.plan = node.stage.plan(view, node.config)
        node.planned_on_inputs = view is not None or not node.deps
        if node.plan.output_url is None and node.products:
            node.plan.output_url = product_url(spec.store, node.products[0])
        if check and node.will_run:
            node.stage.check(node.config, view)
    return JobGraph(spec=spec, nodes=order, study_exists=exists)


def _makers_of(product: str) -> list[str]:
    from .registry import STAGES, stage_class

    out = []
    for name in STAGES:
        try:
            cls = stage_class(name)
        except (ImportError, AttributeError):
            continue
        try:
            made = cls().products(cls.Config())
        except Exception:  # config with required fields: fall back to the declared products
            made = cls.provides or (name,)
        if product in made:
            out.append(name)
    return out


def _toposort(nodes: list[StageNode]) -> list[StageNode]:
    """Kahn's algorithm, stable in spec order among independent stages."""
    remaining = list(nodes)
    placed: set[str] = set()
    order: list[StageNode] = []
    while remaining:
        for n in remaining:
            if all(d is None or d in placed for d in n.deps.values()):
                order.append(n)
                placed.add(n.name)
                remaining.remove(n)
                break
        else:
            raise SpecError(f"stages {', '.join(n.name for n in remaining)} depend on each other",
                            field="stages", fix="remove the cycle")
    return order
