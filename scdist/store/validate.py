"""Input checks run before anything is written: each failure is an InputError naming the field.

The checks are vectorised over whole chunks (numpy / pandas), never a loop over cells or
genes. Field names in messages are the user's own (their obs key, their layer name), so
the fix can be applied to their data without reading scdist's code.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd

from ..errors import InputError

MIN_DONORS = 2


def _examples(values, k: int = 5) -> str:
    vals = list(values)
    more = f" and {len(vals) - k} more" if len(vals) > k else ""
    return ", ".join(repr(v) for v in vals[:k]) + more


_BLANK = ["", "nan", "None", "NaN"]


def _blank_labels(col: pd.Series) -> np.ndarray:
    """Mask of missing or blank labels (NaN, None, '', 'nan'), cheap for categoricals."""
    if isinstance(col.dtype, pd.CategoricalDtype):
        cats = pd.Index(col.cat.categories).astype(str).str.strip()
        bad_codes = np.flatnonzero(cats.isin(_BLANK))
        codes = col.cat.codes.to_numpy()
        return (codes < 0) | np.isin(codes, bad_codes)
    missing = col.isna().to_numpy()
    if col.dtype == object or pd.api.types.is_string_dtype(col):
        missing |= col.astype(str).str.strip().isin(_BLANK).to_numpy()
    return missing


def check_counts(values: np.ndarray, field: str, *, where: str = "",
                 max_value: int | None = None) -> None:
    """Counts must be finite, non-negative and integer-valued (float storage is allowed).

    ``values`` are the stored entries of a chunk (the ``data`` of a CSR matrix or a dense
    block); ``where`` describes the chunk (e.g. ``"cells 0-9999"``) for the message;
    ``max_value`` is the largest count the store's dtype can hold.
    """
    v = np.asarray(values)
    at = f" ({where})" if where else ""
    if v.dtype.kind == "b" or v.dtype.kind not in "iuf":
        raise InputError(f"counts have dtype {v.dtype}{at}; integer UMI/read counts are required",
                         field=field, fix="pass raw counts (integers), e.g. adata.layers['counts'] "
                                          "via layer=, not normalised or boolean values")
    if v.size == 0:
        return
    if v.dtype.kind == "f":
        finite = np.isfinite(v)
        if not finite.all():
            n = int(v.size - finite.sum())
            raise InputError(f"{n} counts are NaN or infinite{at}", field=field,
                             fix="remove or fill non-finite values; counts must be integers >= 0")
        frac = v != np.floor(v)
        if frac.any():
            raise InputError(
                f"{int(frac.sum())} counts are not whole numbers (e.g. {v[frac][0]!r}){at}; these "
                "look like normalised values", field=field,
                fix="pass raw integer counts (e.g. layer='counts'), not log/CPM-normalised data")
    vmin = v.min()
    if vmin < 0:
        raise InputError(f"{int((v < 0).sum())} counts are negative (min {vmin!r}){at}",
                         field=field, fix="counts must be >= 0: pass raw counts, not centred or "
                                          "scaled values")
    if max_value is not None and v.max() > max_value:
        raise InputError(f"a count of {v.max()!r}{at} exceeds the store's count dtype "
                         f"(max {max_value})", field=field,
                         fix="ingest with count_dtype='int64'")


def check_gene_names(names: Sequence, field: str = "var_names") -> np.ndarray:
    """Gene names must be present, non-empty and unique. Returns them as an object array of str."""
    s = pd.Series(np.asarray(names, dtype=object))
    if len(s) == 0:
        raise InputError("there are no genes", field=field, fix="pass a matrix with at least one gene")
    bad = s.isna() | (s.astype(str).str.strip() == "")
    if bad.any():
        raise InputError(f"{int(bad.sum())} gene names are missing or empty (positions "
                         f"{_examples(np.flatnonzero(bad.to_numpy()))})", field=field,
                         fix="give every gene a name (e.g. adata.var_names = adata.var['gene_ids'])")
    s = s.astype(str)
    dup = s[s.duplicated()].unique()
    if len(dup):
        raise InputError(f"{len(dup)} gene names are not unique: {_examples(dup)}", field=field,
                         fix="make them unique (adata.var_names_make_unique()) or aggregate "
                             "duplicated genes before ingest")
    return s.to_numpy(dtype=object)


def check_obs(obs: pd.DataFrame, *, donor_key: str, celltype_key: str,
              batch_key: str | None = None, covariates: Sequence[str] = (),
              min_donors: int = MIN_DONORS) -> None:
    """Check the cell metadata: keys present, labels non-empty, enough donors, donor covariates.

    Keys are the user's obs column names. Donor-level covariates must have one value per
    donor (constant within donor) and no missing values.
    """
    keys = {"donor_key": donor_key, "celltype_key": celltype_key}
    if batch_key is not None:
        keys["batch_key"] = batch_key
    for arg, key in keys.items():
        if key not in obs.columns:
            raise InputError(f"obs has no column {key!r} (given as {arg}); available: "
                             f"{_examples(obs.columns, 20)}", field=f"obs[{key!r}]",
                             fix=f"set {arg} to one of the obs columns")
    for c in covariates:
        if c not in obs.columns:
            raise InputError(f"obs has no column {c!r} (listed in covariates); available: "
                             f"{_examples(obs.columns, 20)}", field=f"obs[{c!r}]",
                             fix="list only existing obs columns as donor covariates")
        if c in keys.values():
            raise InputError(f"{c!r} is both a covariate and a donor/celltype/batch key",
                             field=f"obs[{c!r}]", fix="remove it from covariates")
    if len(obs) == 0:
        raise InputError("there are no cells", field="obs", fix="pass a non-empty AnnData")
    for arg, key in keys.items():
        missing = _blank_labels(obs[key])
        if missing.any():
            raise InputError(f"{int(missing.sum())} cells have an empty {arg.removesuffix('_key')}"
                             f" label (first at row {int(np.flatnonzero(missing)[0])})",
                             field=f"obs[{key!r}]",
                             fix="fill or drop those cells before ingest (e.g. "
                                 f"adata = adata[adata.obs[{key!r}].notna()])")
    donor_codes, donor_labels = pd.factorize(obs[donor_key])
    n_donors = len(donor_labels)
    if n_donors < min_donors:
        raise InputError(f"only {n_donors} donor(s) found; population methods need at least "
                         f"{min_donors}", field=f"obs[{donor_key!r}]",
                         fix="check donor_key names the donor/sample column, or add donors")
    if covariates:
        cov = obs[list(covariates)]
        null = cov.isna()
        if null.to_numpy().any():
            c = null.any().idxmax()
            raise InputError(f"{int(null[c].sum())} cells have no value for covariate {c!r}",
                             field=f"obs[{c!r}]",
                             fix="fill the missing donor-level values or drop the covariate")
        per_donor = cov.groupby(donor_codes, sort=True).nunique()
        varying = per_donor.gt(1)
        if varying.to_numpy().any():
            c = varying.any().idxmax()
            bad = np.asarray(donor_labels)[per_donor.index[varying[c].to_numpy()]]
            raise InputError(f"covariate {c!r} is not constant within donor for "
                             f"{len(bad)} donor(s): {_examples(bad)}", field=f"obs[{c!r}]",
                             fix="donor covariates must have one value per donor; use a "
                                 "donor-level column (cell-level covariates are not supported)")


def intersect_genes(sc_genes: Sequence[str], bulk_genes: Sequence[str]) -> dict:
    """Intersect single-cell and bulk gene names (single-cell order kept).

    Returns a report: ``kept`` (list), ``dropped_sc`` / ``dropped_bulk`` (genes only in one),
    and their counts. InputError if nothing is shared.
    """
    sc = pd.Index(np.asarray(sc_genes, dtype=object).astype(str))
    bk = pd.Index(np.asarray(bulk_genes, dtype=object).astype(str))
    kept = sc[sc.isin(bk)]
    if len(kept) == 0:
        raise InputError(f"no gene is shared between single-cell ({_examples(sc)}) and bulk "
                         f"({_examples(bk)}) data", field="bulk genes",
                         fix="use the same gene identifiers in both (e.g. both Ensembl IDs), "
                             "or check the orientation (genes_x_samples vs samples_x_genes)")
    dropped_sc = sc[~sc.isin(bk)]
    dropped_bulk = bk[~bk.isin(sc)]
    return {"n_kept": int(len(kept)), "n_dropped_sc": int(len(dropped_sc)),
            "n_dropped_bulk": int(len(dropped_bulk)), "kept": kept.tolist(),
            "dropped_sc": dropped_sc.tolist(), "dropped_bulk": dropped_bulk.tolist()}
