"""Exact Pólya-Gamma PG(1, ψ) draws, compiled (numba), for the (S1) step of the Gibbs sweep.

Devroye's rejection sampler as given by Polson, Scott & Windle (2013, JASA, §4): PG(1, ψ) =
J*(1, z) / 4 with z = |ψ| / 2, where J*(1, z) has density

    f(x | z) = cosh(z) e^{−z² x / 2} Σ_{n≥0} (−1)^n a_n(x),
    a_n(x) = π (n + ½) (2 / (π x))^{3/2} e^{−2 (n + ½)² / x}     for 0 < x ≤ t,
    a_n(x) = π (n + ½) e^{−(n + ½)² π² x / 2}                      for x > t,

with the switch point t = 0.64. The proposal is e^{−z² x / 2} a_0(x): on (t, ∞) a truncated
exponential with rate K = π²/8 + z²/2 and mass p = π / (2K) e^{−K t}; on (0, t] an inverse
Gaussian IG(μ = 1/z, λ = 1) truncated to (0, t], with mass q = 2 e^{−z} P_IG(X ≤ t). A proposal x
is kept iff V a_0(x) ≤ Σ_n (−1)^n a_n(x) (V uniform), decided by the alternating series.

Where the time goes, and the two shortcuts (both exact):

* the side (right with probability p / (p + q)) needs two erfc and two exp per draw. w(z) =
  p / (p + q) is decreasing in z (checked on a fine grid by the tests), so a table of w on a grid of
  z brackets it: U < w(z_{g+1}) ⇒ right, U ≥ w(z_g) ⇒ left, and only U inside the bracket
  (about 1 % of draws) computes w(z) itself;
* a_1(x) / a_0(x) ≤ 3 e^{−π² t} on the right and ≤ 3 e^{−4 / t} on the left, so V below 1 minus
  that bound accepts at once (the series' partial sum S_1 is a lower bound of the sum); the series
  is evaluated only for the other ~0.6 % of proposals.

The kernels draw from the caller's ``numpy.random.Generator`` (numba shares its bit generator), so
a block's stream fixes the draws on every engine.
"""
from __future__ import annotations

import math

import numpy as np
from scipy.special import erfc

from ._jit import njit

T = 0.64
_PI = math.pi
_PI2_8 = _PI * _PI / 8.0
_SQRT_T = math.sqrt(T)
_SQRT2 = math.sqrt(2.0)
# 1 − a_1/a_0 at its largest on each side: V below it accepts without evaluating the series
_SQUEEZE_RIGHT = 1.0 - 3.0 * math.exp(-_PI * _PI * T)
_SQUEEZE_LEFT = 1.0 - 3.0 * math.exp(-4.0 / T)
# beyond this z, p / (p + q) < 1e-100: below the resolution of a uniform draw, so always left
Z_MAX = 30.0
GRID_STEP = 1.0 / 64.0


def right_weight_exact(z):
    """w(z) = p / (p + q), the proposal's probability of the piece x > t (vectorised, scipy)."""
    z = np.asarray(z, dtype=float)
    K = _PI2_8 + 0.5 * z * z
    p = _PI / (2.0 * K) * np.exp(-K * T)
    # Φ(x) = erfc(−x / √2) / 2
    q = (np.exp(-z) * erfc(-(T * z - 1.0) / (_SQRT_T * _SQRT2))
         + np.exp(z) * erfc((T * z + 1.0) / (_SQRT_T * _SQRT2)))
    return p / (p + q)


# w(z) at z = g · GRID_STEP, g = 0 … Z_MAX / GRID_STEP
WEIGHT_TABLE = right_weight_exact(np.arange(int(Z_MAX / GRID_STEP) + 2) * GRID_STEP)


@njit()
def _right_weight(z):
    K = _PI2_8 + 0.5 * z * z
    p = _PI / (2.0 * K) * math.exp(-K * T)
    q = (math.exp(-z) * math.erfc(-(T * z - 1.0) / (_SQRT_T * _SQRT2))
         + math.exp(z) * math.erfc((T * z + 1.0) / (_SQRT_T * _SQRT2)))
    return p / (p + q)


@njit(inline="always")
def _goes_right(z, rng, table):
    """Bernoulli(w(z)) with the table bracket; exact."""
    if z >= Z_MAX:
        return False
    u = rng.random()
    g = int(z * (1.0 / GRID_STEP))
    if u < table[g + 1]:
        return True
    if u >= table[g]:
        return False
    return u < _right_weight(z)


@njit(inline="always")
def _left_proposal(z, rng):
    """IG(1/z, 1) truncated to (0, t]."""
    if z * T < 1.0:
        # mean 1/z > t: truncated Lévy (x = 1/Y², Y ~ N(0,1) on |Y| > 1/√t, Marsaglia's tail
        # method), then accept the tilt e^{−z² x / 2}
        while True:
            while True:
                e1 = rng.standard_exponential()
                e2 = rng.standard_exponential()
                if e1 * e1 <= 2.0 * e2 / T:
                    break
            d = 1.0 + e1 * T
            x = T / (d * d)
            h = 0.5 * z * z * x
            u = rng.random()
            if u <= 1.0 - h or u <= math.exp(-h):
                return x
    mu = 1.0 / z
    while True:
        # Michael, Schucany & Haas (1976) with λ = 1, redrawn until below t
        y = rng.standard_normal()
        y = y * y
        my = mu * y
        x = mu + 0.5 * mu * my - 0.5 * mu * math.sqrt(4.0 * my + my * my)
        if rng.random() > mu / (mu + x):
            x = mu * mu / x
        if x <= T:
            return x


@njit()
def _series_accepts(x, v):
    """V ≤ Σ_n (−1)^n a_n(x) / a_0(x), by the alternating series (terms decrease for t = 0.64)."""
    s = 1.0
    n = 0
    while True:
        n += 1
        if x > T:
            r = (2 * n + 1) * math.exp(-0.5 * n * (n + 1) * _PI * _PI * x)
        else:
            r = (2 * n + 1) * math.exp(-2.0 * n * (n + 1) / x)
        if n % 2 == 1:
            s -= r
            if v <= s:
                return True
        else:
            s += r
            if v > s:
                return False


@njit(inline="always")
def pg1(psi, rng, table):
    """One PG(1, ψ) draw (ψ = ±∞ gives 0, the limit; NaN raises instead of looping)."""
    if not psi == psi:
        raise ValueError("Polya-Gamma draw with psi = NaN")
    z = 0.5 * abs(psi)
    if z == math.inf:
        return 0.0
    K = _PI2_8 + 0.5 * z * z
    while True:
        if _goes_right(z, rng, table):
            x = T + rng.standard_exponential() / K
            v = rng.random()
            if v <= _SQUEEZE_RIGHT or _series_accepts(x, v):
                return 0.25 * x
        else:
            x = _left_proposal(z, rng)
            v = rng.random()
            if v <= _SQUEEZE_LEFT or _series_accepts(x, v):
                return 0.25 * x


@njit()
def pg1_fill(psi, out, rng, table):
    """out[e] = PG(1, psi[e]) draws for 1-d arrays."""
    for e in range(psi.shape[0]):
        out[e] = pg1(psi[e], rng, table)
