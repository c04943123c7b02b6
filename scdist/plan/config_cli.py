"""Turn a stage's pydantic Config into command-line options, so `scdist simulate` and
`scdist ingest` take exactly the keys the spec's stage block takes (one source of truth).

Scalar fields (int, float, str, bool, and their optionals) become ``--field-name`` options,
lists of scalars repeatable options; anything else (mappings, nested lists) is given as
``--set key=VALUE`` with VALUE parsed as YAML.
"""
from __future__ import annotations

import inspect
import types
import typing
from typing import Any, Callable

import typer
from pydantic import BaseModel

from ..errors import SpecError

_SCALARS = (int, float, str, bool)


def _scalar_type(annotation) -> type | None:
    if annotation in _SCALARS:
        return annotation
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1 and args[0] in _SCALARS:
            return args[0]
    if origin is typing.Literal:
        return str
    return None


def option_fields(model: type[BaseModel]) -> dict[str, Any]:
    """Config fields that become their own CLI option, with their Python type (scalars, and
    lists of scalars as repeatable options)."""
    out: dict[str, Any] = {}
    for name, info in model.model_fields.items():
        t = _scalar_type(info.annotation)
        if t is None and typing.get_origin(info.annotation) is list:
            item = _scalar_type(typing.get_args(info.annotation)[0])
            t = typing.List[item] if item is not None else None
        if t is not None:
            out[name] = t
    return out


def config_parameters(model: type[BaseModel]) -> list[inspect.Parameter]:
    """``inspect.Parameter`` objects (typer options) for the scalar fields of ``model``.

    Every option defaults to ``None`` meaning "not given": the Config's own default then
    applies, so the CLI never duplicates a default.
    """
    params = []
    for name, t in option_fields(model).items():
        info = model.model_fields[name]
        flag = "--" + name.replace("_", "-")
        default = None if info.is_required() else info.get_default(call_default_factory=True)
        desc = (info.description or "").rstrip(".")
        if info.is_required():
            tail = "Required."
        elif default in (None, [], {}):
            tail = ""
        else:
            tail = f"Default: {default}."
        if typing.get_origin(t) is list:
            tail = ("Repeat for several. " + tail).strip()
        help_ = f"{desc + '. ' if desc else ''}{tail}".strip()
        if t is bool:
            decl = typer.Option(None, f"{flag}/--no-{name.replace('_', '-')}", help=help_)
        else:
            decl = typer.Option(None, flag, help=help_)
        params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=decl,
                                        annotation=typing.Optional[t]))
    return params


def parse_sets(sets: list[str] | None) -> dict[str, Any]:
    """``["key=VALUE", ...]`` -> ``{key: yaml(VALUE)}``."""
    import yaml

    out: dict[str, Any] = {}
    for item in sets or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SpecError(f"--set {item!r} is not KEY=VALUE", field="--set",
                            fix="write e.g. --set celltype_props='[0.4, 0.3, 0.2, 0.1]'")
        out[key.strip()] = yaml.safe_load(value)
    return out


def with_config_options(model: type[BaseModel], fn: Callable) -> Callable:
    """Wrap ``fn(config: dict, **own_params)`` into a function whose signature also has one
    option per scalar field of ``model``; the given ones are collected into ``config``."""
    sig = inspect.signature(fn)
    hints = typing.get_type_hints(fn)  # string annotations (PEP 563) resolved in fn's module
    own = [p.replace(annotation=hints.get(n, p.annotation))
           for n, p in sig.parameters.items() if n != "config"]
    fields = option_fields(model)
    clash = set(fields) & {p.name for p in own}
    extra = [p for p in config_parameters(model) if p.name not in clash]

    def wrapper(**kwargs):
        config = {k: kwargs.pop(k) for k in list(kwargs) if k in fields and k not in clash}
        config = {k: (list(v) if isinstance(v, tuple) else v) for k, v in config.items()
                  if v is not None and not (isinstance(v, (list, tuple)) and not v)}
        return fn(config=config, **kwargs)

    wrapper.__signature__ = sig.replace(parameters=own + extra)
    wrapper.__name__ = fn.__name__
    wrapper.__doc__ = fn.__doc__
    return wrapper
