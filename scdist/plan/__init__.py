"""Planner: pipeline spec -> job graph of stages -> runner.

``scdist.plan`` is both this package and a function: ``scdist.plan(spec)`` validates a spec
and returns its :class:`~scdist.plan.graph.JobGraph` without doing any work (the module is
made callable so that importing ``scdist.plan.<submodule>`` never shadows the function).

Pieces: :mod:`.spec` (YAML/dict -> validated models), :mod:`.stage` (what a stage is),
:mod:`.registry` (stage names -> classes, lazily), :mod:`.graph` (dependencies, order,
what is done), :mod:`.runner` (execution, markers, provenance), :mod:`.context`
(``RunContext`` handed to stages), :mod:`.runlog` (run records), :mod:`.storeinfo`
(`scdist info` / `status`).
"""
from __future__ import annotations

import sys
import types

__all__ = ["plan", "run", "load_spec", "Stage", "StagePlan", "StageConfig", "RunContext"]


def plan(spec, **overrides):
    """Validate ``spec`` (YAML path, dict or Spec) and return its job graph; no work is done."""
    from .runner import plan as _plan

    return _plan(spec, **overrides)


def run(spec, client=None, **kwargs):
    """Run ``spec``; see :func:`scdist.plan.runner.run`."""
    from .runner import run as _run

    return _run(spec, client=client, **kwargs)


def __getattr__(name):
    if name == "load_spec":
        from .spec import load_spec

        return load_spec
    if name in ("Stage", "StagePlan", "StageConfig"):
        from . import stage

        return getattr(stage, name)
    if name == "RunContext":
        from .context import RunContext

        return RunContext
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class _CallableModule(types.ModuleType):
    def __call__(self, spec, **overrides):
        return plan(spec, **overrides)


sys.modules[__name__].__class__ = _CallableModule
