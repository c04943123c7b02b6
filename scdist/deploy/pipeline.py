"""The pipeline spec a submission carries: read once, checked before anything is sent.

The text goes into the ConfigMap verbatim (``stages`` is an ordered mapping, and the user's
comments stay readable in the cluster); the parsed form decides what to build: a spec with a
Ray stage and no Ray address gets a KubeRay ``RayJob`` (see :mod:`scdist.deploy.objects`).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path


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
    from ..plan.spec import read_spec_source, validate_model, validate_stages

    raw, source = read_spec_source(path)
    top = validate_model(raw)
    engines = {cls.engine if cls is not None else _FALLBACK_ENGINES.get(name, "dask")
               for name, cls, _ in validate_stages(top, allow_unavailable=True)}
    return SubmittedPipeline(text=Path(path).read_text(), raw=raw, source=str(source),
                             stage_names=tuple(top.stages), engines=frozenset(engines))


# Engines of the registered stage types (docs/CONTRACT.md), used only when a stage's module is
# not importable in the submitting environment.
_FALLBACK_ENGINES = {"ursm": "ray", "ldvae": "ray", "mrvi": "ray"}
