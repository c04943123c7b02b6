"""MrVI analysis kernels on plain arrays: distances, densities, per-cell regression, the
composite-null t-test, the exact fast counterfactual path and the DE design."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats

from scdist.errors import InputError
from scdist.vae.analysis.counterfactual import counterfactual_states
from scdist.vae.analysis.design import design_matrix
from scdist.vae.analysis.kernels import (composite_null_ttest, covariate_statistics, gaussian_log_density,
                                         group_sums, pairwise_distances, per_sample_log_density,
                                         same_sample_distance_stats, weighted_least_squares)
from scdist.vae.mrvi import MrVIModule


def test_pairwise_distances_match_brute_force():
    g = torch.Generator().manual_seed(0)
    Z = torch.randn(7, 9, 5, generator=g) * 3 + 10.0  # far from the origin: the centring matters
    D = pairwise_distances(Z)
    ref = torch.linalg.norm(Z[:, :, None, :] - Z[:, None, :, :], dim=-1)
    assert D.shape == (7, 9, 9)
    torch.testing.assert_close(D, ref, atol=2e-5, rtol=1e-5)
    assert torch.all(D.diagonal(dim1=1, dim2=2) == 0)
    # tiny distances stay accurate despite |z| ~ 10
    Zs = Z[:, :1].expand(-1, 9, -1) + 1e-3 * torch.randn(7, 9, 5, generator=g)
    ref = torch.linalg.norm(Zs[:, :, None] - Zs[:, None], dim=-1)
    torch.testing.assert_close(pairwise_distances(Zs), ref, atol=1e-5, rtol=1e-3)


def test_same_sample_stats_and_group_sums():
    z = torch.zeros(8, 3, 2)
    z[4:, :, 0] = torch.tensor([1.0, 2.0, 3.0])
    mu, sd = same_sample_distance_stats(z)
    torch.testing.assert_close(mu, torch.tensor([1.0, 2.0, 3.0]))
    v = torch.arange(12.0).view(4, 3)
    s = group_sums(v, torch.tensor([1, 0, 1, -1]), 3)
    torch.testing.assert_close(s, torch.tensor([[3.0, 4, 5], [6, 8, 10], [0, 0, 0]]))


def test_gaussian_log_density_and_per_sample_reductions():
    g = torch.Generator().manual_seed(1)
    u = torch.randn(6, 4, generator=g) * 2
    m = torch.randn(5, 4, generator=g) * 2
    s = torch.rand(5, 4, generator=g) * 0.1 + 0.05   # narrow posteriors: large quadratic terms
    ld = gaussian_log_density(u, m, s)
    ref = torch.distributions.Normal(m.double()[None], s.double()[None]).log_prob(u.double()[:, None]).sum(-1)
    torch.testing.assert_close(ld, ref, rtol=1e-9, atol=1e-7)
    # 2 samples x 3 components, the second sample has one padding slot; cell 11 is component (0, 1)
    cm = torch.randn(2, 3, 4, generator=g)
    cs = torch.rand(2, 3, 4, generator=g) + 0.5
    ci = torch.tensor([[10, 11, 12], [20, 21, -1]])
    cv = ci >= 0
    uu = torch.randn(2, 4, generator=g)
    idx = torch.tensor([11, 99])
    full = gaussian_log_density(uu, cm.view(6, 4), cs.view(6, 4)).view(2, 2, 3)
    mx = per_sample_log_density(uu, idx, cm, cs, ci, cv, "max")
    mean = per_sample_log_density(uu, idx, cm, cs, ci, cv, "mean")
    # cell 11 leaves its own component out of sample 0; padding never counts
    # (float32 products: ~1e-7 relative to the quadratic terms)
    close = dict(rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(mx[0, 0], torch.maximum(full[0, 0, 0], full[0, 0, 2]), **close)
    torch.testing.assert_close(mx[1, 1], full[1, 1, :2].max(), **close)
    torch.testing.assert_close(mean[0, 0], torch.logsumexp(full[0, 0, [0, 2]], 0) - math.log(2), **close)
    torch.testing.assert_close(mean[1, 0], torch.logsumexp(full[1, 0], 0) - math.log(3), **close)
    torch.testing.assert_close(mean[1, 1], torch.logsumexp(full[1, 1, :2], 0) - math.log(2), **close)
    with pytest.raises(ValueError):
        per_sample_log_density(uu, idx, cm, cs, ci, cv, "median")


def _design(S, rng):
    x1 = np.repeat([0.0, 1.0], S // 2)
    x2 = rng.normal(size=S)
    X = np.column_stack([np.ones(S), x1 - x1.mean(), (x2 - x2.mean()) / x2.std()])
    return X


def test_least_squares_recovers_known_coefficients():
    rng = np.random.default_rng(0)
    S, L, B = 40, 6, 50
    X = _design(S, rng)
    beta = rng.normal(size=(B, 3, L))
    Z = np.einsum("sp,bpl->bsl", X, beta) + 0.05 * rng.normal(size=(B, S, L))
    W = np.ones((B, S))
    fit = weighted_least_squares(torch.from_numpy(Z), torch.from_numpy(X), torch.from_numpy(W))
    np.testing.assert_allclose(fit["beta"].numpy(), beta, atol=0.05)
    np.testing.assert_allclose(fit["sigma2"].numpy(), 0.05 ** 2, rtol=0.3)
    assert torch.all(fit["dof"] == S - 3)
    # zero weights are the same as dropping those samples
    W2 = W.copy()
    W2[:, :7] = 0
    f2 = weighted_least_squares(torch.from_numpy(Z), torch.from_numpy(X), torch.from_numpy(W2))
    f3 = weighted_least_squares(torch.from_numpy(Z[:, 7:]), torch.from_numpy(X[7:]), torch.ones(B, S - 7,
                                                                                                  dtype=torch.float64))
    np.testing.assert_allclose(f2["beta"].numpy(), f3["beta"].numpy(), atol=1e-10)
    np.testing.assert_allclose(f2["sigma2"].numpy(), f3["sigma2"].numpy(), rtol=1e-10)
    # a binary covariate seen at one level only is not identified: NaN statistics
    W4 = W.copy()
    W4[:, S // 2:] = 0
    st = covariate_statistics(weighted_least_squares(torch.from_numpy(Z), torch.from_numpy(X), torch.from_numpy(W4)))
    assert np.isnan(st["chi2"][:, 1]).all() and np.isfinite(st["chi2"][:, 2]).all()


def test_chi2_statistic_null_calibration_and_power():
    rng = np.random.default_rng(2)
    S, L, B = 24, 5, 4000
    X = _design(S, rng)
    Z = rng.normal(size=(B, S, L))                 # no covariate effect
    Z[:, :, :] += rng.normal(size=(B, 1, L))       # a per-cell intercept
    st = covariate_statistics(weighted_least_squares(torch.from_numpy(Z), torch.from_numpy(X),
                                                     torch.ones(B, S, dtype=torch.float64)))
    for j in (1, 2):
        p = st["pvalue"][:, j]
        assert stats.kstest(p, "uniform").pvalue > 0.01
        assert abs((p < 0.05).mean() - 0.05) < 0.015
    Z1 = Z + 0.8 * X[None, :, 1, None]             # effect of covariate 1 on every dimension
    st1 = covariate_statistics(weighted_least_squares(torch.from_numpy(Z1), torch.from_numpy(X),
                                                      torch.ones(B, S, dtype=torch.float64)))
    assert (st1["pvalue"][:, 1] < 0.05).mean() > 0.9
    # ||beta_n1|| estimates the true 0.8 sqrt(L) (X[:, 1] is the centred 0/1 column)
    assert abs(np.median(st1["beta_norm"][:, 1]) / (0.8 * math.sqrt(L)) - 1) < 0.15


def test_composite_null_ttest_size_and_power():
    rng = np.random.default_rng(3)
    delta = 0.1
    # at the boundary of the null (true difference = delta) the test rejects at most ~alpha
    rej = [composite_null_ttest(rng.normal(delta, 1, 400), rng.normal(0, 1, 600), delta)["pvalue"] < 0.05
           for _ in range(600)]
    assert np.mean(rej) < 0.05 + 0.025
    # inside the null (difference 0) with huge n: never significant (the point of delta)
    r0 = composite_null_ttest(rng.normal(0.02, 1, 200_000), rng.normal(0, 1, 200_000), delta)
    assert r0["pvalue"] > 0.5
    # a real difference well beyond delta is found, with the sign kept
    r1 = composite_null_ttest(rng.normal(-0.6, 1, 300), rng.normal(0, 1, 300), delta)
    assert r1["pvalue"] < 1e-4 and r1["diff"] < 0
    assert np.isnan(composite_null_ttest([1.0], [1.0, 2.0])["pvalue"])


@pytest.mark.parametrize("variant,n_latent,n_batch", [("attention", 12, 1), ("attention", 6, 3), ("linear", 12, 2)])
def test_fast_counterfactuals_equal_module(variant, n_latent, n_batch):
    torch.manual_seed(0)
    m = MrVIModule(50, n_sample=11, n_batch=n_batch, n_latent=n_latent, n_latent_u=6, variant=variant).eval()
    if variant == "linear":
        with torch.no_grad():
            m.A_s.normal_(0, 0.2)
            m.a_s.normal_()
    u = torch.randn(37, 6)
    s = torch.tensor([3, 0, 10, 5])
    with torch.no_grad():
        ref = m.counterfactual_z(u, s).permute(1, 0, 2)
        fast = counterfactual_states(m, u, s)
        slow = counterfactual_states(m, u, s, fast=False)
    assert fast.shape == (37, 4, n_latent)
    torch.testing.assert_close(fast, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(slow, ref)


def test_design_matrix_columns_and_errors():
    t = pd.DataFrame({"disease": ["a", "b", "b", "c", "a", "c"], "age": [20.0, 30.0, 50.0, 60.0, 41.0, 35.0],
                      "sex": [0, 1, 1, 0, 1, 0]}, index=[f"s{i}" for i in range(6)])
    d = design_matrix(t, ["disease", "age", "sex"])
    assert d.names == ["intercept", "disease[b]", "disease[c]", "age", "sex[1]"]
    assert d.kind == ["intercept", "binary", "binary", "continuous", "binary"]
    np.testing.assert_allclose(d.X[:, 1:].mean(0), 0, atol=1e-12)       # centred
    np.testing.assert_allclose(d.X[:, 3].std(), 1)
    np.testing.assert_allclose(d.lfc_high - d.lfc_low, [0, 1, 1, 1, 1])
    with pytest.raises(InputError, match=r"\[age\]"):
        design_matrix(t.assign(age=1.0), ["age"])
    with pytest.raises(InputError, match=r"\[covariates\]"):
        design_matrix(t.assign(age2=t["sex"] * 2.0), ["sex", "age2"])


def test_group_distance_sums_match_per_cell_sums():
    from scdist.vae.analysis.kernels import distance_block, group_distance_sums
    g = torch.Generator().manual_seed(3)
    B, S = 3 * distance_block(9) + 5, 9                        # several blocks and a partial one
    Z = torch.randn(B, S, 4, generator=g) + 5.0
    codes = torch.randint(-1, 3, (B,), generator=g)           # -1: cell in no group
    ref = torch.zeros(3, S, S, dtype=torch.float64)
    D = torch.linalg.norm(Z.double()[:, :, None] - Z.double()[:, None], dim=-1)
    for k in range(3):
        ref[k] = D[codes == k].sum(0)
    torch.testing.assert_close(group_distance_sums(Z, codes, 3), ref, rtol=1e-5, atol=1e-4)
    mu, sd = torch.rand(B, generator=g) + 1, torch.rand(B, generator=g) + 0.5
    Dz = (D - mu.double()[:, None, None]) / sd.double()[:, None, None]
    Dz[:, torch.arange(S), torch.arange(S)] = (-mu / sd).double()[:, None]
    ref = torch.stack([Dz[codes == k].sum(0) for k in range(3)])
    torch.testing.assert_close(group_distance_sums(Z, codes, 3, mu, sd), ref, rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("encoder_sample", [True, False])
def test_encoder_from_csr_equals_concatenated_first_layer(encoder_sample):
    """The encoder's split first layer (W_x log1p x + W_s[:, s]) on log1p of the CSR nonzeros
    gives q(u | x, s) of the MLP on [log1p x; onehot(s)] written out directly."""
    import scipy.sparse as sp
    import torch.nn.functional as F

    from scdist.vae.analysis.stream import log1p_csr
    torch.manual_seed(0)
    m = MrVIModule(40, n_sample=5, encoder_sample=encoder_sample).eval()
    rng = np.random.default_rng(0)
    X = sp.random(23, 40, density=0.3, format="csr", random_state=1, data_rvs=lambda n: rng.integers(1, 30, n))
    s = torch.from_numpy(rng.integers(0, 5, 23))
    enc = m.encoder
    with torch.no_grad():
        xin = torch.log1p(torch.from_numpy(X.toarray().astype(np.float32)))
        if encoder_sample:
            xin = torch.cat([xin, F.one_hot(s, 5).float()], dim=-1)
        h = enc.net(xin)
        ref = (enc.mean(h), torch.sqrt(torch.exp(enc.var(h)) + enc.var_eps))
        got = m.encode_log1p(torch.from_numpy(log1p_csr(X).toarray()), s)
        via_counts = m.encode(torch.from_numpy(X.toarray().astype(np.float32)), s)
    for a, b, c in zip(got, ref, via_counts):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(c, b, atol=1e-5, rtol=1e-5)


def test_component_scores_float32_match_float64_on_narrow_posteriors():
    """Own components left out, padding, narrow posteriors far from the origin: the float32
    product stays within 1e-2 nats of the float64 densities (log scores of -1e3 .. 1e2)."""
    from scdist.vae.analysis.kernels import ComponentScorer
    g = torch.Generator().manual_seed(5)
    S, M, L = 6, 40, 10
    cm = torch.randn(S, M, L, generator=g) * 2 + 4.0
    cs = torch.rand(S, M, L, generator=g) * 0.1 + 0.02              # s down to 0.02: a = 1/s^2 up to 2,500
    ci = torch.arange(S * M).view(S, M) + 1000
    ci[2, 30:] = -1                                                  # padding
    cv = ci >= 0
    u = torch.cat([cm[0, :50 // 2], cm[2, :10], torch.randn(35, L, generator=g) * 2 + 4.0])   # B = 70
    idx = torch.cat([ci[0, :25], ci[2, :10], torch.arange(35) + 10**6])
    full = gaussian_log_density(u, cm.view(-1, L), cs.view(-1, L)).view(-1, S, M)
    own = (idx[:, None, None] == ci[None]) | ~cv[None]
    ref_max = full.masked_fill(own, -math.inf).amax(-1)
    ref_mean = torch.logsumexp(full.masked_fill(own, -math.inf), -1) - torch.log((~own).sum(-1).double())
    sc = ComponentScorer(cm, cs, ci, cv)
    ok = torch.isfinite(ref_max)
    torch.testing.assert_close(sc(u, idx, "max")[ok], ref_max[ok], rtol=0, atol=1e-2)
    torch.testing.assert_close(sc(u, idx, "mean")[ok], ref_mean[ok], rtol=0, atol=1e-2)


@pytest.mark.parametrize("variant,n_latent,n_batch", [("attention", 12, 1), ("attention", 6, 3), ("linear", 12, 2)])
def test_counterfactual_map_centred_and_own_equal_module(variant, n_latent, n_batch):
    """The distance operand (states centred over samples, B x L_z x S) and the own-sample
    states of the Monte Carlo draws equal the module's own computation; the reused workspace
    gives the same numbers whatever minibatch size came before."""
    from scdist.vae.analysis.counterfactual import CounterfactualMap
    torch.manual_seed(1)
    m = MrVIModule(50, n_sample=11, n_batch=n_batch, n_latent=n_latent, n_latent_u=6, variant=variant).eval()
    with torch.no_grad():
        for p in m.parameters():  # away from the initialisation: sample effects of order 1
            p.add_(0.3 * torch.randn_like(p))
    u = torch.randn(37, 6) * 2 + 3
    s = torch.tensor([3, 0, 10, 5, 7])
    cm = CounterfactualMap(m, s)
    with torch.no_grad():
        ref = m.counterfactual_z(u, s).permute(1, 0, 2)                   # B x S x Lz
        ref_c = (ref.double() - ref.double().mean(1, keepdim=True)).transpose(1, 2)
        first = cm.centred_t(u).clone()
        cm.centred_t(u[:5])                                             # a smaller minibatch in between
        again = cm.centred_t(u)
        pos = torch.from_numpy(np.random.default_rng(0).integers(0, 5, 37))
        own = cm.own(u, pos)
        own_ref = m.z_from_u(u, s[pos])
    tol = 2e-6 * float(ref.abs().max())                                  # float32 noise at the states' scale
    assert first.shape == (37, n_latent, 5) and first.is_contiguous()
    torch.testing.assert_close(first.double(), ref_c, atol=tol, rtol=1e-5)
    torch.testing.assert_close(again, first)
    torch.testing.assert_close(own, own_ref, atol=tol, rtol=1e-5)
    # distances from the centred operand = brute force on the module's states
    D = torch.linalg.norm(ref.double()[:, :, None] - ref.double()[:, None], dim=-1)
    from scdist.vae.analysis.kernels import distances_from_centred, group_distance_sums
    torch.testing.assert_close(distances_from_centred(first).double(), D, atol=5 * tol, rtol=1e-5)
    codes = torch.from_numpy(np.random.default_rng(1).integers(-1, 3, 37))
    torch.testing.assert_close(group_distance_sums(first, codes, 3, centred_t=True),
                               group_distance_sums(ref, codes, 3), atol=50 * tol, rtol=1e-5)


@pytest.mark.parametrize("space", ["z", "expression"])
def test_mc_normalisation_fast_path_equals_module(space):
    """normalize=True: the Monte Carlo same-sample statistics from the own-sample fast path
    equal those from the module's z_from_u on the same draws."""
    from scdist.vae.analysis.distances import _maps, _mc_stats
    torch.manual_seed(2)
    m = MrVIModule(30, n_sample=9, n_batch=2, n_latent=8, n_latent_u=5).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.3 * torch.randn_like(p))
    rng = np.random.default_rng(3)
    b = {"u_mean": torch.randn(41, 5), "u_std": torch.rand(41, 5) * 0.5 + 0.1,
         "sample": torch.from_numpy(rng.integers(0, 9, 41)), "batch": torch.from_numpy(rng.integers(0, 2, 41))}
    _, own = _maps(m, torch.tensor([1, 4, 2]), normalize=True)          # own samples outside the compared ones too
    with torch.no_grad():
        slow = _mc_stats(m, b, 6, torch.Generator().manual_seed(7), space)
        fast = _mc_stats(m, b, 6, torch.Generator().manual_seed(7), space, own=own)
    for a, r in zip(fast, slow):
        torch.testing.assert_close(a, r, atol=1e-5, rtol=1e-4)
    assert torch.all(slow[1] > 0)


def test_batch_bounds_cover_rows_without_short_tail():
    from scdist.vae.analysis.stream import batch_bounds
    for n, bs in [(625, 512), (1000, 512), (5, 512), (0, 512), (2049, 1024), (10_000, 300)]:
        b = batch_bounds(n, bs)
        sizes = [e - s for s, e in b]
        assert sum(sizes) == n and all(x > 0 for x in sizes)
        assert [s for s, _ in b[1:]] == [e for _, e in b[:-1]]
        if n:
            assert max(sizes) <= 1.5 * bs + 1 and (len(b) == 1 or min(sizes) >= bs // 2)


def test_counterfactual_map_cache_follows_parameter_changes():
    """The per-thread map cache hands the same map back for the same module and samples, and
    a fresh one after a parameter changed in place (its version moved)."""
    from scdist.vae.analysis.counterfactual import counterfactual_map
    torch.manual_seed(4)
    m = MrVIModule(20, n_sample=6, n_latent=5, n_latent_u=4).eval()
    s = torch.tensor([0, 2, 5])
    u = torch.randn(9, 4)
    a = counterfactual_map(m, s)
    assert counterfactual_map(m, s) is a and counterfactual_map(m, torch.tensor([1, 2])) is not a
    with torch.no_grad():
        m.g_uz.post[4].weight.mul_(2.0)
        ref = m.counterfactual_z(u, s).permute(1, 0, 2)
    b = counterfactual_map(m, s)
    assert b is not a
    torch.testing.assert_close(b(u), ref, atol=1e-5, rtol=1e-5)


def test_chunk_blocks_merge_small_chunks_only():
    from scdist.vae.analysis.stream import _blocks
    chunks = [(0, 100), (100, 200), (200, 300), (300, 350), (350, 1000)]
    assert [(c, span, n) for c, span, _, n in _blocks(chunks, None, None)] == \
        [(i, ch, 1) for i, ch in enumerate(chunks)]
    got = [(c, span, n) for c, span, _, n in _blocks(chunks, None, 150)]
    assert got == [(0, (0, 200), 2), (2, (200, 350), 2), (4, (350, 1000), 1)]
    keep = np.array([5, 150, 160, 310, 420, 999])                  # chunk 2 holds no kept cell
    got = _blocks(chunks, keep, 3)
    assert [(c, span, n) for c, span, _, n in got] == [(0, (0, 200), 2), (3, (300, 1000), 2)]
    np.testing.assert_array_equal(got[0][2], [5, 150, 160])
    np.testing.assert_array_equal(got[1][2], [310, 420, 999])
