"""MrVI analyses over a trained model: streaming equals all-at-once, Dask equals in-process,
shapes / coordinates, store round trip, bad input; and on a simulated study with known truth
(sample groups shifting genes in one cell type, one cell type differentially abundant, one
sample missing a cell type): distances separate the true groups in the affected type only,
DE recovers the affected genes, DA finds the DA type, admissibility drops the missing pairs."""
from __future__ import annotations

import numpy as np
import pytest
import xarray as xr

from scdist.errors import InputError
from scdist.vae import train_mrvi
from scdist.vae import analysis as A
from scdist.vae.simulate import sample_effects


pytestmark = pytest.mark.usefixtures("torch_one_thread")


def _auc(score, truth):
    from scipy.stats import rankdata
    score, truth = np.asarray(score, float), np.asarray(truth, bool)
    r = rankdata(score)
    n1, n0 = truth.sum(), (~truth).sum()
    return (r[truth].sum() - n1 * (n1 + 1) / 2) / (n1 * n0)


def _ari(a, b):
    import pandas as pd
    from scipy.special import comb
    ct = pd.crosstab(np.asarray(a), np.asarray(b)).to_numpy()
    s_ij = comb(ct, 2).sum()
    s_a, s_b = comb(ct.sum(1), 2).sum(), comb(ct.sum(0), 2).sum()
    exp = s_a * s_b / comb(ct.sum(), 2)
    return (s_ij - exp) / (0.5 * (s_a + s_b) - exp)


# ----------------------------------------------------------------------------- mechanics (quick model)
@pytest.fixture(scope="module")
def quick():
    adata, info = sample_effects(n_cells=700, n_genes=60, n_samples=5, n_types=2, n_markers=10, seed=3,
                                 n_batches=2)
    model = train_mrvi(adata, "sample", "batch", seed=0, max_epochs=2, n_hidden=32, n_latent=8, n_latent_u=4,
                       batch_size=128)
    assert len(model._source.chunks) > 1  # several chunks: the streaming is exercised
    return adata, model


def test_streamed_distances_equal_all_at_once(quick):
    adata, model = quick
    cells = np.arange(adata.n_obs)
    Z = A.counterfactual_z(model, cells).values                       # cells x S x Lz
    D = np.linalg.norm(Z[:, :, None] - Z[:, None], axis=-1)
    ct = adata.obs["celltype"].astype(str).to_numpy()
    agg = model.sample_distances(groupby="celltype", min_cells=1)
    assert agg.dims == ("group", "sample", "sample_b")
    assert list(agg["group"].values) == ["t0", "t1"]
    assert list(agg["sample"].values) == list(model.samples) == list(agg["sample_b"].values)
    for g in ("t0", "t1"):
        np.testing.assert_allclose(agg.sel(group=g).values, D[ct == g].mean(0), rtol=1e-4, atol=1e-5)
    counts = agg["n_cells"].sel(group="t0").values
    np.testing.assert_array_equal(counts, [np.sum((ct == "t0") & (adata.obs["sample"].astype(str) == s))
                                           for s in model.samples])
    # groupby None: one group "all"; a subset of cells and of samples
    sub = np.arange(0, adata.n_obs, 3)
    one = model.sample_distances(cells=sub, min_cells=1, samples=list(model.samples[:3]))
    assert one.shape == (1, 3, 3) and one["group"].item() == "all"
    np.testing.assert_allclose(one.values[0], D[sub][:, :3, :3].mean(0), rtol=1e-4, atol=1e-5)
    # minibatches smaller than the source's chunks (several tasks, several minibatches each)
    small = model.sample_distances(cells=sub, min_cells=1, samples=list(model.samples[:3]), batch_size=40)
    np.testing.assert_allclose(small.values, one.values, rtol=1e-5, atol=1e-6)
    loc = A.local_sample_distances(model, sub[:20])
    assert loc.dims == ("cell", "sample", "sample_b") and loc.shape == (20, 5, 5)
    np.testing.assert_allclose(loc.values, D[sub[:20]], rtol=1e-4, atol=1e-5)
    assert list(loc["cell"].values) == list(adata.obs_names[sub[:20]])


def test_min_cells_and_normalisation(quick):
    adata, model = quick
    agg = model.sample_distances(groupby="celltype", min_cells=10_000)
    assert np.isnan(agg.values).all()
    n1 = A.sample_distances(model, normalize=True, mc_samples=8, seed=1)
    n2 = A.sample_distances(model, normalize=True, mc_samples=8, seed=1)
    xr.testing.assert_equal(n1, n2)                                   # seeded
    raw = A.sample_distances(model)
    assert n1.attrs["normalized"] == 1 and not np.allclose(n1.values, raw.values)
    with pytest.raises(InputError, match=r"\[mc_samples\]"):
        A.sample_distances(model, normalize=True, mc_samples=1)
    with pytest.raises(InputError, match=r"\[groupby\]"):
        model.sample_distances(groupby="nope")
    with pytest.raises(InputError, match=r"\[cells\]"):
        model.sample_distances(cells=[10 ** 7])


def test_dask_map_equals_in_process(quick, dask_client):
    adata, model = quick
    local = model.sample_distances(groupby="celltype", min_cells=1)
    remote = model.sample_distances(groupby="celltype", min_cells=1, client=dask_client)
    np.testing.assert_allclose(remote.values, local.values, rtol=1e-5, atol=1e-6)
    da_l = model.differential_abundance("group", max_cells=50)
    da_r = model.differential_abundance("group", max_cells=50, client=dask_client)
    np.testing.assert_allclose(da_r["log_probs"].values, da_l["log_probs"].values, rtol=1e-5)


def test_de_scores_admissibility_in_its_own_pass(quick):
    """DE with admissible=True scores the pairs inside the DE pass; same pairs and statistics
    as filtering with the separately computed admissibility result."""
    _, model = quick
    adm = model.admissibility(max_cells=60, seed=2)
    assert 0 < adm["admissible"].values.mean() < 1                 # the filter drops some pairs
    fused = model.differential_expression("group", max_cells=60, seed=2)
    given = model.differential_expression("group", admissible=adm)
    np.testing.assert_array_equal(fused["n_admissible"].values, adm["n_admissible"].values)
    np.testing.assert_allclose(fused["chi2"].values, given["chi2"].values, rtol=1e-6)
    np.testing.assert_allclose(fused["lfc_mean"].values, given["lfc_mean"].values, rtol=1e-5, atol=1e-7)


def test_cluster_samples_result(quick):
    _, model = quick
    agg = model.sample_distances(groupby="celltype", min_cells=1)
    cl = A.cluster_samples(agg, n_clusters=2)
    assert cl["linkage"].dims == ("group", "merge", "linkage_field") and cl["linkage"].shape == (2, 4, 4)
    for g in range(2):
        assert sorted(cl["order"].values[g]) == list(range(len(model.samples)))
        assert set(cl["cluster"].values[g]) <= {1, 2}
    with pytest.raises(InputError, match=r"\[distances\]"):
        A.cluster_samples(agg.transpose("sample", "group", "sample_b"))


def test_results_written_to_store(quick, tmp_store):
    from scdist.store import create_study
    from scdist.store.markers import STAGE, is_done

    adata, model = quick
    study = create_study(tmp_store)
    agg = model.sample_distances(groupby="celltype", min_cells=1)
    url = A.write_result(agg, study, "r1", "distances")
    back = A.results.read_result(study, "r1", "distances")
    np.testing.assert_allclose(back["distance"].values, agg.values)
    assert list(back["sample"].values) == list(agg["sample"].values) and is_done(url, STAGE)
    da = model.differential_abundance("group", max_cells=50)
    url = A.write_result(da, study, "r1", "da", cell_chunk=256)
    back = A.results.read_result(study, "r1", "da")
    np.testing.assert_allclose(back["log_ratio"].values, da["log_ratio"].values)
    assert is_done(url, "cells-000002") and is_done(url, STAGE)


def test_bad_input(quick):
    adata, model = quick
    with pytest.raises(InputError, match=r"\[celltype\]"):
        model.differential_expression("celltype")                    # varies within samples
    with pytest.raises(InputError, match=r"\[covariates\]"):
        model.differential_expression([])
    with pytest.raises(InputError, match=r"\[sample_groups\]"):
        model.differential_abundance({"x": (["s0"], ["s0"])})
    with pytest.raises(InputError, match=r"\[quantile\]"):
        model.admissibility(quantile=1.5)
    with pytest.raises(InputError, match=r"\[admissible\]"):
        model.differential_expression("group", admissible="yes")


# ----------------------------------------------------------------------------- quality (trained model)
@pytest.fixture(scope="module")
def study():
    """Type t0: samples of group g1 shift 30 genes (DE). Type t1: depleted in g0 samples (DA).
    Sample s0 has no t2 cells (out of distribution for t2)."""
    adata, info = sample_effects(n_cells=2200, n_genes=80, n_samples=8, n_types=3, n_markers=15, lfc=2.0,
                                 seed=0)
    rng = np.random.default_rng(0)
    obs = adata.obs
    grp = obs["group"].astype(str).to_numpy()
    ct = obs["celltype"].astype(str).to_numpy()
    drop = ((ct == "t1") & (grp == "g0") & (rng.random(adata.n_obs) < 0.75)) | (
        (ct == "t2") & (obs["sample"].astype(str).to_numpy() == "s0"))
    adata = adata[~drop].copy()
    model = train_mrvi(adata, "sample", seed=0, max_epochs=40, n_hidden=64)
    return adata, info, model


@pytest.mark.slow
def test_distances_separate_true_groups_in_affected_type(study):
    adata, info, model = study
    agg = model.sample_distances(groupby="celltype")
    g = info["sample_group"]
    same = (g[:, None] == g[None]) & ~np.eye(len(g), dtype=bool)
    ratio = {t: np.nanmean(agg.sel(group=t).values[g[:, None] != g[None]]) / np.nanmean(agg.sel(group=t).values[same])
             for t in ("t0", "t1")}
    assert ratio["t0"] > 3 and ratio["t0"] > 2 * ratio["t1"], ratio
    cl = A.cluster_samples(agg, n_clusters=2)
    assert _ari(cl["cluster"].sel(group="t0").values, g) == 1.0
    # the type with a sample missing: that sample is left out (NaN) by the k = 5 rule
    assert np.isnan(agg.sel(group="t2", sample="s0").values).all()
    assert not bool(cl["clustered"].sel(group="t2", sample="s0"))


@pytest.mark.slow
def test_de_recovers_affected_genes(study):
    adata, info, model = study
    de = model.differential_expression("group", groupby="celltype", admissible=False, lfc_cells=np.arange(5))
    assert de["covariate"].values.tolist() == ["group[g1]"]
    genes = np.zeros(adata.n_vars, bool)
    genes[info["effect_genes"][1]] = True
    lfc_t0 = de["lfc_mean"].sel(group="t0", covariate="group[g1]").values
    # signed: the effect genes go up; every other gene goes down by the softmax renormalisation
    # (30 of 80 genes raised e^2-fold), so |LFC| alone would not rank them
    assert _auc(lfc_t0, genes) > 0.95
    assert lfc_t0[genes].mean() > 0.5                                  # raised in g1 (true LFC 2 / ln 2 = 2.9 log2)
    lfc_t2 = de["lfc_mean"].sel(group="t2", covariate="group[g1]").values
    assert np.abs(lfc_t2[genes]).mean() < 0.3 * lfc_t0[genes].mean()
    ct = adata.obs["celltype"].astype(str).to_numpy()
    eff = de["beta_norm"].values[:, 0]
    assert _auc(eff, ct == "t0") > 0.9                                 # effect strength flags the affected cells
    assert de["lfc"].shape == (5, 1, adata.n_vars)


@pytest.mark.slow
def test_da_finds_da_type_and_admissibility(study):
    adata, info, model = study
    da = model.differential_abundance("group", groupby="celltype")
    ct = adata.obs["celltype"].astype(str).to_numpy()
    r = da["log_ratio"].sel(contrast="group=g1").values
    # enriched in g1 samples: t1 cells rank above the null type's. (The DE type t0 is left out of
    # this ranking: the trained u keeps part of t0's group shift, so its cells split by group in u.)
    keep = ct != "t0"
    assert _auc(r[keep], ct[keep] == "t1") > 0.85
    res = da.sel(contrast="group=g1")
    md = res["mean_difference"].to_series()
    # t1 is enriched in g1 (log ratio ~ log 3 against ~ -0.3 for the others): the largest shift
    assert md.idxmax() == "t1" and md["t1"] > 0.5, md
    assert float(res["pvalue"].sel(group="t1")) < 1e-3
    assert md["t0"] < 0                                                # relatively depleted in g1
    adm = model.admissibility()
    t2 = ct == "t2"
    assert adm["admissible"].sel(sample="s0").values[t2].mean() < 0.2   # s0 has no t2 cells
    others = adm["admissible"].drop_sel(sample="s0").values[t2]
    assert others.mean() > 0.8
    assert adm["n_admissible"].dims == ("cell",)


@pytest.mark.slow
def test_cluster_cells_by_distance_matrices(study):
    adata, info, model = study
    cc = A.cluster_cells(model, max_fit_cells=1500, resolution=0.5)
    ct = adata.obs["celltype"].astype(str).to_numpy()
    # the affected type has its own sample stratification: its cells form their own cluster(s)
    t0_labels = set(cc["cluster"].values[ct == "t0"])
    other = cc["cluster"].values[ct != "t0"]
    assert np.isin(other, list(t0_labels)).mean() < 0.1
    agg = model.sample_distances(groupby=cc["cluster"].values)
    assert agg.sizes["group"] == len(set(cc["cluster"].values))
