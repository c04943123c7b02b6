"""Offline validation of Kubernetes manifests (no API server needed).

- Core kinds (ConfigMap, Job, CronJob, Deployment, Service, PVC, RBAC ...) are validated with
  ``kubernetes-validate`` in strict mode (unknown fields are errors), against the schemas of
  Kubernetes ``K8S_VERSION``.
- Custom resources (KubeRay RayCluster / RayJob, Dask DaskCluster / DaskJob) are validated with
  ``jsonschema`` against the ``openAPIV3Schema`` of their CustomResourceDefinition, after the
  adjustments the API server itself makes (:func:`strict_crd_schema`, :func:`prune_nulls`):
  int-or-string fields accept both, ``nullable`` fields accept null, other null fields are
  pruned, and — like ``kubectl --validate=strict`` — unknown fields are errors unless the CRD
  preserves them. CEL rules (``x-kubernetes-validations``) are not evaluated offline.
"""
from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any, Iterable, Mapping

from ..errors import SpecError

K8S_VERSION = "1.35.0"
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_INT_OR_STRING = {"anyOf": [{"type": "integer"}, {"type": "string"}]}


def strict_crd_schema(schema: Mapping) -> dict:
    """A CRD's openAPIV3Schema made checkable with jsonschema the way the API server checks it."""
    def walk(node):
        if isinstance(node, list):
            return [walk(n) for n in node]
        if not isinstance(node, dict):
            return node
        node = {k: walk(v) for k, v in node.items()}
        if node.get("x-kubernetes-int-or-string") or node.get("format") == "int-or-string":
            # controller-gen also writes anyOf [integer, string]; the dask CRDs write
            # `type: string, format: int-or-string`: both mean "an integer or a string".
            node.pop("type", None)
            node.pop("anyOf", None)
            node.pop("format", None)
            node.update(copy.deepcopy(_INT_OR_STRING))
        if node.get("nullable") and isinstance(node.get("type"), str):
            node["type"] = [node["type"], "null"]
        if ("properties" in node and "additionalProperties" not in node
                and not node.get("x-kubernetes-preserve-unknown-fields")):
            node["additionalProperties"] = False
        return node

    out = walk(dict(schema))
    # The API server always accepts the object envelope, whether or not the CRD lists it.
    props = out.setdefault("properties", {})
    props.setdefault("apiVersion", {"type": "string"})
    props.setdefault("kind", {"type": "string"})
    props.setdefault("metadata", {"type": "object"})
    return out


def prune_nulls(obj: Any, schema: Mapping | None) -> Any:
    """Drop null fields the API server would prune (those whose schema is not nullable)."""
    if isinstance(obj, dict):
        props = (schema or {}).get("properties") or {}
        extra = (schema or {}).get("additionalProperties")
        out = {}
        for k, v in obj.items():
            sub = props.get(k, extra if isinstance(extra, dict) else None)
            if v is None and not (sub or {}).get("nullable"):
                continue
            out[k] = prune_nulls(v, sub)
        return out
    if isinstance(obj, list):
        items = (schema or {}).get("items")
        return [prune_nulls(v, items if isinstance(items, dict) else None) for v in obj]
    return obj


class CrdSchemas:
    """openAPIV3Schemas of CustomResourceDefinitions, looked up by (apiVersion, kind)."""

    def __init__(self):
        self._raw: dict[tuple[str, str], dict] = {}
        self._strict: dict[tuple[str, str], dict] = {}

    @classmethod
    def from_files(cls, paths: Iterable[str | Path]) -> "CrdSchemas":
        import yaml

        loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # CRDs are MBs of YAML: use libyaml
        out = cls()
        for p in paths:
            for doc in yaml.load_all(Path(p).read_text(), Loader=loader):
                if doc and doc.get("kind") == "CustomResourceDefinition":
                    out.add(doc)
        return out

    def add(self, crd: Mapping) -> None:
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        for version in crd["spec"]["versions"]:
            schema = version["schema"]["openAPIV3Schema"]
            key = (f"{group}/{version['name']}", kind)
            self._raw[key] = schema
            self._strict[key] = strict_crd_schema(schema)

    def __contains__(self, key) -> bool:
        return key in self._strict

    def kinds(self) -> list[tuple[str, str]]:
        return sorted(self._strict)

    def problems(self, obj: Mapping) -> list[str]:
        import jsonschema

        key = (obj.get("apiVersion"), obj.get("kind"))
        data = prune_nulls(obj, self._raw[key])
        validator = jsonschema.Draft7Validator(self._strict[key])
        return [f"{'.'.join(str(p) for p in e.absolute_path) or '<root>'}: {e.message}"
                for e in sorted(validator.iter_errors(data), key=lambda e: list(map(str, e.absolute_path)))]


def _metadata_problems(obj: Mapping) -> list[str]:
    meta = obj.get("metadata") or {}
    name = meta.get("name")
    out = []
    if not name:
        out.append("metadata.name: required")
    elif len(name) > 253 or not _DNS_SUBDOMAIN.match(name):
        out.append(f"metadata.name: {name!r} is not a valid DNS subdomain")
    for field in ("labels", "annotations"):
        for k, v in (meta.get(field) or {}).items():
            if not isinstance(v, str):
                out.append(f"metadata.{field}.{k}: must be a string, got {type(v).__name__}")
    return out


def manifest_problems(obj: Mapping, crds: CrdSchemas | None = None,
                      k8s_version: str = K8S_VERSION, allow_unknown: bool = False) -> list[str]:
    """Everything wrong with one manifest (empty list when it is valid).

    A kind that is neither core nor in ``crds`` is a problem unless ``allow_unknown``.
    """
    import kubernetes_validate

    if not isinstance(obj, Mapping) or "apiVersion" not in obj or "kind" not in obj:
        return ["not a Kubernetes object (apiVersion and kind are required)"]
    key = (obj["apiVersion"], obj["kind"])
    problems = _metadata_problems(obj)
    if crds is not None and key in crds:
        return problems + crds.problems(obj)
    try:
        kubernetes_validate.validate(dict(obj), k8s_version, strict=True)
    except kubernetes_validate.ValidationError as e:
        path = ".".join(str(p) for p in e.path) or "<root>"
        problems.append(f"{path}: {e.message}")
    except kubernetes_validate.SchemaNotFoundError:
        if allow_unknown:
            return problems
        problems.append(f"no schema for {key[1]} ({key[0]}): neither a core kind of Kubernetes "
                        f"{k8s_version} nor a CRD given")
    return problems


def validate_manifests(objs: Iterable[Mapping], crds: CrdSchemas | None = None,
                       k8s_version: str = K8S_VERSION, allow_unknown: bool = False) -> None:
    """Raise :class:`SpecError` listing every problem of every manifest; return None if all pass."""
    errors = []
    for obj in objs:
        name = f"{obj.get('kind')}/{(obj.get('metadata') or {}).get('name')}"
        errors += [f"{name} {p}" for p in manifest_problems(obj, crds, k8s_version, allow_unknown)]
    if errors:
        raise SpecError("invalid manifests: " + "; ".join(errors), field="manifests",
                        fix="correct the values or options that produced these fields")
