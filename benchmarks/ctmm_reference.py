"""Run the authors' CTMM package (``ctmm`` 1.1.0, PyPI) and save its answers as a test fixture.

The reference lives in its own virtual environment (``benchmarks/.venv-ctmm``) because it needs
R through rpy2; scdist itself never needs R.  Running this script with any Python does:

1. ``apt-get install r-base`` (+ the Debian-packaged R libraries the reference loads) if ``R`` is
   missing, and creates ``benchmarks/.venv-ctmm`` with ``pip install ctmm==1.1.0`` if absent;
2. re-executes itself inside that venv (``--inner``) with one BLAS thread;
3. simulates seeded CTP data with numpy (Eq 3 of Chen & Dahl: N = 94 donors, C = 4 cell types,
   Hom and Free genes), fits the reference on a subset of genes and on the Cuomo test gene
   (``../shared/data/cuomo_ctmm_testdata``), and writes

   - ``tests/fixtures/ctmm_reference_sim.npz``   inputs + reference estimates / p-values,
   - ``tests/fixtures/ctmm_reference_cuomo.npz`` the same for the Cuomo test gene,
   - ``tests/fixtures/ctmm_reference_meta.json`` versions, settings, per-gene CPU seconds.

Reference calls (read from its source; defaults unless stated): ``ctp.<model>_REML`` /
``_ML`` with ``optim_by_R=True, method="BFGS"`` (R ``optim``; 10 random restarts on failure),
``ctp.free_REML(..., jack_knife=True)`` for the leave-one-donor-out Wald tests,
``ctp.free_HE`` / ``ctp.hom_HE`` (jackknife on by default), ``util.lrt`` for the LRTs.
R's random restarts draw from R's RNG, so the script seeds it per fit (``set.seed``).

Usage::

    .venv/bin/python benchmarks/ctmm_reference.py                # everything (about 40 min)
    .venv/bin/python benchmarks/ctmm_reference.py --genes 60 --jk-genes 8
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
VENV = HERE / ".venv-ctmm"
FIXTURES = ROOT / "tests" / "fixtures"
CUOMO = ROOT.parent / "shared" / "data" / "cuomo_ctmm_testdata"
REF_VERSION = "1.1.0"
R_DEBIAN_PACKAGES = ["r-base", "r-cran-abind", "r-cran-mvtnorm", "r-cran-numderiv", "r-cran-tensor"]


# --------------------------------------------------------------------------------------------
# Data (numpy only: imported by ctmm_perf.py and the tests' helpers as well)
# --------------------------------------------------------------------------------------------
def simulate_ctp(n_genes: int = 300, n_donors: int = 94, n_celltypes: int = 4, seed: int = 20240611):
    """Seeded CTP data from Eq 3: y_ic = beta_c + alpha_i + Gamma_ic + delta_ic.

    Genes alternate Hom (V = 0) and Free (diagonal V); every second pair of genes has equal
    cell type means (null for the mean test).  nu_ic = sigma2_ic / n_ic with n_ic cells drawn
    from donor-specific proportions P_i ~ Dirichlet.  Values are rounded to float32 precision so
    that the stored float32 fixture is exactly the input the reference saw.

    Returns a dict: ``Y``, ``nu`` (gene, donor, celltype), ``P`` (donor, celltype), ``n_cells``,
    ``true_hom2`` (gene,), ``true_V`` (gene, celltype), ``true_beta`` (gene, celltype),
    ``is_free`` (gene,) bool.
    """
    rng = np.random.default_rng(seed)
    G, N, C = n_genes, n_donors, n_celltypes
    props = np.linspace(2.0, 1.0, C)
    P = rng.dirichlet(8.0 * props / props.sum() * C, size=N)
    n_total = rng.integers(250, 700, size=N)
    n_cells = np.maximum(np.round(P * n_total[:, None]), 2).astype(np.int64)
    P = n_cells / n_cells.sum(1, keepdims=True)

    is_free = (np.arange(G) % 2) == 1
    hom2 = np.where(is_free, rng.uniform(0.05, 0.3, G), rng.uniform(0.1, 0.5, G))
    V = np.where(is_free[:, None], rng.uniform(0.0, 0.5, (G, C)), 0.0)
    equal_means = (np.arange(G) // 2) % 2 == 0
    beta = np.where(equal_means[:, None], 0.0, rng.normal(0.0, 0.5, (G, C)))

    sigma2 = rng.uniform(5.0, 30.0, G)[:, None, None] * rng.gamma(4.0, 0.25, (G, N, C))
    nu = sigma2 / n_cells[None]
    alpha = rng.normal(size=(G, N, 1)) * np.sqrt(hom2)[:, None, None]
    gamma = rng.normal(size=(G, N, C)) * np.sqrt(V)[:, None, :]
    delta = rng.normal(size=(G, N, C)) * np.sqrt(nu)
    Y = beta[:, None, :] + alpha + gamma + delta
    f32 = lambda a: a.astype(np.float32).astype(np.float64)  # noqa: E731
    return {"Y": f32(Y), "nu": f32(nu), "P": f32(P), "n_cells": n_cells, "true_hom2": hom2,
            "true_V": V, "true_beta": beta, "is_free": is_free}


def select_genes(is_free: np.ndarray, n: int) -> np.ndarray:
    """First n/2 Hom and n/2 Free genes (indices into the simulated set)."""
    hom = np.flatnonzero(~is_free)[: n // 2]
    free = np.flatnonzero(is_free)[: n - n // 2]
    return np.sort(np.concatenate([hom, free]))


def load_cuomo(folder: Path = CUOMO) -> dict:
    """The CTMM repository's 50-donor x 4-day test gene (whitespace text, gzip, no header)."""
    rd = lambda name: np.loadtxt(folder / name, ndmin=2)  # noqa: E731
    return {"Y": rd("CTP.gz"), "nu": rd("ctnu.gz"), "P": rd("P.gz"), "pca": rd("pca.gz"),
            "batch": rd("batch.gz")}


# --------------------------------------------------------------------------------------------
# Outer: environment
# --------------------------------------------------------------------------------------------
def ensure_environment() -> Path:
    """R from Debian (benchmark machine only) and the reference venv; returns its python."""
    if shutil.which("R") is None:
        print("installing R from Debian (benchmark environment only)", flush=True)
        subprocess.run(["apt-get", "update", "-qq"], check=True)
        subprocess.run(["apt-get", "install", "-y", "-q", *R_DEBIAN_PACKAGES], check=True,
                       env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    py = VENV / "bin" / "python"
    if not py.exists():
        print(f"creating {VENV} with ctmm=={REF_VERSION}", flush=True)
        subprocess.run([sys.executable if sys.prefix == sys.base_prefix else "python3", "-m",
                        "venv", str(VENV)], check=True)
        subprocess.run([str(py), "-m", "pip", "install", "-q", f"ctmm=={REF_VERSION}"], check=True)
    return py


def single_thread_env() -> dict:
    env = dict(os.environ)
    for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env[k] = "1"
    return env


# --------------------------------------------------------------------------------------------
# Inner: runs inside the reference venv
# --------------------------------------------------------------------------------------------
class Reference:
    """Thin wrapper over the reference's file-based API (one gene at a time)."""

    def __init__(self, workdir: Path):
        import logging

        from ctmm import ctp, util
        from rpy2.robjects import r

        logging.getLogger("ctmm").setLevel(logging.WARNING)
        for name in list(logging.root.manager.loggerDict):
            if "ctmm" in name or "rpy2" in name:
                logging.getLogger(name).setLevel(logging.WARNING)
        self.ctp, self.util, self.r = ctp, util, r
        self.dir = workdir
        workdir.mkdir(parents=True, exist_ok=True)

    def write(self, Y, nu, P, covars: dict | None = None) -> dict:
        f = {}
        for key, arr in (("y_f", Y), ("ctnu_f", nu), ("P_f", P)):
            f[key] = str(self.dir / f"{key}.txt")
            np.savetxt(f[key], arr, fmt="%.17g")
        fixed, random = {}, {}
        for key, (kind, arr) in (covars or {}).items():
            path = str(self.dir / f"{key}.txt")
            np.savetxt(path, arr, fmt="%.17g")
            (fixed if kind == "fixed" else random)[key] = path
        f["fixed_covars_d"], f["random_covars_d"] = fixed, random
        return f

    def call(self, fn_name: str, files: dict, seed: int, **kw):
        """Run one reference fit; returns (estimates, pvalues, cpu_seconds) or raises."""
        self.r(f"set.seed({int(seed)})")
        np.random.seed(seed)
        fn = getattr(self.ctp, fn_name)
        t0 = time.process_time()
        with contextlib.redirect_stdout(io.StringIO()):  # it prints eigenvalues on every check
            out = fn(**files, **kw)
        dt = time.process_time() - t0
        if isinstance(out, tuple):
            est, p = out
        else:
            est, p = out, {}
        return est, p, dt


def _nan(shape=()):
    return np.full(shape, np.nan)


def fit_gene(ref: Reference, files: dict, C: int, seed: int, *, models: list[str],
             jackknife: bool, timings: dict) -> dict:
    """All reference fits for one gene; returns flat arrays keyed ``<model>_<method>_<what>``."""
    out: dict[str, np.ndarray] = {}

    def put(prefix, est, p, dt, kind):
        timings.setdefault(prefix, []).append(dt)
        hom2 = est.get("hom2", 0.0)
        out[f"{prefix}_hom2"] = np.float64(hom2)
        V = np.asarray(est.get("V", np.zeros((C, C))), dtype=float)
        out[f"{prefix}_V"] = V if V.ndim == 2 else np.diag(V)
        beta = est["beta"]["ct_beta"] if isinstance(est.get("beta"), dict) else est.get("beta")
        out[f"{prefix}_beta"] = np.asarray(beta, dtype=float)[:C]
        out[f"{prefix}_loglik"] = np.float64(est.get("l", np.nan))
        opt = est.get("opt", {})
        conv = opt.get("convergence", 0 if kind == "he" else np.nan)
        out[f"{prefix}_converged"] = np.bool_(conv == 0)
        for key in ("hom2", "V", "ct_beta"):
            if key in p:
                out[f"{prefix}_p_{key}"] = np.float64(p[key])

    R_kw = dict(optim_by_R=True, method="BFGS")
    plan = []
    if "hom" in models:
        plan += [("hom_reml", "hom_REML", R_kw, "reml"), ("hom_ml", "hom_ML", R_kw, "ml"),
                 ("hom_he", "hom_HE", {}, "he")]
    if "free" in models:
        plan += [("free_reml", "free_REML", R_kw, "reml"), ("free_ml", "free_ML", R_kw, "ml"),
                 ("free_he", "free_HE", {}, "he")]
    if "full" in models:
        plan += [("full_reml", "full_REML", R_kw, "reml")]
    if jackknife:
        plan += [("free_reml_jk", "free_REML", {**R_kw, "jack_knife": True}, "reml")]
    for k, (prefix, fn, kw, kind) in enumerate(plan):
        try:
            est, p, dt = ref.call(fn, files, seed + 7919 * k, **kw)
            put(prefix, est, p, dt, kind)
        except (SystemExit, Exception) as e:  # the reference sys.exit()s on singular matrices
            print(f"  {prefix} failed: {type(e).__name__}: {e}", flush=True)
            out[f"{prefix}_failed"] = np.bool_(True)
    for m in ("reml", "ml"):
        if f"free_{m}_loglik" in out and f"hom_{m}_loglik" in out:
            out[f"free_vs_hom_{m}_lrt"] = np.float64(
                ref.util.lrt(out[f"free_{m}_loglik"], out[f"hom_{m}_loglik"], C))
    if "full_reml_loglik" in out and "free_reml_loglik" in out:
        out["full_vs_free_reml_lrt"] = np.float64(
            ref.util.lrt(out["full_reml_loglik"], out["free_reml_loglik"], C * (C + 1) // 2 - (C + 1)))
    return out


def stack(rows: list[dict], C: int) -> dict:
    keys = sorted({k for r in rows for k in r})
    res = {}
    for k in keys:
        sample = next(r[k] for r in rows if k in r)
        shape = np.shape(sample)
        fill = False if np.asarray(sample).dtype == bool else np.nan
        arr = np.stack([np.asarray(r.get(k, np.full(shape, fill))) for r in rows])
        res[k] = arr
    return res


def inner(args) -> None:
    import ctmm

    ref = Reference(Path(args.workdir) / args.part)   # parts may run side by side
    meta = {"reference": f"ctmm {getattr(ctmm, '__version__', REF_VERSION)}",
            "R": ref.r("R.version.string")[0], "python": platform.python_version(),
            "machine": platform.machine(), "cpu_count": os.cpu_count(),
            "blas_threads": os.environ.get("OPENBLAS_NUM_THREADS"),
            "note": "CPU seconds per gene from time.process_time() around each reference call "
                    "(embedded R included); machine shared with other jobs, so noisy.",
            "calls": "optim_by_R=True, method='BFGS', nrep=10 (default); HE jack_knife=True "
                     "(default); LRT via ctmm.util.lrt"}
    t_start = time.time()

    sim = simulate_ctp(args.sim_genes, seed=args.seed)
    genes = select_genes(sim["is_free"], args.genes)
    FIXTURES.mkdir(parents=True, exist_ok=True)
    if args.part in ("all", "sim"):
        _part_sim(ref, args, sim, genes, dict(meta), t_start)
    if args.part in ("all", "extra"):
        _part_extra(ref, args, sim, genes, dict(meta), t_start)


def _part_sim(ref, args, sim, genes, meta, t_start) -> None:
    """(a) every model/method on the simulated genes -> ctmm_reference_sim.npz (saved after each
    gene, so an interrupted run leaves a usable fixture; ``n_fitted`` says how far it got)."""
    C = sim["Y"].shape[2]
    timings: dict[str, list[float]] = {}
    rows: list[dict] = []
    if args.resume:   # keep the first --resume genes of an interrupted run's fixture
        prev = np.load(args.resume_from)
        assert np.array_equal(prev["gene_index"][: args.resume], genes[: args.resume])
        keys = [k[4:] for k in prev.files if k.startswith("ref_") and k != "ref_jk_mask"]
        rows = [{k: prev[f"ref_{k}"][i] for k in keys} for i in range(args.resume)]
    for pos, g in enumerate(genes):
        if pos < len(rows):
            continue
        files = ref.write(sim["Y"][g], sim["nu"][g], sim["P"])
        rows.append(fit_gene(ref, files, C, args.seed + int(g), models=args.models,
                             jackknife=False, timings=timings))
        res = stack(rows, C)
        idx = genes[: len(rows)]
        np.savez_compressed(
            FIXTURES / "ctmm_reference_sim.npz",
            Y=sim["Y"][idx].astype(np.float32), nu=sim["nu"][idx].astype(np.float32),
            P=sim["P"].astype(np.float32), gene_index=idx, true_hom2=sim["true_hom2"][idx],
            true_V=sim["true_V"][idx], true_beta=sim["true_beta"][idx],
            is_free=sim["is_free"][idx], **{f"ref_{k}": v for k, v in res.items()})
        meta["sim"] = {"seed": args.seed, "n_genes_simulated": args.sim_genes,
                       "n_genes_fitted": len(rows), "N": int(sim["Y"].shape[1]), "C": C,
                       "cpu_s_per_gene_median": {k: float(np.median(v))
                                                 for k, v in timings.items()},
                       "cpu_s_per_gene_n": {k: len(v) for k, v in timings.items()},
                       "wall_s": time.time() - t_start}
        (FIXTURES / "ctmm_reference_meta.json").write_text(json.dumps(meta, indent=1))
        print(f"sim gene {pos + 1}/{len(genes)} (#{g}) done, {time.time() - t_start:.0f}s",
              flush=True)


def _part_extra(ref, args, sim, genes, meta, t_start) -> None:
    """(b) the Cuomo test gene (plain, with jackknife; and with PCs fixed + batch random) ->
    ctmm_reference_cuomo.npz; (c) Free REML + jackknife on a few simulated genes (about 150
    CPU-s each) -> ctmm_reference_sim_jk.npz.  Meta: ctmm_reference_meta_extra.json."""
    C = sim["Y"].shape[2]
    if CUOMO.exists():
        cu = load_cuomo()
        cu_out = {k: v for k, v in cu.items()}
        ctimings: dict[str, list[float]] = {}
        files = ref.write(cu["Y"], cu["nu"], cu["P"])
        plain = fit_gene(ref, files, C, args.seed, models=args.models, jackknife=True,
                         timings=ctimings)
        files = ref.write(cu["Y"], cu["nu"], cu["P"],
                          {"pca": ("fixed", cu["pca"]), "batch": ("random", cu["batch"])})
        cov = fit_gene(ref, files, C, args.seed + 1, models=["hom", "free"], jackknife=False,
                       timings=ctimings)
        cu_out.update({f"ref_plain_{k}": v for k, v in plain.items()})
        cu_out.update({f"ref_cov_{k}": v for k, v in cov.items()})
        np.savez_compressed(FIXTURES / "ctmm_reference_cuomo.npz", **cu_out)
        meta["cuomo"] = {"cpu_s": ctimings,
                         "covariates": "fixed: pca.gz (6 PCs); random: batch.gz (21 batches)"}
        (FIXTURES / "ctmm_reference_meta_extra.json").write_text(json.dumps(meta, indent=1))
    jk = select_genes(sim["is_free"][genes], args.jk_genes)     # positions in `genes`
    timings: dict[str, list[float]] = {}
    rows = []
    for pos in jk:
        g = genes[pos]
        files = ref.write(sim["Y"][g], sim["nu"][g], sim["P"])
        rows.append(fit_gene(ref, files, C, args.seed + int(g), models=[], jackknife=True,
                             timings=timings))
        res = stack(rows, C)
        idx = genes[jk[: len(rows)]]
        np.savez_compressed(FIXTURES / "ctmm_reference_sim_jk.npz", gene_index=idx,
                            **{f"ref_{k}": v for k, v in res.items()})
        meta["sim_jackknife"] = {"genes": idx.tolist(), "cpu_s": timings,
                                 "wall_s": time.time() - t_start}
        (FIXTURES / "ctmm_reference_meta_extra.json").write_text(json.dumps(meta, indent=1))
        print(f"jackknife gene #{g} done, {time.time() - t_start:.0f}s", flush=True)


def time_reference(args) -> None:
    """``--time``: per-gene CPU seconds of the reference on the first k simulated genes.

    Used by ctmm_perf.py (which runs scdist on the same genes in the same run)."""
    ref = Reference(Path(args.workdir) / "time")
    sim = simulate_ctp(args.sim_genes, seed=args.seed)
    genes = select_genes(sim["is_free"], args.genes)
    res: dict[str, list[float]] = {}
    kw = dict(optim_by_R=True, method="BFGS")
    calls = [("free_reml", "free_REML", kw), ("hom_reml", "hom_REML", kw),
             ("he", "free_HE", {"jack_knife": False})]
    for pos, g in enumerate(genes):
        files = ref.write(sim["Y"][g], sim["nu"][g], sim["P"])
        for name, fn, extra in calls:
            res.setdefault(name, []).append(ref.call(fn, files, args.seed + int(g), **extra)[2])
        if pos < args.jk_genes:
            dt = ref.call("free_REML", files, args.seed + int(g), **kw, jack_knife=True)[2]
            res.setdefault("free_reml_jk", []).append(dt)
        print(f"timed gene {pos + 1}/{len(genes)}", file=sys.stderr, flush=True)
    print(json.dumps({"genes": genes.tolist(), "cpu_s": res}))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--genes", type=int, default=40, help="simulated genes fitted (half Hom)")
    ap.add_argument("--jk-genes", type=int, default=2, help="of those, genes with jackknife")
    ap.add_argument("--sim-genes", type=int, default=300, help="genes simulated")
    ap.add_argument("--models", nargs="+", default=["hom", "free", "full"])
    ap.add_argument("--seed", type=int, default=20240611)
    ap.add_argument("--workdir", default=str(HERE / "out" / "ctmm_reference_work"))
    ap.add_argument("--part", choices=["all", "sim", "extra"], default="all",
                    help="sim: all fits on the simulated genes; extra: Cuomo gene + jackknife")
    ap.add_argument("--resume", type=int, default=0,
                    help="part sim: keep the first N genes of --resume-from and fit the rest")
    ap.add_argument("--resume-from", default=str(FIXTURES / "ctmm_reference_sim.npz"))
    ap.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--time", action="store_true",
                    help="only time the reference on --genes genes (JSON on stdout)")
    args = ap.parse_args(argv)
    if args.inner:
        (time_reference if args.time else inner)(args)
        return
    py = ensure_environment()
    cmd = [str(py), str(Path(__file__).resolve()), "--inner", *(argv or sys.argv[1:])]
    sys.exit(subprocess.run(cmd, env=single_thread_env()).returncode)


if __name__ == "__main__":
    main()
