"""LOSVD families against independent references: quadrature of the pdf, closed forms."""

import equinox as eqx
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import eval_hermite, factorial

from kinjax.losvd import (
    GaussHermite,
    Gaussian,
    Histogram,
    Mixture,
    SandersEvans,
    delta_max,
    hermite_normalised,
    losvd_on_grid,
    velocity_grid,
)

OMEGA = np.linspace(-0.2, 0.2, 41)  # rad per km/s: beyond π/velscale for velscale ≥ 16 km/s


_pdf = eqx.filter_jit(lambda losvd, v: losvd.pdf(v))


N_GRID = 80000  # one grid length, so that the jitted pdf compiles once per family


def _grid(losvd, vmax=None):
    """Midpoints of N_GRID cells on [-vmax, vmax]; by default |V| + 60 σ, which covers
    every tail to < 1e-16 and resolves σ' with > 30 cells for σ_K ≤ 20."""
    if vmax is None:
        parts = losvd.components if isinstance(losvd, Mixture) else (losvd,)
        vmax = max(abs(float(c.v)) + 60 * float(c.sigma) for c in parts)
    dv = 2 * vmax / N_GRID
    return -vmax + dv * (np.arange(N_GRID) + 0.5), dv


def quad_ft(losvd, omega, vmax=None):
    """∫ pdf(v) exp(-iωv) dv by the midpoint rule on a wide fine grid."""
    v, dv = _grid(losvd, vmax)
    p = np.asarray(_pdf(losvd, jnp.asarray(v)))
    return np.exp(-1j * np.outer(omega, v)) @ p * dv


def numerical_moments(losvd, vmax=None):
    """Moments by the midpoint rule (no sample falls on a histogram bin edge)."""
    v, dv = _grid(losvd, vmax)
    p = np.asarray(_pdf(losvd, jnp.asarray(v)))
    norm = np.sum(p) * dv
    mean = np.sum(p * v) * dv / norm
    mu = [np.sum(p * (v - mean) ** k) * dv / norm for k in (2, 3, 4)]
    return norm, mean, np.sqrt(mu[0]), mu[1] / mu[0] ** 1.5, mu[2] / mu[0] ** 2 - 3


def random_sanders_evans(rng, n):
    """Draws over the valid ranges, including κ = ±1 exactly and δ near its limit."""
    out = []
    for i in range(n):
        kappa = [-1.0, 1.0, rng.uniform(-1, 1)][i % 3]
        dmax = delta_max("uniform") if kappa == -1.0 else delta_max("mixture")
        delta = rng.uniform(-0.99, 0.99) * dmax
        out.append(
            SandersEvans(
                v=rng.uniform(-500, 500),
                sigma=rng.uniform(20, 300),
                sigma_k=np.exp(rng.uniform(np.log(0.05), np.log(5.0))),
                delta=delta,
                kappa=kappa,
            )
        )
    return out


SE_DRAWS = random_sanders_evans(np.random.default_rng(1), 20)


# ---------------------------------------------------------------- transforms
def test_gauss_hermite_ft_matches_quadrature():
    losvd = GaussHermite(v=100.0, sigma=150.0, h=jnp.array([0.1, 0.05]))
    err = np.max(np.abs(quad_ft(losvd, OMEGA) - np.asarray(losvd.ft(OMEGA))))
    assert err < 1e-6


def test_gauss_hermite_h3_to_h6_ft_matches_quadrature():
    losvd = GaussHermite(v=-300.0, sigma=90.0, h=jnp.array([-0.08, 0.06, 0.04, -0.05]))
    err = np.max(np.abs(quad_ft(losvd, OMEGA) - np.asarray(losvd.ft(OMEGA))))
    assert err < 1e-6


@pytest.mark.parametrize("index", range(20))
def test_sanders_evans_ft_matches_quadrature(index):
    losvd = SE_DRAWS[index]
    err = np.max(np.abs(quad_ft(losvd, OMEGA) - np.asarray(losvd.ft(OMEGA))))
    assert err < 1e-6


@pytest.mark.parametrize("kernel", ["uniform", "laplace"])
def test_sanders_evans_pure_kernels_ft_matches_quadrature(kernel):
    losvd = SandersEvans(50.0, 120.0, 1.5, 0.5, kernel=kernel)
    err = np.max(np.abs(quad_ft(losvd, OMEGA) - np.asarray(losvd.ft(OMEGA))))
    assert err < 1e-6


def test_histogram_ft_matches_exact_bin_integrals():
    centres = velocity_grid(600.0, 20.0)
    weights = np.exp(-0.5 * ((centres - 50) / 120) ** 2) * (1 + 0.5 * np.sin(centres / 90))
    losvd = Histogram(centres, weights)
    # midpoint rule on 2000 sub-points per bin, aligned with the bin edges
    sub = (np.arange(2000) + 0.5) / 2000 - 0.5
    v = (centres[:, None] + 20.0 * sub).ravel()
    p = np.asarray(losvd.pdf(jnp.asarray(v)))
    ref = np.array([np.sum(p * np.exp(-1j * w * v)) * 20.0 / 2000 for w in OMEGA])
    assert np.max(np.abs(ref - np.asarray(losvd.ft(OMEGA)))) < 1e-6
    assert np.isclose(np.sum(p) * 20.0 / 2000, 1.0, atol=1e-12)
    # outside the grid the density is zero
    assert float(losvd.pdf(611.0)) == 0.0 and float(losvd.pdf(-611.0)) == 0.0


def test_mixture_ft_matches_quadrature():
    losvd = Mixture(
        (Gaussian(-150.0, 60.0), GaussHermite(150.0, 80.0, jnp.array([0.05, 0.02])), SandersEvans(0, 100, 1, -0.3, 0.5)),
        jnp.array([0.3, 0.5, 0.2]),
    )
    err = np.max(np.abs(quad_ft(losvd, OMEGA) - np.asarray(losvd.ft(OMEGA))))
    assert err < 1e-6


def test_ft_at_zero_is_one():
    for losvd in [GaussHermite(10.0, 100.0, jnp.array([0.2, -0.2, 0.1, 0.1])), *SE_DRAWS[:3]]:
        assert abs(complex(losvd.ft(0.0)) - 1) < 1e-14


# ------------------------------------------------------------------- moments
MOMENT_CASES = [
    GaussHermite(100.0, 150.0, jnp.array([0.1, 0.05])),
    GaussHermite(0.0, 200.0, jnp.array([-0.05, 0.08, 0.02, -0.03])),
    Gaussian(-40.0, 75.0),
    SandersEvans(100.0, 150.0, 1.0, 0.4, 0.3),
    SandersEvans(-20.0, 90.0, 2.0, -0.7, -1.0),
    Histogram(velocity_grid(500.0, 25.0), np.exp(-np.abs(velocity_grid(500.0, 25.0) - 60) / 80)),
    Mixture((Gaussian(-150.0, 60.0), Gaussian(150.0, 80.0)), jnp.array([0.4, 0.6])),
]


@pytest.mark.parametrize("losvd", MOMENT_CASES, ids=lambda x: type(x).__name__)
def test_moments_match_numerical_moments(losvd):
    if isinstance(losvd, Histogram):  # sub-sample each bin; no sample on an edge
        norm, mean, disp, skew, kurt = numerical_moments(losvd, vmax=1000.0)
    else:
        norm, mean, disp, skew, kurt = numerical_moments(losvd)
    assert abs(norm - 1) < 1e-8
    assert abs(float(losvd.mean) - mean) < 1e-6
    assert abs(float(losvd.dispersion) - disp) < 1e-6
    assert abs(float(losvd.skewness) - skew) < 1e-6
    assert abs(float(losvd.kurtosis) - kurt) < 1e-6


@pytest.mark.parametrize("index", range(0, 20, 3))
def test_sanders_evans_mean_and_dispersion_are_exact(index):
    """The overrides return v, sigma; the autodiff moments of ft must agree."""
    losvd = SE_DRAWS[index]
    from kinjax.losvd.base import LOSVD

    assert abs(float(LOSVD.mean.fget(losvd)) - float(losvd.v)) < 1e-9 * float(losvd.sigma)
    assert abs(float(LOSVD.dispersion.fget(losvd)) / float(losvd.sigma) - 1) < 1e-12
    _, mean, disp, _, _ = numerical_moments(losvd)
    assert abs(mean - float(losvd.v)) < 1e-6 and abs(disp - float(losvd.sigma)) < 1e-6


# -------------------------------------------------------- Sanders–Evans shape
def _edge_draws():
    rng = np.random.default_rng(7)
    draws = []
    for kappa in (-1.0, -0.5, 0.0, 0.5, 1.0):
        dmax = delta_max("uniform") if kappa == -1.0 else delta_max("mixture")
        for sigma_k in (1e-3, 0.3, 3.0, 20.0):
            for frac in (-0.999, -0.5, 0.0, 0.5, 0.999):
                draws.append(SandersEvans(rng.uniform(-300, 300), rng.uniform(5, 800), sigma_k, frac * dmax, kappa))
    return draws


def test_sanders_evans_pdf_non_negative_everywhere():
    v = jnp.linspace(-40000.0, 40000.0, 50001)
    for losvd in _edge_draws():
        p = np.asarray(_pdf(losvd, v))
        assert np.all(np.isfinite(p)) and np.all(p >= 0), losvd
        # far in the tails (hundreds of σ) nothing overflows
        far = np.asarray(_pdf(losvd, jnp.array([-1e6, 1e6])))
        assert np.all(np.isfinite(far)) and np.all(far >= 0)


def test_sanders_evans_skew_sign_follows_delta():
    draws = _edge_draws()
    for losvd in draws:
        delta = float(losvd.delta)
        if delta != 0:
            assert np.sign(float(losvd.skewness)) == np.sign(delta)
    # independent check of the sign (and value) on every fifth draw with visible skew
    for losvd in draws[1::5]:
        if float(losvd.sigma_k) < 0.01:
            continue  # skew ~ σ_K³: numerically zero
        _, _, _, skew, _ = numerical_moments(losvd)
        assert np.sign(skew) == np.sign(float(losvd.delta))
        assert abs(skew - float(losvd.skewness)) < 1e-6


@pytest.mark.parametrize("sigma_k", [0.1, 0.7, 1.5, 4.0, 30.0])
def test_sanders_evans_kurtosis_ranges_at_zero_delta(sigma_k):
    r = sigma_k**4 / (1 + sigma_k**2) ** 2
    uni = SandersEvans(0.0, 100.0, sigma_k, 0.0, -1.0)
    lap = SandersEvans(0.0, 100.0, sigma_k, 0.0, 1.0)
    # closed forms: uniform κ4 = −(2/15)a⁴ with a² = 3σ_K²; Laplace κ4 = 12 b⁴ with 2b² = σ_K²
    assert abs(float(uni.kurtosis) + 1.2 * r) < 1e-10
    assert abs(float(lap.kurtosis) - 3.0 * r) < 1e-10
    assert -1.2 < float(uni.kurtosis) < 0 < float(lap.kurtosis) < 3
    # mixture weights interpolate linearly in κ4 (same mean and variance)
    mid = SandersEvans(0.0, 100.0, sigma_k, 0.0, 0.2)
    assert abs(float(mid.kurtosis) - (0.4 * -1.2 * r + 0.6 * 3.0 * r)) < 1e-10


# -------------------------------------------------------- Gauss–Hermite shape
def test_hermite_normalised_matches_scipy():
    y = np.linspace(-6, 6, 101)
    herm = hermite_normalised(jnp.asarray(y), 10)
    for m in range(11):
        ref = eval_hermite(m, y) / np.sqrt(2.0**m * factorial(m))
        assert np.max(np.abs(np.asarray(herm[m]) - ref)) < 1e-9 * max(1, np.max(np.abs(ref)))


def test_gauss_hermite_pdf_closed_form_and_norm():
    v = np.linspace(-1000, 1000, 2001)
    V, s, h3, h4 = 30.0, 120.0, 0.1, -0.07
    y = (v - V) / s
    raw = np.exp(-0.5 * y**2) / (s * np.sqrt(2 * np.pi)) * (1 + h3 * (2 * y**3 - 3 * y) / np.sqrt(3) + h4 * (4 * y**4 - 12 * y**2 + 3) / np.sqrt(24))
    losvd = GaussHermite(V, s, jnp.array([h3, h4]))
    norm = 1 + np.sqrt(6) / 4 * h4
    assert abs(float(losvd.norm) - norm) < 1e-14
    assert np.max(np.abs(np.asarray(losvd.pdf(v)) - raw / norm)) < 1e-14


def test_gauss_hermite_positive_h3_is_positive_skew():
    losvd = GaussHermite(0.0, 100.0, jnp.array([0.1]))
    _, mean, _, skew, _ = numerical_moments(losvd, vmax=3000.0)
    assert skew > 0 and float(losvd.skewness) > 0 and mean > 0
    assert float(losvd.pdf(250.0)) > float(losvd.pdf(-250.0))  # tail at positive v
    # and the transform carries the same sign (the prototype's bug flipped it)
    mirror = GaussHermite(0.0, 100.0, jnp.array([-0.1]))
    w = np.array([0.005, 0.01, 0.02])
    assert np.max(np.abs(quad_ft(losvd, w, 3000.0) - np.asarray(losvd.ft(w)))) < 1e-9
    assert np.max(np.abs(quad_ft(losvd, w, 3000.0) - np.asarray(mirror.ft(w)))) > 1e-3


def test_gauss_hermite_negative_wings():
    v = jnp.linspace(-2000.0, 2000.0, 40001)
    assert float(GaussHermite(0.0, 100.0, jnp.array([0.0, -0.3])).pdf(v).min()) < 0
    assert float(GaussHermite(0.0, 100.0, jnp.array([0.3])).pdf(v).min()) < 0
    # h4 alone stays non-negative up to h4 = 1 / max|h̃_4| = 0.816
    assert float(GaussHermite(0.0, 100.0, jnp.array([0.0, 0.3])).pdf(v).min()) >= 0


def test_losvd_on_grid():
    velocity, pdf = losvd_on_grid(SandersEvans(0.0, 100.0, 1.0, 0.2, 0.0), 1000.0, 2.0)
    assert velocity.shape == pdf.shape == (1001,)
    assert float(velocity[500]) == 0.0 and float(velocity[-1]) == 1000.0
    assert abs(np.trapezoid(np.asarray(pdf), np.asarray(velocity)) - 1) < 1e-6
