"""The vectorised jackknife equals explicit leave-one-donor-out refits; Wald/F/LRT helpers."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

import scdist.ctmm as ctmm
from scdist.ctmm import jackknife as jk
from scdist.ctmm import tests as T
from scdist.ctmm.kernel import FitConfig, _Fitter


@pytest.fixture(autouse=True)
def _one_compiled_kernel(monkeypatch):
    """One compiled version of the likelihood kernel for every test size: each size-specialised
    version costs ~10 CPU-s to compile in a fresh checkout (the specialised path is tested
    against the numpy kernel in test_ctmm_likelihood)."""
    from scdist.ctmm import blockkernel

    monkeypatch.setattr(blockkernel, "SPECIALISE_MIN", 10 ** 12)


def _fitter(sim, cfg=FitConfig()):
    Y = sim["mean"].transpose("gene", "donor", "celltype").values
    NU = sim["nu"].transpose("gene", "donor", "celltype").values
    return _Fitter(Y, NU, np.isfinite(Y), None, [], None, sim.sizes["celltype"], cfg)


@pytest.mark.parametrize("method", ["reml", "he"])
def test_batched_jackknife_equals_explicit_leave_one_out(method):
    sim = ctmm.simulate_ctp(3, 20, 3, hom2=0.3, V=[0.1, 0.2, 0.3], missing_frac=0.05, seed=31)
    res = ctmm.fit(sim, models=("free",), method=method, tests=(), op=False)
    f = _fitter(sim)
    prob = f.problem("free")
    theta = np.c_[res.hom2.sel(model="free").values,
                  np.diagonal(res.V.sel(model="free").values, axis1=1, axis2=2)]
    conv = np.ones((3, 20), bool)
    if method == "he":
        th_jk, be_jk = jk.jackknife_he(prob, f.layout, f._he_beta)
    else:
        th_jk, be_jk, conv, _ = jk.jackknife_reml(prob, f.layout, theta, "reml",
                                               random_start=f.random_start("free"))
        assert conv.mean() > 0.9
    checked = 0
    for j in (0, 7, 19):
        loo = ctmm.fit(sim.drop_isel(donor=j), models=("free",), method=method, tests=(), op=False)
        free = loo.sel(model="free")
        ref = np.c_[free.hom2.values, np.diagonal(free.V.values, axis1=1, axis2=2)]
        ok = conv[:, j] & free.converged.values      # regular optima on both sides
        np.testing.assert_allclose(th_jk[ok, j], ref[ok], atol=5e-5)
        np.testing.assert_allclose(be_jk[ok, j, :3], free.beta.values[ok], atol=5e-5)
        checked += ok.sum()
    assert checked >= 7


def test_jackknife_cov_formula_and_unobserved_donors():
    rng = np.random.default_rng(0)
    reps = rng.normal(size=(2, 10, 3))
    w = np.ones((2, 10), bool)
    w[1, 4] = False
    cov = T.jackknife_cov(reps, w)
    d = reps[0] - reps[0].mean(0)
    np.testing.assert_allclose(cov[0], 9 / 10 * d.T @ d)
    keep = np.delete(reps[1], 4, axis=0)
    d = keep - keep.mean(0)
    np.testing.assert_allclose(cov[1], 8 / 9 * d.T @ d)


def test_wald_f_and_lrt_match_scipy():
    est = np.array([[1.0, -0.5], [0.1, 0.2]])
    cov = np.array([np.diag([0.25, 0.5]), np.eye(2)])
    p = T.wald_f(est, cov, 30)
    stat = np.array([(1 / 0.25 + 0.25 / 0.5) / 2, (0.01 + 0.04) / 2])
    np.testing.assert_allclose(p, stats.f.sf(stat, 2, 30))
    np.testing.assert_allclose(T.lrt(np.array([-10.0]), np.array([-12.0]), 3), stats.chi2.sf(4.0, 3))
    assert T.lrt(np.array([-12.0]), np.array([-11.9]), 3)[0] == 1.0   # negative stat -> 0
    L = T.mean_contrasts(3)
    np.testing.assert_allclose(L @ np.array([2.0, 2.0, 2.0]), 0)


def test_jackknife_rules_nest_and_agree_where_they_overlap():
    """The jackknife rules (FitConfig.jk_rule) on one set of fits: every gene the strict
    'regular' rule tests is tested by the laxer rules with the same p-value where they use
    the same replicates; 'all' tests every gene; fit(jk_rule=...) gives the rule's p-values."""
    from scdist.ctmm.kernel import _fit_kind, jackknife_pvalues, test_labels, wald_df2
    from scdist.errors import InputError

    sim = ctmm.simulate_ctp(40, 20, 4, hom2=0.25, V=0, seed=5)
    Y = sim["mean"].transpose("gene", "donor", "celltype").values
    NU = sim["nu"].transpose("gene", "donor", "celltype").values
    models, tests = ("hom", "free"), ("jackknife",)
    cfg = FitConfig(models=models, tests=tests, jk_rule="all",
                    test_labels=test_labels(models, "reml", tests))
    fitter, fits, _ = _fit_kind(Y, NU, np.isfinite(Y), None, [], None, 4, cfg)
    free = fits["free"]
    w = free["weight"]
    df2 = wald_df2(fitter, w)
    p = {r: jackknife_pvalues(free, w, 4, df2, r)["free_vs_hom_jackknife"]
         for r in ("regular", "edge", "drop", "all")}
    t = {r: np.isfinite(v) for r, v in p.items()}
    assert np.isfinite(free["theta"]).all() and t["all"].all()
    assert not (t["regular"] & ~t["edge"]).any() and not (t["regular"] & ~t["drop"]).any()
    assert t["regular"].sum() < t["all"].sum()       # N = 20 null: some fits on the edge
    for r in ("edge", "drop", "all"):
        np.testing.assert_allclose(p[r][t["regular"]], p["regular"][t["regular"]], rtol=1e-10)
    res = ctmm.fit(sim, models=models, tests=tests, op=False, jk_rule="drop")
    np.testing.assert_allclose(res.pvalue.sel(test="free_vs_hom_jackknife").values, p["drop"],
                               rtol=1e-8, equal_nan=True)
    with pytest.raises(InputError, match="jk_rule"):
        ctmm.fit(sim, models=models, tests=tests, jk_rule="some")
