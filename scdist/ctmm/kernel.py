"""The CTMM block kernel: a pure function of one gene block of the pseudobulk cube.

``fit_block(block, cfg)`` takes an ``xarray.Dataset`` with ``mean``/``nu`` over
``(donor, celltype, gene)`` for a block of genes (plus the donor-level ``covariates`` /
random-effect variables and, for OP, ``op_mean``/``op_nu``/``P``) and returns the result
Dataset for those genes. It knows nothing of Dask or the store, so the engine adapters only
place it on workers, and it is tested on plain in-memory data.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import xarray as xr

from . import covariance as cov_models
from .design import Layout, Problem, covariance_basis, encode_factor, fixed_design, make_layout
from .he import he_fit, ols_beta
from .jackknife import donor_weights, jackknife_he, jackknife_reml
from .likelihood import evaluate, fisher_at
from .optimize import maximize_with_restarts
from .tests import jackknife_cov, lrt, mean_contrasts, wald_f

METHODS = ("reml", "ml", "he")
TESTS = ("lrt", "wald", "jackknife")
# Which ML/REML leave-one-out refits a jackknife test may use (see jackknife_usable)
JK_RULES = ("regular", "edge", "drop", "all")


@dataclass(frozen=True)
class FitConfig:
    """Everything a block fit needs besides the data (small, picklable, broadcast to tasks)."""

    models: tuple[str, ...] = ("hom", "free")
    method: str = "reml"
    tests: tuple[str, ...] = TESTS
    covariates: tuple[str, ...] = ()
    random_effects: tuple[str, ...] = ()
    op: bool = False
    n_restarts: int = 10
    jk_restarts: int = 2
    jk_rule: str = "regular"
    max_iter: int = 60
    tol: float = 1e-9
    seed: int = 0
    test_labels: tuple[str, ...] = field(default=())


def test_labels(models, method: str, tests) -> tuple[str, ...]:
    """The p-value labels a fit with these models/method/tests produces (fixed before work)."""
    labels = []
    if method != "he":
        if "lrt" in tests and "free" in models and "hom" in models:
            labels.append("free_vs_hom_lrt")
        if "wald" in tests and "free" in models:
            labels.append("free_vs_hom_wald")
    if "jackknife" in tests and "free" in models:
        labels.append("free_vs_hom_jackknife")
    if method != "he" and "lrt" in tests and "full" in models and "free" in models:
        labels.append("full_vs_free_lrt")
    if "jackknife" in tests and "free" in models:
        labels.append("mean_jackknife")
    return tuple(labels)


def _ols_resid_var(y, mask, X2, B, m):
    R = y.shape[0]
    yf = np.where(mask, y, 0.0).reshape(R, B * m)
    mf = mask.reshape(R, B * m).astype(float)
    p = X2.shape[1]
    XtX = (mf @ (X2[:, :, None] * X2[:, None, :]).reshape(-1, p * p)).reshape(R, p, p)
    Xty = yf @ X2
    with np.errstate(all="ignore"):
        b = np.linalg.solve(XtX + 1e-12 * np.eye(X2.shape[1]), Xty[..., None])[..., 0]
    res = (yf - b @ X2.T) * mf
    n = mf.sum(axis=1)
    return (res ** 2).sum(axis=1) / np.maximum(n - X2.shape[1], 1)


class _Fitter:
    """Fits every model of one data kind (CTP or OP) for a gene block."""

    def __init__(self, Y, NU, mask, Z, factors, P, C: int, cfg: FitConfig):
        G, N, c = Y.shape
        self.cfg, self.C, self.P, self.factors = cfg, C, P, factors
        self.layout: Layout = make_layout(N, c, factors)
        lay = self.layout
        self.X = fixed_design(lay, Z, P)
        self.y = lay.to_blocks(np.where(mask, Y, 0.0))
        self.nu = lay.to_blocks(np.where(mask, NU, 1.0), 1.0)
        self.mask = lay.to_blocks(mask, False)
        B, m, p = self.X.shape
        self.total = _ols_resid_var(self.y, self.mask, self.X.reshape(B * m, p), B, m)
        self.total = np.where(np.isfinite(self.total) & (self.total > 0), self.total, 1.0)
        self.n_re = len(factors)

    def problem(self, model: str) -> Problem:
        k = cov_models.basis(model, self.C)
        K = covariance_basis(self.layout, k, self.factors, self.P)
        return Problem(y=self.y, nu=self.nu, mask=self.mask, X=self.X, K=K, n_vc=len(k))

    def start(self, model: str, rows=None) -> np.ndarray:
        tot = self.total if rows is None else self.total[rows]
        th = cov_models.initial(model, self.C, tot)
        if self.n_re:
            K = th.shape[1] + self.n_re
            re = np.repeat((tot / (K + 1.0))[:, None], self.n_re, axis=1)
            th = np.concatenate([th, re], axis=1)
        return th

    def random_start(self, model: str):
        def draw(rng, rows):
            base = self.start(model, rows)
            noise = rng.gamma(2.0, 0.5, size=base.shape)
            th = base * noise
            if model == "full":
                r, c = np.tril_indices(self.C)
                off = np.flatnonzero(r != c)
                scale = np.sqrt(base[:, r == c].mean(axis=1))
                th[:, off] = rng.normal(size=(len(rows), off.size)) * 0.1 * scale[:, None] ** 2
            return th
        return draw

    def fit(self, model: str, need_fisher: bool, need_jk: bool) -> dict:
        cfg = self.cfg
        prob = self.problem(model)
        out = {}
        if cfg.method == "he":
            theta, b_ols = he_fit(prob)
            out.update(theta=theta, loglik=np.full(prob.rows, np.nan),
                       converged=np.isfinite(theta).all(axis=1),
                       iterations=np.zeros(prob.rows, int), beta=self._he_beta(prob, theta))
            if need_jk:
                out["theta_jk"], out["beta_jk"] = jackknife_he(prob, self.layout, self._he_beta)
            return out
        res = maximize_with_restarts(prob, self.start(model), cfg.method,
                                     random_start=self.random_start(model),
                                     n_restarts=cfg.n_restarts, seed=cfg.seed,
                                     max_iter=cfg.max_iter, tol=cfg.tol)
        # the optimiser's last accepted state is at res.theta: its GLS beta, and a finite
        # likelihood where Sigma is positive definite (no further evaluation needed)
        ok = np.isfinite(res.loglik)
        out.update(theta=res.theta, loglik=np.where(ok, res.loglik, np.nan),
                   converged=res.converged & ok, iterations=res.iterations, beta=res.beta)
        if need_fisher:
            out["fisher"] = fisher_at(prob, res.theta, cfg.method)
        if need_jk:
            # only regular fits are jackknifed: at a fit on the singular-covariance edge every
            # refit that keeps the donor defining the edge stays on it, the replicates barely
            # move and the jackknife variance collapses (its Wald tests are reported as NaN)
            N = int(self.layout.slots.max()) + 1
            K, p = res.theta.shape[1], prob.X.shape[-1]
            th_jk = np.full((prob.rows, N, K), np.nan)
            be_jk = np.full((prob.rows, N, p), np.nan)
            if cfg.jk_rule == "all":
                reg = np.flatnonzero(np.isfinite(res.theta).all(axis=1) & ok)
            else:
                reg = np.flatnonzero(out["converged"])
            jk_reg = np.zeros((prob.rows, N), bool)
            jk_rc = np.zeros((prob.rows, N))
            if reg.size:
                draw = self.random_start(model)
                th_jk[reg], be_jk[reg], jk_reg[reg], jk_rc[reg] = jackknife_reml(
                    prob.take(reg), self.layout, res.theta[reg], cfg.method,
                    random_start=lambda rng, rows: draw(rng, reg[rows]),
                    n_restarts=cfg.jk_restarts, seed=cfg.seed)
            out["theta_jk"], out["beta_jk"], out["jk_regular"] = th_jk, be_jk, jk_reg
            out["jk_rcmin"] = jk_rc
        if model == "free":    # donors with data, for the Wald / jackknife tests' df
            out["weight"] = donor_weights(prob, self.layout)
        return out

    @staticmethod
    def _he_beta(prob: Problem, theta: np.ndarray) -> np.ndarray:
        """GLS fixed effects at the HE variance components (OLS where Sigma is not PD)."""
        th = np.where(np.isfinite(theta), theta, 0.0)
        st = evaluate(prob, th, "reml", grad=False, ai=False)
        beta = st.beta
        if not st.ok.all():
            bad = ~st.ok
            beta = beta.copy()
            beta[bad] = ols_beta(prob.take(np.flatnonzero(bad)))
        return beta


def _tests(fits: dict, fitter: _Fitter, cfg: FitConfig, labels) -> dict:
    C = fitter.C
    out = {}
    free = fits.get("free")
    if free is not None:
        weight = free.get("weight")
        if weight is None:
            weight = donor_weights(fitter.problem("free"), fitter.layout)
        df2 = wald_df2(fitter, weight)
        vsel = np.arange(1, C + 1)
    if "free_vs_hom_lrt" in labels:
        out["free_vs_hom_lrt"] = lrt(free["loglik"], fits["hom"]["loglik"], C)
    if "full_vs_free_lrt" in labels:
        df = cov_models.n_params("full", C) - cov_models.n_params("free", C)
        out["full_vs_free_lrt"] = lrt(fits["full"]["loglik"], free["loglik"], df)
    if "free_vs_hom_wald" in labels:
        with np.errstate(all="ignore"):
            try:
                cov = np.linalg.inv(free["fisher"])
            except np.linalg.LinAlgError:
                cov = np.linalg.pinv(free["fisher"])
        p_wald = wald_f(free["theta"][:, vsel], cov[:, vsel][:, :, vsel], df2)
        # the Fisher information of a fit on the singular-covariance edge is not a variance
        out["free_vs_hom_wald"] = np.where(free["converged"], p_wald, np.nan)
    if "free_vs_hom_jackknife" in labels or "mean_jackknife" in labels:
        rule = cfg.jk_rule if "jk_regular" in free else "he"
        out.update(jackknife_pvalues(free, weight, C, df2, rule))
    return {k: v for k, v in out.items() if k in labels}


def wald_df2(fitter: _Fitter, weight: np.ndarray) -> np.ndarray:
    """Denominator df N - R of the Wald F tests: donors with data minus the Free model's
    parameters (C + 1 variances, extra random effects, fixed effects; 2C + 1 plain)."""
    n_par = (fitter.C + 1) + fitter.n_re + fitter.X.shape[-1]
    return np.maximum(weight.sum(axis=1) - n_par, 1)


def jackknife_usable(free: dict, weight: np.ndarray, rule: str):
    """(genes tested (R,), replicates used (R, N)) of a Free fit's jackknife under ``rule``.

    A refit on the singular-covariance edge is pinned there by the donor with the smallest
    noise; if many replicates are pinned together they stop varying and the jackknife
    variance collapses (inflated false positives). The rules, from strict to lax:

    - ``regular``: the full fit and every replicate are regular optima (rcmin >= NEAR_EDGE);
    - ``edge``: the full fit is regular, every replicate converged off the spike itself
      (rcmin >= likelihood.EDGE, a hundred times closer to singular than ``regular``);
    - ``drop``: the full fit is regular; replicates that are not regular optima are left
      out of the jackknife (like donors without data) when they are at most 10 % of the
      donors, otherwise the gene is not tested;
    - ``all``: every gene with a finite fit and replicates (the reference package's rule);
    - ``he``: HE (closed form, nothing to check) -- every gene with finite replicates.
    """
    from .likelihood import EDGE

    reps_ok = np.isfinite(free["theta_jk"]).all(axis=2)
    full_ok = free["converged"]
    used = weight
    if rule in ("he", "all"):
        full_ok = np.isfinite(free["theta"]).all(axis=1)
        rep_ok = reps_ok
    elif rule == "regular":
        rep_ok = free["jk_regular"] & reps_ok
    elif rule == "edge":
        rep_ok = (free["jk_rcmin"] >= EDGE) & reps_ok
    elif rule == "drop":
        good = free["jk_regular"] & reps_ok
        n_bad = (weight & ~good).sum(axis=1)
        used = weight & good
        return full_ok & (n_bad <= 0.1 * weight.sum(axis=1)) & (used.sum(axis=1) >= 2), used
    else:
        raise ValueError(f"unknown jackknife rule {rule!r}")
    return full_ok & np.where(weight, rep_ok, True).all(axis=1), used


def jackknife_pvalues(free: dict, weight: np.ndarray, C: int, df2, rule: str) -> dict:
    """Jackknife Wald p-values of V_11 = .. = V_CC = 0 and of equal means (NaN where the
    gene is not tested under ``rule``, see :func:`jackknife_usable`)."""
    tested, used = jackknife_usable(free, weight, rule)
    vsel = np.arange(1, C + 1)
    jc = jackknife_cov(np.where(used[..., None], free["theta_jk"][:, :, vsel], 0.0), used)
    p_v = wald_f(free["theta"][:, vsel], jc, df2)
    L = mean_contrasts(C)
    est = free["beta"][:, :C] @ L.T
    reps = np.where(used[..., None], free["beta_jk"][:, :, :C] @ L.T, 0.0)
    p_m = wald_f(est, jackknife_cov(reps, used), df2)
    return {"free_vs_hom_jackknife": np.where(tested, p_v, np.nan),
            "mean_jackknife": np.where(tested, p_m, np.nan)}


def _assemble(fits: dict, tests: dict, fitter: _Fitter, cfg: FitConfig, prefix: str,
              coords: dict) -> dict:
    C = fitter.C
    models = cfg.models
    G = fitter.y.shape[0]
    hom2 = np.full((len(models), G), np.nan)
    V = np.full((len(models), G, C, C), np.nan)
    beta = np.full((len(models), G, C), np.nan)
    q = len(cfg.covariates)
    gamma = np.full((len(models), G, q), np.nan)
    re = np.full((len(models), G, fitter.n_re), np.nan)
    ll = np.full((len(models), G), np.nan)
    conv = np.zeros((len(models), G), bool)
    iters = np.zeros((len(models), G), np.int32)
    for i, mname in enumerate(models):
        f = fits[mname]
        nv = cov_models.n_params(mname, C)
        h, Vm = cov_models.unpack(mname, f["theta"][:, :nv], C)
        hom2[i] = np.nan if mname == "full" else h
        V[i] = Vm
        beta[i] = f["beta"][:, :C]
        gamma[i] = f["beta"][:, C:]
        re[i] = f["theta"][:, nv:]
        ll[i] = f["loglik"]
        conv[i] = f["converged"]
        iters[i] = f["iterations"]
    d = {
        f"{prefix}hom2": (("model", "gene"), hom2),
        f"{prefix}V": (("model", "gene", "celltype", "celltype2"), V),
        f"{prefix}beta": (("model", "gene", "celltype"), beta),
        f"{prefix}loglik": (("model", "gene"), ll),
        f"{prefix}converged": (("model", "gene"), conv),
        f"{prefix}iterations": (("model", "gene"), iters),
    }
    if q:
        d[f"{prefix}gamma"] = (("model", "gene", "covariate"), gamma)
    if fitter.n_re:
        d[f"{prefix}re_var"] = (("model", "gene", "random_effect"), re)
    labels = cfg.test_labels
    if labels:
        pv = np.stack([tests.get(t, np.full(G, np.nan)) for t in labels])
        d[f"{prefix}pvalue"] = (("test", "gene"), pv)
    return d


def _fit_kind(Y, NU, mask, Z, factors, P, C, cfg: FitConfig):
    fitter = _Fitter(Y, NU, mask, Z, factors, P, C, cfg)
    labels = cfg.test_labels
    fits = {}
    for mname in cfg.models:
        fits[mname] = fitter.fit(mname, need_fisher=(mname == "free" and "free_vs_hom_wald" in labels),
                                 need_jk=(mname == "free" and "free_vs_hom_jackknife" in labels))
    return fitter, fits, _tests(fits, fitter, cfg, labels)


def donor_inputs(block: xr.Dataset, cfg: FitConfig):
    """Donor-level covariate matrix ``Z (N, q)`` and random-effect codes from a block."""
    Z = None
    if cfg.covariates:
        Z = block["covariates"].sel(covariate=list(cfg.covariates)).transpose("donor", "covariate").values
        Z = np.asarray(Z, float)
    factors = [encode_factor(block[name].values, name) for name in cfg.random_effects]
    return Z, factors


def block_arrays(block: xr.Dataset, cfg: FitConfig) -> tuple[dict, dict]:
    """:func:`fit_block`'s results as ``({name: (dims, array)}, coords)`` without building
    the Dataset (the in-process fit joins its blocks' arrays and builds one Dataset)."""
    Y = np.asarray(block["mean"].transpose("gene", "donor", "celltype").values, float)
    NU = np.asarray(block["nu"].transpose("gene", "donor", "celltype").values, float)
    mask = np.isfinite(Y) & np.isfinite(NU)
    G, N, C = Y.shape
    Z, factors = donor_inputs(block, cfg)
    coords = {"model": list(cfg.models), "gene": block["gene"].values,
              "celltype": block["celltype"].values,
              "celltype2": block["celltype"].values}
    fitter, fits, tests = _fit_kind(Y, NU, mask, Z, factors, None, C, cfg)
    data = _assemble(fits, tests, fitter, cfg, "", coords)
    if cfg.op:
        Yo = np.asarray(block["op_mean"].transpose("gene", "donor").values, float)[..., None]
        NUo = np.asarray(block["op_nu"].transpose("gene", "donor").values, float)[..., None]
        P = np.asarray(block["P"].transpose("donor", "celltype").values, float)
        mo = np.isfinite(Yo) & np.isfinite(NUo)
        fo, fits_o, tests_o = _fit_kind(Yo, NUo, mo, Z, factors, P, C, cfg)
        data.update(_assemble(fits_o, tests_o, fo, cfg, "op_", coords))
    if cfg.test_labels:
        coords["test"] = list(cfg.test_labels)
    if cfg.covariates:
        coords["covariate"] = list(cfg.covariates)
    if cfg.random_effects:
        coords["random_effect"] = list(cfg.random_effects)
    return data, coords


def arrays_to_dataset(data: dict, coords: dict) -> xr.Dataset:
    """The result Dataset of :func:`block_arrays`' output (string coordinates as object
    arrays, the store's convention, made before the Dataset)."""
    coords = {k: np.asarray(v).astype(object) for k, v in coords.items()}
    return xr.Dataset(data, coords=coords)


def join_blocks(parts: list[tuple[dict, dict]]) -> tuple[dict, dict]:
    """Several blocks' :func:`block_arrays` outputs joined along the gene axis (in order)."""
    if len(parts) == 1:
        return parts[0]
    data0, coords0 = parts[0]
    data = {}
    for name, (dims, _) in data0.items():
        ax = dims.index("gene")
        data[name] = (dims, np.concatenate([d[name][1] for d, _ in parts], axis=ax))
    coords = dict(coords0)
    coords["gene"] = np.concatenate([np.asarray(c["gene"]) for _, c in parts])
    return data, coords


def fit_block(block: xr.Dataset, cfg: FitConfig) -> xr.Dataset:
    """Fit CTMM to one gene block; returns the result Dataset for those genes."""
    return arrays_to_dataset(*block_arrays(block, cfg))
