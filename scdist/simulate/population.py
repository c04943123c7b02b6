"""A seeded population-scale single-cell study with known truth, written chunk by chunk.

Generative model (all effects on the log scale of the expected count, ``eta``):

* Donors i = 1..D in B batches (balanced, independent of everything else), with donor
  covariates sex (F/M) and age (years).
* Donor groups for MrVI: ``n_groups = (T, S)`` gives T top groups x S subgroups; leaf group
  ``l = t * S + s``. Donors are spread evenly over the leaves.
* Cell type proportions: P_i ~ Dirichlet(concentration * pi), pi a decreasing base profile;
  in the differential-abundance cell type ``da_celltype`` the base proportion of donors in
  top group 1 is multiplied by ``da_fold`` (before normalising). Cells per donor vary
  (log-normal weights); n_ic ~ Multinomial(n_i, P_i).
* Per-donor cell type means follow CTMM's Eq 1 on the log scale, per gene g:

      eta_icg = beta_cg + sum_k x_ik gamma_kg + b_batch(i),g + alpha_ig + Gamma_icg
                [+ e_l(i),g  if c = mrvi_celltype and g in the MrVI gene set]

  with alpha_ig ~ N(0, hom2_g) (cell type-shared) and Gamma_i.g ~ N(0, V_g) (cell
  type-specific). Each gene follows one CTMM model: ``hom`` (V = 0), ``free`` (V diagonal,
  some cell types 0) or ``full`` (V dense PSD with hom2 = 0, CTMM's convention since
  hom2 and V are not jointly identified in Full).
* MrVI sample-level effect e_lg = u_tg + w_lg in one cell type on a gene set (a fraction
  ``mrvi_gene_frac`` of genes): the top group effect u = +-``mrvi_top_effect`` (0 for t = 0)
  plus a subgroup (leaf) effect w ~ N(0, ``mrvi_sub_sd``^2), so donor distances in that cell
  type are hierarchical (T top groups, each of S subgroups). Other cell types carry no group
  effect. Design version 3 (defaults 15% of genes, u = 1.0, i.e. 2.7-fold, w sd 0.8): a
  moderate shift, well below the cell-type differences (norm of the top-group shift ~10 vs
  ~20 between cell types), so a model's cell state need not split by group. Identifiability
  needs the donor random effects (alpha, Gamma on EVERY gene) to be small next to the leaves:
  with CTMM's default ``hom2_range`` / ``v_range`` even the truth clusters the leaves poorly,
  so the MrVI quality study uses :data:`MRVI_STUDY_DESIGN` (both (0.01, 0.05)), where the true
  eta gives leaf ARI 1.0 and tree Spearman 0.87 (seed 0 and 1, 40 donors, 500 genes; the
  maximum with 3 tied tree levels is ~0.9). Former versions: v1 10% / 1.0 / 0.4 (truth leaf
  ARI 0.26, not identifiable), v2 20% / 1.5 / 1.0 with default donor noise (shift as large as
  the cell-type differences: u separated the top groups in every MrVI fit).
* Counts: y_sg ~ NB(mean = L_s exp(eta_i(s)c(s)g), size = phi_g) (gamma-Poisson), L_s a
  log-normal size factor per cell.
* Bulk samples (optional, URSM's model): W_j ~ Dirichlet(1), X_j ~ Multinomial(R_j, A W_j),
  A_gc the relative expression of gene g in cell type c (columns sum to one).

Truth goes to ``truth/`` (xarray, dims gene, celltype, celltype2, donor, batch, covariate,
group, top_group, bulk_sample); see :func:`simulate_study` for the variables.
Memory is bounded by one chunk of cells (``chunk_cells`` x genes) plus the truth arrays
(donor x celltype x gene), whatever ``n_cells`` is.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import pandas as pd
import scipy.sparse as sp
import xarray as xr

from ..errors import InputError
from ..store import layout

MODELS = ("hom", "free", "full")
# Bumped whenever the MrVI / DA part of the design changes, so benchmarks never reuse a stale store.
MRVI_DESIGN_VERSION = 3
# Donor random-effect sizes of the MrVI quality study (benchmarks/mrvi_quality.py, the slow
# hierarchy test): small enough that the truth resolves the leaves (see the module docstring);
# the defaults of make_design stay CTMM's.
MRVI_STUDY_DESIGN = {"hom2_range": (0.01, 0.05), "v_range": (0.01, 0.05)}
COVARIATES = ("sex", "age")
AGE_CENTER = 50.0


@dataclass
class Design:
    """Everything drawn before any cell: the truth and the per-donor cell layout."""

    seed: int
    donors: np.ndarray          # (D,) labels
    celltypes: np.ndarray       # (C,)
    genes: np.ndarray           # (G,)
    batch: np.ndarray           # (D,) int
    sex_m: np.ndarray           # (D,) 0/1
    age: np.ndarray             # (D,) years
    group: np.ndarray           # (D,) leaf group
    n_sub: int
    P: np.ndarray               # (D, C) expected proportions
    n_ic: np.ndarray            # (D, C) realised cells
    eta: np.ndarray             # (D, C, G) float32 log mean per cell at size factor 1
    phi: np.ndarray             # (G,) NB size
    size_sd: float
    truth: dict = field(default_factory=dict)

    @property
    def offsets(self) -> np.ndarray:
        """First cell of each donor (cells are stored donor by donor)."""
        return np.concatenate([[0], np.cumsum(self.n_ic.sum(1))])


def _check(name, value, lo, kind=int):
    if not isinstance(value, (int, np.integer)) if kind is int else not isinstance(value, (int, float)):
        raise InputError(f"{name} must be a number, got {value!r}", field=name,
                         fix=f"pass {name} >= {lo}")
    if value < lo:
        raise InputError(f"{name} must be >= {lo}, got {value}", field=name,
                         fix=f"pass {name} >= {lo}")


def _random_psd(rng, C: int, lo: float, hi: float) -> np.ndarray:
    """A dense covariance: variances U(lo, hi), correlations from a random factor model."""
    f = rng.normal(size=(C, max(1, C // 2)))
    R = f @ f.T + np.eye(C) * 0.5
    d = np.sqrt(np.diag(R))
    R = R / d[:, None] / d[None, :]
    s = np.sqrt(rng.uniform(lo, hi, C))
    return R * s[:, None] * s[None, :]


def make_design(*, n_donors: int, n_cells: int, n_genes: int, n_celltypes: int, n_batches: int,
                seed: int, model_mix=(0.4, 0.4, 0.2), hom2_range=(0.05, 0.3),
                v_range=(0.05, 0.4), n_groups=None, mrvi_celltype: int = 0,
                mrvi_gene_frac: float = 0.15, mrvi_top_effect: float = 1.0,
                mrvi_sub_sd: float = 0.8, da_celltype: int | None = 1, da_fold: float = 3.0,
                proportion_concentration: float = 30.0, base_log_mean: float = -1.2,
                base_log_sd: float = 1.2, celltype_sd: float = 0.5, marker_frac: float = 0.05,
                marker_effect: float = 2.0, batch_sd: float = 0.15, sex_sd: float = 0.15,
                age_sd_per_decade: float = 0.05, dispersion_range=(1.0, 8.0),
                size_sd: float = 0.35, bulk_samples: int = 0, bulk_depth: int = 2_000_000
                ) -> Design:
    """Draw the study design and truth (no cells). Parameters: see :func:`simulate_study`."""
    _check("n_donors", n_donors, 2)
    _check("n_celltypes", n_celltypes, 1)
    _check("n_genes", n_genes, 1)
    _check("n_batches", n_batches, 1)
    _check("bulk_samples", bulk_samples, 0)
    if n_batches > n_donors:
        raise InputError(f"n_batches={n_batches} exceeds n_donors={n_donors}", field="n_batches",
                         fix="use at most one batch per donor")
    _check("n_cells", n_cells, n_donors)
    if n_groups is None:  # 2 x 4 leaves when there are donors enough, else no groups
        n_groups = (2, 4) if n_donors >= 8 else (1, 1)
    T, S = (int(v) for v in n_groups)
    if T < 1 or S < 1 or T * S > n_donors:
        raise InputError(f"n_groups={n_groups} needs 1 <= T*S <= n_donors", field="n_groups",
                         fix="use e.g. (2, 4) with at least 8 donors")
    mix = np.asarray(model_mix, float)
    if mix.shape != (3,) or (mix < 0).any() or mix.sum() <= 0:
        raise InputError(f"model_mix={model_mix!r} is not 3 non-negative weights",
                         field="model_mix", fix="give weights for (hom, free, full)")
    C, G, D = int(n_celltypes), int(n_genes), int(n_donors)
    if not 0 <= mrvi_celltype < C:
        raise InputError(f"mrvi_celltype={mrvi_celltype} not in [0, {C})", field="mrvi_celltype",
                         fix="pick a cell type index")
    if da_celltype is not None and (not 0 <= da_celltype < C or da_celltype == mrvi_celltype):
        da_celltype = None if C == 1 else (mrvi_celltype + 1) % C
    rng = np.random.default_rng([seed, 0])

    # Donors: batches, covariates, MrVI groups (balanced, independently shuffled).
    batch = rng.permutation(np.arange(D) % n_batches)
    group = rng.permutation(np.arange(D) % (T * S))
    top = group // S
    sex_m = rng.integers(0, 2, D)
    age = np.round(rng.uniform(20, 80, D), 1)

    # Cell type proportions and cells per donor.
    pi = np.sort(rng.dirichlet(np.full(C, 3.0)))[::-1] * 0.8 + 0.2 / C
    base = np.tile(pi, (D, 1))
    if da_celltype is not None:
        base[top == 1, da_celltype] *= da_fold
    base /= base.sum(1, keepdims=True)
    P = np.stack([rng.dirichlet(proportion_concentration * C * b) for b in base])
    w = rng.lognormal(0, 0.3, D)
    n_i = rng.multinomial(n_cells - D, w / w.sum()) + 1
    n_ic = np.stack([rng.multinomial(n, p) for n, p in zip(n_i, P)])

    # Genes: CTMM model, variance components, fixed effects.
    models = rng.choice(3, G, p=mix / mix.sum())
    hom2 = np.where(models == 2, 0.0, rng.uniform(*hom2_range, G))
    V = np.zeros((G, C, C))
    free = np.flatnonzero(models == 1)
    dv = rng.uniform(*v_range, (free.size, C)) * (rng.random((free.size, C)) < 0.6)
    V[free[:, None], np.arange(C), np.arange(C)] = dv
    for g in np.flatnonzero(models == 2):
        V[g] = _random_psd(rng, C, *v_range)
    beta = rng.normal(base_log_mean, base_log_sd, G)[None, :] + rng.normal(0, celltype_sd, (C, G))
    marker = rng.random((C, G)) < marker_frac
    beta = beta + marker_effect * marker
    cov_names = np.array(["sex_M", "age"], dtype=object)
    cov_effect = np.stack([rng.normal(0, sex_sd, G), rng.normal(0, age_sd_per_decade / 10, G)])
    batch_effect = rng.normal(0, batch_sd, (n_batches, G))
    phi = np.exp(rng.uniform(np.log(dispersion_range[0]), np.log(dispersion_range[1]), G))

    # Donor random effects (Eq 1): alpha_i ~ N(0, hom2), Gamma_i ~ N(0, V), per gene.
    alpha = rng.normal(size=(D, G)) * np.sqrt(hom2)
    # Cholesky-free draw that accepts PSD (incl. zero) V: V = U diag(l) U^T.
    lam, U = np.linalg.eigh(V)
    z = rng.normal(size=(D, G, C)) * np.sqrt(np.clip(lam, 0, None))[None]
    gamma = np.einsum("gcj,dgj->dcg", U, z)

    # MrVI hierarchical group effects in one cell type on a gene set.
    mrvi_gene = rng.random(G) < mrvi_gene_frac
    u = np.zeros((T, G))
    u[1:] = mrvi_top_effect * rng.choice([-1.0, 1.0], (T - 1, G))
    group_effect = (np.repeat(u, S, axis=0) + rng.normal(0, mrvi_sub_sd, (T * S, G))) * mrvi_gene

    x = np.stack([sex_m, age - AGE_CENTER], axis=1).astype(float)
    eta = (beta[None] + (x @ cov_effect)[:, None, :] + batch_effect[batch][:, None, :]
           + alpha[:, None, :] + gamma)
    eta[:, mrvi_celltype, :] += group_effect[group]

    donors = np.array([f"donor{i:0{len(str(D - 1))}d}" for i in range(D)], dtype=object)
    celltypes = np.array([f"celltype{c}" for c in range(C)], dtype=object)
    genes = np.array([f"gene{g:0{len(str(G - 1))}d}" for g in range(G)], dtype=object)
    truth = dict(models=models, hom2=hom2, V=V, beta=beta, marker=marker, cov_names=cov_names,
                 cov_effect=cov_effect, batch_effect=batch_effect, alpha=alpha, gamma=gamma,
                 mrvi_gene=mrvi_gene, group_effect=group_effect, T=T, S=S,
                 mrvi_celltype=mrvi_celltype, da_celltype=da_celltype, da_fold=da_fold,
                 base_P=base)
    if bulk_samples:
        # A_gc: relative expression of each gene in cell type c (population-average profile).
        prof = np.exp(beta + 0.5 * (hom2[None] + np.diagonal(V, axis1=1, axis2=2).T))
        A = prof / prof.sum(1, keepdims=True)
        W = rng.dirichlet(np.ones(C), bulk_samples)
        depth = rng.integers(bulk_depth // 2, bulk_depth * 3 // 2, bulk_samples)
        bulk = np.stack([rng.multinomial(r, p) for r, p in zip(depth, W @ A)])
        truth.update(A=A, W=W, bulk_depth=depth, bulk_counts=bulk)
    return Design(seed=seed, donors=donors, celltypes=celltypes, genes=genes, batch=batch,
                  sex_m=sex_m, age=age, group=group, n_sub=S, P=P, n_ic=n_ic,
                  eta=eta.astype(np.float32), phi=phi, size_sd=size_sd, truth=truth)


def generate_chunk(design: Design, start: int, stop: int) -> tuple[sp.csr_matrix, pd.DataFrame]:
    """Counts and obs of cells ``start:stop`` (deterministic given the design).

    Cells are stored donor by donor; within a donor the cell types come in a donor-seeded
    random order, so any chunking of the same design yields the same cell types.
    Randomness of the counts is seeded by (seed, start), so a chunk is reproducible on its
    own (on any worker) for a fixed chunk layout.
    """
    off = design.offsets
    C = design.celltypes.size
    d0 = int(np.searchsorted(off, start, side="right") - 1)
    d1 = int(np.searchsorted(off, stop, side="left"))
    donor_parts, ct_parts = [], []
    for i in range(d0, d1):  # donors overlapping the chunk (a few), not cells
        cts = np.random.default_rng([design.seed, 1, i]).permutation(
            np.repeat(np.arange(C), design.n_ic[i]))
        a, b = max(start, off[i]) - off[i], min(stop, off[i + 1]) - off[i]
        ct_parts.append(cts[a:b])
        donor_parts.append(np.full(b - a, i))
    donor = np.concatenate(donor_parts)
    ct = np.concatenate(ct_parts)
    rng = np.random.default_rng([design.seed, 2, start])
    size = rng.lognormal(-0.5 * design.size_sd ** 2, design.size_sd, donor.size).astype(np.float32)
    mu = np.exp(design.eta[donor, ct]) * size[:, None]
    phi = design.phi.astype(np.float32)
    lam = rng.standard_gamma(np.broadcast_to(phi, mu.shape), dtype=np.float32) * (mu / phi)
    counts = sp.csr_matrix(rng.poisson(lam).astype(np.int32))
    obs = pd.DataFrame({
        layout.OBS_DONOR: design.donors[donor], layout.OBS_CELLTYPE: design.celltypes[ct],
        layout.OBS_BATCH: np.array([f"batch{b}" for b in design.batch], dtype=object)[donor],
        "sex": np.array(["F", "M"], dtype=object)[design.sex_m[donor]],
        "age": design.age[donor]},
        index=pd.Index([f"cell{s}" for s in range(start, stop)]))
    return counts, obs


def truth_dataset(design: Design) -> xr.Dataset:
    """The simulator's truth as an xarray Dataset (see :func:`simulate_study`)."""
    t = design.truth
    T, S = t["T"], t["S"]
    D, C = design.P.shape
    obj = lambda a: np.asarray(a, dtype=object)  # noqa: E731
    ds = xr.Dataset(
        {
            "gene_model": ("gene", obj(np.asarray(MODELS)[t["models"]])),
            "hom2": ("gene", t["hom2"]),
            "V": (("gene", "celltype", "celltype2"), t["V"]),
            "beta": (("celltype", "gene"), t["beta"]),
            "marker": (("celltype", "gene"), t["marker"]),
            "dispersion": ("gene", design.phi),
            "covariate_effect": (("covariate", "gene"), t["cov_effect"]),
            "batch_effect": (("batch", "gene"), t["batch_effect"]),
            "alpha": (("donor", "gene"), t["alpha"].astype(np.float32)),
            "gamma": (("donor", "celltype", "gene"), t["gamma"].astype(np.float32)),
            "eta": (("donor", "celltype", "gene"), design.eta),
            "P": (("donor", "celltype"), design.P),
            "n_cells": (("donor", "celltype"), design.n_ic),
            "donor_batch": ("donor", obj([f"batch{b}" for b in design.batch])),
            "sex": ("donor", obj(np.array(["F", "M"])[design.sex_m])),
            "age": ("donor", design.age),
            "donor_group": ("donor", design.group),
            "donor_top_group": ("donor", design.group // S),
            "group_parent": ("group", np.arange(T * S) // S),
            "group_effect": (("group", "gene"), t["group_effect"]),
            "mrvi_gene": ("gene", t["mrvi_gene"]),
        },
        coords={"gene": design.genes, "celltype": design.celltypes,
                "celltype2": design.celltypes.copy(), "donor": design.donors,
                "covariate": t["cov_names"], "batch": obj([f"batch{b}" for b in range(
                    t["batch_effect"].shape[0])]),
                "group": np.arange(T * S), "top_group": np.arange(T)},
        attrs={"seed": int(design.seed), "mrvi_celltype": design.celltypes[t["mrvi_celltype"]],
               "da_celltype": "" if t["da_celltype"] is None else
               design.celltypes[t["da_celltype"]],
               "da_fold": float(t["da_fold"]), "n_top_groups": int(T), "n_subgroups": int(S),
               "age_center": AGE_CENTER, "scale": "log expected count at size factor 1",
               "models": list(MODELS)})
    if "W" in t:
        n_b = t["W"].shape[0]
        ds = ds.assign_coords(bulk_sample=obj([f"bulk{j}" for j in range(n_b)]))
        ds["W"] = (("bulk_sample", "celltype"), t["W"])
        ds["A"] = (("celltype", "gene"), t["A"])
        ds["bulk_depth"] = ("bulk_sample", t["bulk_depth"])
    return ds


def simulate_study(url: str, *, n_donors: int = 40, n_cells: int = 20_000, n_genes: int = 500,
                   n_celltypes: int = 4, n_batches: int = 2, seed: int = 0,
                   chunk_cells: int = 10_000, bulk_samples: int = 0, overwrite: bool = False,
                   storage_options: dict | None = None, client=None, progress=None,
                   **design_kw):
    """Simulate a population single-cell study into a new study store; return the Study.

    Cells are generated and written one chunk of ``chunk_cells`` at a time through
    :class:`scdist.store.CellWriter`, so memory does not grow with ``n_cells``.

    Parameters (notation of the module docstring)
    ----------
    url : where to create the store (local path or fsspec URL).
    n_donors, n_cells, n_genes, n_celltypes, n_batches : D, total cells, G, C, B.
    seed : the same seed (and parameters) gives an identical store.
    chunk_cells : cells per chunk of ``cells/X`` (also the generation unit).
    bulk_samples : M bulk samples mixed from the cell type profiles into ``bulk/``.
    overwrite : replace an existing store at ``url``.
    client : optional ``distributed.Client``: chunks are then generated on its workers
        (same result as without; the driver writes them in order).
    progress : optional object with ``update(n=1)``, called once per chunk written.
    design_kw : model knobs of :func:`make_design`, e.g. ``model_mix=(hom, free, full)``
        weights, ``hom2_range`` (sigma_alpha^2), ``v_range`` (V_cc), ``n_groups=(T, S)``,
        ``mrvi_celltype``, ``mrvi_gene_frac``, ``da_celltype``, ``da_fold``, ``bulk_depth``.

    ``truth/`` holds: ``gene_model`` (hom/free/full), ``hom2`` [sigma_alpha^2], ``V``
    (gene, celltype, celltype2), ``beta`` [beta_c] (celltype, gene), ``marker``,
    ``dispersion`` [phi], ``covariate_effect`` (covariate sex_M/age per year, gene),
    ``batch_effect``, the realised ``alpha`` and ``gamma`` [Gamma_ic], ``eta`` (donor,
    celltype, gene), ``P`` (expected proportions), ``n_cells`` (realised n_ic),
    ``donor_batch``, ``sex``, ``age``, ``donor_group`` (leaf), ``donor_top_group``,
    ``group_parent`` (the tree), ``group_effect`` (group, gene) in the MrVI cell type,
    ``mrvi_gene``, and with bulk samples ``W`` (bulk_sample, celltype), ``A`` (celltype,
    gene), ``bulk_depth``. attrs name the MrVI and DA cell types and ``da_fold``.
    """
    from ..store import CellWriter, create_study
    from ..store.markers import STAGE, mark_done
    from ..store.results import strings_to_object

    _check("chunk_cells", chunk_cells, 1)
    design = make_design(n_donors=n_donors, n_cells=n_cells, n_genes=n_genes,
                         n_celltypes=n_celltypes, n_batches=n_batches, seed=seed,
                         bulk_samples=bulk_samples, **design_kw)
    study = create_study(url, overwrite=overwrite, storage_options=storage_options)
    total = int(design.n_ic.sum())
    starts = list(range(0, total, chunk_cells))
    with CellWriter(study, list(design.genes), chunk_cells=chunk_cells,
                    covariates=list(COVARIATES),
                    source_keys={"donor": "donor", "celltype": "celltype", "batch": "batch"}
                    ) as writer:
        if client is None:
            for a in starts:
                writer.append(*generate_chunk(design, a, min(a + chunk_cells, total)))
                if progress is not None:
                    progress.update(1)
        else:
            # Workers generate, the driver appends in order; a window of chunks bounds the
            # driver's memory to a few chunks.
            slim = client.scatter(replace(design, truth={}), broadcast=True)
            window = 2 * max(1, len(client.scheduler_info()["workers"]))
            for w0 in range(0, len(starts), window):
                futs = [client.submit(generate_chunk, slim, a, min(a + chunk_cells, total),
                                      pure=False) for a in starts[w0:w0 + window]]
                for f in futs:
                    writer.append(*f.result())
                    f.release()
                    if progress is not None:
                        progress.update(1)
    so = study.storage_options
    kw = {"storage_options": so} if so and "://" in study.url else {}
    truth = strings_to_object(truth_dataset(design))
    gchunk = min(design.genes.size, 512)
    truth_url = study.group_url(layout.TRUTH)
    enc = {k: {"chunks": tuple(gchunk if d == "gene" else n for d, n in zip(v.dims, v.shape))}
           for k, v in truth.data_vars.items() if "gene" in v.dims}
    truth.to_zarr(truth_url, mode="w", consolidated=False, zarr_format=3, encoding=enc, **kw)
    mark_done(truth_url, STAGE, {"seed": seed}, storage_options=so)
    if bulk_samples:
        t = design.truth
        bulk = xr.Dataset(
            {"counts": (("bulk_sample", "gene"), t["bulk_counts"].astype(np.int64)),
             "true_W": (("bulk_sample", "celltype"), t["W"])},
            coords={"bulk_sample": truth["bulk_sample"].values, "gene": design.genes,
                    "celltype": design.celltypes})
        bulk_url = study.group_url(layout.BULK)
        strings_to_object(bulk).to_zarr(bulk_url, mode="w", consolidated=False,
                                        zarr_format=3, **kw)
        mark_done(bulk_url, STAGE, {"seed": seed}, storage_options=so)
    params = dict(n_donors=n_donors, n_cells=n_cells, n_genes=n_genes, n_celltypes=n_celltypes,
                  n_batches=n_batches, seed=seed, chunk_cells=chunk_cells,
                  bulk_samples=bulk_samples, **design_kw)
    study.add_provenance("simulate", params)
    return study


