"""Pooled Pólya-Gamma draws (scdist.ursm.pg_pool): package draws at a bin's edge z_b, tilted
exactly to PG(1, ψ). Checked against the closed-form moments and the package's own CDF."""
import numpy as np
import pytest
from scipy.stats import kstest

from scdist.ursm.pg_pool import BOUNDS, EDGES, N_BINS, Z_POOL, PGPool, _bin

# bin edges, mid-bin values, both signs, the direct region (|ψ| ≥ Z_POOL) and 0
VALUES = np.array([0.0, 0.3, 0.5, -0.77, 1.0, 1.99, 2.0, -3.33, 5.0, 5.95, 6.1, 11.9, 12.5, 20.0, -30.0])


def _moments(z):
    z = abs(z)
    if z == 0:
        return 0.25, 1.0 / 24.0
    return np.tanh(z / 2) / (2 * z), (np.sinh(z) - z) / (4 * z ** 3 * np.cosh(z / 2) ** 2)


def _mixed(n_each, seed):
    rng = np.random.default_rng(seed)
    psi = np.repeat(VALUES, n_each)
    rng.shuffle(psi)
    return psi.reshape(-1, 100), rng


def test_bins_cover_their_values_and_bound_the_rejections():
    z = np.linspace(0.0, Z_POOL, 200_001)[:-1]
    b = np.array([_bin(x) for x in z])
    assert b.min() == 0 and b.max() == N_BINS - 1 and np.all(np.diff(b) >= 0)
    upper = np.append(EDGES, Z_POOL)
    # up to rounding of the bin arithmetic (the tilt clamps z² − z_b² at 0)
    assert np.all(EDGES[b] <= z + 1e-12) and np.all(z < upper[b + 1] + 1e-12)
    assert _bin(Z_POOL) == -1 and _bin(np.nan) == -1
    # expected proposals per kept draw ≤ cosh(z_{b+1}/2) / cosh(z_b/2) ≤ 1.11
    assert np.all(BOUNDS >= 1.0) and BOUNDS.max() < 1.11


def test_pooled_draws_have_the_closed_form_moments():
    psi, rng = _mixed(100_000, 0)
    omega = np.empty_like(psi)
    n_direct = PGPool(psi.size).draw(psi, omega, rng)
    assert n_direct >= 3 * 100_000            # the three |ψ| ≥ Z_POOL values at least
    assert np.all(omega > 0)
    for z in VALUES:
        w = omega[psi == z]
        mean, var = _moments(z)
        assert abs(w.mean() - mean) < 4 * np.sqrt(var / w.size), z
        assert abs(w.var() / var - 1) < 0.04, z


@pytest.mark.parametrize("margin,chunk", [(2.0, 1 << 18), (-3.0, 1 << 18), (2.0, 7_000)])
def test_pooled_draws_match_the_package_cdf(margin, chunk):
    """KS against polyagamma's PG(1, ψ) CDF, with ordinary pools, with pools too short (many
    entries fall back to direct draws mid-way) and with small chunks."""
    from polyagamma import polyagamma_cdf

    psi, rng = _mixed(20_000, 1)
    omega = np.empty_like(psi)
    n_direct = PGPool(psi.size, margin=margin, chunk=chunk).draw(psi, omega, rng)
    if margin < 0:
        assert n_direct > 3 * 20_000 + 100        # short pools did run out
    for z in (0.3, -0.77, 1.99, 5.95, 11.9, 12.5):
        w = omega[psi == z]
        cdf = lambda x: polyagamma_cdf(x, h=1.0, z=z)   # noqa: E731
        assert kstest(w, cdf).pvalue > 1e-3, z
        # power: a 5 % scale error is rejected
        assert kstest(1.05 * w, cdf).pvalue < 1e-4, z


def test_pooled_draws_are_reproducible():
    psi, _ = _mixed(2_000, 2)
    a, b = np.empty_like(psi), np.empty_like(psi)
    PGPool(psi.size).draw(psi, a, np.random.default_rng(5))
    PGPool(psi.size).draw(psi, b, np.random.default_rng(5))
    assert np.array_equal(a, b)
