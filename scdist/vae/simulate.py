"""Small count simulations with known structure, for tests and benchmarks of the VAE models.

``gene_programs``: cells of several types, each type raising its own block of marker genes
(the programs LDVAE's loadings should find), negative binomial counts, optional batches.
``sample_effects``: cells of several types from S samples; in one cell type, samples of
different groups shift a block of genes (a sample effect MrVI's z should carry and its u
should not), other types unaffected.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import scipy.sparse as sp


def _nb_counts(rng, mu: np.ndarray, theta: float) -> np.ndarray:
    return rng.negative_binomial(theta, theta / (theta + mu)).astype(np.float32)


def _anndata(X, obs: pd.DataFrame, n_genes: int):
    import anndata as ad
    a = ad.AnnData(sp.csr_matrix(X), obs=obs)
    a.var_names = [f"gene{i}" for i in range(n_genes)]
    return a


def gene_programs(n_cells: int = 4000, n_genes: int = 400, n_types: int = 5, n_markers: int = 30, *,
                  lfc: float = 2.0, n_batches: int = 2, batch_sd: float = 0.2, theta: float = 10.0,
                  library: float = 3000.0, seed: int = 0):
    """Returns (AnnData, markers) with markers[t] the gene indices of type t's program.

    log rho_ng = b_g + lfc * 1(g in program of type_n) * a_n + batch_{b_n, g}, a_n ~ U(0.5, 1.5)
    (the program's activity varies within a type), normalised by a softmax over genes.
    """
    rng = np.random.default_rng(seed)
    base = rng.normal(0, 1.0, n_genes)
    ctype = rng.integers(0, n_types, n_cells)
    batch = rng.integers(0, n_batches, n_cells)
    markers = [np.arange(t * n_markers, (t + 1) * n_markers) for t in range(n_types)]
    prog = np.zeros((n_types, n_genes))
    for t, m in enumerate(markers):
        prog[t, m] = lfc
    act = rng.uniform(0.5, 1.5, n_cells)[:, None]
    bshift = rng.normal(0, batch_sd, (n_batches, n_genes))
    logit = base + prog[ctype] * act + bshift[batch]
    rho = np.exp(logit - logit.max(1, keepdims=True))
    rho /= rho.sum(1, keepdims=True)
    lib = rng.lognormal(np.log(library), 0.3, n_cells)[:, None]
    X = _nb_counts(rng, lib * rho, theta)
    obs = pd.DataFrame({"celltype": pd.Categorical([f"t{t}" for t in ctype]),
                        "batch": pd.Categorical([f"b{b}" for b in batch])},
                       index=[f"cell{i}" for i in range(n_cells)])
    return _anndata(X, obs, n_genes), markers


def sample_effects(n_cells: int = 4000, n_genes: int = 200, n_types: int = 3, n_samples: int = 8, *,
                   n_groups: int = 2, effect_type: int = 0, n_effect_genes: int = 30, lfc: float = 1.5,
                   n_markers: int = 30, theta: float = 10.0, library: float = 2000.0, n_batches: int = 1,
                   seed: int = 0):
    """Returns (AnnData, info). obs: ``sample``, ``celltype``, ``group`` (of the sample), ``batch``.

    Samples are split into ``n_groups`` groups; in cell type ``effect_type`` each group g > 0
    raises its own block of ``n_effect_genes`` genes by ``lfc``. info: sample_group (array over
    samples), effect_genes (per group).
    """
    rng = np.random.default_rng(seed)
    base = rng.normal(0, 1.0, n_genes)
    sample = rng.integers(0, n_samples, n_cells)
    sample_group = np.arange(n_samples) % n_groups
    ctype = rng.integers(0, n_types, n_cells)
    batch = sample % n_batches
    logit = np.tile(base, (n_cells, 1))
    for t in range(n_types):
        logit[ctype == t, t * n_markers:(t + 1) * n_markers] += 2.0
    start = n_types * n_markers
    effect_genes = {}
    for g in range(1, n_groups):
        genes = np.arange(start + (g - 1) * n_effect_genes, start + g * n_effect_genes)
        effect_genes[g] = genes
        hit = (ctype == effect_type) & (sample_group[sample] == g)
        logit[np.ix_(hit, genes)] += lfc
    rho = np.exp(logit - logit.max(1, keepdims=True))
    rho /= rho.sum(1, keepdims=True)
    lib = rng.lognormal(np.log(library), 0.3, n_cells)[:, None]
    X = _nb_counts(rng, lib * rho, theta)
    obs = pd.DataFrame({"sample": pd.Categorical([f"s{s}" for s in sample]),
                        "celltype": pd.Categorical([f"t{t}" for t in ctype]),
                        "group": pd.Categorical([f"g{sample_group[s]}" for s in sample]),
                        "batch": pd.Categorical([f"b{b}" for b in batch])},
                       index=[f"cell{i}" for i in range(n_cells)])
    return _anndata(X, obs, n_genes), {"sample_group": sample_group, "effect_genes": effect_genes}


def marker_precision(loadings: np.ndarray, markers, n_top: int) -> float:
    """Fraction of each factor's top ``n_top`` |loading| genes that belong to some program."""
    truth = np.zeros(loadings.shape[0], bool)
    for m in markers:
        truth[np.asarray(m)] = True
    top = np.argsort(-np.abs(loadings), axis=0, kind="stable")[:n_top]
    return float(truth[top].mean())
