"""scdist.ursm.polya_gamma: the compiled PG(1, ψ) sampler (Devroye's method with a table bracket
for the proposal's side and a squeeze on the alternating series) against closed forms, the series
it relies on, and the ``polyagamma`` package."""
import numpy as np
import pytest
from scipy import stats

from scdist.ursm import polya_gamma as pgm


def _pg_moments(psi):
    """Mean and variance of PG(1, ψ) (Polson, Scott & Windle 2013)."""
    if psi == 0:
        return 0.25, 1.0 / 24.0
    return np.tanh(psi / 2) / (2 * psi), (np.sinh(psi) - psi) / (4 * psi ** 3 * np.cosh(psi / 2) ** 2)


def _series_ratio(x, terms=400):
    """Σ_n (−1)^n a_n(x) / a_0(x) summed directly (left form for x ≤ t, right form above)."""
    n = np.arange(terms)
    if x > pgm.T:
        r = (2 * n + 1) * np.exp(-0.5 * n * (n + 1) * np.pi ** 2 * x)
    else:
        r = (2 * n + 1) * np.exp(-2.0 * n * (n + 1) / x)
    return float(((-1.0) ** n * r).sum())


def test_left_and_right_series_are_the_same_density():
    # the two forms of a_n must describe one J*(1) density, so their sums agree everywhere
    n = np.arange(300)[:, None]
    x = np.linspace(0.2, 1.5, 27)[None, :]
    left = (np.pi * (n + .5) * (2 / (np.pi * x)) ** 1.5 * np.exp(-2 * (n + .5) ** 2 / x) * (-1.0) ** n).sum(0)
    right = (np.pi * (n + .5) * np.exp(-(n + .5) ** 2 * np.pi ** 2 * x / 2) * (-1.0) ** n).sum(0)
    assert np.allclose(left, right, rtol=1e-12)


def test_series_decision_equals_the_summed_series():
    rng = np.random.default_rng(3)
    for x in [0.05, 0.3, 0.6, pgm.T, 0.65, 1.0, 3.0]:
        s = _series_ratio(x)
        # uniforms near the threshold and anywhere
        for v in np.concatenate([s + np.array([-1e-9, 1e-9]), rng.uniform(0.99, 1.0, 50)]):
            if 0 < v < 1:
                assert pgm._series_accepts(x, v) == (v <= s), (x, v, s)
    # the squeezes are lower bounds of the series on their side
    assert pgm._SQUEEZE_RIGHT <= min(_series_ratio(x) for x in np.linspace(pgm.T + 1e-9, 5, 200))
    assert pgm._SQUEEZE_LEFT <= min(_series_ratio(x) for x in np.linspace(1e-3, pgm.T, 200))


def test_side_probability_is_decreasing_so_the_table_brackets_it():
    z = np.linspace(0, pgm.Z_MAX, 2_000_001)
    w = pgm.right_weight_exact(z)
    assert np.all(np.diff(w) <= 0)
    assert np.allclose(pgm.WEIGHT_TABLE, pgm.right_weight_exact(np.arange(len(pgm.WEIGHT_TABLE)) * pgm.GRID_STEP))
    # compiled exact weight = scipy's, and beyond Z_MAX the right side is below a uniform's resolution
    for zz in [0.0, 0.3, 1.5625, 4.0, 17.0, 29.9]:
        assert pgm._right_weight(zz) == pytest.approx(float(pgm.right_weight_exact(zz)), rel=1e-12)
    assert pgm.right_weight_exact(pgm.Z_MAX) < 1e-100


@pytest.mark.parametrize("psi", [0.0, -0.5, 2.0, 3.125, 3.2, 10.0, 40.0, 60.0, 600.0])
def test_pg_draws_have_the_closed_form_mean_and_variance(psi):
    rng = np.random.default_rng(11)
    n = 200_000
    out = np.empty(n)
    pgm.pg1_fill(np.full(n, psi), out, rng, pgm.WEIGHT_TABLE)
    mean, var = _pg_moments(abs(psi))
    assert abs(out.mean() - mean) < 4 * np.sqrt(var / n)
    assert abs(out.var() / var - 1) < 0.03
    assert (out > 0).all()


@pytest.mark.parametrize("psi", [0.0, 1.0, 3.0, 7.0, 25.0])
def test_pg_draws_match_the_polyagamma_package(psi):
    from polyagamma import random_polyagamma

    rng = np.random.default_rng(5)
    n = 100_000
    out = np.empty(n)
    pgm.pg1_fill(np.full(n, psi), out, rng, pgm.WEIGHT_TABLE)
    ref = random_polyagamma(1.0, np.full(n, psi), random_state=np.random.default_rng(6), method="alternate")
    assert stats.ks_2samp(out, ref).pvalue > 1e-3


def test_pg_ks_test_detects_a_small_error():
    # power check for the comparison above: a 4 % scale error is rejected
    from polyagamma import random_polyagamma

    n = 100_000
    out = np.empty(n)
    pgm.pg1_fill(np.full(n, 1.0), out, np.random.default_rng(5), pgm.WEIGHT_TABLE)
    ref = random_polyagamma(1.0, np.full(n, 1.0), random_state=np.random.default_rng(6), method="alternate")
    assert stats.ks_2samp(1.04 * out, ref).pvalue < 1e-3


def test_same_generator_state_same_pg_draws():
    psi = np.linspace(-5, 12, 1000)
    a, b = np.empty_like(psi), np.empty_like(psi)
    pgm.pg1_fill(psi, a, np.random.default_rng(9), pgm.WEIGHT_TABLE)
    pgm.pg1_fill(psi, b, np.random.default_rng(9), pgm.WEIGHT_TABLE)
    assert np.array_equal(a, b)


def test_nan_psi_raises_and_infinite_psi_gives_the_limit():
    out = np.empty(1)
    with pytest.raises(ValueError, match="NaN"):
        pgm.pg1_fill(np.array([np.nan]), out, np.random.default_rng(0), pgm.WEIGHT_TABLE)
    pgm.pg1_fill(np.array([np.inf]), out, np.random.default_rng(0), pgm.WEIGHT_TABLE)
    assert out[0] == 0.0
