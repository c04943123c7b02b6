"""scdist: distributed batch compute for population-scale single-cell RNA-seq.

Public API (all imports are lazy: ``import scdist`` loads neither torch, ray nor dask)::

    scdist.run(spec, client=None)   # run a pipeline spec (YAML path or dict)
    scdist.plan(spec)               # its job graph, without running anything
    scdist.store                    # study stores (open_study, create_study, ingest_*)
    scdist.pseudobulk, scdist.simulate, scdist.ctmm, scdist.ursm, scdist.vae
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_SUBMODULES = ("store", "plan", "engines", "pseudobulk", "simulate", "ctmm", "ursm", "vae",
               "errors", "report", "deploy")

__all__ = ["run", "plan", "__version__", *_SUBMODULES]


def run(spec, client=None, **kwargs):
    """Run a pipeline spec (path to YAML, dict or Spec) and return a RunResult.

    ``client``: an existing ``distributed.Client`` to run on; scdist never closes it.
    Without it scdist connects to ``dask.address`` / ``SCDIST_DASK_ADDRESS`` or starts (and
    stops) an embedded LocalCluster. Keyword arguments: ``store``, ``dask_address``,
    ``ray_address``, ``rich``, ``run_id`` (see :func:`scdist.plan.runner.run`).
    """
    from .plan.runner import run as _run

    return _run(spec, client=client, **kwargs)


def __getattr__(name):
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_SUBMODULES))
