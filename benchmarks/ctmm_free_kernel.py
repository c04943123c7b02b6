"""CTMM Free closed-form kernel against the generic compiled kernel, and the restarts' yield.

``--check``: every fit of the check sets with the Free closed forms
(``scdist.ctmm.blockkernel.FREE_CLOSED_FORM = True``, the default) and with the generic loops
(``False``), compared: which fits are regular (converged), estimates, log-likelihoods, GLS
beta, iterations and p-values (bit-identical, else the largest difference over regular fits).
Sets: the reference's 300-gene mixed set (N = 94, Hom + Free REML, LRT + Wald), 1,000 null
genes at N = 20 and 50 (Hom + Free REML, LRT + Wald + jackknife), 40 genes with ML and the
jackknife, 200 genes with 10 % missing pairs (REML, LRT + Wald + jackknife).

``--time``: paired per-gene CPU of the Free REML first pass (one optimisation from the
default start, no restarts) and of the whole Free REML + Wald fit (``fit_block``) on the
reference's set, the two kernels alternating in one process; medians of ``--repeats``.

``--restarts``: on the reference's set and the null sets, what restarts 2..10 change for fits
without a regular optimum after the first pass and restart 1: per start, whether it rescues
the gene (first regular optimum) or raises its best log-likelihood by more than 1e-3.

``--opt-check REV`` / ``--opt-time REV``: the current optimiser against
``scdist/ctmm/optimize.py`` at git revision REV (the same comparison as ``--check`` on the check
sets plus one with covariates and missing pairs; paired CPU of Free REML + Wald and of Free
REML + jackknife on 60 genes). ``--paired-rev REV``: paired CPU of ``ctmm.fit`` Free REML +
Wald with the whole package at REV against the current one (results checked identical).

    .venv/bin/python benchmarks/ctmm_free_kernel.py --check --time --restarts
    .venv/bin/python benchmarks/ctmm_free_kernel.py --opt-check f3ec335 --paired-rev f3ec335 --repeats 21
"""
from __future__ import annotations

import os

for _k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
    os.environ[_k] = "1"   # one core; must precede numpy's import

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

REF_SEED = 20240611
FREE_V = [0.25, 0.1, 0.05, 0.0]     # ctmm_calibration's default (only its length matters here)


def reference_set():
    from ctmm_perf import as_cube
    from ctmm_reference import simulate_ctp

    return as_cube(simulate_ctp(300, seed=REF_SEED))


def null_set(n_donors: int, reps: int = 1000):
    from ctmm_calibration import simulate

    ds = simulate(n_donors, reps, "hom", FREE_V, 7 + 1000 * n_donors)
    return ds[["mean", "nu"]]


def missing_set():
    from scdist.ctmm.simulate import simulate_ctp

    ds = simulate_ctp(200, 50, 4, hom2=0.25, V=[0.2, 0.1, 0.0, 0.0], missing_frac=0.1, seed=3)
    return ds[["mean", "nu"]]


def check_sets():
    """(name, dataset, models, method, tests) of the equality checks."""
    ref = reference_set()
    return [
        ("reference 300 genes, REML", ref, ("hom", "free"), "reml", ("lrt", "wald")),
        ("null N=20 1,000 genes, REML", null_set(20), ("hom", "free"), "reml",
         ("lrt", "wald", "jackknife")),
        ("null N=50 1,000 genes, REML", null_set(50), ("hom", "free"), "reml",
         ("lrt", "wald", "jackknife")),
        ("reference 40 genes, ML + jackknife", ref.isel(gene=slice(0, 40)), ("hom", "free"), "ml",
         ("lrt", "wald", "jackknife")),
        ("missing pairs 200 genes, REML", missing_set(), ("hom", "free"), "reml",
         ("lrt", "wald", "jackknife")),
    ]


def fit(ds, models, method, tests, closed_form: bool):
    from scdist.ctmm import blockkernel
    from scdist.ctmm.kernel import FitConfig, fit_block, test_labels

    blockkernel.FREE_CLOSED_FORM = closed_form
    try:
        cfg = FitConfig(models=tuple(models), method=method, tests=tuple(tests),
                        test_labels=test_labels(models, method, tests))
        return fit_block(ds, cfg)
    finally:
        blockkernel.FREE_CLOSED_FORM = True


def _maxdiff(a, b, where) -> float:
    a, b = np.asarray(a, float), np.asarray(b, float)
    where = np.broadcast_to(where.reshape(where.shape + (1,) * (a.ndim - where.ndim)), a.shape)
    both = where & np.isfinite(a) & np.isfinite(b)
    return float(np.abs(a - b)[both].max()) if both.any() else 0.0


def compare(gen, cf) -> dict:
    """Generic (``gen``) against closed-form (``cf``) results of one set."""
    out = {}
    for model in gen["model"].values:
        g, c = gen.sel(model=model), cf.sel(model=model)
        reg_g, reg_c = g["converged"].values, c["converged"].values
        row = {"regular": int(reg_g.sum()), "regular_sets_equal": bool((reg_g == reg_c).all()),
               "iterations_equal": bool((g["iterations"].values == c["iterations"].values).all())}
        ident = True
        for v in ("hom2", "V", "beta", "loglik"):
            a, b = g[v].values, c[v].values
            ident &= bool(np.array_equal(a, b, equal_nan=True))
            row[f"max_abs_diff_{v}_regular"] = _maxdiff(a, b, reg_g & reg_c)
            row[f"max_abs_diff_{v}_all"] = _maxdiff(a, b, np.ones_like(reg_g))
        row["bit_identical"] = ident
        both = reg_g & reg_c
        far = np.zeros(both.shape, bool)
        for v in ("hom2", "V", "beta", "loglik"):
            d = np.abs(g[v].values - c[v].values)
            far |= (d.reshape(d.shape[0], -1) > 1e-8).any(axis=1)
        row["regular_genes_differing_1e-8"] = int((far & both).sum())
        out[str(model)] = row
    if "pvalue" in gen:
        pv = {}
        for t in gen["test"].values:
            a, b = gen["pvalue"].sel(test=t).values, cf["pvalue"].sel(test=t).values
            same_nan = bool((np.isnan(a) == np.isnan(b)).all())
            pv[str(t)] = {"bit_identical": bool(np.array_equal(a, b, equal_nan=True)),
                          "same_tested_genes": same_nan,
                          "max_abs_diff": _maxdiff(a, b, np.ones(a.shape, bool)),
                          "genes_differing_1e-8": int((np.abs(a - b) > 1e-8).sum()),
                          "rejections_at_0.05": [int((a < 0.05).sum()), int((b < 0.05).sum())]}
        out["pvalue"] = pv
    return out


def run_check() -> dict:
    res = {}
    for name, ds, models, method, tests in check_sets():
        gen = fit(ds, models, method, tests, False)
        cf = fit(ds, models, method, tests, True)
        res[name] = compare(gen, cf)
        print(name, json.dumps(res[name], indent=1), flush=True)
    return res


def run_time(repeats: int) -> dict:
    """Paired CPU per gene: first pass and whole Free REML + Wald fit, both kernels."""
    from scdist.ctmm import blockkernel
    from scdist.ctmm.kernel import FitConfig, _Fitter
    from scdist.ctmm.optimize import maximize

    ds = reference_set()
    G = ds.sizes["gene"]
    Y = ds["mean"].transpose("gene", "donor", "celltype").values
    NU = ds["nu"].transpose("gene", "donor", "celltype").values
    fitter = _Fitter(Y, NU, np.isfinite(Y), None, [], None, 4, FitConfig(models=("free",)))
    prob = fitter.problem("free")
    th0 = fitter.start("free")
    for cf in (False, True):        # compile / load both paths outside the timings
        fit(ds.isel(gene=slice(0, 8)), ("free",), "reml", ("wald",), cf)
    times = {k: {"generic": [], "closed_form": []} for k in ("first_pass", "free_reml_wald")}
    load_before = os.getloadavg()
    for r in range(repeats):
        for cf in ((False, True) if r % 2 == 0 else (True, False)):
            key = "closed_form" if cf else "generic"
            blockkernel.FREE_CLOSED_FORM = cf
            t = time.process_time()
            maximize(prob, th0, "reml")
            times["first_pass"][key].append((time.process_time() - t) / G * 1e3)
            blockkernel.FREE_CLOSED_FORM = True
            t = time.process_time()
            fit(ds, ("free",), "reml", ("wald",), cf)
            times["free_reml_wald"][key].append((time.process_time() - t) / G * 1e3)
    out = {"load_before": load_before}
    for k, v in times.items():
        med = {kk: float(np.median(vv)) for kk, vv in v.items()}
        out[k] = {"cpu_ms_per_gene_median": med, "runs": v,
                  "speedup": med["generic"] / med["closed_form"]}
        print(k, {kk: round(x, 3) for kk, x in med.items()},
              f"speed-up {out[k]['speedup']:.2f}x", flush=True)
    out["load_after"] = os.getloadavg()
    return out


def restart_yield(ds, method: str = "reml") -> dict:
    """What each restart start did for the genes still without a regular optimum.

    Replays ``maximize_with_restarts`` on the Free fits, recording every restart round's
    optimisation (the draws are those of the fit); per start j = 1..n: rescues (first regular
    optimum of a gene that had none) and raises (no rescue, best log-likelihood up by > 1e-3)."""
    from scdist.ctmm import optimize
    from scdist.ctmm.kernel import FitConfig, _Fitter

    Y = ds["mean"].transpose("gene", "donor", "celltype").values
    NU = ds["nu"].transpose("gene", "donor", "celltype").values
    mask = np.isfinite(Y) & np.isfinite(NU)
    C = Y.shape[2]
    cfg = FitConfig(models=("free",), method=method)
    fitter = _Fitter(Y, NU, mask, None, [], None, C, cfg)
    prob = fitter.problem("free")
    rounds = []
    orig = optimize.maximize

    def spy(p, th, m, **kw):
        r = orig(p, th, m, **kw)
        if kw.get("abandon", 0) > 0:
            rounds.append((np.asarray(kw["rows"]), r))
        return r

    optimize.maximize = spy
    try:
        first = orig(prob, fitter.start("free"), method)
        first.converged &= ~optimize.near_edge(first)
        ll0 = first.loglik.copy()
        reg0 = first.converged.copy()
        res = optimize.maximize_with_restarts(prob, fitter.start("free"), method,
                                              random_start=fitter.random_start("free"),
                                              n_restarts=cfg.n_restarts, seed=cfg.seed,
                                              stop_after=0)
    finally:
        optimize.maximize = orig
    # replay the starts in order per gene
    per_start = {}
    best = {int(g): ll0[g] for g in np.flatnonzero(~reg0)}
    rescued = set()
    j0 = 0
    for rows, r in rounds:
        reg = r.converged & ~optimize.near_edge(r)
        genes = np.unique(rows)
        k = rows.size // genes.size
        for j in range(k):
            sl = slice(j * genes.size, (j + 1) * genes.size)
            resc = raise_ = tried = 0
            for g, rg, ll in zip(rows[sl], reg[sl], r.loglik[sl]):
                g = int(g)
                if g in rescued:
                    continue
                tried += 1
                if rg:
                    rescued.add(g)
                    resc += 1
                elif np.isfinite(ll) and ll > best[g] + 1e-3:
                    raise_ += 1
                if np.isfinite(ll) and ll > best[g]:
                    best[g] = ll
            per_start[j0 + j + 1] = {"genes_without_regular_optimum": tried, "rescued": resc,
                                     "best_loglik_raised_by_more_than_1e-3": raise_}
        j0 += k
    return {"genes": int(prob.rows), "regular_after_first_pass": int(reg0.sum()),
            "regular_after_restarts": int(res.converged.sum()), "per_start": per_start}


def run_restarts() -> dict:
    out = {}
    for name, ds in (("reference 300 genes", reference_set()), ("null N=20", null_set(20)),
                     ("null N=50", null_set(50))):
        out[name] = restart_yield(ds)
        print(name, json.dumps(out[name]), flush=True)
    return out


def fit_stop(ds, models, method, tests, stop_after: int):
    from scdist.ctmm import optimize

    old = optimize.RESTART_STOP_AFTER
    optimize.RESTART_STOP_AFTER = stop_after
    try:
        return fit(ds, models, method, tests, True)
    finally:
        optimize.RESTART_STOP_AFTER = old


def run_stop(stop_after: int, repeats: int) -> dict:
    """The multi-start stopping rule (``stop_after``) against every gene getting all ten
    restarts (0): which Free fits are regular, regular estimates, every positive rate at
    alpha = 0.05 (null sets: false positive rates) and CPU of Free REML + Wald (paired)."""
    out = {}
    sets = [("reference 300 genes", reference_set(), ("lrt", "wald")),
            ("null N=20", null_set(20), ("lrt", "wald", "jackknife")),
            ("null N=50", null_set(50), ("lrt", "wald", "jackknife"))]
    for name, ds, tests in sets:
        a = fit_stop(ds, ("hom", "free"), "reml", tests, 0)
        b = fit_stop(ds, ("hom", "free"), "reml", tests, stop_after)
        row = compare(a, b)
        fa, fb = a.sel(model="free"), b.sel(model="free")
        nonreg = ~fa["converged"].values
        dl = (fb["loglik"].values - fa["loglik"].values)[nonreg]
        row["free_nonregular_loglik_change"] = {
            "genes": int(nonreg.sum()), "median": float(np.nanmedian(dl)) if dl.size else 0.0,
            "min": float(np.nanmin(dl)) if dl.size else 0.0}
        row["iterations_total"] = [int(fa["iterations"].sum()), int(fb["iterations"].sum())]
        out[name] = row
        print(name, json.dumps(row), flush=True)
    ds = sets[0][1]
    G = ds.sizes["gene"]
    for s in (0, stop_after):
        fit_stop(ds.isel(gene=slice(0, 8)), ("free",), "reml", ("wald",), s)
    runs = {0: [], stop_after: []}
    for r in range(repeats):
        for s in ((0, stop_after) if r % 2 == 0 else (stop_after, 0)):
            t = time.process_time()
            fit_stop(ds, ("free",), "reml", ("wald",), s)
            runs[s].append((time.process_time() - t) / G * 1e3)
    med = {str(k): float(np.median(v)) for k, v in runs.items()}
    out["free_reml_wald_cpu_ms_per_gene"] = {"median": med, "runs": {str(k): v for k, v in
                                                                      runs.items()},
                                             "load": os.getloadavg()}
    print("Free REML + Wald ms/gene (stop_after: median)", med, flush=True)
    return out


def run_op_split(G: int = 128, repeats: int = 2) -> dict:
    """Where OP's cost goes: CPU of the full fits (optimiser with restarts) and of the
    jackknife refits, per data kind (CTP, OP) and model, in one in-process REML fit (Hom +
    Free, LRT + Wald + jackknife) of a Free-simulated block with its OP variables (the
    transcriptome benchmark's simulation)."""
    import scdist.ctmm as ctmm
    from scdist.ctmm import kernel
    from scdist.ctmm.kernel import FitConfig, fit_block, test_labels

    sim = ctmm.simulate_ctp(G, 94, 4, hom2=0.2, V=[0.1, 0.2, 0.0, 0.1], seed=0)
    ds = sim.drop_vars([v for v in sim.data_vars if v.startswith("true_")])
    models, tests = ("hom", "free"), ("lrt", "wald", "jackknife")
    cfg = FitConfig(models=models, method="reml", tests=tests, op=True,
                    test_labels=test_labels(models, "reml", tests))
    fit_block(ds.isel(gene=slice(0, 8)), cfg)
    acc: dict = {}
    orig = {"full": kernel.maximize_with_restarts, "jackknife": kernel.jackknife_reml}

    def timed(part):
        def f(prob, *a, **kw):
            t = time.process_time()
            r = orig[part](prob, *a, **kw)
            kind = "OP" if prob.X.shape[1] == 1 else "CTP"
            model = "hom" if prob.n_vc == 1 else "free"
            key = f"{kind} {model} {part}"
            acc[key] = acc.get(key, 0.0) + time.process_time() - t
            return r
        return f

    kernel.maximize_with_restarts = timed("full")
    kernel.jackknife_reml = timed("jackknife")
    try:
        total = 0.0
        for _ in range(repeats):
            t = time.process_time()
            fit_block(ds, cfg)
            total += time.process_time() - t
    finally:
        kernel.maximize_with_restarts = orig["full"]
        kernel.jackknife_reml = orig["jackknife"]
    out = {"genes": G, "load": os.getloadavg(),
           "total_cpu_ms_per_gene": total / repeats / G * 1e3,
           "cpu_ms_per_gene": {k: v / repeats / G * 1e3 for k, v in sorted(acc.items())}}
    print(json.dumps(out, indent=1), flush=True)
    return out


def op_check_sets():
    """(name, dataset with op_mean / op_nu / P, models, method, tests, covariates) of the OP
    equality checks: null genes at N = 20 and 50, the OP split's Free set (N = 94), ML with
    the jackknife, Full, and covariates with 10 % of the donors' OP missing."""
    from scdist.ctmm.simulate import simulate_ctp

    def sim(G, N, V, seed, **kw):
        ds = simulate_ctp(G, N, 4, hom2=0.2, V=V, seed=seed, **kw)
        return ds.drop_vars([v for v in ds.data_vars if v.startswith("true_")])

    miss = sim(200, 50, [0.2, 0.1, 0.0, 0.0], 5, n_covariates=2)
    hole = np.random.default_rng(5).random(miss["op_mean"].shape) < 0.1
    miss["op_mean"] = miss["op_mean"].where(~hole)
    miss["op_nu"] = miss["op_nu"].where(~hole)
    jk = ("lrt", "wald", "jackknife")
    return [
        ("OP null N=20 1,000 genes, REML", sim(1000, 20, None, 20), ("hom", "free"), "reml", jk, ()),
        ("OP null N=50 1,000 genes, REML", sim(1000, 50, None, 50), ("hom", "free"), "reml", jk, ()),
        ("OP Free N=94 128 genes, REML", sim(128, 94, [0.1, 0.2, 0.0, 0.1], 0), ("hom", "free"),
         "reml", jk, ()),
        ("OP Free N=94 60 genes, ML", sim(60, 94, [0.1, 0.2, 0.0, 0.1], 1), ("hom", "free"), "ml",
         jk, ()),
        ("OP Full N=50 100 genes, REML", sim(100, 50, [0.1, 0.2, 0.0, 0.1], 2),
         ("hom", "free", "full"), "reml", ("lrt", "wald"), ()),
        ("OP covariates + 10 % missing N=50 200 genes, REML", miss, ("hom", "free"), "reml", jk,
         ("cov0", "cov1")),
    ]


def fit_op(ds, models, method, tests, covariates, scalar_form: bool):
    """The OP part of ``fit_block`` (OP variables only) with the scalar kernel on or off."""
    import xarray as xr

    from scdist.ctmm import scalar
    from scdist.ctmm.kernel import FitConfig, _assemble, _fit_kind, donor_inputs, test_labels

    scalar.SCALAR_FORM = scalar_form
    try:
        cfg = FitConfig(models=tuple(models), method=method, tests=tuple(tests), op=True,
                        covariates=tuple(covariates), test_labels=test_labels(models, method, tests))
        Y = np.asarray(ds["op_mean"].transpose("gene", "donor").values, float)[..., None]
        NU = np.asarray(ds["op_nu"].transpose("gene", "donor").values, float)[..., None]
        P = np.asarray(ds["P"].transpose("donor", "celltype").values, float)
        Z, factors = donor_inputs(ds, cfg)
        t = time.process_time()
        fitter, fits, tests_o = _fit_kind(Y, NU, np.isfinite(Y) & np.isfinite(NU), Z, factors,
                                          P, P.shape[1], cfg)
        cpu = time.process_time() - t
        d = _assemble(fits, tests_o, fitter, cfg, "", {})
        coords = {"model": list(models)}
        if cfg.test_labels:
            coords["test"] = list(cfg.test_labels)
        return xr.Dataset(d, coords=coords), cpu
    finally:
        scalar.SCALAR_FORM = True


def run_op_check() -> dict:
    """OP fits with the scalar kernel against the block kernel (``scalar.SCALAR_FORM``):
    regular sets, estimates, log-likelihoods, p-values; and each side's CPU per gene."""
    res = {}
    for name, ds, models, method, tests, covs in op_check_sets():
        blk, t_blk = fit_op(ds, models, method, tests, covs, False)
        sca, t_sca = fit_op(ds, models, method, tests, covs, True)
        row = compare(blk, sca)
        # the problems' own conditioning: the block kernel against itself on the same data
        # with every OP noise variance nu_i raised by one part in 1e14
        tiny = ds.assign(op_nu=ds["op_nu"] * (1.0 + 1e-14))
        blk2, _ = fit_op(tiny, models, method, tests, covs, False)
        row["noise_floor_block_vs_block_nu_1e-14"] = compare(blk, blk2)
        G = ds.sizes["gene"]
        row["cpu_ms_per_gene"] = {"block": t_blk / G * 1e3, "scalar": t_sca / G * 1e3}
        res[name] = row
        print(name, json.dumps(row, indent=1), flush=True)
    return res


def _lapack_solve(A, g):
    """The optimiser's earlier batched LAPACK solve (NaN rows where A is singular)."""
    try:
        return np.linalg.solve(A, g[..., None])[..., 0]
    except np.linalg.LinAlgError:
        d = np.full_like(g, np.nan)
        for i in range(len(g)):
            try:
                d[i] = np.linalg.solve(A[i], g[i])
            except np.linalg.LinAlgError:
                pass
        return d


def run_solver_check() -> dict:
    """The optimiser's compiled small solve (``linalg.solve_small``) against the batched
    LAPACK solve it replaced, on the check sets (same comparison as ``--check``)."""
    from scdist.ctmm import optimize

    res = {}
    for name, ds, models, method, tests in check_sets():
        compiled = optimize.solve_small
        optimize.solve_small = _lapack_solve
        try:
            old = fit(ds, models, method, tests, True)
        finally:
            optimize.solve_small = compiled
        new = fit(ds, models, method, tests, True)
        res[name] = compare(old, new)
        print(name, json.dumps(res[name]), flush=True)
    return res


def optimizer_at(rev: str):
    """``scdist/ctmm/optimize.py`` as of git revision ``rev``, loaded as a module of the
    package (its relative imports resolve against the current code)."""
    import importlib.util
    import subprocess
    import tempfile

    src = subprocess.run(["git", "show", f"{rev}:scdist/ctmm/optimize.py"], cwd=HERE.parent,
                         check=True, capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / "optimize_at_rev.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("scdist.ctmm._optimize_at_rev", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def fit_with(mod, ds, models, method, tests, covariates=()):
    """``fit_block`` with the restarts' optimiser taken from module ``mod`` (None: current)."""
    from scdist.ctmm import jackknife, kernel, optimize
    from scdist.ctmm.kernel import FitConfig, fit_block, test_labels

    mwr = (mod or optimize).maximize_with_restarts
    saved = kernel.maximize_with_restarts, jackknife.maximize_with_restarts
    kernel.maximize_with_restarts = jackknife.maximize_with_restarts = mwr
    try:
        cfg = FitConfig(models=tuple(models), method=method, tests=tuple(tests),
                        covariates=tuple(covariates), test_labels=test_labels(models, method, tests))
        return fit_block(ds, cfg)
    finally:
        kernel.maximize_with_restarts, jackknife.maximize_with_restarts = saved


def covariate_missing_set():
    """200 genes, N = 50, two donor covariates, 10 % missing pairs (CTP)."""
    from scdist.ctmm.simulate import simulate_ctp

    ds = simulate_ctp(200, 50, 4, hom2=0.25, V=[0.2, 0.1, 0.0, 0.0], missing_frac=0.1, seed=11,
                      n_covariates=2)
    return ds.drop_vars([v for v in ds.data_vars if v.startswith("true_") or v.startswith("op_")
                         or v == "P"])


def run_opt_check(rev: str) -> dict:
    """The current optimiser against the one at git revision ``rev`` on the check sets plus a
    set with covariates and missing pairs (same comparison as ``--check``)."""
    old = optimizer_at(rev)
    sets = [s + ((),) for s in check_sets()]
    sets.append(("covariates + missing pairs 200 genes, REML", covariate_missing_set(),
                 ("hom", "free"), "reml", ("lrt", "wald", "jackknife"), ("cov0", "cov1")))
    res = {"rev": rev}
    for name, ds, models, method, tests, covs in sets:
        a = fit_with(old, ds, models, method, tests, covs)
        b = fit_with(None, ds, models, method, tests, covs)
        res[name] = compare(a, b)
        print(name, json.dumps(res[name]), flush=True)
    return res


def run_opt_time(rev: str, repeats: int) -> dict:
    """Paired CPU per gene of Free REML + Wald (and Free REML + jackknife on the first 60
    genes) on the reference's set: the optimiser at ``rev`` against the current one,
    alternating in one process; medians of ``repeats``."""
    old = optimizer_at(rev)
    ds = reference_set()
    jk = ds.isel(gene=slice(0, 60))
    parts = {"free_reml_wald": (ds, ("wald",)), "free_reml_jackknife_60": (jk, ("jackknife",))}
    for mod in (old, None):
        fit_with(mod, ds.isel(gene=slice(0, 8)), ("free",), "reml", ("wald",))
    runs = {k: {"old": [], "new": []} for k in parts}
    load = [os.getloadavg()]
    for r in range(repeats):
        for key, (d, tests) in parts.items():
            for tag in (("old", "new") if r % 2 == 0 else ("new", "old")):
                t = time.process_time()
                fit_with(old if tag == "old" else None, d, ("free",), "reml", tests)
                runs[key][tag].append((time.process_time() - t) / d.sizes["gene"] * 1e3)
    load.append(os.getloadavg())
    out = {"rev": rev, "load": load}
    for key, v in runs.items():
        med = {k: float(np.median(x)) for k, x in v.items()}
        out[key] = {"cpu_ms_per_gene_median": med, "runs": v, "speedup": med["old"] / med["new"]}
        print(key, {k: round(x, 4) for k, x in med.items()}, f"{med['old'] / med['new']:.3f}x",
              flush=True)
    return out


def package_at(rev: str):
    """The whole ``scdist`` package as of git revision ``rev``, importable as ``scdist_at_rev``
    (extracted to a temporary directory; its relative imports stay inside it)."""
    import importlib
    import subprocess
    import tarfile
    import tempfile

    root = Path(tempfile.mkdtemp())
    tar = subprocess.run(["git", "archive", rev, "scdist"], cwd=HERE.parent, check=True,
                         capture_output=True).stdout
    with tarfile.open(fileobj=__import__("io").BytesIO(tar)) as tf:
        tf.extractall(root, filter="data")
    (root / "scdist").rename(root / "scdist_at_rev")
    sys.path.insert(0, str(root))
    return importlib.import_module("scdist_at_rev.ctmm")


def run_paired_rev(rev: str, repeats: int) -> dict:
    """Paired CPU per gene of ``ctmm.fit`` Free REML + Wald on the reference's 300 genes with
    the whole package at ``rev`` and the current one, alternating in one process (medians of
    ``repeats``); the two results must be identical."""
    import xarray as xr

    import scdist.ctmm as cur

    old = package_at(rev)
    ds = reference_set()
    kw = dict(models=["free"], method="reml", tests=["wald"])
    for mod in (old, cur):                  # compile / load, then one full fit each
        mod.fit(ds.isel(gene=slice(0, 8)), **kw)
    xr.testing.assert_identical(old.fit(ds, **kw).drop_attrs(), cur.fit(ds, **kw).drop_attrs())
    runs = {"old": [], "new": []}
    load = [os.getloadavg()]
    for r in range(repeats):
        for tag in (("old", "new") if r % 2 == 0 else ("new", "old")):
            t = time.process_time()
            (old if tag == "old" else cur).fit(ds, **kw)
            runs[tag].append((time.process_time() - t) / ds.sizes["gene"] * 1e3)
    load.append(os.getloadavg())
    med = {k: float(np.median(v)) for k, v in runs.items()}
    out = {"rev": rev, "results_identical": True, "cpu_ms_per_gene_median": med,
           "speedup": med["old"] / med["new"], "runs": runs, "load": load}
    print("Free REML + Wald ms/gene", {k: round(v, 4) for k, v in med.items()},
          f"{out['speedup']:.3f}x", flush=True)
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--check", action="store_true")
    ap.add_argument("--time", action="store_true")
    ap.add_argument("--restarts", action="store_true")
    ap.add_argument("--stop", type=int, default=0,
                    help="compare the multi-start stopping rule with this k against k = 0")
    ap.add_argument("--op-split", action="store_true", help="OP cost: full fits vs refits")
    ap.add_argument("--op-check", action="store_true",
                    help="OP scalar kernel against the block kernel (equality, CPU)")
    ap.add_argument("--solver-check", action="store_true",
                    help="optimiser's compiled small solve against the LAPACK one")
    ap.add_argument("--opt-check", metavar="REV",
                    help="current optimiser against optimize.py at git revision REV (equality)")
    ap.add_argument("--opt-time", metavar="REV",
                    help="paired CPU: current optimiser against optimize.py at REV")
    ap.add_argument("--paired-rev", metavar="REV",
                    help="paired CPU of Free REML + Wald: the whole package at REV vs now")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=str(HERE / "out" / "ctmm_free_kernel.json"))
    a = ap.parse_args(argv)
    res = {"load_start": os.getloadavg()}
    if a.check:
        res["check"] = run_check()
    if a.time:
        res["time"] = run_time(a.repeats)
    if a.restarts:
        res["restarts"] = run_restarts()
    if a.solver_check:
        res["solver_check"] = run_solver_check()
    if a.opt_check:
        res["opt_check"] = run_opt_check(a.opt_check)
    if a.opt_time:
        res["opt_time"] = run_opt_time(a.opt_time, a.repeats)
    if a.paired_rev:
        res["paired_rev"] = run_paired_rev(a.paired_rev, a.repeats)
    if a.op_check:
        res["op_check"] = run_op_check()
    if a.op_split:
        res["op_split"] = run_op_split()
    if a.stop:
        res[f"stop_after_{a.stop}"] = run_stop(a.stop, a.repeats)
    res["load_end"] = os.getloadavg()
    Path(a.out).parent.mkdir(exist_ok=True)
    prev = json.loads(Path(a.out).read_text()) if Path(a.out).exists() else {}
    prev.update(res)
    Path(a.out).write_text(json.dumps(prev, indent=1))


if __name__ == "__main__":
    main()
