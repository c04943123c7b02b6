"""``scdist.ctmm.fit``: the public entry point of CTMM.

Validates everything first (bad input fails with an :class:`~scdist.errors.InputError` naming
the field before any work starts), then fits gene blocks with :func:`~.kernel.fit_block`:
in-process for an in-memory Dataset without a client, on Dask otherwise (see
:mod:`scdist.ctmm.distributed`, which also writes ``results/ctmm/<run>/`` for a study).
"""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np
import xarray as xr

from ..errors import InputError
from . import covariance as cov_models
from .kernel import (JK_RULES, METHODS, TESTS, FitConfig, arrays_to_dataset, block_arrays,
                     join_blocks, test_labels)

DEFAULT_GENE_BLOCK = 256


def _as_tuple(x, field: str) -> tuple[str, ...]:
    if x is None:
        return ()
    if isinstance(x, str):
        return (x,)
    try:
        return tuple(str(v) for v in x)
    except TypeError:
        raise InputError(f"expected a list of names, got {x!r}", field=field,
                         fix=f"pass {field}=['name', ...]") from None


def make_config(data: xr.Dataset, *, models, method, tests, covariates, random_effects, op,
                n_restarts: int, seed: int, jk_rule: str = "regular") -> FitConfig:
    """Validate the arguments against ``data`` (a pseudobulk cube) and build a FitConfig."""
    models = cov_models.check_models(models)
    method = str(method).lower()
    if method not in METHODS:
        raise InputError(f"unknown method {method!r}", field="method", fix=f"use one of {METHODS}")
    tests = _as_tuple(tests, "tests")
    bad = [t for t in tests if t not in TESTS]
    if bad:
        raise InputError(f"unknown test(s) {bad}", field="tests", fix=f"use some of {TESTS}")
    if method != "he" and "lrt" in tests and not (
            ("free" in models and "hom" in models) or ("free" in models and "full" in models)):
        raise InputError("the LRTs compare free with hom (or full with free)", field="models",
                         fix="add 'free' and 'hom' to models, or drop 'lrt' from tests")
    if ("wald" in tests and method != "he" or "jackknife" in tests) and "free" not in models:
        raise InputError("Wald and jackknife tests are tests of the Free model", field="models",
                         fix="add 'free' to models or drop those tests")
    for name in ("mean", "nu"):
        if name not in data:
            raise InputError(f"the data have no {name!r} variable", field=name,
                             fix="pass a pseudobulk cube with mean and nu over (donor, celltype, gene)")
        if set(data[name].dims) != {"donor", "celltype", "gene"}:
            raise InputError(f"{name} has dims {data[name].dims}", field=name,
                             fix="use dims (donor, celltype, gene)")
    cov = _as_tuple(covariates, "covariates")
    if cov == ("all",):
        cov = tuple(str(c) for c in data["covariate"].values) if "covariates" in data else ()
    if cov:
        if "covariates" not in data:
            raise InputError("the data have no donor covariates", field="covariates",
                             fix="ingest with donor covariates, or pass covariates=None")
        have = [str(c) for c in data["covariate"].values]
        missing = [c for c in cov if c not in have]
        if missing:
            raise InputError(f"unknown covariate(s) {missing}", field="covariates",
                             fix=f"choose from {have}")
        Z = np.asarray(data["covariates"].sel(covariate=list(cov)).values, float)
        if not np.isfinite(Z).all():
            raise InputError("donor covariates contain NaN/inf", field="covariates",
                             fix="impute or drop donors with missing covariates")
    re = _as_tuple(random_effects, "random_effects")
    for name in re:
        if name not in data or data[name].dims != ("donor",):
            raise InputError(f"no donor-level variable {name!r} for a random effect",
                             field="random_effects",
                             fix="name a variable over (donor,) such as 'batch'")
    has_op = all(v in data for v in ("op_mean", "op_nu", "P"))
    if op is None:
        op = has_op
    elif op and not has_op:
        raise InputError("OP fits need op_mean, op_nu and P", field="op",
                         fix="use a pseudobulk cube from scdist, or op=False")
    C = data.sizes["celltype"]
    N = data.sizes["donor"]
    if C < 2:  # with one cell type, shared (hom2) and specific (V) variance are not identifiable
        raise InputError(f"{C} cell type(s): CTMM separates cell type-shared from -specific "
                         "variance and needs at least 2", field="celltype",
                         fix="keep at least two cell types in the cube (check celltype_key / min_cells)")
    n_par = (C + 1) + len(re) + C + len(cov)
    if N <= n_par:
        raise InputError(f"{N} donors but the Free model has {n_par} parameters", field="donor",
                         fix="use more donors or fewer covariates")
    if jk_rule not in JK_RULES:
        raise InputError(f"unknown jk_rule {jk_rule!r}", field="jk_rule",
                         fix=f"use one of {JK_RULES}")
    return FitConfig(models=models, method=method, tests=tests, covariates=cov,
                     random_effects=re, op=bool(op), n_restarts=int(n_restarts), seed=int(seed),
                     jk_rule=jk_rule, test_labels=test_labels(models, method, tests))


def check_values(block: xr.Dataset) -> None:
    """Value checks on (a block of) the cube: negative noise variances, unusable cell types."""
    nu = np.asarray(block["nu"].transpose("donor", "celltype", "gene").values, float)
    mean = np.asarray(block["mean"].transpose("donor", "celltype", "gene").values, float)
    if (nu[np.isfinite(nu)] < 0).any():
        raise InputError("negative noise variances nu", field="nu",
                         fix="nu_ic = var_ic / n_ic must be >= 0; recompute the pseudobulk")
    if np.isinf(mean).any():
        raise InputError("infinite pseudobulk means", field="mean", fix="recompute the pseudobulk")
    obs = np.isfinite(mean) & np.isfinite(nu)                 # (donor, celltype, gene)
    if obs.size:
        donors_per_ct = obs.any(axis=2).sum(axis=0)
        ct = [str(c) for c, n in zip(block["celltype"].values, donors_per_ct) if n < 2]
        if ct:
            raise InputError(f"cell type(s) {ct} observed in fewer than 2 donors", field="celltype",
                             fix="drop those cell types from the cube or lower min_cells")


def _impute(ds: xr.Dataset, seed: int) -> xr.Dataset:
    try:
        from .impute import soft_impute_ctp
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise InputError("softImpute imputation is not available", field="missing",
                         fix="use missing='drop'") from exc
    mean = ds["mean"].transpose("donor", "celltype", "gene").values
    nu = ds["nu"].transpose("donor", "celltype", "gene").values
    imp = soft_impute_ctp(mean, nu, seed=seed)
    out = ds.copy()
    out["mean"] = (("donor", "celltype", "gene"), imp.mean)
    out["nu"] = (("donor", "celltype", "gene"), imp.nu)
    return out


def _is_study(data) -> bool:
    return hasattr(data, "pseudobulk") and hasattr(data, "result_url")


def fit(data, *, models: Sequence[str] = ("hom", "free"), method: str = "reml",
        tests: Sequence[str] = TESTS, covariates: Sequence[str] | None = None,
        random_effects: Sequence[str] | None = None, client=None,
        gene_block: int | None = None, missing: str = "drop", op: bool | None = None,
        run: str = "default", genes: Sequence[str] | None = None, n_restarts: int = 10,
        seed: int = 0, overwrite: bool = False, progress=None, n_workers: int | None = None,
        jk_rule: str = "regular") -> xr.Dataset:
    """Fit CTMM (Chen & Dahl) per gene and test for cell type-specific variance.

    Model (Eq 3, CTP): ``y_ic = beta_c + z_i' gamma + alpha_i + Gamma_ic + delta_ic`` with
    ``alpha_i ~ N(0, hom2)`` (sigma_alpha^2), ``Gamma_i ~ N(0, V)``, ``delta_ic ~ N(0, nu_ic)``;
    OP (Eq 2) is fitted too when ``op_mean``/``op_nu``/``P`` are present.

    Parameters
    ----------
    data : a study (path, URL or :class:`~scdist.store.Study`; reads ``pseudobulk/`` and writes
        ``results/ctmm/<run>/``) or an in-memory ``xarray.Dataset`` with ``mean`` (y_ic) and
        ``nu`` (nu_ic) over (donor, celltype, gene), NaN for missing pairs; optional
        ``covariates(donor, covariate)``, ``batch(donor)``, ``op_mean``/``op_nu(donor, gene)``
        and ``P(donor, celltype)``.
    models : subset of "hom" (V = 0), "iid" (V = v I), "free" (diagonal V), "full" (any V,
        hom2 = 0).
    method : "reml", "ml" or "he" (Haseman-Elston, closed form).
    tests : subset of "lrt", "wald", "jackknife" (see result's ``test`` coordinate).
    covariates : donor covariate names (from ``covariates``) as fixed effects; "all" for all.
    random_effects : donor-level categorical variables (e.g. "batch") as extra random effects.
    client : a ``distributed.Client``; with a study and no client an embedded LocalCluster
        (``n_workers``) is started.
    gene_block : genes per task (rounded to whole chunks of the stored cube).
    missing : "drop" (missing pairs leave the likelihood) or "impute" (softImpute, transcriptome-wide).
    op : fit OP too (default: when the data have it).
    run : result name under ``results/ctmm/`` (study only); ``overwrite`` replaces a run made
        with other settings. ``genes``: subset of gene names. ``seed``: restarts' random starts.
    jk_rule : which ML/REML leave-one-out refits the jackknife tests may use (genes whose
        refits break the rule get NaN): "regular" (default: full fit and every refit regular
        optima), "edge", "drop" or "all" -- see ``scdist.ctmm.kernel.jackknife_usable``.

    Returns
    -------
    xarray.Dataset with dims model, gene, celltype, celltype2, test: ``hom2(model, gene)``,
    ``V(model, gene, celltype, celltype2)``, ``beta(model, gene, celltype)``,
    ``gamma(model, gene, covariate)``, ``re_var(model, gene, random_effect)``,
    ``loglik(model, gene)``, ``converged``, ``iterations``, ``pvalue(test, gene)``; OP results
    as the same names prefixed ``op_``; ``attrs['method']`` etc.
    """
    if missing not in ("drop", "impute"):
        raise InputError(f"unknown missing={missing!r}", field="missing", fix="use 'drop' or 'impute'")
    study = None
    if isinstance(data, (str, os.PathLike)):
        from ..store import open_study

        study = open_study(str(data))
    elif _is_study(data):
        study = data
    elif not isinstance(data, xr.Dataset):
        raise InputError(f"cannot fit CTMM to a {type(data).__name__}", field="data",
                         fix="pass a study path / Study or an xarray.Dataset with mean and nu")
    ds = study.pseudobulk() if study is not None else data
    if genes is not None:
        genes = [str(g) for g in genes]
        have = set(map(str, ds["gene"].values))
        unknown = [g for g in genes if g not in have]
        if unknown:
            raise InputError(f"{len(unknown)} unknown genes, e.g. {unknown[:3]}", field="genes",
                             fix="use names from the cube's gene coordinate")
        ds = ds.sel(gene=genes)
    cfg = make_config(ds, models=models, method=method, tests=tests, covariates=covariates,
                      random_effects=random_effects, op=op, n_restarts=n_restarts, seed=seed,
                      jk_rule=jk_rule)
    if study is not None:
        from .distributed import fit_study

        return fit_study(study, ds, cfg, client=client, gene_block=gene_block, missing=missing,
                         run=run, overwrite=overwrite, progress=progress, n_workers=n_workers,
                         subset=genes is not None)
    ds = ds.load() if hasattr(ds, "load") else ds
    check_values(ds)
    if missing == "impute":
        ds = _impute(ds, seed)
    block = int(gene_block or DEFAULT_GENE_BLOCK)
    G = ds.sizes["gene"]
    slices = [slice(s, min(G, s + block)) for s in range(0, G, block)]
    if client is not None:
        from .distributed import fit_in_memory

        parts = fit_in_memory(client, ds, slices, cfg, progress=progress)
        res = xr.concat(parts, dim="gene", data_vars="minimal", coords="minimal",
                        compat="override", join="override") if len(parts) > 1 else parts[0]
    else:
        # in-process: the blocks' arrays are joined and one Dataset is built
        arrays = []
        for sl in slices:
            arrays.append(block_arrays(ds.isel(gene=sl), cfg))
            if progress is not None:
                progress.update(1)
        res = arrays_to_dataset(*join_blocks(arrays))
    res.attrs.update(result_attrs(cfg, missing))
    return res


def result_attrs(cfg: FitConfig, missing: str) -> dict:
    """JSON-able attributes recorded with every result."""
    from .. import __version__

    return {"method": cfg.method, "models": list(cfg.models), "tests": list(cfg.tests),
            "covariates": list(cfg.covariates), "random_effects": list(cfg.random_effects),
            "missing": missing, "op": bool(cfg.op), "seed": cfg.seed,
            "n_restarts": cfg.n_restarts, "jk_rule": cfg.jk_rule,
            "loglik": ("log-likelihood including constants: ML -1/2[n log 2pi + log|S| + r'S^-1 r]; "
                       "REML -1/2[(n-p) log 2pi + log|S| + log|X'S^-1 X| + y'Py]; NaN for HE"),
            "scdist_version": __version__}
