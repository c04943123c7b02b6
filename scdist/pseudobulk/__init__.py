"""Pseudobulk cube (CTMM's cell type-specific and overall pseudobulk) over a study's cells.

:mod:`.kernel` is the pure numpy/scipy math over one chunk of cells; :mod:`.compute` maps
it over the store's cell chunks with Dask and writes ``pseudobulk/``.
"""
from .compute import compute_pseudobulk

__all__ = ["compute_pseudobulk"]
