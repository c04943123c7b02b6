"""Simulate cell type-specific and overall pseudobulk exactly from CTMM (Eq 2 and Eq 3).

``y_ic = beta_c + z_i' gamma + alpha_i + Gamma_ic + delta_ic`` with ``alpha_i ~ N(0, hom2)``,
``Gamma_i ~ N(0, V)``, ``delta_ic ~ N(0, nu_ic)``, optional batch effects
``b_batch(i) ~ N(0, batch_var)``; OP is the proportion-weighted average
``y_i = sum_c P_ic y_ic`` with noise variance ``nu_i = sum_c P_ic^2 nu_ic``.
"""
from __future__ import annotations

import numpy as np
import xarray as xr


def simulate_ctp(n_genes: int = 100, n_donors: int = 50, n_celltypes: int = 4, *,
                 hom2=0.25, V=None, beta=None, nu_mean: float = 0.2, nu_cv: float = 0.5,
                 n_covariates: int = 0, gamma=None, n_batches: int = 0, batch_var: float = 0.0,
                 missing_frac: float = 0.0, seed: int = 0) -> xr.Dataset:
    """Return a Dataset with ``mean``, ``nu`` (donor, celltype, gene), ``P``,
    ``op_mean``/``op_nu`` (donor, gene), optional ``covariates`` and ``batch``, and the true
    parameters as ``true_*`` variables.

    ``hom2`` (scalar or per gene) is sigma_alpha^2; ``V`` a C x C matrix, a length-C vector
    (diagonal, Free model) or an array (gene, C, C); default 0 (Hom model).
    """
    rng = np.random.default_rng(seed)
    G, N, C = n_genes, n_donors, n_celltypes
    hom2 = np.broadcast_to(np.asarray(hom2, float), (G,)).copy()
    if V is None:
        V = np.zeros((C, C))
    V = np.asarray(V, float)
    if V.ndim == 1:
        V = np.diag(V)
    V = np.broadcast_to(V, (G, C, C)).copy()
    beta = np.linspace(1.0, 0.0, C) if beta is None else np.asarray(beta, float)
    beta = np.broadcast_to(beta, (G, C)).copy()
    alpha = rng.normal(size=(G, N)) * np.sqrt(np.maximum(hom2, 0))[:, None]
    Lv = np.linalg.cholesky(V + 1e-12 * np.eye(C))
    Gam = np.einsum("gcd,gnd->gnc", Lv, rng.normal(size=(G, N, C)))
    shape = 1.0 / nu_cv ** 2
    nu = rng.gamma(shape, nu_mean / shape, size=(G, N, C))
    y = beta[:, None, :] + alpha[:, :, None] + Gam + rng.normal(size=(G, N, C)) * np.sqrt(nu)
    data = {}
    coords = {"donor": np.array([f"d{i:03d}" for i in range(N)], dtype=object),
              "celltype": np.array([f"ct{c}" for c in range(C)], dtype=object),
              "gene": np.array([f"g{g:05d}" for g in range(G)], dtype=object)}
    if n_covariates:
        Z = rng.normal(size=(N, n_covariates))
        gamma = rng.normal(size=(G, n_covariates)) * 0.3 if gamma is None else np.broadcast_to(gamma, (G, n_covariates))
        y = y + (Z @ np.asarray(gamma).T).T[:, :, None]
        coords["covariate"] = np.array([f"cov{j}" for j in range(n_covariates)], dtype=object)
        data["covariates"] = (("donor", "covariate"), Z)
        data["true_gamma"] = (("gene", "covariate"), np.asarray(gamma))
    if n_batches:
        b = rng.integers(0, n_batches, N)
        eff = rng.normal(size=(G, n_batches)) * np.sqrt(batch_var)
        y = y + eff[:, b][:, :, None]
        data["batch"] = (("donor",), np.array([f"b{v}" for v in b], dtype=object))
    P = rng.dirichlet(np.full(C, 5.0), size=N)
    op_mean = np.einsum("nc,gnc->gn", P, y)
    op_nu = np.einsum("nc,gnc->gn", P ** 2, nu)
    if missing_frac > 0:
        miss = rng.random((N, C)) < missing_frac
        y = np.where(miss[None], np.nan, y)
        nu = np.where(miss[None], np.nan, nu)
    data.update({
        "mean": (("donor", "celltype", "gene"), y.transpose(1, 2, 0)),
        "nu": (("donor", "celltype", "gene"), nu.transpose(1, 2, 0)),
        "P": (("donor", "celltype"), P),
        "op_mean": (("donor", "gene"), op_mean.T),
        "op_nu": (("donor", "gene"), op_nu.T),
        "true_hom2": (("gene",), hom2),
        "true_V": (("gene", "celltype", "celltype2"), V),
        "true_beta": (("gene", "celltype"), beta),
    })
    coords["celltype2"] = coords["celltype"].copy()
    return xr.Dataset(data, coords=coords)
