"""Compiled (numba) inner loops of the Gibbs sweep where numpy's per-element cost dominates.

Only the random-variate generation is here; what is drawn is exactly the conditional of spec
§1.1 and every kernel consumes the caller's ``numpy.random.Generator`` (numba shares its bit
generator state), so a block's stream still fixes the result.

* ``binomial(n, p)``: exact. Inversion from 0 for n·min(p, 1 − p) < 24 (numpy's algorithm); else
  Hörmann's transformed rejection BTRD, whose acceptance test is evaluated exactly with a
  table ``lf`` (ln k! and 1/k). numpy's own sampler costs ~60 ns of set-up plus
  O(np) steps per call from Python-level broadcasting; this one is about 2× cheaper here.
* ``draw_allocations``: (B2) Z̃_ij ~ Mult(X_ij, r_ij·) as K − 1 conditional binomials for every
  (i, j), each given by its two masses (``_binomial_mass``), accumulated straight into
  n_jk = Σ_i Z̃_ijk (and optionally Σ_j Z̃_ijk) without the (M × N) temporaries of the numpy version.
* ``sequential_s``: the paper's gene-by-gene S update (S2) for a block of cells, compiled.
* ``cell_sweep``: one whole single-cell sweep, ω (S1, exact PG(1, ψ) draws from
  ``polya_gamma``) → S (S2) → (κ, τ) (S3) → ψ, plus the kept-sweep products.
"""
from __future__ import annotations

import math

import numpy as np
from scipy.special import gammaln

from ._jit import njit

# inlined into cell_sweep; numba's on-disk cache only checks this file's timestamp, so after
# editing polya_gamma.py or _jit.py delete scdist/ursm/__pycache__/kernels.* (or touch this file)
from .polya_gamma import pg1

# below this n·min(p, 1 − p): inversion; above: transformed rejection (BTRD needs ≥ 10). 24 is
# where the two cost the same here (~55 ns per draw).
_INV_SMALL = 24.0


def log_factorials(nmax: int) -> np.ndarray:
    """Tables for the binomial sampler, shape (2, nmax + 1): lf[0, k] = ln k!, lf[1, k] = 1 / k
    (lf[1, 0] = 0); the reciprocals keep divisions out of the inversion loop."""
    k = np.arange(int(nmax) + 1, dtype=float)
    inv = np.divide(1.0, k, out=np.zeros_like(k), where=k > 0)
    return np.stack([gammaln(k + 1.0), inv])


@njit(inline="always")
def _btrd(n, p, rng, lf):
    """Bin(n, p) for p ≤ ½, n·p ≥ 10 by transformed rejection with decomposition (Hörmann 1993,
    "The generation of binomial random variates", algorithm BTRD). The hat's immediate-acceptance
    region needs one uniform and no logarithm; otherwise a point is accepted iff
    v ≤ f(k) / f(m) (m the mode), evaluated exactly in logs with the table ``lf``."""
    q = 1.0 - p
    m = int((n + 1) * p)
    spq = math.sqrt(n * p * q)
    b = 1.15 + 2.53 * spq
    a = -0.0873 + 0.0248 * b + 0.01 * p
    c = n * p + 0.5
    alpha = (2.83 + 5.1 / b) * spq
    vr = 0.92 - 4.2 / b
    urvr = 0.86 * vr
    while True:
        v = rng.random()
        if v <= urvr:
            u = v / vr - 0.43
            return int(math.floor((2.0 * a / (0.5 - abs(u)) + b) * u + c))
        if v >= vr:
            u = rng.random() - 0.5
        else:
            u = v / vr - 0.93
            u = (0.5 if u > 0.0 else -0.5) - u
            v = rng.random() * vr
        us = 0.5 - abs(u)
        k = int(math.floor((2.0 * a / us + b) * u + c))
        if k < 0 or k > n:
            continue
        v = v * alpha / (a / (us * us) + b)
        if math.log(v) <= lf[0, m] + lf[0, n - m] - lf[0, k] - lf[0, n - k] + (k - m) * math.log(p / q):
            return k


@njit(inline="always")
def binomial(n, p, rng, lf):
    """One exact Bin(n, p) draw (n ≤ lf.shape[1] − 1); a NaN p raises instead of looping."""
    if not p == p:
        raise ValueError("binomial draw with p = NaN")
    return _binomial_mass(n, p, 1.0 - p, rng, lf)


@njit(inline="always")
def _binomial_mass(n, mk, mo, rng, lf):
    """Bin(n, p) with p = mk / (mk + mo), given the two masses mk, mo ≥ 0 (mk + mo > 0), so that the
    rarer outcome's probability and the odds need no subtraction 1 − p. Draws the count of the
    rarer outcome (p ≤ ½; the other is n minus it): inversion from 0 for n·p < 24 (pmf recursion
    f_k = f_{k−1} (n − k + 1)/k · lo/hi), else BTRD. The two divisions are independent of each
    other, which shortens the dependency chain before the search starts."""
    if n <= 0 or mk <= 0.0:
        return 0
    if mo <= 0.0:
        return n
    flip = mk > mo
    s = mk + mo
    lo = mo if flip else mk
    hi = mk if flip else mo
    p = lo / s
    if n * p >= _INV_SMALL:
        k = _btrd(n, p, rng, lf)
        return n - k if flip else k
    r = lo / hi
    f0 = (hi / s) ** n   # integer power by squaring: much cheaper than exp(n log q) here
    while True:
        u = rng.random()
        f = f0
        k = 0
        nk = float(n)    # n − k + 1 at step k, exact in floating point
        while u > f:
            u -= f
            k += 1
            if k > n:
                break
            f *= nk * r * lf[1, k]
            nk -= 1.0
        if k <= n:
            break
        # u exceeded the (rounded) total mass: redraw (probability ~1e-16)
    return n - k if flip else k


@njit()
def binomial_many(n, p, size, rng, lf):
    """``size`` independent Bin(n, p) draws (used by the distribution tests)."""
    out = np.empty(size, np.int64)
    for t in range(size):
        out[t] = binomial(n, p, rng, lf)
    return out


@njit()
def binomial_mass_many(n, mk, mo, size, rng, lf):
    """``size`` independent Bin(n, mk / (mk + mo)) draws as the allocations make them (tests)."""
    out = np.empty(size, np.int64)
    for t in range(size):
        out[t] = _binomial_mass(n, mk, mo, rng, lf)
    return out


def draw_allocations(X, W, A, rng, lf, n_out, zsum, want_zsum, cz, want_cz):
    """(B2) for a block of bulk samples. X (Mb × N, int64), W (Mb × K), A (N × K).

    Z̃_ijk ~ Bin(X_ij − Σ_{k'<k} Z̃_ijk', m_ijk / Σ_{k'≥k} m_ijk') for k < K − 1 (the rest to the last
    type), m_ijk = A_ik W_kj: the multinomial Mult(X_ij, r_ij·), r_ijk = m_ijk / (AW)_ij, as
    conditional binomials. Writes n_out[j, k] = Σ_i Z̃_ijk and, if ``want_zsum``, adds Σ_j Z̃_ijk to
    zsum[i, k]; if ``want_cz``, adds the Rao-Blackwellised Σ_j E[Z̃_ijk | W] = Σ_j X_ij r_ijk to
    cz[i, k]. K = 3 runs a kernel with the masses in registers (~0.85× the time), drawing exactly
    what the general kernel draws (tested)."""
    if A.shape[1] == 3:
        _allocations_k3(X, W, A, rng, lf, n_out, zsum, want_zsum, cz, want_cz)
    else:
        _allocations(X, W, A, rng, lf, n_out, zsum, want_zsum, cz, want_cz)


@njit()
def _allocations(X, W, A, rng, lf, n_out, zsum, want_zsum, cz, want_cz):
    """``draw_allocations`` for any K."""
    M, N = X.shape
    K = A.shape[1]
    m = np.empty(K)
    rest = np.empty(K)
    for j in range(M):
        for k in range(K):
            n_out[j, k] = 0.0
        for i in range(N):
            x = X[j, i]
            if x == 0:
                continue
            for k in range(K):
                m[k] = A[i, k] * W[j, k]
            # rest[k] = Σ_{k'>k} m_k', each formed afresh from the right (no running subtraction)
            acc = 0.0
            for k in range(K - 1, -1, -1):
                rest[k] = acc
                acc += m[k]
            if not acc > 0.0:
                raise ValueError("bulk reads of a gene with (AW)_ij = 0: no cell type can have produced "
                                 "them; use eps_A > 0")
            if want_cz:
                xt = x / acc
                for k in range(K):
                    cz[i, k] += xt * m[k]
            rem = x
            for k in range(K - 1):
                z = _binomial_mass(rem, m[k], rest[k], rng, lf)
                n_out[j, k] += z
                if want_zsum:
                    zsum[i, k] += z
                rem -= z
            n_out[j, K - 1] += rem
            if want_zsum:
                zsum[i, K - 1] += rem


@njit()
def _allocations_k3(X, W, A, rng, lf, n_out, zsum, want_zsum, cz, want_cz):
    """``_allocations`` written out for K = 3 (same arithmetic in the same order, same draws)."""
    M, N = X.shape
    for j in range(M):
        w0 = W[j, 0]
        w1 = W[j, 1]
        w2 = W[j, 2]
        s0 = 0
        s1 = 0
        s2 = 0
        for i in range(N):
            x = X[j, i]
            if x == 0:
                continue
            m0 = A[i, 0] * w0
            m1 = A[i, 1] * w1
            m2 = A[i, 2] * w2
            r1 = 0.0 + m2
            r0 = r1 + m1
            if not r0 + m0 > 0.0:
                raise ValueError("bulk reads of a gene with (AW)_ij = 0: no cell type can have produced "
                                 "them; use eps_A > 0")
            if want_cz:
                xt = x / (r0 + m0)
                cz[i, 0] += xt * m0
                cz[i, 1] += xt * m1
                cz[i, 2] += xt * m2
            z0 = _binomial_mass(x, m0, r0, rng, lf)
            rem = x - z0
            z1 = _binomial_mass(rem, m1, r1, rng, lf)
            z2 = rem - z1
            s0 += z0
            s1 += z1
            s2 += z2
            if want_zsum:
                zsum[i, 0] += z0
                zsum[i, 1] += z1
                zsum[i, 2] += z2
        n_out[j, 0] = s0
        n_out[j, 1] = s1
        n_out[j, 2] = s2


@njit(inline="always")
def _expressed_mass(S, a, l):
    """U_l = Σ_i a_il S_il, the profile mass on cell l's expressed genes."""
    U = 0.0
    for i in range(S.shape[1]):
        if S[l, i]:
            U += a[l, i]
    return U


@njit()
def sequential_s(S, pos, psi, a, R, rng):
    """(S2) gene after gene within each cell (spec §1.1): for zeros, logit b_il = ψ_il −
    R_l ln(1 + a_il / U_{−i,l}), U refreshed after every gene; cells with R_l = 0 use σ(ψ_il)."""
    Lb, N = S.shape
    for l in range(Lb):
        U = _expressed_mass(S, a, l)
        for i in range(N):
            if pos[l, i]:
                continue
            ai = a[l, i]
            Um = U - ai if S[l, i] else U
            if R[l] > 0:
                logit = psi[l, i] - R[l] * math.log1p(ai / Um)
            else:
                logit = psi[l, i]
            new = rng.random() * (1.0 + math.exp(-logit)) < 1.0
            S[l, i] = new
            U = Um + ai if new else Um


@njit()
def gamma_s(S, pos, psi, a, R, rng):
    """(S2) auxiliary-variable update of all of a block's zeros (spec §1.1): v_l ~ Gamma(R_l, rate
    U_l), then S_il ~ Bern(σ(ψ_il − v_l a_il)) independently over genes (v_l = 0 when R_l = 0)."""
    Lb, N = S.shape
    for l in range(Lb):
        U = _expressed_mass(S, a, l)
        v = rng.standard_gamma(R[l]) / U if R[l] > 0 else 0.0
        for i in range(N):
            if pos[l, i]:
                continue
            # u < σ(x)  ⇔  u (1 + e^{−x}) < 1
            S[l, i] = rng.random() * (1.0 + math.exp(v * a[l, i] - psi[l, i])) < 1.0


@njit()
def kappa_tau_draw(omega, S, a, mu_k, ik2, mu_t, it2, kappa, tau, rng, ridge, want_ridge):
    """(S3) for every cell: (κ_l, τ_l) ~ N₂(m_l, P_l⁻¹) with
    P_l = [[Σ_i ω_il + σκ⁻², Σ_i ω_il a_il], [Σ_i ω_il a_il, Σ_i ω_il a_il² + στ⁻²]],
    P_l m_l = [Σ_i S_il − N/2 + μκ σκ⁻², Σ_i S_il a_il − ½ + μτ στ⁻²] (``ik2`` = σκ⁻², ``it2`` = στ⁻²),
    drawn as m_l + L_l⁻ᵀ z with the 2 × 2 Cholesky factor P_l = L_l L_lᵀ. If ``want_ridge``, adds
    Σ_l m_l (2) and Σ_l P_l⁻¹ (as its 11, 12, 22 entries) to ``ridge`` (the collapsed μ step)."""
    Lb, N = S.shape
    for l in range(Lb):
        p11 = ik2
        p12 = 0.0
        p22 = it2
        s1 = 0.0
        sa = 0.0
        for i in range(N):
            w = omega[l, i]
            ai = a[l, i]
            wa = w * ai
            p11 += w
            p12 += wa
            p22 += wa * ai
            if S[l, i]:
                s1 += 1.0
                sa += ai
        b1 = s1 - N / 2.0 + mu_k * ik2
        b2 = sa - 0.5 + mu_t * it2
        det = p11 * p22 - p12 * p12
        l11 = math.sqrt(p11)
        l21 = p12 / l11
        l22 = math.sqrt(det) / l11
        x2 = rng.standard_normal() / l22
        z0 = rng.standard_normal()
        mk = (p22 * b1 - p12 * b2) / det
        mt = (p11 * b2 - p12 * b1) / det
        kappa[l] = mk + (z0 - l21 * x2) / l11
        tau[l] = mt + x2
        if want_ridge:
            ridge[0] += mk
            ridge[1] += mt
            ridge[2] += p22 / det
            ridge[3] -= p12 / det
            ridge[4] += p11 / det


@njit(inline="always")
def pg_mean(x):
    """E[ω | ψ = x] for ω ~ PG(1, x): tanh(x/2) / (2x), even in x; as (1 − e^{−|x|}) / ((1 + e^{−|x|}) 2|x|)
    (one exp instead of a tanh: ~3× cheaper here), by its series 1/4 − x²/48 + x⁴/480 near 0."""
    y = abs(x)
    if y < 1e-3:
        y2 = y * y
        return 0.25 - y2 / 48.0 + y2 * y2 / 480.0
    e = math.exp(-y)
    return (1.0 - e) / ((1.0 + e) * 2.0 * y)


@njit()
def cell_sweep(S, pos, psi, a, R, G, omega, kappa, tau, mu_k, ik2, mu_t, it2, rng, sequential, keep, rb,
               ES, C1, C2, pg_table, draw_omega, ridge, want_ridge):
    """One single-cell sweep: ω (S1, ``polya_gamma.pg1``; if ``draw_omega``, else ``omega`` holds
    this sweep's draws already), S (S2), (κ, τ) (S3), ψ_il = κ_l + τ_l a_il,
    and, on kept sweeps, the within-sweep products of spec §1.2: ES_l· += S_l·, and per type k = G_l
    (C1, C2 are N × K) C1_ik += τ(S_il − ½) − κτw_il, C2_ik += w_il τ², with w = E[ω | ψ]
    (``rb``, ``pg_mean``) or the drawn ω. Summing per type here keeps two (cells × genes)
    accumulators out of memory. On kept sweeps with ``want_ridge``, Σ_l m_l and Σ_l P_l⁻¹ of (S3) go
    into ``ridge`` (``kappa_tau_draw``)."""
    Lb, N = S.shape
    if draw_omega:
        for l in range(Lb):
            for i in range(N):
                omega[l, i] = pg1(psi[l, i], rng, pg_table)
    if sequential:
        sequential_s(S, pos, psi, a, R, rng)
    else:
        gamma_s(S, pos, psi, a, R, rng)
    kappa_tau_draw(omega, S, a, mu_k, ik2, mu_t, it2, kappa, tau, rng, ridge, keep and want_ridge)
    for l in range(Lb):
        k = kappa[l]
        t = tau[l]
        kt = k * t
        t2 = t * t
        g = G[l]
        for i in range(N):
            x = k + t * a[l, i]
            psi[l, i] = x
            if keep:
                s = 1.0 if S[l, i] else 0.0
                ES[l, i] += s
                w = pg_mean(x) if rb else omega[l, i]
                C1[i, g] += t * (s - 0.5) - kt * w
                C2[i, g] += w * t2
