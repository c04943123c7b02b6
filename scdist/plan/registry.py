"""Registered stage types, as lazy "module:Class" references.

Lazy so that a spec with only dask stages never imports torch or ray.
"""
from __future__ import annotations

import importlib

STAGES: dict[str, str] = {
    "simulate": "scdist.plan.stages.simulate:SimulateStage",
    "ingest": "scdist.plan.stages.ingest:IngestStage",
    "pseudobulk": "scdist.plan.stages.pseudobulk:PseudobulkStage",
    "ctmm": "scdist.plan.stages.ctmm:CtmmStage",
    "ursm": "scdist.plan.stages.ursm:UrsmStage",
    "ldvae": "scdist.plan.stages.ldvae:LdvaeStage",
    "mrvi": "scdist.plan.stages.mrvi:MrviStage",
}


def stage_class(name: str):
    """Import and return the stage class registered under ``name``."""
    module, cls = STAGES[name].split(":")
    return getattr(importlib.import_module(module), cls)
