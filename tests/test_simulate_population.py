"""The population simulator: determinism, truth recovered by simple moments, bounded memory."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import xarray as xr
import zarr

from scdist.pseudobulk import kernel as K

from scdist.errors import InputError
from scdist.simulate import generate_chunk, make_design, simulate_study
from scdist.store import open_study

SMALL = dict(n_donors=16, n_cells=4000, n_genes=60, n_celltypes=3, n_batches=2,
             chunk_cells=700, bulk_samples=4)


def _arrays(url):
    g = zarr.open_group(url + "/cells/X", mode="r")
    return {k: g[k][...] for k in ("data", "indices", "indptr")}


def test_same_seed_same_store_and_workers_agree(tmp_path, dask_client):
    class Count:
        n = 0

        def update(self, n=1):
            self.n += n

    bar = Count()
    a = simulate_study(str(tmp_path / "a.zarr"), seed=7, progress=bar, **SMALL)
    assert bar.n == -(-4000 // 700)  # one update per chunk
    b = simulate_study(str(tmp_path / "b.zarr"), seed=7, client=dask_client, **SMALL)
    c = simulate_study(str(tmp_path / "c.zarr"), seed=8, **SMALL)
    xa, xb, xc = _arrays(a.url), _arrays(b.url), _arrays(c.url)
    for k in xa:
        np.testing.assert_array_equal(xa[k], xb[k])
    assert xa["data"].size != xc["data"].size or not np.array_equal(xa["data"], xc["data"])
    assert a.obs().equals(b.obs())
    xr.testing.assert_identical(a.truth().load(), b.truth().load())
    xr.testing.assert_identical(a.bulk().load(), b.bulk().load())
    assert not a.truth()["eta"].equals(c.truth()["eta"])
    # Layout and labels as the rest of scdist expects them.
    s = open_study(a.url)
    assert s.n_cells == 4000 and s.n_genes == 60
    assert s.donor_covariates == ["sex", "age"]
    obs = s.obs()
    assert obs["donor"].nunique() == 16 and obs["batch"].nunique() == 2
    assert (obs.groupby("donor", observed=True)["age"].nunique() == 1).all()
    t = s.truth()
    np.testing.assert_array_equal(
        t["n_cells"].values,
        obs.groupby(["donor", "celltype"], observed=False).size().unstack().values)
    assert set(t["gene_model"].values) <= {"hom", "free", "full"}
    assert s.bulk()["counts"].dtype == np.int64
    np.testing.assert_allclose(s.bulk()["true_W"].sum("celltype"), 1.0)


def test_chunks_are_independent_of_how_cells_are_split():
    d = make_design(n_donors=5, n_cells=900, n_genes=10, n_celltypes=3, n_batches=1, seed=3)
    # Cell types of a cell do not depend on the chunking (counts are seeded per chunk).
    _, o1 = generate_chunk(d, 0, 900)
    _, o2 = generate_chunk(d, 250, 610)
    assert o1.iloc[250:610]["celltype"].tolist() == o2["celltype"].tolist()
    assert o1.iloc[250:610]["donor"].tolist() == o2["donor"].tolist()


def test_bad_parameters_name_the_field(tmp_path):
    for kw, field in [({"n_donors": 1}, "n_donors"), ({"n_batches": 50}, "n_batches"),
                      ({"n_groups": (4, 8)}, "n_groups"), ({"model_mix": (1, 1)}, "model_mix"),
                      ({"chunk_cells": 0}, "chunk_cells")]:
        args = {**SMALL, **kw}
        with pytest.raises(InputError) as e:
            simulate_study(str(tmp_path / "x.zarr"), seed=0, **args)
        assert e.value.field == field
    assert not (tmp_path / "x.zarr" / "cells").exists()


@pytest.fixture(scope="module")
def recovery(tmp_path_factory):
    """A study with many cells per donor and no fixed effects, to read truth off moments."""
    url = str(tmp_path_factory.mktemp("rec") / "s.zarr")
    s = simulate_study(url, n_donors=80, n_cells=48_000, n_genes=150, n_celltypes=3,
                       n_batches=1, seed=11, chunk_cells=8000, batch_sd=0.0, sex_sd=0.0,
                       age_sd_per_decade=0.0, base_log_mean=1.5, base_log_sd=0.5,
                       model_mix=(0.5, 0.5, 0.0), hom2_range=(0.05, 0.4),
                       v_range=(0.05, 0.4), da_fold=3.0)
    counts = s.read_counts(0, s.n_cells)
    obs = s.obs()
    donor = obs["donor"].cat.codes.to_numpy().astype(np.int64)
    ct = obs["celltype"].cat.codes.to_numpy().astype(np.int64)
    # Per donor x cell type mean and variance of raw counts (the pseudobulk kernel).
    cube = K.finalize(K.chunk_stats(counts, donor, ct, 3, normalization="none"), 80, 3,
                      min_cells=1)
    return s, s.truth().load(), cube


def test_proportions_and_differential_abundance(recovery):
    s, t, cube = recovery
    P_hat = cube.P
    assert np.corrcoef(P_hat.ravel(), t["P"].values.ravel())[0, 1] > 0.97
    da = list(t["celltype"].values).index(t.attrs["da_celltype"])
    top = t["donor_top_group"].values
    P = t["P"].values

    def ratio(p, c):
        return p[top == 1, c].mean() / p[top == 0, c].mean()

    # da_fold = 3 multiplies the base proportion before renormalising: realised ratio > 1.5
    # in the DA cell type, and the other cell types shrink in top group 1.
    assert ratio(P, da) > 1.5
    assert abs(ratio(P_hat, da) / ratio(P, da) - 1) < 0.15
    for c in range(3):
        if c != da:
            assert ratio(P_hat, c) < 1.0


def test_hom_and_free_variance_recovered_by_moments(recovery):
    """log pseudobulk means vary across donors as hom2 + V_cc (Eq 1), shared only under Hom."""
    s, t, cube = recovery
    keep = ~t["mrvi_gene"].values
    logm = np.log(cube.mean)                                  # donor x celltype x gene
    # Delta method: var(log mean) = nu / mean^2 of sampling noise, removed as CTMM does.
    noise = np.mean(cube.nu / cube.mean ** 2, axis=0).T      # gene x celltype
    dev = logm - logm.mean(0, keepdims=True)
    cov = np.einsum("dcg,dkg->gck", dev, dev) / (dev.shape[0] - 1)  # gene x C x C
    cov[:, np.arange(3), np.arange(3)] -= noise
    C = cov.shape[1]
    off = (cov.sum((1, 2)) - np.trace(cov, axis1=1, axis2=2)) / (C * (C - 1))
    diag = np.diagonal(cov, axis1=1, axis2=2)                 # gene x C
    hom2, V = t["hom2"].values, np.diagonal(t["V"].values, axis1=1, axis2=2)
    model = t["gene_model"].values
    # Shared part: off-diagonal covariance estimates hom2 (slope near 1).
    slope = np.polyfit(hom2[keep], off[keep], 1)[0]
    assert 0.8 < slope < 1.2, slope
    assert np.corrcoef(hom2[keep], off[keep])[0, 1] > 0.85
    # Cell type-specific part: diag - shared is ~0 under Hom and tracks V_cc under Free.
    spec = diag - off[:, None]
    hom = keep & (model == "hom")
    free = keep & (model == "free")
    assert hom.sum() > 20 and free.sum() > 20
    assert abs(np.median(spec[hom])) < 0.03
    assert np.corrcoef(V[free].ravel(), spec[free].ravel())[0, 1] > 0.85
    assert 0.8 < np.polyfit(V[free].ravel(), spec[free].ravel(), 1)[0] < 1.2


def test_mrvi_group_effect_in_one_celltype_only(recovery):
    s, t, cube = recovery
    logm = np.log(cube.mean)
    g = t["mrvi_gene"].values
    top = t["donor_top_group"].values
    ct = list(t["celltype"].values).index(t.attrs["mrvi_celltype"])
    diff = np.abs(logm[top == 1].mean(0) - logm[top == 0].mean(0))  # celltype x gene
    assert diff[ct, g].mean() > 0.6          # |top effect| = 1 in the MrVI cell type
    others = [c for c in range(3) if c != ct]
    assert diff[np.ix_(others, np.flatnonzero(g))].mean() < 0.25
    # Leaves of the tree: the subgroups of a top group differ too (hierarchy, not 2 blobs).
    leaf = t["donor_group"].values
    m = np.stack([logm[leaf == l, ct][:, g].mean(0) for l in range(8)])
    sib = np.mean([np.abs(m[i] - m[j]).mean() for t in (0, 4) for i in range(t, t + 4) for j in range(i + 1, t + 4)])
    cousin = np.mean([np.abs(m[i] - m[j]).mean() for i in range(4) for j in range(4, 8)])
    assert 0.15 < sib < cousin - 0.08   # siblings closer than cousins (truth: 0.94 vs 1.11)


_PEAK_SCRIPT = """
import sys, tracemalloc
from scdist.simulate import simulate_study
simulate_study(sys.argv[1] + "/warm.zarr", n_cells=500, n_donors=20, n_genes=200, n_celltypes=4,
               n_batches=2, seed=1, chunk_cells=2000)  # first-call imports and caches
tracemalloc.start()
simulate_study(sys.argv[1] + "/m.zarr", n_cells=int(sys.argv[2]), n_donors=20, n_genes=200,
               n_celltypes=4, n_batches=2, seed=1, chunk_cells=2000)
print(tracemalloc.get_traced_memory()[1])
"""


@pytest.mark.slow
def test_memory_does_not_grow_with_cells(tmp_path):
    """Peak traced allocations of a 4x larger simulation stay within 1.5x (chunks bound it).

    Each size runs in a fresh interpreter: tracemalloc counts every thread, and in the test
    process the session's Dask client and Ray threads allocate while it traces."""
    peaks = []
    for n_cells in (8_000, 32_000):
        d = tmp_path / str(n_cells)
        d.mkdir()
        out = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT, str(d), str(n_cells)],
                             check=True, capture_output=True, text=True, timeout=600)
        peaks.append(int(out.stdout.split()[-1]))
    assert peaks[1] < 1.5 * peaks[0], peaks
