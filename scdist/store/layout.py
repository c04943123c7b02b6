"""Names of the groups, variables and attributes of a study store (the on-disk contract).

A study store is one Zarr v3 group (a directory or an fsspec URL)::

    <root>/                 attrs: scdist_schema_version, scdist_version, created, provenance
      cells/                AnnData-on-Zarr: X (CSR, chunked by cells), obs, var
      pseudobulk/           xarray Dataset (donor, celltype, gene), chunked along gene
      bulk/                 xarray Dataset (bulk_sample, gene)
      truth/                simulator ground truth (xarray Dataset), when simulated
      results/<method>/<run>/   xarray Datasets and checkpoints

Every module reads these names from here; nothing else spells them.
"""
SCHEMA_VERSION = 1

CELLS = "cells"
PSEUDOBULK = "pseudobulk"
BULK = "bulk"
TRUTH = "truth"
RESULTS = "results"

# Standard obs columns inside cells/ (ingest renames the user's keys to these).
OBS_DONOR = "donor"
OBS_CELLTYPE = "celltype"
OBS_BATCH = "batch"

# Root attributes.
ATTR_SCHEMA = "scdist_schema_version"
ATTR_VERSION = "scdist_version"
ATTR_CREATED = "created"
ATTR_PROVENANCE = "provenance"

# Completion markers live beside the data they vouch for.
MARKER_DIR = "_scdist_done"
