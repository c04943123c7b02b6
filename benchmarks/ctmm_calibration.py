"""CTMM calibration and power (the paper's Figure 1) on scdist's own simulator.

For each sample size N in ``--ns`` (default 20, 50, 100, 300) and each model (Hom: V = 0;
Free: V = diag(``--free-v``)), ``--reps`` replicate genes (default 1,000) are simulated from
Eq 3 (CTP) with ``scdist.ctmm.simulate.simulate_ctp`` (hom2 = 0.25, beta = (1, .67, .33, 0),
nu_ic ~ Gamma with mean 0.2 and CV 0.5, P_i ~ Dirichlet(5)) together with the overall
pseudobulk of Eq 2 (OP, y_i = sum_c P_ic y_ic), and fitted with

- REML: Free vs Hom LRT (df C), Wald with the inverse Fisher information (F(C, N - R)),
  jackknife Wald (F(C, N - R));
- HE: jackknife Wald.

The positive rate at alpha = 0.05 is the false positive rate under Hom and the power under
Free; the table gives it with its binomial standard error.  Genes are fitted on an embedded
Dask LocalCluster (``--workers``), blocks of genes per task, via ``scdist.ctmm.fit(...,
client=...)``.  Usage::

    .venv/bin/python benchmarks/ctmm_calibration.py                       # ~1,000 reps
    .venv/bin/python benchmarks/ctmm_calibration.py --reps 200 --ns 20 50
    .venv/bin/python benchmarks/ctmm_calibration.py --jk-rules --reps 1000   # jackknife rules

``--jk-rules`` fits CTP (REML with every gene jackknifed, and HE) once per gene block on the
workers and reports, for each jackknife rule of ``scdist.ctmm.kernel.jackknife_usable``, the
positive rate over the genes the rule tests (exact 95% CI) and the share of genes it tests.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ALPHA = 0.05
TESTS = [("REML (LRT)", "reml", "free_vs_hom_lrt"), ("REML (Wald)", "reml", "free_vs_hom_wald"),
         ("REML (JK)", "reml", "free_vs_hom_jackknife"), ("HE (JK)", "he", "free_vs_hom_jackknife")]


def simulate(n_donors: int, reps: int, model: str, free_v, seed: int):
    from scdist.ctmm.simulate import simulate_ctp

    V = None if model == "hom" else np.asarray(free_v, float)
    return simulate_ctp(n_genes=reps, n_donors=n_donors, n_celltypes=len(free_v), hom2=0.25,
                        V=V, seed=seed)


def clopper_pearson(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Exact binomial confidence interval of a rate k / n."""
    from scipy import stats

    a = (1 - level) / 2
    lo = stats.beta.ppf(a, k, n - k + 1) if k > 0 else 0.0
    hi = stats.beta.ppf(1 - a, k + 1, n - k) if k < n else 1.0
    return float(lo), float(hi)


def positive_rates(ds, client, op: bool = True) -> dict:
    """{(data, test label): positive rate, n, 95% CI} for CTP (and OP).

    Wald and jackknife p-values are NaN for genes without a regular Free fit (an optimum on
    the singular-covariance edge, ``converged=False``); the rate is over the tested genes and
    ``rate_all`` counts the untested ones as not significant."""
    import scdist.ctmm as ctmm

    out = {}
    fits = {
        "reml": ctmm.fit(ds, models=["hom", "free"], method="reml",
                         tests=["lrt", "wald", "jackknife"], client=client, op=op),
        "he": ctmm.fit(ds, models=["hom", "free"], method="he", tests=["jackknife"],
                       client=client, op=op),
    }
    for data, prefix in (("CTP", ""), ("OP", "op_")):
        var = f"{prefix}converged"
        if var in fits["reml"]:
            out[f"{data} REML regular Free fits"] = {
                "rate": float(fits["reml"][var].sel(model="free").mean()), "n": ds.sizes["gene"]}
    for name, method, label in TESTS:
        for data, var in (("CTP", "pvalue"), ("OP", "op_pvalue")):
            res = fits[method]
            if var not in res or label not in res[var]["test"].values:
                continue
            p = res[var].sel(test=label).values
            ok = np.isfinite(p)
            k = int((p[ok] < ALPHA).sum())
            out[f"{data} {name}"] = {"rate": k / max(int(ok.sum()), 1), "n": int(ok.sum()),
                                     "n_nan": int((~ok).sum()), "rate_all": k / p.size,
                                     "ci95": clopper_pearson(k, int(ok.sum()))}
    return out


JK_RULES = ("regular", "edge", "drop", "all")


def block_pvalues(block, op: bool = False) -> dict:
    """Per-gene p-values of one gene block for every test and every jackknife rule.

    One REML fit with ``jk_rule="all"`` (every gene jackknifed) gives the replicates; each
    rule of ``scdist.ctmm.kernel.jackknife_usable`` then decides which genes it tests, so the
    rules are compared on the same fits. Runs on a Dask worker."""
    from scdist.ctmm.kernel import (FitConfig, _fit_kind, jackknife_pvalues, test_labels,
                                    wald_df2)

    out = {}
    kinds = [("CTP", "mean", "nu", None)]
    if op:
        kinds.append(("OP", "op_mean", "op_nu", "P"))
    for data, ym, nm, pn in kinds:
        if pn is None:
            Y = block[ym].transpose("gene", "donor", "celltype").values
            NU = block[nm].transpose("gene", "donor", "celltype").values
            P = None
        else:
            Y = block[ym].transpose("gene", "donor").values[..., None]
            NU = block[nm].transpose("gene", "donor").values[..., None]
            P = block[pn].transpose("donor", "celltype").values
        mask = np.isfinite(Y) & np.isfinite(NU)
        C = block.sizes["celltype"]
        tests = ("lrt", "wald", "jackknife")
        models = ("hom", "free")
        cfg = FitConfig(models=models, method="reml", tests=tests, jk_rule="all",
                        test_labels=test_labels(models, "reml", tests))
        fitter, fits, pv = _fit_kind(Y, NU, mask, None, [], P, C, cfg)
        free = fits["free"]
        out[f"{data} REML (LRT)"] = pv["free_vs_hom_lrt"]
        out[f"{data} REML (Wald)"] = pv["free_vs_hom_wald"]
        df2 = wald_df2(fitter, free["weight"])
        for rule in JK_RULES:
            out[f"{data} REML (JK, {rule})"] = jackknife_pvalues(
                free, free["weight"], C, df2, rule)["free_vs_hom_jackknife"]
        out[f"{data} regular Free fit"] = free["converged"].astype(float)
        he = FitConfig(models=models, method="he", tests=("jackknife",),
                       test_labels=test_labels(models, "he", ("jackknife",)))
        out[f"{data} HE (JK)"] = _fit_kind(Y, NU, mask, None, [], P, C, he)[2]["free_vs_hom_jackknife"]
    return out


def rule_rates(ds, client, block: int = 50, op: bool = False) -> dict:
    """Positive rate over tested genes (exact CI), share of genes tested, for every test."""
    G = ds.sizes["gene"]
    blocks = [ds.isel(gene=slice(s, min(G, s + block))) for s in range(0, G, block)]
    futs = client.map(block_pvalues, blocks, op=op, pure=False)
    parts = client.gather(futs)
    out = {}
    for name in parts[0]:
        p = np.concatenate([q[name] for q in parts])
        if name.endswith("regular Free fit"):
            out[name] = {"rate": float(p.mean()), "n": int(p.size)}
            continue
        ok = np.isfinite(p)
        k = int((p[ok] < ALPHA).sum())
        out[name] = {"rate": k / max(int(ok.sum()), 1), "n": int(ok.sum()),
                     "tested": float(ok.mean()), "rate_all": k / p.size,
                     "ci95": clopper_pearson(k, int(ok.sum()))}
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ns", type=int, nargs="+", default=[20, 50, 100, 300])
    ap.add_argument("--reps", type=int, default=1000)
    ap.add_argument("--free-v", type=float, nargs="+", default=[0.25, 0.1, 0.05, 0.0],
                    help="diagonal of V under Free (C = its length)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--models", nargs="+", default=["hom", "free"], choices=["hom", "free"],
                    help="simulate under these (hom: false positive rate, free: power)")
    ap.add_argument("--no-op", action="store_true", help="CTP only (skip the OP fits)")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--jk-rules", action="store_true",
                    help="compare the jackknife rules on the same REML fits (CTP; OP with --op)")
    ap.add_argument("--op", action="store_true", help="with --jk-rules: also OP")
    ap.add_argument("--out", default=str(HERE / "out" / "ctmm_calibration.json"))
    args = ap.parse_args(argv)
    from scdist.engines.dask import dask_client

    results = {"settings": vars(args), "alpha": ALPHA, "rates": {}}
    t0 = time.perf_counter()
    with dask_client(n_workers=args.workers) as client:
        for N in args.ns:
            for k, model in enumerate(("hom", "free")):
                if model not in args.models:
                    continue
                t = time.perf_counter()
                ds = simulate(N, args.reps, model, args.free_v, args.seed + 1000 * N + k)
                if args.jk_rules:
                    rates = rule_rates(ds, client, op=args.op)
                else:
                    rates = positive_rates(ds, client, op=not args.no_op)
                results["rates"][f"{model} N={N}"] = rates
                print(f"{model} N={N}: {time.perf_counter() - t:.0f}s "
                      + ", ".join(f"{k}={v['rate']:.3f}" for k, v in rates.items()), flush=True)
                Path(args.out).parent.mkdir(exist_ok=True)
                Path(args.out).write_text(json.dumps(results, indent=1))
    results["wall_s"] = time.perf_counter() - t0
    Path(args.out).write_text(json.dumps(results, indent=1))
    print_table(results)


def _test_rank(name: str) -> int:
    names = (["regular Free fit"] + [t[0] for t in TESTS[:3]]
             + [f"REML (JK, {r})" for r in JK_RULES] + [TESTS[3][0]])
    return names.index(name) if name in names else -1


def print_table(results: dict) -> None:
    ns = results["settings"]["ns"]
    reps = results["settings"]["reps"]
    cols = sorted({c for r in results["rates"].values() for c in r},
                  key=lambda c: (c.split()[0], _test_rank(" ".join(c.split()[1:]))))
    for model, what in (("hom", "false positive rate (Hom)"), ("free", "power (Free)")):
        print(f"\n{what} at alpha = {ALPHA}, {reps} genes per cell "
              f"(binomial s.e. at 0.05: {np.sqrt(0.05 * 0.95 / reps):.3f}); rate over tested genes "
              "(exact 95% CI; n tested)\n")
        print("| test | " + " | ".join(f"N = {n}" for n in ns) + " |")
        print("|---|" + "---|" * len(ns))
        for c in cols:
            cells = []
            for n in ns:
                r = results["rates"].get(f"{model} N={n}", {}).get(c)
                if r is None:
                    cells.append("")
                elif "ci95" in r and "tested" in r:
                    lo, hi = r["ci95"]
                    cells.append(f"{r['rate']:.3f} ({lo:.3f}-{hi:.3f}); {100 * r['tested']:.0f} %")
                elif "ci95" in r:
                    lo, hi = r["ci95"]
                    cells.append(f"{r['rate']:.3f} ({lo:.3f}-{hi:.3f}; n={r['n']})")
                else:
                    cells.append(f"{r['rate']:.3f}")
            print(f"| {c} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--table":
        print_table(json.loads(Path(sys.argv[2]).read_text()))
    else:
        main()
