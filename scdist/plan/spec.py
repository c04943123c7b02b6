"""Pipeline spec: a YAML file or a dict, validated into typed models before any work starts.

A spec names the study store, how to reach (or start) Dask and Ray, and an ordered mapping
of stage type -> stage config::

    store: quickstart.zarr
    dask: {address: null, n_workers: 2, threads_per_worker: 1}
    ray:  {address: null, num_cpus: null}
    stages:
      simulate: {n_donors: 30}
      pseudobulk: {min_cells: 10}

Every error is a :class:`~scdist.errors.SpecError` whose ``field`` is the dotted path of the
bad key (``stages.pseudobulk.min_cells``) and whose message lists the keys allowed there.

Cluster addresses are resolved with this precedence: explicit argument (CLI flag) >
environment variable (``SCDIST_DASK_ADDRESS`` / ``SCDIST_RAY_ADDRESS``) > spec file, so one
spec file runs unchanged on a laptop and on a cluster whose address the deployment injects.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..errors import SpecError

ENV_DASK_ADDRESS = "SCDIST_DASK_ADDRESS"
ENV_RAY_ADDRESS = "SCDIST_RAY_ADDRESS"


class DaskSection(BaseModel):
    """How to reach Dask: ``address`` of a running scheduler, else an embedded LocalCluster."""

    model_config = ConfigDict(extra="forbid")
    address: str | None = None
    n_workers: int | None = Field(None, ge=1)
    threads_per_worker: int = Field(1, ge=1)
    memory_limit: str | None = "auto"
    dashboard: bool = False


class RaySection(BaseModel):
    """How to reach Ray: ``address`` of a running head, else a local ``ray.init``."""

    model_config = ConfigDict(extra="forbid")
    address: str | None = None
    num_cpus: int | None = Field(None, ge=1)


class SpecModel(BaseModel):
    """The top level of a pipeline spec (stage configs are validated per stage type)."""

    model_config = ConfigDict(extra="forbid")
    store: str = Field(min_length=1)
    dask: DaskSection = Field(default_factory=DaskSection)
    ray: RaySection = Field(default_factory=RaySection)
    stages: dict[str, dict[str, Any] | None] = Field(min_length=1)


@dataclass(frozen=True)
class StageSpec:
    """One validated stage of a spec: its registered type name and its config model."""

    name: str
    config: BaseModel

    def config_dict(self) -> dict:
        return self.config.model_dump(mode="json")

    def config_hash(self) -> str:
        """Stable hash of the config; a stage done under another hash is stale."""
        return config_hash(self.name, self.config_dict())


@dataclass
class Spec:
    """A validated pipeline spec (what the planner and runner consume)."""

    store: str
    dask: DaskSection
    ray: RaySection
    stages: list[StageSpec]
    source: str | None = None
    raw: dict = field(default_factory=dict)

    def stage(self, name: str) -> StageSpec:
        for s in self.stages:
            if s.name == name:
                return s
        raise KeyError(name)


def config_hash(name: str, cfg: Mapping) -> str:
    payload = json.dumps({"stage": name, "config": cfg}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _allowed_keys(model: type[BaseModel], loc: tuple) -> list[str] | None:
    """Field names of the (sub)model that holds the last element of ``loc``."""
    current: Any = model
    for part in loc[:-1]:
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return None
        info = current.model_fields.get(part)
        if info is None:
            return None
        current = info.annotation
        # Optional[Model] / Model | None: take the model member.
        for arg in getattr(current, "__args__", ()) or ():
            if isinstance(arg, type) and issubclass(arg, BaseModel):
                current = arg
    if isinstance(current, type) and issubclass(current, BaseModel):
        return list(current.model_fields)
    return None


def _spec_error(exc: ValidationError, model: type[BaseModel], prefix: str = "") -> SpecError:
    """Turn pydantic's first error into a SpecError naming the dotted key and the allowed keys."""
    messages = []
    first_field = None
    for err in exc.errors():
        loc = tuple(err["loc"])
        dotted = ".".join(str(p) for p in (prefix.split(".") if prefix else []) + list(loc))
        first_field = first_field or dotted or prefix or "spec"
        allowed = _allowed_keys(model, loc) if loc else list(model.model_fields)
        if err["type"] == "extra_forbidden":
            msg = f"{dotted}: unknown key"
        elif err["type"] == "missing":
            msg = f"{dotted}: required key is missing"
        else:
            msg = f"{dotted}: {err['msg']} (got {err.get('input')!r})"
        if allowed and err["type"] in ("extra_forbidden", "missing"):
            msg += f"; allowed keys: {', '.join(allowed)}"
        messages.append(msg)
    return SpecError("; ".join(messages), field=first_field,
                     fix="correct the spec (see `scdist --help` and the README's pipeline spec reference)")


def read_spec_source(source: str | os.PathLike | Mapping) -> tuple[dict, str | None]:
    """Return (raw dict, source path or None) from a YAML path or a mapping."""
    if isinstance(source, Mapping):
        return dict(source), None
    path = Path(source)
    if not path.is_file():
        raise SpecError(f"spec file {str(path)!r} does not exist", field="spec",
                        fix="pass the path of a YAML pipeline spec, e.g. examples/quickstart.yaml")
    import yaml

    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise SpecError(f"{path} is not valid YAML: {exc}", field="spec",
                        fix="fix the YAML syntax") from exc
    if not isinstance(raw, dict):
        raise SpecError(f"{path} must hold a mapping with keys store, dask, ray, stages",
                        field="spec", fix="write the spec as a YAML mapping")
    return raw, str(path)


def normalize_store(store: str) -> str:
    """Local paths become absolute (workers may run elsewhere); URLs are kept as they are."""
    if store.startswith("file://"):
        store = store[len("file://"):]
    if "://" in store:
        return store.rstrip("/")
    return os.path.abspath(os.path.expanduser(store))


def validate_model(raw: Mapping) -> SpecModel:
    """Validate the top level of a raw spec (stage configs not yet checked)."""
    try:
        return SpecModel.model_validate(raw)
    except ValidationError as exc:
        raise _spec_error(exc, SpecModel) from None


def validate_stages(top: SpecModel, *, allow_unavailable: bool = False
                    ) -> list[tuple[str, type | None, BaseModel | None]]:
    """``(name, stage class, validated config)`` for each stage of ``top``, in spec order.

    Unknown stage names and bad config keys raise SpecError naming ``stages.<name>[.key]``.
    A registered stage whose module is missing from this install is an error too, unless
    ``allow_unavailable`` (e.g. checking a spec that will run elsewhere): then its class
    and config are None.
    """
    from .registry import STAGES, stage_class

    out: list[tuple[str, type | None, BaseModel | None]] = []
    for name, cfg in top.stages.items():
        if name not in STAGES:
            raise SpecError(f"unknown stage {name!r}; registered stages: {', '.join(STAGES)}",
                            field=f"stages.{name}", fix="use one of the registered stage names")
        try:
            cls = stage_class(name)
        except ImportError as exc:
            if allow_unavailable:
                out.append((name, None, None))
                continue
            raise SpecError(f"stage {name!r} is registered but not available in this install ({exc})",
                            field=f"stages.{name}", fix="install the scdist version that provides it") from exc
        try:
            config = cls.Config.model_validate(cfg or {})
        except ValidationError as exc:
            raise _spec_error(exc, cls.Config, prefix=f"stages.{name}") from None
        out.append((name, cls, config))
    return out


def load_spec(source: "str | os.PathLike | Mapping | Spec", *, store: str | None = None,
              dask_address: str | None = None, ray_address: str | None = None) -> Spec:
    """Validate a spec (path, dict or :class:`Spec`) into a :class:`Spec`.

    ``store``, ``dask_address`` and ``ray_address`` override the spec (CLI flags); the
    environment variables ``SCDIST_DASK_ADDRESS`` / ``SCDIST_RAY_ADDRESS`` override the file.
    """
    if isinstance(source, Spec):
        if store is None and dask_address is None and ray_address is None:
            return source
        raw, path = dict(source.raw), source.source
    else:
        raw, path = read_spec_source(source)
    top = validate_model(raw)
    stages = [StageSpec(name, config) for name, _, config in validate_stages(top)]

    dask, ray = top.dask, top.ray
    dask_address = dask_address or os.environ.get(ENV_DASK_ADDRESS) or dask.address
    ray_address = ray_address or os.environ.get(ENV_RAY_ADDRESS) or ray.address
    dask = dask.model_copy(update={"address": dask_address})
    ray = ray.model_copy(update={"address": ray_address})
    return Spec(store=normalize_store(store or top.store), dask=dask, ray=ray, stages=stages,
                source=path, raw=raw)
