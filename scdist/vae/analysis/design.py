"""Sample-level covariates c^s (one row per sample) and the DE design matrix X (MrVI Eq. 3)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pandas as pd

from ...errors import InputError


def sample_table(model, data, keys: Sequence[str]) -> pd.DataFrame:
    """Per-sample values of obs columns ``keys`` (index: the model's sample labels).

    Fails naming the column when a value is missing or varies within a sample (such a
    column is a cell-level, not a sample-level, covariate).
    """
    source, cats = model._resolve(data)
    cols = source.obs_columns()
    codes = cats["sample"].codes
    labels = np.asarray(model.samples, dtype=object)
    out = {}
    for key in keys:
        if key not in cols:
            raise InputError(f"obs has no column {key!r}", field=key, fix=f"use one of {cols}")
        v = pd.Series(np.asarray(source.obs_column(key)))
        if v.isna().any():
            raise InputError(f"obs column {key!r} has missing values", field=key,
                             fix="fill them or leave the covariate out")
        per = v.groupby(codes).nunique()
        if (per > 1).any():
            bad = labels[per.index[per > 1][0]]
            raise InputError(f"obs column {key!r} varies within sample {bad!r}", field=key,
                             fix="use a sample-level covariate (one value per sample)")
        first = v.groupby(codes).first()
        col = pd.Series([None] * len(labels), index=range(len(labels)), dtype=object)
        col[first.index] = first.values
        out[key] = col.values
    return pd.DataFrame(out, index=pd.Index(labels, name="sample"))


@dataclass
class Design:
    """X (S x P): intercept + covariate columns; ``names`` (P); per non-intercept column the
    two covariate codes whose decoded states are contrasted for the LFC (``lfc_low``, ``lfc_high``
    in the centred column's units) and ``kind`` ("binary" | "continuous")."""

    X: np.ndarray
    names: list[str]
    lfc_low: np.ndarray
    lfc_high: np.ndarray
    kind: list[str]


def design_matrix(table: pd.DataFrame, covariates: Sequence[str], samples_present: np.ndarray | None = None
                  ) -> Design:
    """Columns: intercept, then per covariate either the one-hot levels after the first
    (categorical / string / bool), centred; or the standardised value (numeric with > 2 values),
    or the centred 0/1 indicator (numeric with 2 values). Centring makes the intercept the
    counterfactual state at the average covariates, the reference state z^0 of the LFCs.

    LFC contrast per column: binary columns compare their two levels (x = 0 vs x = 1, others
    at the mean); continuous columns compare -1/2 and +1/2 s.d. around the mean.
    """
    cols, names, low, high, kind = [np.ones(len(table))], ["intercept"], [0.0], [0.0], ["intercept"]
    for key in covariates:
        v = table[key]
        numeric = pd.api.types.is_numeric_dtype(v.infer_objects()) and not pd.api.types.is_bool_dtype(v.infer_objects())
        if numeric:
            x = v.astype(float).to_numpy()
            uniq = np.unique(x)
            if uniq.size < 2:
                raise InputError(f"covariate {key!r} is constant over the samples", field=key,
                                 fix="drop it from the covariates")
            if uniq.size == 2:
                ind = (x == uniq[1]).astype(float)
                m = ind.mean()
                cols.append(ind - m), names.append(f"{key}[{uniq[1]:g}]"), low.append(-m), high.append(1 - m)
                kind.append("binary")
            else:
                sd = x.std()
                cols.append((x - x.mean()) / sd), names.append(key), low.append(-0.5), high.append(0.5)
                kind.append("continuous")
            continue
        levels = sorted(pd.Series(v).astype(str).unique().tolist())
        if len(levels) < 2:
            raise InputError(f"covariate {key!r} has one level over the samples", field=key,
                             fix="drop it from the covariates")
        s = pd.Series(v).astype(str).to_numpy()
        for lev in levels[1:]:
            ind = (s == lev).astype(float)
            m = ind.mean()
            cols.append(ind - m), names.append(f"{key}[{lev}]"), low.append(-m), high.append(1 - m)
            kind.append("binary")
    X = np.stack(cols, axis=1)
    if np.linalg.matrix_rank(X) < X.shape[1]:
        raise InputError(f"the design over covariates {list(covariates)} is rank deficient", field="covariates",
                         fix="drop covariates that are collinear over the samples")
    return Design(X, names, np.asarray(low), np.asarray(high), kind)
