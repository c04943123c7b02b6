"""The pipeline spec a submission carries: read once, checked before anything is sent.

The text goes into the ConfigMap verbatim (``stages`` is an ordered mapping, and the user's
comments stay readable in the cluster); the parsed form decides what to build: a spec with a
Ray stage and no Ray address gets a KubeRay ``RayJob`` (see :mod:`scdist.deploy.objects`).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import SpecError

_URL = re.compile(r"^[a-z][a-z0-9+.-]*://")


@dataclass(frozen=True)
class SubmittedPipeline:
    """A checked spec: ``text`` (what the ConfigMap holds), ``raw`` (parsed), and what it needs."""

    text: str
    raw: dict
    source: str
    stage_names: tuple[str, ...]
    engines: frozenset[str]

    @property
    def store(self) -> str:
        return str(self.raw["store"])

    @property
    def store_is_url(self) -> bool:
        return bool(_URL.match(self.store)) and not self.store.startswith("file://")

    @property
    def needs_ray(self) -> bool:
        return "ray" in self.engines

    @property
    def ray_address(self) -> str | None:
        return (self.raw.get("ray") or {}).get("address")

    @property
    def dask_address(self) -> str | None:
        return (self.raw.get("dask") or {}).get("address")


def load_pipeline(path: str | Path) -> SubmittedPipeline:
    """Read ``path`` and check it as ``scdist run`` will, before anything is submitted.

    Top-level keys and stage names are checked with the planner's own models; each stage's
    config is checked when its stage type is importable here (the image runs the same version).
    """
    from pydantic import ValidationError

    from ..plan.registry import STAGES, stage_class
    from ..plan.spec import SpecModel, _spec_error, read_spec_source

    raw, source = read_spec_source(path)
    try:
        top = SpecModel.model_validate(raw)
    except ValidationError as exc:
        raise _spec_error(exc, SpecModel) from None
    engines = set()
    for name, cfg in top.stages.items():
        if name not in STAGES:
            raise SpecError(f"unknown stage {name!r}; registered stages: {', '.join(STAGES)}",
                            field=f"stages.{name}", fix="use one of the registered stage names")
        try:
            cls = stage_class(name)
        except ImportError:
            engines.add(_FALLBACK_ENGINES.get(name, "dask"))
            continue
        try:
            cls.Config.model_validate(cfg or {})
        except ValidationError as exc:
            raise _spec_error(exc, cls.Config, prefix=f"stages.{name}") from None
        engines.add(cls.engine)
    return SubmittedPipeline(text=Path(path).read_text(), raw=raw, source=str(source),
                             stage_names=tuple(top.stages), engines=frozenset(engines))


# Engines of the registered stage types (docs/CONTRACT.md), used only when a stage's module is
# not importable in the submitting environment.
_FALLBACK_ENGINES = {"ursm": "ray", "ldvae": "ray", "mrvi": "ray"}
