"""CTMM (Chen & Dahl): cell type-specific interindividual variance from pseudobulk.

``scdist.ctmm.fit(data, ...)`` is the entry point (see :mod:`scdist.ctmm.api`). The numerics
(:mod:`.likelihood`, :mod:`.optimize`, :mod:`.he`, :mod:`.jackknife`, :mod:`.tests`) are batched
over genes and import neither Dask nor Ray; :mod:`.distributed` places them on Dask.
"""
from __future__ import annotations

from .api import fit
from .kernel import FitConfig, fit_block
from .simulate import simulate_ctp

__all__ = ["fit", "fit_block", "FitConfig", "simulate_ctp"]
