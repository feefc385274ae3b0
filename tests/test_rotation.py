"""The arctan rotation-curve mean function: recovered from noisy maps of known discs."""

import numpy as np
import pytest

from kinjax.errors import KinjaxError
from kinjax.rotation import RotationCurve, fit_rotation_curve, rotation_velocity


def _grid(n=15, step=0.5):
    c = (np.arange(n) - (n - 1) / 2) * step
    x, y = np.meshgrid(c, c)
    return x.ravel(), y.ravel()


def test_velocity_along_the_axes():
    """On the major axis V = v_sys ± v_amp (2/π) arctan(R/r_t); on the minor axis V = v_sys."""
    p = RotationCurve(v_sys=20.0, v_amp=150.0, r_t=1.0, pa=np.deg2rad(30.0), q=0.5, x0=0.0, y0=0.0)
    r = np.array([0.5, 1.0, 3.0])
    major = rotation_velocity(p, r * np.cos(p.pa), r * np.sin(p.pa))
    np.testing.assert_allclose(major, 20.0 + 150.0 * 2 / np.pi * np.arctan(r), rtol=1e-12)
    minor = rotation_velocity(p, -r * np.sin(p.pa), r * np.cos(p.pa))
    np.testing.assert_allclose(minor, 20.0, atol=1e-9)
    assert rotation_velocity(p, 0.0, 0.0) == pytest.approx(20.0)


@pytest.mark.parametrize("pa_deg, q", [(20.0, 0.4), (200.0, 0.8), (300.0, 0.3)])
def test_fit_recovers_a_known_disc(pa_deg, q):
    rng = np.random.default_rng(int(pa_deg))
    truth = RotationCurve(v_sys=-35.0, v_amp=140.0, r_t=0.8, pa=np.deg2rad(pa_deg), q=q, x0=0.3, y0=-0.2)
    x, y = _grid()
    err = np.full(x.size, 6.0)
    v = rotation_velocity(truth, x, y) + err * rng.standard_normal(x.size)
    v[::17] += 400.0  # a few catastrophic spaxels must not steer the fit
    v[5] = np.nan
    fit = fit_rotation_curve(x, y, v, err).curve
    assert fit.v_sys == pytest.approx(truth.v_sys, abs=3.0)
    assert fit.v_amp == pytest.approx(truth.v_amp, rel=0.08)
    assert fit.r_t == pytest.approx(truth.r_t, rel=0.3)
    assert np.rad2deg(np.angle(np.exp(1j * (fit.pa - truth.pa)))) == pytest.approx(0.0, abs=3.0)
    assert fit.q == pytest.approx(truth.q, abs=0.08)
    assert np.hypot(fit.x0 - truth.x0, fit.y0 - truth.y0) < 0.2
    resid = rotation_velocity(fit, x, y) - rotation_velocity(truth, x, y)
    assert np.sqrt(np.mean(resid**2)) < 3.0


def test_mean_function_errors_match_the_scatter_of_refits():
    """The propagated covariance of the fitted curve (RotationFit.basis) agrees with the
    scatter of the curve over noise realisations (40 refits), within 35 %."""
    truth = RotationCurve(v_sys=10.0, v_amp=120.0, r_t=1.2, pa=np.deg2rad(60.0), q=0.6, x0=0.0, y0=0.0)
    x, y = _grid(11)
    err = np.full(x.size, 8.0)
    rng = np.random.default_rng(5)
    fits = [fit_rotation_curve(x, y, rotation_velocity(truth, x, y) + err * rng.standard_normal(x.size), err)
            for _ in range(40)]
    spread = np.std([f.velocity(x, y) for f in fits], axis=0)
    b = fits[0].basis(x, y)
    predicted = np.sqrt(np.sum(b**2, axis=1))
    assert b.shape == (x.size, 7)
    assert np.median(predicted / spread) == pytest.approx(1.0, abs=0.35)


def test_too_few_spaxels():
    x, y = _grid(2)
    with pytest.raises(KinjaxError, match="at least 8"):
        fit_rotation_curve(x, y, np.zeros(4), np.ones(4))
