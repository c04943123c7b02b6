"""(S1) ω_il ~ PG(1, ψ_il) from the ``polyagamma`` package, drawn in pools by |ψ| and tilted exactly.

Why: the package draws PG(1, z) for one scalar z at ~85 ns per draw, but ~150 ns when every draw
has its own z (the sampler's set-up for z is redone per draw). The sweep needs one draw per
(cell, gene), each with its own ψ_il.

How (exact): the PG(1, z) density is cosh(z/2) e^{−z² ω / 2} p(ω | 0), so for |z_b| ≤ |z| a draw
ω ~ PG(1, z_b) kept with probability e^{−(z² − z_b²) ω / 2} is a PG(1, z) draw (rejection sampling
with bound cosh(z/2) / cosh(z_b/2); PG(1, z) is even in z). Entries are binned by z = |ψ| with the
bin's lower edge z_b as the proposal; the bins are narrow enough that the bound stays ≤ 1.051
below z = 6 and ≤ 1.105 up to ``Z_POOL`` (at most ~3 % of proposals rejected below z = 2):

* z < 2: equal steps of ``_DZ2`` in z² (there cosh(z/2) ≈ 1 + z²/8, so the bound is ≤ e^{0.03});
* 2 ≤ z < 6: steps of 0.1 in z (bound ≤ e^{0.05} ≈ 1.051); 6 ≤ z < ``Z_POOL``: steps of 0.2 (≤ e^{0.1});
* z ≥ ``Z_POOL`` (about 1 % of entries in the §4.1 simulations) and bins with fewer than
  ``MIN_POOL`` entries (a package call's overhead would exceed the saving): one direct array call.

Per bin one package call fills a pool sized from the bin's count and its bound; the compiled
pass walks the entries in order and takes pool draws until one is kept. An entry whose bin's pool
runs out gets a direct draw, so the result is exact whatever the pool sizes. All draws come
from the caller's Generator in a fixed order, so a block's stream fixes the result (same draws
in-process and on Ray actors). Blocks are processed in chunks of ``CHUNK`` entries, which bounds
the pool's memory for large blocks.
"""
from __future__ import annotations

import math

import numpy as np
from polyagamma import random_polyagamma

from ._jit import njit

_DZ2 = 0.25                   # bin width in z² below z = 2
_NB1 = 16                     # 2² / _DZ2 bins below z = 2
_NB2 = 40                     # 2 ≤ z < 6, width 0.1
_NB3 = 30                     # 6 ≤ z < 12, width 0.2
Z_POOL = 12.0
N_BINS = _NB1 + _NB2 + _NB3
CHUNK = 1 << 18
MIN_POOL = 48                 # fewer entries in a bin than this: drawn directly


def bin_edges() -> np.ndarray:
    """Lower edge z_b of every bin (the proposal's z), shape (N_BINS,)."""
    e1 = np.sqrt(np.arange(_NB1) * _DZ2)
    e2 = 2.0 + 0.1 * np.arange(_NB2)
    e3 = 6.0 + 0.2 * np.arange(_NB3)
    return np.concatenate([e1, e2, e3])


def bin_bounds() -> np.ndarray:
    """Upper bound cosh(z_{b+1}/2) / cosh(z_b/2) of the expected proposals per kept draw."""
    e = np.append(bin_edges(), Z_POOL)
    return np.cosh(e[1:] / 2) / np.cosh(e[:-1] / 2)


EDGES = bin_edges()
BOUNDS = bin_bounds()


@njit(inline="always")
def _bin(z):
    """Bin of z = |ψ| ≥ 0 (−1: z ≥ Z_POOL or NaN, drawn directly); same arithmetic as ``bin_edges``."""
    if z < 2.0:
        return min(int(z * z * (1.0 / _DZ2)), _NB1 - 1)
    if z < 6.0:
        return _NB1 + min(int((z - 2.0) * 10.0), _NB2 - 1)
    if z < Z_POOL:
        return _NB1 + _NB2 + min(int((z - 6.0) * 5.0), _NB3 - 1)
    return -1


@njit()
def count_bins(psi, start, stop, counts):
    """counts[b] = number of entries psi.flat[start:stop] in bin b; returns the number drawn directly."""
    for b in range(counts.size):
        counts[b] = 0
    direct = 0
    for e in range(start, stop):
        b = _bin(abs(psi[e]))
        if b < 0:
            direct += 1
        else:
            counts[b] += 1
    return direct


@njit()
def take_from_pools(psi, omega, start, stop, edges, pool, first, last, rng):
    """ω_e for e in [start, stop): pool draws of the entry's bin until one is kept with probability
    e^{−(ψ_e² − z_b²) ω / 2} (u ≤ 1 − d accepts without the exp, as e^{−d} ≥ 1 − d). Entries with no
    bin or whose bin's pool ran out get NaN (drawn directly by the caller); returns their number."""
    ptr = first.copy()
    left = 0
    for e in range(start, stop):
        x = psi[e]
        b = _bin(abs(x))
        kept = False
        if b >= 0:
            zb = edges[b]
            d0 = max(0.5 * (x * x - zb * zb), 0.0)
            while ptr[b] < last[b]:
                w = pool[ptr[b]]
                ptr[b] += 1
                d = d0 * w
                u = rng.random()
                if u <= 1.0 - d or u < math.exp(-d):
                    omega[e] = w
                    kept = True
                    break
        if not kept:
            omega[e] = np.nan
            left += 1
    return left


class PGPool:
    """Reusable work space for pooled PG(1, ψ) draws of one block (see module docstring).

    ``margin`` scales the pools' safety margin (standard deviations of the number of proposals);
    any value gives exact draws, it only moves work between the pools and direct draws."""

    def __init__(self, size: int, *, margin: float = 2.0, chunk: int = CHUNK):
        self.chunk = max(1, min(int(size), int(chunk)))
        self.margin = float(margin)
        self.counts = np.zeros(N_BINS, np.int64)
        # pools hold at most max bound × chunk draws plus the margins (grown in ``draw`` if not)
        cap = int(self.chunk * BOUNDS.max() + N_BINS * (max(self.margin, 0.0) * math.sqrt(self.chunk) + 2)) + 1
        self.pool = np.empty(cap)

    def draw(self, psi: np.ndarray, omega: np.ndarray, rng: np.random.Generator) -> int:
        """Fill ``omega`` (C-contiguous, shape of ``psi``) with ω ~ PG(1, ψ); returns the number of
        entries drawn directly (no bin, or their bin's pool ran out)."""
        if not (psi.flags.c_contiguous and omega.flags.c_contiguous and omega.shape == psi.shape):
            raise ValueError("psi and omega must be C-contiguous arrays of one shape")   # reshape must not copy
        pf = psi.reshape(-1)
        of = omega.reshape(-1)
        n_direct = 0
        for start in range(0, pf.size, self.chunk):
            stop = min(start + self.chunk, pf.size)
            count_bins(pf, start, stop, self.counts)
            mean = self.counts * BOUNDS
            # a bin with few entries is drawn directly: a package call costs ~3.7 µs, ~55 draws' saving
            need = np.where(self.counts >= MIN_POOL, np.ceil(mean + self.margin * np.sqrt(mean) + 1.0), 0.0)
            need = np.maximum(need, 0.0).astype(np.int64)
            last = np.cumsum(need)
            first = last - need
            if last[-1] > self.pool.size:
                self.pool = np.empty(int(last[-1]))
            for b in np.flatnonzero(need):
                random_polyagamma(1.0, EDGES[b], out=self.pool[first[b]:last[b]], method="devroye",
                                  disable_checks=True, random_state=rng)
            left = take_from_pools(pf, of, start, stop, EDGES, self.pool, first, last, rng)
            if left:
                seg = of[start:stop]
                miss = np.flatnonzero(np.isnan(seg))
                seg[miss] = random_polyagamma(1.0, pf[start:stop][miss], method="devroye", disable_checks=True,
                                              random_state=rng)
                n_direct += left
        return n_direct
