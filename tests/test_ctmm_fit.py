"""CTMM fits: parameter recovery, agreement with a brute-force optimiser, missing pairs, errors."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import optimize

import scdist.ctmm as ctmm
from scdist.ctmm import covariance as cv
from scdist.errors import InputError

from test_ctmm_likelihood import Dense


@pytest.fixture(autouse=True)
def _one_compiled_kernel(monkeypatch):
    """One compiled version of the likelihood kernel for every test size: each size-specialised
    version costs ~10 CPU-s to compile in a fresh checkout (the specialised path is tested
    against the numpy kernel in test_ctmm_likelihood)."""
    from scdist.ctmm import blockkernel

    monkeypatch.setattr(blockkernel, "SPECIALISE_MIN", 10 ** 12)


def test_recovers_hom2_V_beta_gamma_from_free_simulation():
    V = np.array([0.1, 0.2, 0.4, 0.0])
    beta = np.array([1.0, 0.5, -0.5, 0.0])
    sim = ctmm.simulate_ctp(400, 80, 4, hom2=0.3, V=V, beta=beta, n_covariates=1, gamma=[0.5],
                            seed=1)
    res = ctmm.fit(sim, models=("hom", "free"), tests=("lrt",), covariates=["cov0"], op=False)
    free = res.sel(model="free")
    assert bool(free.converged.all())
    # means over 400 genes: standard errors ~ 0.01 for the variances
    assert float(free.hom2.mean()) == pytest.approx(0.3, abs=0.03)
    np.testing.assert_allclose(np.diagonal(free.V.mean("gene").values), V, atol=0.03)
    np.testing.assert_allclose(free.beta.mean("gene").values, beta, atol=0.03)
    assert float(free.gamma.mean()) == pytest.approx(0.5, abs=0.03)
    # Free-simulated genes: the Free vs Hom LRT has power
    assert float((res.pvalue.sel(test="free_vs_hom_lrt") < 0.05).mean()) > 0.9


def test_full_model_recovers_covariances():
    Vt = np.array([[0.4, 0.2, 0.0], [0.2, 0.4, -0.1], [0.0, -0.1, 0.3]])
    sim = ctmm.simulate_ctp(200, 120, 3, hom2=0.0, V=Vt, seed=2)
    res = ctmm.fit(sim, models=("free", "full"), tests=("lrt",), op=False)
    full = res.sel(model="full")
    assert float(full.converged.mean()) > 0.97
    np.testing.assert_allclose(full.V.where(full.converged).mean("gene").values, Vt, atol=0.04)
    assert bool(np.isnan(full.hom2).all())


@pytest.mark.parametrize("method", ["reml", "ml"])
def test_optimum_equals_brute_force_dense_optimiser(method):
    """Same maximum as BFGS on the dense N*C likelihood (covariates, batch random effect,
    missing pairs). With negative variance components the likelihood also has spikes where a
    donor's covariance becomes singular; the brute-force search excludes them (eigenvalue
    guard) so both find the regular maximum."""
    sim = ctmm.simulate_ctp(3, 30, 3, hom2=0.3, V=[0.2, 0.1, 0.3], n_covariates=1, n_batches=4,
                            batch_var=0.2, missing_frac=0.1, seed=3)
    res = ctmm.fit(sim, models=("free",), method=method, tests=(), covariates=["cov0"],
                   random_effects=["batch"], op=False)
    Y = sim["mean"].transpose("gene", "donor", "celltype").values
    NU = sim["nu"].transpose("gene", "donor", "celltype").values
    batch = np.unique(sim["batch"].values, return_inverse=True)[1]
    Z = sim["covariates"].values
    for g in range(3):
        d = Dense("free", Y[g], NU[g], np.isfinite(Y[g]), Z, batch)
        d.nu = np.nan_to_num(d.nu, nan=1.0)

        def f(t):
            S = d.sigma(t)
            ev = np.linalg.eigvalsh(S)
            if ev[0] <= 1e-3 * np.abs(np.diag(S)).max():
                return 1e10
            return -d.loglik(t, method)

        got = res.isel(gene=g).sel(model="free")
        theta = np.r_[float(got.hom2), np.diagonal(got.V.values), got.re_var.values.ravel()]
        best = optimize.minimize(f, np.full(5, 0.2), method="BFGS", options={"gtol": 1e-8})
        assert bool(got.converged)
        assert float(got.loglik) == pytest.approx(-best.fun, abs=1e-5)
        assert float(got.loglik) == pytest.approx(d.loglik(theta, method), abs=1e-8)
        np.testing.assert_allclose(theta, best.x, atol=2e-3)


def test_missing_pairs_drop_equals_removing_the_donor():
    """A donor with every pair missing contributes nothing: same fit as without that donor."""
    sim = ctmm.simulate_ctp(20, 40, 3, hom2=0.2, V=[0.1, 0.2, 0.3], seed=4)
    holed = sim.copy(deep=True)
    holed["mean"][dict(donor=5)] = np.nan
    holed["nu"][dict(donor=5)] = np.nan
    a = ctmm.fit(holed, models=("hom", "free"), tests=("lrt",), op=False)
    b = ctmm.fit(sim.drop_isel(donor=5), models=("hom", "free"), tests=("lrt",), op=False)
    for v in ("hom2", "V", "beta", "loglik"):
        np.testing.assert_allclose(a[v].values, b[v].values, atol=1e-5)


def test_missing_pairs_change_the_fit_and_stay_finite():
    sim = ctmm.simulate_ctp(30, 40, 4, hom2=0.2, V=[0.1, 0.2, 0.3, 0.1], missing_frac=0.15, seed=5)
    assert np.isnan(sim["mean"].values).any()
    res = ctmm.fit(sim, models=("hom", "free"), tests=("lrt", "wald"), op=False)
    assert bool(res.converged.all())
    assert np.isfinite(res.pvalue.values).all()


def test_missing_impute_uses_soft_impute():
    pytest.importorskip("scdist.ctmm.impute")
    sim = ctmm.simulate_ctp(8, 25, 3, hom2=0.2, V=[0.1, 0.2, 0.3], missing_frac=0.1, seed=6)
    res = ctmm.fit(sim, models=("hom", "free"), tests=("lrt",), missing="impute", op=False)
    assert res.attrs["missing"] == "impute"
    assert np.isfinite(res.loglik.values).all()
    dropped = ctmm.fit(sim, models=("hom", "free"), tests=("lrt",), op=False)
    # imputation adds pseudo-observations, so the likelihood covers more entries
    assert not np.allclose(res.loglik.values, dropped.loglik.values)


def test_op_fit_recovers_hom2():
    sim = ctmm.simulate_ctp(300, 100, 3, hom2=0.4, V=0, seed=7)
    res = ctmm.fit(sim, models=("hom", "free"), tests=("lrt",), op=True)
    hom = res.sel(model="hom")
    assert float(hom.op_hom2.mean()) == pytest.approx(0.4, abs=0.05)
    assert float(hom.hom2.mean()) == pytest.approx(0.4, abs=0.03)
    assert "op_pvalue" in res


def test_he_method_recovers_parameters_and_labels():
    sim = ctmm.simulate_ctp(300, 80, 3, hom2=0.3, V=[0.0, 0.2, 0.4], seed=8)
    res = ctmm.fit(sim, models=("hom", "free"), method="he", tests=("jackknife",), op=False)
    assert res.attrs["method"] == "he"
    assert bool(np.isnan(res.loglik).all())
    np.testing.assert_allclose(np.diagonal(res.V.sel(model="free").mean("gene").values),
                               [0.0, 0.2, 0.4], atol=0.05)
    assert list(res.test.values) == ["free_vs_hom_jackknife", "mean_jackknife"]


def test_result_layout_and_attrs():
    sim = ctmm.simulate_ctp(5, 20, 3, seed=9)
    res = ctmm.fit(sim, models=("hom", "free", "full"), tests=("lrt", "wald", "jackknife"), op=False)
    assert set(res.dims) >= {"model", "gene", "celltype", "celltype2", "test"}
    assert res.hom2.dims == ("model", "gene")
    assert res.V.dims == ("model", "gene", "celltype", "celltype2")
    assert res.beta.dims == ("model", "gene", "celltype")
    assert res.pvalue.dims == ("test", "gene")
    assert list(res.test.values) == ["free_vs_hom_lrt", "free_vs_hom_wald", "free_vs_hom_jackknife",
                                     "full_vs_free_lrt", "mean_jackknife"]
    assert list(res.gene.values) == list(sim.gene.values)
    assert float(res.hom2.sel(model="hom").isel(gene=0)) >= -1
    assert (res.V.sel(model="hom") == 0).all()
    assert res.attrs["method"] == "reml"


@pytest.mark.parametrize("kwargs, field", [
    (dict(models=("hom", "bogus")), "models"),
    (dict(method="bayes"), "method"),
    (dict(tests=("lrt", "permutation")), "tests"),
    (dict(covariates=["nope"]), "covariates"),
    (dict(random_effects=["nope"]), "random_effects"),
    (dict(models=("hom",), tests=("wald",)), "models"),
    (dict(missing="zero"), "missing"),
])
def test_bad_arguments_name_the_field(kwargs, field):
    sim = ctmm.simulate_ctp(3, 20, 3, n_covariates=1, seed=10)
    with pytest.raises(InputError) as exc:
        ctmm.fit(sim, **kwargs)
    assert exc.value.field == field and exc.value.fix


def test_bad_values_fail_before_work():
    sim = ctmm.simulate_ctp(3, 20, 3, seed=11)
    bad = sim.copy(deep=True)
    bad["nu"][0, 0, 0] = -1.0
    with pytest.raises(InputError, match=r"\[nu\]"):
        ctmm.fit(bad)
    few = sim.copy(deep=True)
    few["mean"][dict(celltype=1)] = np.nan
    with pytest.raises(InputError, match=r"\[celltype\]"):
        ctmm.fit(few)
    with pytest.raises(InputError, match=r"\[donor\]"):
        ctmm.fit(ctmm.simulate_ctp(3, 7, 3, seed=1))


def test_parameter_names_and_unpack_roundtrip():
    assert cv.param_names("free", ["a", "b"]) == ["hom2", "V[a]", "V[b]"]
    th = np.array([[0.1, 0.2, 0.3]])
    hom2, V = cv.unpack("full", th, 2)
    np.testing.assert_allclose(V[0], [[0.1, 0.2], [0.2, 0.3]])
