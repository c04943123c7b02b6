"""scdist.ursm.fit: recovery on seeded simulations, determinism, submodels, Ray actors, bad input."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from scdist.errors import InputError
from scdist.ursm import fit, naive_profile, simulate

FAST = dict(burnin=15, samples=30)


@pytest.fixture(scope="module")
def sim200():
    return simulate(seed=5)


@pytest.mark.slow
def test_urs_beats_naive_single_cell_and_joint(sim200):
    s = sim200
    naive = np.abs(naive_profile(s.Y, s.cell_types, 3) - s.A).sum()
    sc = fit(s.Y, s.cell_types, None, em_iters=8, **FAST)
    l1_sc = np.abs(sc.A.values - s.A).sum()
    joint = fit(s.Y, s.cell_types, s.X, em_iters=8, **FAST)
    l1_joint = np.abs(joint.A.values - s.A).sum()
    assert l1_sc < 0.6 * naive, (l1_sc, naive)
    # spec §3 reference-matching EM, single-cell part: with the reference's choices (cold chain every
    # iteration, τ pinned near N, Euclidean A steps) the single-cell submodel lands near the paper's
    # 0.27 (measured 0.266 here, 0.30 on seeds 1 and 2); the joint model's improvement on it needs
    # ~50 iterations with those choices (benchmarks/ursm_paper_figures.py), too long for the suite
    ref = fit(s.Y, s.cell_types, None, em_iters=8, warm_start=False, init_dropout="pinned",
              a_solver="euclidean", **FAST)
    l1_ref = np.abs(ref.A.values - s.A).sum()
    assert 0.20 < l1_ref < 0.34, l1_ref
    assert l1_joint < 0.5 * naive, (l1_joint, naive)
    # W: posterior means close to the truth (uniform guess gives ~0.5 per sample here)
    l1_w = np.abs(joint.W.values - s.W).sum() / s.W.shape[0]
    assert l1_w < 0.15, l1_w
    # dropout posteriors live on zeros only, imputation fills called dropouts with R_l Â
    zero = s.Y == 0
    dp = joint.dropout_prob.values
    assert (dp[~zero] == 0).all() and (dp[zero] > 0).mean() > 0.5
    imp = joint.imputed.values
    assert np.array_equal(imp[~zero], s.Y[~zero].astype(np.float32))
    called = zero & (dp > 0.5)
    R = s.Y.sum(1)
    assert np.allclose(imp[called], (R[:, None] * joint.A.values[:, s.cell_types].T)[called], rtol=1e-5)
    # the dropout rate among zeros is calibrated and τ's prior mean is near the truth (1.5 N = 300)
    truth_rate = (s.S[zero] == 0).mean()
    assert abs(dp[zero].mean() - truth_rate) < 0.08, (dp[zero].mean(), truth_rate)
    assert abs(joint.mu_tau.item() / 300 - 1) < 0.2 and joint.mu_kappa.item() < -0.3
    assert joint.objective.dims == ("em_iter",) and joint.objective.size == 8
    assert joint.A.dims == ("gene", "celltype") and np.allclose(joint.A.sum("gene"), 1)
    assert joint.W.dims == ("bulk_sample", "celltype") and np.allclose(joint.W.sum("celltype"), 1)
    for v in ("kappa", "tau"):
        assert joint[v].dims == ("cell",)
    assert joint.alpha.dims == ("celltype",)


def _small(seed=9):
    return simulate(n_genes=80, n_cells=30, n_bulk=20, seed=seed)


def test_same_seed_same_result_and_seed_matters():
    s = _small()
    kw = dict(em_iters=2, burnin=3, samples=6, chains=2, cell_block_size=16, bulk_block_size=8)
    a = fit(s.Y, s.cell_types, s.X, seed=3, **kw)
    b = fit(s.Y, s.cell_types, s.X, seed=3, **kw)
    c = fit(s.Y, s.cell_types, s.X, seed=4, **kw)
    for v in a.data_vars:
        np.testing.assert_array_equal(a[v].values, b[v].values)
    assert not np.array_equal(a.A.values, c.A.values)
    d = fit(s.Y, s.cell_types, s.X, seed=3, thin=2, **kw)
    assert d.attrs["thin"] == 2 and not np.array_equal(a.A.values, d.A.values)
    for v in ("rhat_W", "rhat_kappa", "rhat_tau", "rhat_logjoint", "objective_chain"):
        assert v in a and np.isfinite(a[v].values).all()


@pytest.mark.ray
def test_ray_actors_equal_in_process(ray_local):
    s = _small(10)
    kw = dict(em_iters=2, burnin=3, samples=6, chains=2, cell_block_size=16, bulk_block_size=8, seed=1)
    local = fit(s.Y, s.cell_types, s.X, engine="local", **kw)
    ray_ = fit(s.Y, s.cell_types, s.X, engine="ray", min_ray_entries=0, n_actors=3, ray_timeout=120, **kw)
    assert ray_.attrs["engine"] == "ray" and local.attrs["engine"] == "local"
    for v in local.data_vars:
        np.testing.assert_array_equal(local[v].values, ray_[v].values, err_msg=v)
    # tiny problems degrade to in-process by default
    tiny = fit(s.Y, s.cell_types, s.X, engine="ray", em_iters=1, burnin=1, samples=2)
    assert tiny.attrs["engine"] == "local"


def test_map_w_variant_and_inputs_as_anndata_dataframe_sparse(sim200):
    import anndata as ad

    s = _small(11)
    genes = [f"g{i}" for i in range(s.Y.shape[1])]
    adata = ad.AnnData(sp.csr_matrix(s.Y.astype(np.float32)),
                       obs=pd.DataFrame({"ct": pd.Categorical(np.array(["T", "B", "M"])[s.cell_types])},
                                        index=[f"c{i}" for i in range(len(s.Y))]),
                       var=pd.DataFrame(index=genes))
    bulk = pd.DataFrame(s.X, columns=genes, index=[f"b{j}" for j in range(len(s.X))])
    ds = fit(adata, adata.obs["ct"], bulk, em_iters=3, map_w=True, **FAST)
    assert list(ds.celltype.values) == ["B", "M", "T"]
    assert list(ds.gene.values) == genes and ds.bulk_sample.values[0] == "b0"
    assert (ds.alpha.values >= 1.0).all()
    assert np.allclose(ds.W.sum("celltype"), 1)


def test_bulk_only_submodel_with_markers_deconvolves():
    s = simulate(n_genes=150, n_cells=30, n_bulk=60, seed=12)
    markers = {k: s.markers[k][:5] for k in range(3)}
    ds = fit(None, None, s.X, n_types=3, markers=markers, em_iters=10, **FAST)
    assert "dropout_prob" not in ds and ds.W.shape == (60, 3)
    l1_w = np.abs(ds.W.values - s.W).sum() / 60
    uniform = np.abs(1 / 3 - s.W).sum() / 60
    assert l1_w < 0.6 * uniform, (l1_w, uniform)


def test_fewer_single_cell_types_than_bulk_types():
    s = simulate(n_genes=150, n_cells=70, n_bulk=60, n_types_sc=2, n_types_bulk=3, seed=13)
    markers = {2: s.markers[2][:5]}
    ds = fit(s.Y, s.cell_types, s.X, n_types=3, markers=markers, em_iters=6, **FAST)
    assert ds.A.shape == (150, 3) and ds.W.shape == (60, 3)
    assert list(ds.celltype.values) == ["0", "1", "2"]
    # the bulk-only type's marker genes end up high in its own column
    assert (ds.A.values[s.markers[2][:5], 2] > ds.A.values[s.markers[2][:5], :2].max(axis=1)).all()


@pytest.mark.parametrize("kwargs,field", [
    (dict(sc=np.array([[1.5, 2.0]])), "sc_counts"),
    (dict(sc=-np.ones((3, 2))), "sc_counts"),
    (dict(sc=np.array([[np.nan, 1.0]])), "sc_counts"),
    (dict(ct=[0, 1]), "cell_types"),
    (dict(bulk=np.ones((2, 5), int)), "bulk_counts"),
    (dict(n_types=1), "n_types"),
    (dict(map_w=True, eps_alpha=0.5), "eps_alpha"),
    (dict(engine="spark"), "engine"),
    (dict(burnin=-1), "burnin"),
    (dict(samples=0), "samples"),
    (dict(eps_A=0.5), "eps_A"),
    (dict(sc=None, ct=None, n_types=3), "markers"),
    (dict(n_types=4), "markers"),
    (dict(markers={0: ["nope"]}), "markers"),
    (dict(pg_sampler="saddle"), "pg_sampler"),
    (dict(prior_step="fast"), "prior_step"),
    (dict(prior_step="collapsed", stop_rule="crossfit"), "prior_step"),
])
def test_bad_input_names_the_field(kwargs, field):
    rng = np.random.default_rng(0)
    Y = rng.poisson(2, size=(6, 4))
    args = dict(sc=Y, ct=[0, 1, 0, 1, 0, 1], bulk=rng.poisson(20, size=(3, 4)))
    for k in ("sc", "ct", "bulk"):
        if k in kwargs:
            args[k] = kwargs.pop(k)
    with pytest.raises(InputError) as ei:
        fit(args["sc"], args["ct"], args["bulk"], **{**dict(em_iters=1, burnin=1, samples=1), **kwargs})
    assert ei.value.field == field
    assert "Fix:" in str(ei.value)


def test_chains_pool_statistics_not_parameters():
    """Spec §2.4: several chains are pooled by averaging their §1.2 statistics and running one
    M-step; fit's first M-step must equal that (bit for bit) and differ from the mean of per-chain
    M-steps. Spec §2.8: under MAP-W the deterministic bulk block is computed once for all chains."""
    from scdist.ursm.data import prepare
    from scdist.ursm.em import BlockLayout, EMSettings, GibbsEM, LocalExecutor
    from scdist.ursm.params import initial_theta

    s = _small(11)
    kw = dict(burnin=3, samples=6, chains=2, seed=5)
    got = fit(s.Y, s.cell_types, s.X, em_iters=1, cell_block_size=16, bulk_block_size=8, **kw)
    d = prepare(s.Y, s.cell_types, s.X)
    st = EMSettings(em_iters=1, **kw)
    th0 = initial_theta(d.Y, d.G, d.X, d.K, {}, eps_A=st.eps_A)
    layout = BlockLayout.make(d.L, d.M, 16, 8, False)
    em = GibbsEM(d.Y, d.G, d.X, d.K, st, th0, LocalExecutor(d.Y, d.G, d.X, d.K, layout, st))
    em.layout = layout
    pooled, per_chain = em.estep(0)
    for name in ("ES", "Ek", "Et2", "C1", "C2"):
        np.testing.assert_array_equal(getattr(pooled.cell, name),
                                      (getattr(per_chain[0].cell, name) + getattr(per_chain[1].cell, name)) / 2)
    np.testing.assert_array_equal(pooled.bulk.cZ, (per_chain[0].bulk.cZ + per_chain[1].bulk.cZ) / 2)
    th = em.mstep(pooled)
    np.testing.assert_array_equal(got.A.values, th.A)
    assert got.mu_kappa.item() == th.mu_kappa and np.array_equal(got.alpha.values, th.alpha)
    per = [em.mstep(p, keep_state=False) for p in per_chain]
    assert np.abs((per[0].A + per[1].A) / 2 - th.A).max() > 1e-6      # pooling parameters is different
    # MAP-W: one bulk block for every chain
    stw = EMSettings(em_iters=1, map_w=True, eps_alpha=1.0, **kw)
    layw = BlockLayout.make(d.L, d.M, 16, 8, True)
    emw = GibbsEM(d.Y, d.G, d.X, d.K, stw, th0, LocalExecutor(d.Y, d.G, d.X, d.K, layw, stw))
    emw.layout = layw
    pw, pcw = emw.estep(0)
    assert not layw.bulk_blocks and all(p.bulk is pw.bulk for p in pcw)


def test_collapsed_prior_step_uses_the_pooled_ridge_sums():
    """prior_step='collapsed': the sums of m_l and P_l⁻¹ are added over cell blocks and averaged
    over chains, and fit's μ is ``collapsed_prior_mean`` of them at θ⁰'s prior precisions; the
    σ² step uses that μ; the draws are those of the default step (same A after one iteration)."""
    from scdist.ursm import mstep
    from scdist.ursm.data import prepare
    from scdist.ursm.params import initial_theta

    s = _small(12)
    kw = dict(em_iters=1, burnin=3, samples=6, chains=2, seed=2, cell_block_size=16, final_estep=False)
    seen = {}
    got = fit(s.Y, s.cell_types, s.X, prior_step="collapsed", callback=lambda it, th, p: seen.update(p=p), **kw)
    ref = fit(s.Y, s.cell_types, s.X, **kw)
    assert got.attrs["prior_step"] == "collapsed"
    np.testing.assert_array_equal(got.A.values, ref.A.values)       # A's step does not use μ
    c = seen["p"].cell
    d = prepare(s.Y, s.cell_types, s.X)
    th0 = initial_theta(d.Y, d.G, d.X, d.K, {}, eps_A=1e-6)
    L = len(c.Ek)
    assert L == s.Y.shape[0] and c.ridge.shape == (5,)
    np.testing.assert_allclose(c.ridge[:2] / L, [c.Ek.mean(), c.Et.mean()], rtol=0.05, atol=0.05)
    mu = mstep.collapsed_prior_mean(c.ridge[:2], [[c.ridge[2], c.ridge[3]], [c.ridge[3], c.ridge[4]]], L,
                                    [th0.mu_kappa, th0.mu_tau], [1 / th0.s2_kappa, 1 / th0.s2_tau])
    np.testing.assert_allclose([got.mu_kappa.item(), got.mu_tau.item()], mu, rtol=1e-12)
    assert np.isclose(got.sigma2_kappa.item(), np.mean(c.Ek2) - 2 * mu[0] * c.Ek.mean() + mu[0] ** 2)
    assert not np.isclose(got.mu_kappa.item(), ref.mu_kappa.item())
