"""Public entry point ``scdist.ursm.fit``: validate, initialise, run Gibbs-EM, return an xarray Dataset."""
from __future__ import annotations

import numpy as np
import xarray as xr

from ..errors import InputError
from .data import UrsmData, prepare
from .em import BlockLayout, EMSettings, GibbsEM, LocalExecutor
from .gibbs import PG_SAMPLERS, S_UPDATES
from .mcerror import STOP_RULES
from .params import Theta, initial_theta

ENGINES = ("local", "ray")
PRIOR_STEPS = ("em", "collapsed")


def _check_int(name, v, lo):
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
        raise InputError(f"must be an integer >= {lo}, got {v!r}", field=name, fix=f"pass an integer >= {lo}")


def fit(sc_counts, cell_types, bulk_counts=None, *, n_types=None, em_iters=50, burnin=50, samples=100,
        thin=1, chains=1, map_w=False, seed=0, engine="local", ray_address=None, markers=None, gene_names=None,
        celltype_names=None, warm_start=True, warm_burnin=None, s_update="gamma", rao_blackwell=True,
        init_dropout="wide", eps_A=1e-6, eps_alpha=None, map_w_steps=1, final_estep=True,
        cell_block_size=4096, bulk_block_size=4096, n_actors=None, actor_cpus=None, ray_timeout=600.0,
        min_ray_entries=200_000, bulk_burnin=None, bulk_samples=None, impute_threshold=0.5, a_max_iter=500,
        max_actor_restarts=3, pg_sampler="polyagamma", stop_rule="none", stop_k=2.0, stop_patience=3,
        stop_min_iters=5, stop_max_rounds=4, mc_batches=None, prior_step="em",
        a_solver="scaled", theta0: Theta | None = None, callback=None, progress=None) -> xr.Dataset:
    """Fit URSM (Zhu, Lei, Devlin & Roeder 2018) by Gibbs-EM to single-cell and/or bulk counts.

    Data (paper notation → arguments): Y (N × L single-cell counts) = ``sc_counts.T`` given as
    cells × genes (numpy, scipy.sparse, DataFrame or AnnData); G_l = ``cell_types`` (ints 0..K−1
    or strings); X (N × M bulk counts) = ``bulk_counts.T`` given as samples × genes, same genes
    (None → single-cell-only submodel; ``sc_counts=None`` with ``markers`` → bulk-only submodel).
    K = ``n_types`` (default: number of single-cell types; K = max(K_sc, K_bulk), bulk-only types
    need ``markers`` = {type: [genes]}, which set A⁰ to zero outside the marker's type, §4.5).

    E-step (§3.1): ``burnin`` + ``samples`` × ``thin`` Gibbs sweeps per EM iteration (B, T, keeping
    every ``thin``-th); ``chains``
    independent chains pooled in the M-step (split R-hat per EM iteration when > 1);
    ``map_w``: the MAP-W variant of §4.5 (``map_w_steps`` steps per EM iteration) instead of bulk
    Gibbs. M-step (§3.2): closed forms for μκ, σκ², μτ, στ²; projected gradient ascent for A on
    Δ_{ε_A} (``eps_A``) and α ≥ ε_α (``eps_alpha``; default 1 with MAP-W, else 0.01).

    Convergence options (defaults differ from the authors' code, see docs/readme/ursm.md):
    ``warm_start`` keeps each chain's single-cell state across EM iterations (reference: cold
    restart), ``warm_burnin`` burn-in sweeps after the first iteration, ``init_dropout`` 'wide'
    (τ prior free to move) or 'pinned' (τ held near N), ``s_update`` 'gamma' (vectorised exact
    auxiliary-variable S update) or 'sequential' (the paper's gene-by-gene update),
    ``rao_blackwell`` conditional expectations in the statistics; ``bulk_burnin`` /
    ``bulk_samples`` a shorter (warm-started) bulk chain than the single-cell one.
    ``pg_sampler`` for the ω ~ PG(1, ψ) draws: 'polyagamma' (default: the maintained ``polyagamma``
    package draws at the lower edge of each |ψ| bin, tilted exactly to ψ by rejection,
    ``scdist.ursm.pg_pool``; ~0.75× the time of one call per sweep), 'polyagamma_direct' (one
    package call per sweep, every draw with its own ψ) or 'compiled' (scdist's exact Devroye
    sampler ``scdist.ursm.polya_gamma``, inlined into the compiled sweep).

    Stopping (spec §2.6, ``scdist.ursm.mcerror``): ``em_iters`` is the maximum. Each iteration's
    increment ΔQ = Q(θᵗ⁺¹ | s̄) − Q(θᵗ | s̄) of the M-step objective gets a Monte-Carlo standard
    error from ``mc_batches`` batch means of the kept sweeps per chain (default 4 when a rule is
    on, else 0 = not computed; costs ``mc_batches`` × cells × genes × 4 bytes and two extra
    M-steps per iteration). ΔQ's own M-step fits the noise too, so the rules test the cross-fitted
    increment ``dQ_cv`` (each half of the batches' M-step scored on the other half's draws):
    ``stop_rule='crossfit'`` stops once it is < ``stop_k`` · SE in ``stop_patience`` consecutive
    iterations, not before ``stop_min_iters``; 'ascent' (Caffo, Jank & Jones 2005) then first adds
    another round of ``samples`` kept sweeps per iteration (continuing the chains, up to
    ``stop_max_rounds`` rounds) and stops only when the test fires at the largest sample; 'none'
    runs all ``em_iters``. The result's attrs ``stop_reason`` ('em_iters' or 'mc_error'),
    ``em_iters_run`` and ``samples_final`` say why and when it stopped; ``dQ``, ``dQ_se``,
    ``dQ_cv``, ``dQ_cv_se`` and ``samples`` (kept sweeps T) are traced per iteration.

    ``prior_step``: 'em' (default) is Eq. 3.6, μκ = mean Ê κ_l (likewise τ); 'collapsed' sets
    (μκ, μτ) to the maximiser of the M-step objective with (κ_l, τ_l) integrated out given the
    draws of ω and S (an ECME step, ``mstep.collapsed_prior_mean``): the point EM's μ step moves
    towards along the κ–τ ridge, where plain EM creeps; then σ² given that μ. Not with a
    ``stop_rule``.

    Engine: ``engine='local'`` runs in-process; ``'ray'`` runs (chain, block) samplers on Ray
    actors (``ray_address`` or local Ray; problems with fewer than ``min_ray_entries`` matrix
    entries run in-process). Blocks of ``cell_block_size`` cells / ``bulk_block_size`` samples
    each have their own RNG stream, so the same seed and block layout give identical results on
    either engine and any number of actors. ``max_actor_restarts``: how often Ray may restart each
    actor after its process died; the restarted actor resumes its chains from the state of the last
    EM iteration, so the result is unchanged (``scdist.engines.ray_actors``).

    Returns an ``xarray.Dataset``: ``A(gene, celltype)``, ``W(bulk_sample, celltype)`` posterior
    mean proportions, ``dropout_prob(cell, gene)`` = P(S_il = 0 | data) on zero entries (0
    elsewhere), ``imputed(cell, gene)`` (Y, with R_l Â_{i,G_l} on entries whose dropout_prob >
    ``impute_threshold``), ``kappa(cell)``, ``tau(cell)`` posterior means, ``alpha(celltype)``,
    ``mu_kappa``, ``sigma2_kappa``, ``mu_tau``, ``sigma2_tau``, ``objective(em_iter)`` and, when
    chains > 1, ``rhat_W``, ``rhat_kappa``, ``rhat_tau``, ``rhat_logjoint`` and
    ``objective_chain(em_iter, chain)``.
    """
    # ---- validate everything before any work ------------------------------------------------
    _check_int("em_iters", em_iters, 1)
    _check_int("burnin", burnin, 0)
    _check_int("samples", samples, 1)
    _check_int("chains", chains, 1)
    _check_int("thin", thin, 1)
    _check_int("seed", seed, 0)
    _check_int("map_w_steps", map_w_steps, 1)
    _check_int("cell_block_size", cell_block_size, 1)
    _check_int("bulk_block_size", bulk_block_size, 1)
    _check_int("max_actor_restarts", max_actor_restarts, 0)
    if warm_burnin is not None:
        _check_int("warm_burnin", warm_burnin, 0)
    if bulk_burnin is not None:
        _check_int("bulk_burnin", bulk_burnin, 0)
    if bulk_samples is not None:
        _check_int("bulk_samples", bulk_samples, 1)
    if prior_step not in PRIOR_STEPS:
        raise InputError(f"unknown prior_step {prior_step!r}", field="prior_step", fix=f"use one of {PRIOR_STEPS}")
    if prior_step != "em" and stop_rule != "none":
        raise InputError("the stopping rules score increments of the complete-data objective, which the "
                         "collapsed μ step does not maximise", field="prior_step",
                         fix="use prior_step='em' with a stop_rule, or stop_rule='none'")
    if stop_rule not in STOP_RULES:
        raise InputError(f"unknown stopping rule {stop_rule!r}", field="stop_rule", fix=f"use one of {STOP_RULES}")
    _check_int("stop_patience", stop_patience, 1)
    _check_int("stop_min_iters", stop_min_iters, 1)
    _check_int("stop_max_rounds", stop_max_rounds, 1)
    if isinstance(stop_k, bool) or not isinstance(stop_k, (int, float, np.integer, np.floating)) or not stop_k > 0:
        raise InputError(f"must be a number > 0, got {stop_k!r}", field="stop_k", fix="use e.g. stop_k=2.0")
    if mc_batches is None:
        mc_batches = 0 if stop_rule == "none" else 4
    _check_int("mc_batches", mc_batches, 0)
    if stop_rule != "none" and mc_batches * chains < 2:
        raise InputError(f"stop_rule={stop_rule!r} needs at least 2 batches in all, got mc_batches={mc_batches} "
                         f"with chains={chains}", field="mc_batches", fix="use mc_batches >= 2 (default 4)")
    kept = min(samples, bulk_samples or samples)
    if mc_batches > kept:
        raise InputError(f"mc_batches={mc_batches} exceeds the kept sweeps ({kept}: samples / bulk_samples)",
                         field="mc_batches", fix="use at most one batch per kept sweep")
    if engine not in ENGINES:
        raise InputError(f"unknown engine {engine!r}", field="engine", fix=f"use one of {ENGINES}")
    if s_update not in S_UPDATES:
        raise InputError(f"unknown S update {s_update!r}", field="s_update", fix=f"use one of {S_UPDATES}")
    if pg_sampler not in PG_SAMPLERS:
        raise InputError(f"unknown Polya-Gamma sampler {pg_sampler!r}", field="pg_sampler",
                         fix=f"use one of {PG_SAMPLERS}")
    if a_solver not in ("scaled", "euclidean"):
        raise InputError(f"unknown solver {a_solver!r}", field="a_solver", fix="use 'scaled' or 'euclidean'")
    if init_dropout not in ("wide", "pinned"):
        raise InputError(f"unknown init {init_dropout!r}", field="init_dropout", fix="use 'wide' or 'pinned'")
    if eps_alpha is None:
        eps_alpha = 1.0 if map_w else 1e-2
    if not eps_alpha > 0:
        raise InputError(f"must be > 0, got {eps_alpha}", field="eps_alpha", fix="use a small positive floor")
    if map_w and eps_alpha < 1.0:
        raise InputError(f"MAP-W needs alpha >= 1 but eps_alpha={eps_alpha}", field="eps_alpha",
                         fix="use eps_alpha >= 1 with map_w=True (spec §1.4)")
    if sc_counts is None and cell_types is not None:
        raise InputError("given without sc_counts", field="cell_types", fix="pass sc_counts or drop cell_types")
    data: UrsmData = prepare(sc_counts, cell_types, bulk_counts, n_types=n_types, markers=markers,
                             gene_names=gene_names, celltype_names=celltype_names)
    if not (0 <= eps_A and data.N * eps_A < 1):
        raise InputError(f"N*eps_A = {data.N * eps_A:g} must be < 1", field="eps_A",
                         fix=f"use eps_A < {1.0 / data.N:g}")
    if data.X is not None and (data.X.sum(axis=1) == 0).any():
        bad = data.bulk_names[data.X.sum(axis=1) == 0][:5].tolist()
        raise InputError(f"bulk samples with no counts: {bad}", field="bulk_counts",
                         fix="drop bulk samples whose counts are all zero")

    settings = EMSettings(em_iters=em_iters, burnin=burnin, samples=samples, warm_burnin=warm_burnin,
                          chains=chains, map_w=map_w, map_w_steps=map_w_steps, eps_A=eps_A,
                          eps_alpha=eps_alpha, sc_warm_start=warm_start, s_update=s_update,
                          rao_blackwell=rao_blackwell, seed=int(seed), final_estep=final_estep,
                          a_max_iter=a_max_iter, a_solver=a_solver, bulk_burnin=bulk_burnin,
                          bulk_samples=bulk_samples, thin=thin, pg_sampler=pg_sampler, mc_batches=mc_batches,
                          stop_rule=stop_rule, stop_k=float(stop_k), stop_patience=stop_patience,
                          stop_min_iters=stop_min_iters, stop_max_rounds=stop_max_rounds, prior_step=prior_step)
    theta = theta0.copy() if theta0 is not None else initial_theta(
        data.Y, data.G, data.X, data.K, data.markers, eps_A=eps_A, init_dropout=init_dropout,
        alpha0=max(1.0, eps_alpha))
    layout = BlockLayout.make(data.L, data.M, cell_block_size, bulk_block_size, map_w)
    entries = data.N * (data.L + data.M)
    use_ray = engine == "ray" and entries >= min_ray_entries
    if use_ray:
        from ..engines.ray_actors import RayBlockExecutor   # engine adapter, imported only when asked

        executor = RayBlockExecutor(data.Y, data.G, data.X, data.K, layout, settings, address=ray_address,
                                    n_actors=n_actors, actor_cpus=actor_cpus, timeout=ray_timeout,
                                    max_actor_restarts=max_actor_restarts)
    else:
        executor = LocalExecutor(data.Y, data.G, data.X, data.K, layout, settings)
    try:
        em = GibbsEM(data.Y, data.G, data.X, data.K, settings, theta, executor)
        theta, pooled, trace = em.run(layout, callback=callback, progress=progress)
    finally:
        executor.close()
    ds = to_dataset(data, theta, pooled, trace, settings, impute_threshold)
    ds.attrs["stop_rule"] = stop_rule
    ds.attrs["prior_step"] = prior_step
    ds.attrs["stop_reason"] = em.stop_reason
    ds.attrs["em_iters_run"] = em.iters_run
    ds.attrs["samples_final"] = samples * em.rounds
    ds.attrs["engine"] = "ray" if use_ray else "local"
    ds.attrs["thin"] = thin
    ds.attrs["n_blocks_cells"] = len(layout.cell_blocks)
    ds.attrs["n_blocks_bulk"] = len(layout.bulk_blocks)
    return ds


def to_dataset(data: UrsmData, theta: Theta, pooled, trace: dict, s: EMSettings,
               impute_threshold: float) -> xr.Dataset:
    """Assemble the result Dataset with labelled coordinates."""
    K = data.K
    coords = {"gene": data.gene_names, "celltype": data.celltype_names,
              "em_iter": np.arange(len(trace["objective"]))}
    dv = {"A": (("gene", "celltype"), theta.A),
          "alpha": (("celltype",), theta.alpha),
          "objective": (("em_iter",), np.asarray(trace["objective"])),
          "a_steps": (("em_iter",), np.asarray(trace["a_steps"])),
          "samples": (("em_iter",), np.asarray(trace["samples"], np.int64))}
    if s.mc_batches:
        dv["dQ"] = (("em_iter",), np.asarray(trace["dQ"], float))
        dv["dQ_se"] = (("em_iter",), np.asarray(trace["dQ_se"], float))
        dv["dQ_cv"] = (("em_iter",), np.asarray(trace["dQ_cv"], float))
        dv["dQ_cv_se"] = (("em_iter",), np.asarray(trace["dQ_cv_se"], float))
    if data.Y is not None:
        c = pooled.cell
        Y = data.Y
        zero = Y == 0
        drop = np.where(zero, 1.0 - c.ES, 0.0).astype(np.float32)
        R = Y.sum(axis=1)
        expected = (R[:, None] * theta.A[:, data.G].T)
        imputed = np.where(zero & (drop > impute_threshold), expected, Y).astype(np.float32)
        coords.update(cell=data.cell_names, cell_type=("cell", data.celltype_names[data.G]))
        dv.update(dropout_prob=(("cell", "gene"), drop), imputed=(("cell", "gene"), imputed),
                  kappa=(("cell",), c.Ek), tau=(("cell",), c.Et),
                  kappa_var=(("cell",), c.Ek2 - c.Ek ** 2), tau_var=(("cell",), c.Et2 - c.Et ** 2))
        dv.update(mu_kappa=((), theta.mu_kappa), sigma2_kappa=((), theta.s2_kappa),
                  mu_tau=((), theta.mu_tau), sigma2_tau=((), theta.s2_tau))
    if data.X is not None:
        coords["bulk_sample"] = data.bulk_names
        dv["W"] = (("bulk_sample", "celltype"), pooled.bulk.EW)
    if s.chains > 1:
        coords["chain"] = np.arange(s.chains)
        dv["objective_chain"] = (("em_iter", "chain"), np.asarray(trace["objective_chain"]))
        for k in ("rhat_kappa", "rhat_tau", "rhat_W", "rhat_logjoint"):
            v = np.asarray(trace[k], float)
            if np.isfinite(v).any():
                dv[k] = (("em_iter",), v)
    ds = xr.Dataset(dv, coords=coords)
    ds.attrs.update(method="ursm", em_iters=s.em_iters, burnin=s.burnin, samples=s.samples,
                    warm_burnin=-1 if s.warm_burnin is None else s.warm_burnin, chains=s.chains,
                    map_w=int(s.map_w), seed=s.seed, s_update=s.s_update, sc_warm_start=int(s.sc_warm_start),
                    rao_blackwell=int(s.rao_blackwell), eps_A=s.eps_A, eps_alpha=s.eps_alpha, K=K,
                    mc_batches=s.mc_batches, stop_k=s.stop_k, stop_patience=s.stop_patience,
                    stop_min_iters=s.stop_min_iters, stop_max_rounds=s.stop_max_rounds)
    return ds
