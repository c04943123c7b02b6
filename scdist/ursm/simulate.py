"""Simulation of single-cell and bulk RNA-seq data from the URSM model (paper Section 4.1, 4.5).

Notation: N genes, K types, L cells (type G_l), M bulk samples; A (N × K) profile matrix with
columns summing to 1; W_·j ~ Dir(α); bulk depth R_j ~ Poisson(50 N); single-cell depth
R_l ~ NB(mean 2 N, dispersion 2); κ_l ~ N(−1, 0.5²), τ_l ~ N(1.5 N, (0.15 N)²);
S_il ~ Bern(σ(κ_l + τ_l A_{i,G_l})); Y_·l ~ Mult(R_l, A_{·,G_l} ⊙ S_·l / Σ).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class UrsmSimulation:
    """Simulated data and truth. Arrays use the orientation of :func:`scdist.ursm.fit`."""

    Y: np.ndarray            # (L, N) single-cell counts, cells × genes
    cell_types: np.ndarray   # (L,) int type of each cell
    X: np.ndarray            # (M, N) bulk counts, samples × genes
    A: np.ndarray            # (N, K) true profile matrix
    W: np.ndarray            # (M, K) true mixing proportions
    S: np.ndarray            # (L, N) true observability (0 = dropout)
    kappa: np.ndarray        # (L,)
    tau: np.ndarray          # (L,)
    alpha: np.ndarray        # (K,) Dirichlet parameter of the bulk proportions
    markers: dict = field(default_factory=dict)   # type -> indices of its true marker genes
    anti_markers: dict = field(default_factory=dict)
    housekeeping: np.ndarray | None = None


def simulate_profile(n_genes: int, n_types: int, rng: np.random.Generator, *, n_markers: int = 10,
                     n_anti: int = 10, n_housekeeping: int = 30):
    """Profile matrix A of Section 4.1 (i)–(v); returns (A, markers, anti_markers, housekeeping)."""
    N, K = n_genes, n_types
    need = K * (n_markers + n_anti) + n_housekeeping
    if need > N:
        raise ValueError(f"n_genes={N} too small for {need} marker/anti-marker/housekeeping genes")
    A = rng.lognormal(0.0, 1.0, size=(N, K))
    perm = rng.permutation(N)
    markers, anti = {}, {}
    pos = 0
    for k in range(K):
        markers[k] = np.sort(perm[pos:pos + n_markers]); pos += n_markers
    for k in range(K):
        anti[k] = np.sort(perm[pos:pos + n_anti]); pos += n_anti
    hk = np.sort(perm[pos:pos + n_housekeeping])
    for k in range(K):
        others = [kk for kk in range(K) if kk != k]
        A[np.ix_(markers[k], others)] = 0.0
        A[anti[k], k] = 0.0
    A[hk, :] = A[hk, :1]
    rest = np.setdiff1d(np.arange(N), hk)
    if n_housekeeping:
        A[hk] *= (n_housekeeping / N) / A[hk].sum(axis=0, keepdims=True)
    A[rest] *= (1.0 - n_housekeeping / N) / A[rest].sum(axis=0, keepdims=True)
    return A, markers, anti, hk


def simulate(n_genes: int = 200, n_cells: int = 100, n_bulk: int = 150, *, n_types: int = 3,
             n_types_sc: int | None = None, n_types_bulk: int | None = None,
             cell_fractions=None, alpha=None, kappa_mean: float = -1.0, kappa_sd: float = 0.5,
             tau_mean: float | None = None, tau_sd: float | None = None,
             sc_depth_mean: float | None = None, sc_depth_dispersion: float = 2.0,
             bulk_depth_mean: float | None = None, n_markers: int = 10, n_anti: int = 10,
             n_housekeeping: int = 30, seed: int = 0) -> UrsmSimulation:
    """Simulate the design of Section 4.1 (defaults: N=200, L=100 at 30/30/40 %, M=150, α=(1,2,3)).

    Each type has ``n_markers`` marker and ``n_anti`` anti-marker genes, plus ``n_housekeeping``
    shared genes (10 / 10 / 30 in the paper; shrunk proportionally when they would exceed N/2).
    ``n_types_sc`` / ``n_types_bulk`` give the Section 4.5 design K_sc ≠ K_bk: A has
    K = max(K_sc, K_bk) columns, cells come from the first K_sc types (40 in the first, 30 in each
    other unless ``cell_fractions`` is given), bulk samples mix the first K_bk types with
    α = (1, …, K_bk) (the other types get proportion 0).
    """
    rng = np.random.default_rng(seed)
    N = n_genes
    k_sc = n_types_sc or n_types
    k_bk = n_types_bulk or n_types
    K = max(k_sc, k_bk)
    need = K * (n_markers + n_anti) + n_housekeeping
    if need > N // 2:      # small test problems: shrink the special gene sets to at most half the genes
        f = (N // 2) / need
        n_markers, n_anti, n_housekeeping = (max(1, int(n_markers * f)), max(1, int(n_anti * f)),
                                             int(n_housekeeping * f))
    A, markers, anti, hk = simulate_profile(N, K, rng, n_markers=n_markers, n_anti=n_anti,
                                            n_housekeeping=n_housekeeping)

    # cells
    if cell_fractions is None:
        if k_sc == 3 and n_types_sc is None:
            cell_fractions = [0.3, 0.3, 0.4]
        else:
            w = np.array([40.0] + [30.0] * (k_sc - 1))
            cell_fractions = w / w.sum()
    frac = np.asarray(cell_fractions, float)
    counts = np.floor(frac * n_cells).astype(int)
    counts[np.argmax(frac)] += n_cells - counts.sum()
    G = np.repeat(np.arange(k_sc), counts)
    L = n_cells
    mu_r = sc_depth_mean if sc_depth_mean is not None else 2.0 * N
    disp = sc_depth_dispersion
    R_sc = rng.negative_binomial(disp, disp / (disp + mu_r), size=L)
    kappa = rng.normal(kappa_mean, kappa_sd, size=L)
    tau = rng.normal(tau_mean if tau_mean is not None else 1.5 * N,
                     tau_sd if tau_sd is not None else 0.15 * N, size=L)
    a = A[:, G].T                                                    # (L, N)
    S = rng.random((L, N)) < 1.0 / (1.0 + np.exp(-(kappa[:, None] + tau[:, None] * a)))
    p = a * S
    tot = p.sum(axis=1, keepdims=True)
    # a cell with every gene dropped out cannot produce reads
    R_sc = np.where(tot[:, 0] > 0, R_sc, 0)
    p = np.divide(p, tot, out=np.full_like(p, 1.0 / N), where=tot > 0)
    Y = rng.multinomial(R_sc, p)

    # bulk
    al = np.asarray(alpha if alpha is not None else np.arange(1, k_bk + 1), float)
    W = np.zeros((n_bulk, K))
    W[:, :k_bk] = rng.dirichlet(al, size=n_bulk)
    R_bk = rng.poisson(bulk_depth_mean if bulk_depth_mean is not None else 50.0 * N, size=n_bulk)
    pb = W @ A.T
    pb /= pb.sum(axis=1, keepdims=True)
    X = rng.multinomial(R_bk, pb)
    alpha_full = np.zeros(K)
    alpha_full[:k_bk] = al
    return UrsmSimulation(Y=Y, cell_types=G, X=X, A=A, W=W, S=S.astype(np.int8), kappa=kappa, tau=tau,
                          alpha=alpha_full, markers=markers, anti_markers=anti, housekeeping=hk)


def write_study(sim: UrsmSimulation, url: str, *, overwrite: bool = False, chunk_cells: int = 10_000,
                celltype_names=None) -> str:
    """Write a simulation into a new study store: ``cells/`` (counts, celltype labels; URSM has no
    donors, so cells are spread over two nominal donors to satisfy the store's schema),
    ``bulk/`` (counts and ``true_W``) and ``truth/`` (A, W, S, κ, τ, α). Returns the store URL."""
    import pandas as pd
    import xarray as xr

    from ..store import create_study
    from ..store.cells import CellWriter
    from ..store.ingest import ingest_bulk

    L, N = sim.Y.shape
    K = sim.A.shape[1]
    names = np.asarray(celltype_names if celltype_names is not None else [f"type{k}" for k in range(K)], dtype=object)
    genes = [f"gene{i}" for i in range(N)]
    cells = [f"cell{l}" for l in range(L)]
    bulk = [f"bulk{j}" for j in range(sim.X.shape[0])]
    study = create_study(url, overwrite=overwrite)
    obs = pd.DataFrame({"donor": [f"donor{l % 2}" for l in range(L)], "celltype": names[sim.cell_types]},
                       index=cells)
    with CellWriter(study, genes, chunk_cells=chunk_cells) as w:
        w.append(sim.Y, obs)
    ingest_bulk(study, pd.DataFrame(sim.X, index=bulk, columns=genes), orientation="samples_x_genes",
                true_W=pd.DataFrame(sim.W, index=bulk, columns=list(names)))
    truth = xr.Dataset({"A": (("gene", "celltype"), sim.A), "W": (("bulk_sample", "celltype"), sim.W),
                        "S": (("cell", "gene"), sim.S), "kappa": (("cell",), sim.kappa),
                        "tau": (("cell",), sim.tau), "alpha": (("celltype",), sim.alpha)},
                       coords={"gene": np.asarray(genes, dtype=object), "celltype": names,
                               "cell": np.asarray(cells, dtype=object), "bulk_sample": np.asarray(bulk, dtype=object)})
    truth.attrs["simulator"] = "scdist.ursm.simulate (URSM paper Section 4.1)"
    truth.to_zarr(study.group_url("truth"), mode="w", consolidated=False, zarr_format=3)
    study.add_provenance("ursm_simulate", {"n_genes": N, "n_cells": L, "n_bulk": len(bulk), "K": K})
    return study.url
