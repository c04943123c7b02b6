"""Study store: a Zarr v3 group with cells, pseudobulk, bulk, truth and results.

See docs/CONTRACT.md ("Study store") and :mod:`scdist.store.layout` for the names.
"""
import warnings as _warnings

from .study import Study, create_study, open_study

# scdist's own bookkeeping folders (_scdist_done markers, _scdist_tmp, _scdist_runs) are
# deliberately not Zarr nodes (so anndata.read_zarr still reads a marked cells/ group); zarr
# notes them when it lists a group. Silence exactly that note, nothing else.
_warnings.filterwarnings("ignore", message=r"Object at _scdist_\w+ is not recognized",
                         module=r"zarr\..*")

__all__ = ["Study", "create_study", "open_study", "CellWriter", "ingest_h5ad", "ingest_anndata",
           "ingest_zarr", "ingest_bulk"]


def __getattr__(name):  # keep `import scdist.store` light (anndata/h5py load on first use)
    if name == "CellWriter":
        from .cells import CellWriter

        return CellWriter
    if name in ("ingest_h5ad", "ingest_anndata", "ingest_zarr", "ingest_bulk"):
        from . import ingest

        return getattr(ingest, name)
    raise AttributeError(name)
