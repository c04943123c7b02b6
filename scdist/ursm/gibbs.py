"""E-step: Gibbs sweeps of paper Section 3.1, vectorised over genes, cells and bulk samples.

A *block* is a set of cells (or bulk samples) owned by one sampler; blocks are conditionally
independent given θ, so each runs its B burn-in + T kept sweeps alone and returns additive
sufficient statistics (spec §1.2). Nothing here knows about Ray or Dask.

Single cells (per sweep, reference scan order ω → S → (κ, τ) → ψ):
  (S1) ω_il ~ PG(1, ψ_il)                       [the ``polyagamma`` package, pooled by |ψ| with an
                                                 exact tilt (``pg_pool``), or one package call per
                                                 sweep, or scdist's exact compiled Devroye sampler:
                                                 ``pg_sampler``]
  (S2) S_il | rest on entries with Y_il = 0     ['gamma': v_l ~ Gamma(R_l, U_l), then
       S_il ~ Bern(σ(ψ_il − v_l a_il)) for all zeros at once; 'sequential': the paper's
       logit b_il = ψ_il − R_l ln(1 + a_il / U_{−i,l}) gene after gene, cells at once]
  (S3) (κ_l, τ_l) ~ N₂(m_l, P_l⁻¹)              [closed-form 2 × 2 Cholesky per cell]
  (S1), (S2), (S3), ψ and the kept-sweep products run in one compiled pass (``kernels.cell_sweep``).
Bulk samples (per sweep, W → Z̃):
  (B1) W_·j ~ Dir(α + Σ_i Z̃_ij·)                [normalised gammas]
  (B2) Z̃_ij ~ Mult(X_ij, r_ij·)                 [K − 1 conditional binomials over all (i, j),
                                                 compiled: ``kernels.draw_allocations``]
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from polyagamma import random_polyagamma
from scipy.special import digamma, gammaln

from . import kernels
from .pg_pool import PGPool
from .polya_gamma import WEIGHT_TABLE
from .params import Theta

S_UPDATES = ("gamma", "sequential")
PG_SAMPLERS = ("polyagamma", "polyagamma_direct", "compiled")


def block_rng(seed: int, chain: int, kind: int, block: int, em_iter: int) -> np.random.Generator:
    """One independent stream per (run seed, chain, block kind, block, EM iteration) (spec §2.2).

    Streams are keyed by data block, not by worker, so results do not depend on placement."""
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(chain, kind, block, em_iter)))


def batch_sizes(samples: int, batches: int) -> np.ndarray:
    """Kept sweeps per batch when kept sweep t goes to batch t·nb // T (consecutive, sizes differ by ≤ 1)."""
    return np.bincount(np.arange(samples) * batches // samples, minlength=batches)


def _half(t: int, samples: int) -> int:
    """Which half of the kept sweeps draw t belongs to for split R-hat (−1: the middle draw of an odd T)."""
    h = samples // 2
    return 0 if t < h else (1 if t >= samples - h else -1)


def kappa_tau_conditional(omega, S, a, theta: Theta):
    """(S3) parameters for every cell: precision P_l (as p11, p12, p22) and mean m_l of (κ_l, τ_l) | ω, S.

    P_l = [[Σ_i ω_il + σκ⁻², Σ_i ω_il a_il], [Σ_i ω_il a_il, Σ_i ω_il a_il² + στ⁻²]],
    P_l m_l = [Σ_i S_il − N/2 + μκ σκ⁻², Σ_i S_il a_il − ½ + μτ στ⁻²] (uses Σ_i a_il = 1).
    """
    N = a.shape[1]
    ik2, it2 = 1.0 / theta.s2_kappa, 1.0 / theta.s2_tau
    oa = omega * a
    p11 = omega.sum(axis=1) + ik2
    p12 = oa.sum(axis=1)
    p22 = np.einsum("ln,ln->l", oa, a) + it2
    b1 = S.sum(axis=1) - N / 2.0 + theta.mu_kappa * ik2
    b2 = np.einsum("ln,ln->l", a, S) - 0.5 + theta.mu_tau * it2
    det = p11 * p22 - p12 * p12
    m = np.stack([(p22 * b1 - p12 * b2) / det, (p11 * b2 - p12 * b1) / det])
    return (p11, p12, p22), m


@dataclass
class CellStats:
    """Averages over the T kept sweeps for one cell block (spec §1.2)."""

    ES: np.ndarray        # (Lb, N) Ê[S_il]
    Ek: np.ndarray        # (Lb,) Ê κ_l
    Ek2: np.ndarray       # (Lb,) Ê κ_l²
    Et: np.ndarray        # (Lb,) Ê τ_l
    Et2: np.ndarray       # (Lb,) Ê τ_l²
    C1: np.ndarray        # (N, K) Σ_{l∈k} Ê[τ_l (S_il − ½) − κ_l τ_l ω_il]
    C2: np.ndarray        # (N, K) Σ_{l∈k} Ê[ω_il τ_l²]
    halves: np.ndarray | None = None   # (2, 4, Lb): per half of the kept sweeps Σκ, Σκ², Στ, Στ²
    logjoint: np.ndarray | None = None  # (T,) log p(S, κ, τ, Y | θ) per kept sweep (up to a constant)
    # batch means of the statistics over nb consecutive batches of the kept sweeps (MC error, ``mcerror``)
    bES: np.ndarray | None = None      # (nb, Lb, N) float32
    bmom: np.ndarray | None = None     # (nb, 4, Lb) Ê κ, Ê κ², Ê τ, Ê τ²
    bC1: np.ndarray | None = None      # (nb, N, K)
    bC2: np.ndarray | None = None      # (nb, N, K)
    # collapsed μ step (``mstep.collapsed_prior_mean``): averages over kept sweeps of Σ_l m_l (2) and
    # Σ_l P_l⁻¹ (11, 12, 22) of the (S3) conditional
    ridge: np.ndarray | None = None


@dataclass
class BulkStats:
    """Averages over the T kept sweeps for one bulk block."""

    cZ: np.ndarray        # (N, K) Σ_j Ê[Z̃_ijk]
    ElnW: np.ndarray      # (K,) Σ_j Ê ln W_kj
    EW: np.ndarray        # (Mb, K) Ê W_kj
    halves: np.ndarray | None = None   # (2, 2, Mb, K): per half Σ W, Σ W²
    logjoint: np.ndarray | None = None  # (T,)
    bcZ: np.ndarray | None = None      # (nb, N, K) batch means of Σ_j Ê Z̃_ijk
    bElnW: np.ndarray | None = None    # (nb, K) batch means of Σ_j Ê ln W_kj


class CellBlockSampler:
    """Gibbs state and sweeps for one block of cells (rows of Y, cells × genes)."""

    def __init__(self, Y: np.ndarray, G: np.ndarray, K: int, *, s_update: str = "gamma",
                 rao_blackwell: bool = True, pg_sampler: str = "polyagamma", ridge: bool = False):
        if s_update not in S_UPDATES:
            raise ValueError(f"s_update must be one of {S_UPDATES}")
        if pg_sampler not in PG_SAMPLERS:
            raise ValueError(f"pg_sampler must be one of {PG_SAMPLERS}")
        self.pg_sampler = pg_sampler
        self.Y = np.ascontiguousarray(Y)
        self.pos = self.Y > 0
        self.R = self.Y.sum(axis=1).astype(float)
        self.G = np.asarray(G, dtype=np.int64)
        self.K = K
        self.s_update = s_update
        self.rao_blackwell = rao_blackwell
        self.ridge = ridge
        self.S = self.kappa = self.tau = None

    def set_counts(self, Y: np.ndarray) -> None:
        """Replace the block's counts (same shape), keeping the chain state (used by joint-distribution tests)."""
        self.Y = np.ascontiguousarray(Y)
        self.pos = self.Y > 0
        self.R = self.Y.sum(axis=1).astype(float)
        if self.S is not None:
            self.S |= self.pos

    def _draw_S_gamma(self, S, psi, a, rng):
        kernels.gamma_s(S, self.pos, psi, a, self.R, rng)

    def _draw_S_sequential(self, S, psi, a, rng):
        # genes must be visited in turn (spec §1.1 S2): a compiled loop over (cell, gene)
        kernels.sequential_s(S, self.pos, psi, a, self.R, rng)

    def run(self, theta: Theta, rng: np.random.Generator, burnin: int, samples: int, *,
            cold: bool, track: bool = False, thin: int = 1, batches: int = 0) -> CellStats:
        """Run ``burnin`` + ``samples`` × ``thin`` sweeps at θ and return the averages over the
        ``samples`` kept sweeps (every ``thin``-th after burn-in); ``batches`` > 0 also returns the
        averages over that many consecutive batches of the kept sweeps (their mean is the total)."""
        Lb, N = self.Y.shape
        a = np.ascontiguousarray(theta.A[:, self.G].T)          # a_il = A_{i,G_l}
        if cold or self.S is None:
            self.S = self.pos | (rng.random((Lb, N)) < 0.5)
            self.kappa = np.full(Lb, theta.mu_kappa)
            self.tau = np.full(Lb, theta.mu_tau)
        S, kappa, tau = self.S, self.kappa, self.tau
        ik2, it2 = 1.0 / theta.s2_kappa, 1.0 / theta.s2_tau
        psi = kappa[:, None] + tau[:, None] * a
        omega = np.empty_like(psi)
        nb = min(batches, samples)
        # with batches the kernel accumulates into the current batch's slice; totals are their sums
        ES = np.zeros((max(nb, 1), Lb, N))
        C1 = np.zeros((max(nb, 1), N, self.K))
        C2 = np.zeros((max(nb, 1), N, self.K))
        mom = np.zeros((max(nb, 1), 4, Lb))
        halves = np.zeros((2, 4, Lb)) if track else None
        lps = np.zeros(samples) if track else None
        ridge = np.zeros(5)
        sequential = self.s_update == "sequential"
        compiled_pg = self.pg_sampler == "compiled"
        pooled = PGPool(psi.size) if self.pg_sampler == "polyagamma" else None
        if track:
            ylna = np.einsum("ln,ln->l", self.Y, np.log(a)).sum()
        for s in range(burnin + samples * thin):
            if pooled is not None:
                # (S1) package draws at each |ψ| bin's edge, tilted exactly to ψ_il (pg_pool)
                pooled.draw(psi, omega, rng)
            elif not compiled_pg:
                # (S1) one call per sweep into the reused ``omega``. For h = 1 the package's default
                # (hybrid) method dispatches every draw to its Devroye sampler; naming it skips the
                # dispatch, same draws bit for bit (tested), faster
                random_polyagamma(1.0, psi, out=omega, method="devroye", disable_checks=True,
                                  random_state=rng)
            keep = s >= burnin and (s - burnin + 1) % thin == 0
            t = (s - burnin) // thin
            b = t * nb // samples if (keep and nb) else 0
            # (S1) unless drawn above, (S2), (S3), ψ and, if kept, the within-sweep products of
            # spec §1.2 (compiled)
            kernels.cell_sweep(S, self.pos, psi, a, self.R, self.G, omega, kappa, tau, theta.mu_kappa, ik2,
                               theta.mu_tau, it2, rng, sequential, keep, self.rao_blackwell, ES[b], C1[b],
                               C2[b], WEIGHT_TABLE, compiled_pg, ridge, self.ridge)
            if not keep:
                continue
            cur = np.stack([kappa, kappa * kappa, tau, tau * tau])
            mom[b] += cur
            if track:
                h = _half(t, samples)
                if h >= 0:
                    halves[h] += cur
                U = np.einsum("ln,ln->l", a, S)
                with np.errstate(divide="ignore"):
                    lnU = np.where(self.R > 0, np.log(U), 0.0)
                lps[t] = (-0.5 * ((kappa - theta.mu_kappa) ** 2 * ik2).sum()
                          - 0.5 * ((tau - theta.mu_tau) ** 2 * it2).sum()
                          - 0.5 * Lb * np.log(theta.s2_kappa * theta.s2_tau)
                          + (S * psi).sum() - np.logaddexp(0.0, psi).sum()
                          + ylna - (self.R * lnU).sum())
        inv = 1.0 / samples
        bat = {}
        if nb:
            w = (1.0 / batch_sizes(samples, nb))[:, None, None]
            bat = dict(bES=(ES * w).astype(np.float32), bmom=mom * w, bC1=C1 * w, bC2=C2 * w)
            ES, C1, C2, mom = ES.sum(0), C1.sum(0), C2.sum(0), mom.sum(0)
        else:
            ES, C1, C2, mom = ES[0], C1[0], C2[0], mom[0]
        return CellStats(ES=ES * inv, Ek=mom[0] * inv, Ek2=mom[1] * inv, Et=mom[2] * inv, Et2=mom[3] * inv,
                         C1=C1 * inv, C2=C2 * inv, halves=halves, logjoint=lps,
                         ridge=ridge * inv if self.ridge else None, **bat)


class BulkBlockSampler:
    """Gibbs state and sweeps for one block of bulk samples (rows of X, samples × genes)."""

    def __init__(self, X: np.ndarray, K: int, *, rao_blackwell: bool = True):
        self.K = K
        self.rao_blackwell = rao_blackwell
        self.set_counts(X)
        self.n = None          # (Mb, K) Σ_i Z̃_ijk, the chain's state (warm-started)

    def set_counts(self, X: np.ndarray) -> None:
        """Replace the block's counts (same shape), keeping the chain state."""
        self.X = np.ascontiguousarray(X, dtype=np.int64)
        self.lf = kernels.log_factorials(self.X.max(initial=0))

    def _draw_Z(self, W, A, rng, zsum=None, cz=None):
        """(B2) for all (i, j): Z̃_ij ~ Mult(X_ij, A_i· ⊙ W_·j / (AW)_ij) as K − 1 conditional binomials
        (compiled, exact); returns n_jk = Σ_i Z̃_ijk, sets ``zsum`` to Σ_j Z̃_ijk and adds
        Σ_j E[Z̃_ijk | W] to ``cz``, each if given."""
        n = np.empty((self.X.shape[0], self.K))
        want = zsum is not None
        if want:
            zsum[:] = 0.0
        kernels.draw_allocations(self.X, np.ascontiguousarray(W), A, rng, self.lf, n,
                                 zsum if want else n, want, n if cz is None else cz, cz is not None)
        return n

    def run(self, theta: Theta, rng: np.random.Generator, burnin: int, samples: int, *,
            cold: bool = False, track: bool = False, thin: int = 1, batches: int = 0) -> BulkStats:
        Mb, N = self.X.shape
        K = self.K
        A, alpha = np.ascontiguousarray(theta.A), theta.alpha
        if cold or self.n is None:
            W0 = np.tile(alpha / alpha.sum(), (Mb, 1))
            self.n = self._draw_Z(W0, A, rng)
        nb = min(batches, samples)
        cZ = np.zeros((max(nb, 1), N, K))
        ElnW = np.zeros((max(nb, 1), K))
        EW = np.zeros((Mb, K))
        halves = np.zeros((2, 2, Mb, K)) if track else None
        lps = np.zeros(samples) if track else None
        zsum = np.zeros((N, K)) if (track or not self.rao_blackwell) else None
        lnA = np.log(A)
        for s in range(burnin + samples * thin):
            g = rng.standard_gamma(alpha[None, :] + self.n)
            W = g / g.sum(axis=1, keepdims=True)              # (B1)
            keep = s >= burnin and (s - burnin + 1) % thin == 0
            t = (s - burnin) // thin
            b = t * nb // samples if (keep and nb) else 0
            # (B2); on kept sweeps also Σ_j E[Z̃_ijk | W] into cZ (Rao-Blackwellised)
            self.n = self._draw_Z(W, A, rng, zsum if keep else None,
                                  cZ[b] if (keep and self.rao_blackwell) else None)
            if not keep:
                continue
            post = alpha[None, :] + self.n
            if self.rao_blackwell:
                ElnW[b] += (digamma(post) - digamma(post.sum(axis=1, keepdims=True))).sum(axis=0)
                EW += post / post.sum(axis=1, keepdims=True)
            else:
                cZ[b] += zsum
                ElnW[b] += np.log(W).sum(axis=0)
                EW += W
            if track:
                h = _half(t, samples)
                if h >= 0:
                    halves[h, 0] += W
                    halves[h, 1] += W * W
                with np.errstate(divide="ignore", invalid="ignore"):
                    lnW = np.log(W)
                    lps[t] = (Mb * (gammaln(alpha.sum()) - gammaln(alpha).sum())
                              + np.nansum((alpha - 1.0) * lnW) + np.nansum(self.n * lnW) + (zsum * lnA).sum())
        inv = 1.0 / samples
        bat = {}
        if nb:
            w = 1.0 / batch_sizes(samples, nb)
            bat = dict(bcZ=cZ * w[:, None, None], bElnW=ElnW * w[:, None])
        return BulkStats(cZ=cZ.sum(0) * inv, ElnW=ElnW.sum(0) * inv, EW=EW * inv, halves=halves, logjoint=lps,
                         **bat)
