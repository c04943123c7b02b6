"""What a pipeline stage is: a config model, what it needs and makes, a plan and a run.

A stage type lives in ``scdist/plan/stages/<name>.py`` and is registered in
:mod:`scdist.plan.registry`. The planner calls :meth:`Stage.plan` (no work, may see
``study=None`` when an earlier stage of the same run creates the store) and the runner
calls :meth:`Stage.run` with a :class:`~scdist.plan.context.RunContext`.

Dependencies are named by *products*: store groups such as ``"cells"``, ``"pseudobulk"``,
``"bulk"`` or ``"results/ctmm/default"``. A requirement is met by an earlier stage of the
spec that produces it, or by a previous run that left the product in the store with its
completion marker.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel, ConfigDict

if TYPE_CHECKING:
    from .context import RunContext

STAGE_MARKER = "__stage__"  # = scdist.store.markers.STAGE: the stage's products are complete
STARTED_MARKER = "__started__"  # which config the chunk markers of a product belong to


class StageConfig(BaseModel):
    """Base for stage configs: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")


@dataclass
class StagePlan:
    """What a stage will do, without doing it.

    ``chunks`` is the number of independently restartable units (gene blocks, cell chunks,
    chains...), ``None`` when it is only known once an earlier stage has run;
    ``chunk_desc`` says what a chunk is. ``resources`` is what each task asks for.
    """

    chunks: int | None = None
    chunk_desc: str = ""
    resources: dict[str, Any] = field(default_factory=dict)
    output_url: str | None = None
    notes: list[str] = field(default_factory=list)


class Stage:
    """Base class of stage types (subclasses set ``name``, ``Config``, ``requires``, ``engine``)."""

    name: ClassVar[str]
    Config: ClassVar[type[BaseModel]] = StageConfig
    requires: ClassVar[tuple[str, ...]] = ()
    provides: ClassVar[tuple[str, ...]] = ()
    engine: ClassVar[str] = "dask"

    def products(self, cfg) -> tuple[str, ...]:
        """Store groups this stage writes (relative to the store root)."""
        return self.provides or (self.name,)

    def engine_for(self, cfg) -> str:
        """Engine this config runs on (``scdist plan`` shows it); override when it depends on
        the config, e.g. a stage that uses Ray only with several workers."""
        return self.engine

    def needs(self, cfg) -> tuple[str, ...]:
        """Products this stage reads; override when they depend on the config."""
        return self.requires

    def check(self, cfg, study) -> None:
        """Validate inputs before any stage of the run starts (raise scdist.errors.*)."""

    def plan(self, study, cfg) -> StagePlan:
        return StagePlan()

    def reset(self, store_url: str, cfg) -> None:
        """Forget partial work before recomputing from scratch (config or inputs changed).

        Default: clear the completion markers of every product; override to also drop
        scratch state the stage keeps elsewhere.
        """
        from ..store.markers import clear_markers

        for product in self.products(cfg):
            clear_markers(f"{store_url.rstrip('/')}/{product}")

    def run(self, ctx: "RunContext", cfg) -> None:  # pragma: no cover - abstract
        raise NotImplementedError
