"""Tests for kinjax.rebin: exact step-function integrals, conservation, pPXF."""

import numpy as np
import pytest

from kinjax.constants import C_KMS
from kinjax.errors import KinjaxError
from kinjax.rebin import log_rebin, log_rebin_matrix, pixel_edges


def _step_reference(wave, flux, new_edges):
    """Bin means of the step function via the exact (piecewise-linear) cumulative integral."""
    edges = pixel_edges(wave)
    cum = np.concatenate([[0.0], np.cumsum(flux * np.diff(edges))])
    return np.diff(np.interp(new_edges, edges, cum)) / np.diff(new_edges)


def _edges_from_ln_wave(ln_wave, velscale):
    step = velscale / C_KMS
    return np.exp(np.concatenate([ln_wave - step / 2, [ln_wave[-1] + step / 2]]))


@pytest.fixture
def irregular():
    rng = np.random.default_rng(1)
    wave = 4000 + np.cumsum(rng.uniform(0.5, 1.5, 400))
    flux = 1 + rng.normal(size=400)
    return wave, flux


@pytest.mark.parametrize("velscale", [None, 20.0, 97.3])
def test_matches_exact_step_integral(irregular, velscale):
    wave, flux = irregular
    ln_wave, new, vs = log_rebin(wave, flux, velscale)
    np.testing.assert_allclose(np.diff(ln_wave), vs / C_KMS, rtol=1e-9)
    ref = _step_reference(wave, flux, _edges_from_ln_wave(ln_wave, vs))
    np.testing.assert_allclose(new, ref, rtol=1e-8, atol=1e-10)  # limited by the cumsum reference


def test_smooth_analytic_spectrum():
    """Pixel means of f(λ)=2+sin(λ/15) on 0.1 Å pixels, rebinned to 60 km/s (~1 Å), give the
    exact bin means of f up to the partial-pixel error ~ f' Δ_in² / Δ_out ~ 1e-3."""
    F = lambda x: 2 * x - 15 * np.cos(x / 15)  # noqa: E731 antiderivative
    wave = np.linspace(5000, 5600, 6001)
    edges = pixel_edges(wave)
    flux = np.diff(F(edges)) / np.diff(edges)
    ln_wave, new, vs = log_rebin(wave, flux, 60.0)
    e = _edges_from_ln_wave(ln_wave, vs)
    exact = np.diff(F(e)) / np.diff(e)
    np.testing.assert_allclose(new, exact, atol=1e-3)


def test_flux_conserved_and_constant_stays_constant(irregular):
    wave, flux = irregular
    edges = pixel_edges(wave)
    ln_wave, new, vs = log_rebin(wave, flux)  # n output pixels over the full range
    e = _edges_from_ln_wave(ln_wave, vs)
    np.testing.assert_allclose(e[[0, -1]], edges[[0, -1]], rtol=1e-12)
    np.testing.assert_allclose(np.sum(new * np.diff(e)), np.sum(flux * np.diff(edges)), rtol=1e-11)
    assert new.size == wave.size
    np.testing.assert_allclose(vs, C_KMS * np.log(edges[-1] / edges[0]) / wave.size, rtol=1e-14)
    _, const, _ = log_rebin(wave, np.full_like(wave, 3.5), 33.0)
    np.testing.assert_allclose(const, 3.5, rtol=1e-12)


def test_batch_equals_loop_and_variance(irregular):
    wave, _ = irregular
    rng = np.random.default_rng(2)
    flux = rng.normal(size=(2, 3, wave.size))
    var = rng.uniform(0.5, 2, size=flux.shape)
    ln_wave, new, var_new, vs = log_rebin(wave, flux, 45.0, variance=var)
    assert new.shape == var_new.shape == (2, 3, ln_wave.size)
    for a in range(2):
        for b in range(3):
            np.testing.assert_allclose(log_rebin(wave, flux[a, b], 45.0)[1], new[a, b], rtol=1e-13)
    # Brute-force weight matrix: rebin every unit vector; var_new = (W**2) @ var.
    W = log_rebin(wave, np.eye(wave.size), 45.0)[1].T  # (m, n)
    np.testing.assert_allclose(var_new, var @ (W**2).T, rtol=1e-12)
    np.testing.assert_allclose(W.sum(axis=1), 1.0, rtol=1e-12)


def test_nan_propagates_only_to_touching_bins():
    wave = np.linspace(4000, 4100, 101)
    flux = np.ones(101)
    flux[50] = np.nan
    ln_wave, new, vs = log_rebin(wave, flux, 30.0)
    e = _edges_from_ln_wave(ln_wave, vs)
    pe = pixel_edges(wave)
    touches = (e[1:] > pe[50]) & (e[:-1] < pe[51])
    np.testing.assert_array_equal(~np.isfinite(new), touches)
    np.testing.assert_allclose(new[~touches], 1.0)


def test_bad_input():
    with pytest.raises(KinjaxError):
        log_rebin([1.0, 3.0, 2.0], [1.0, 1.0, 1.0])
    with pytest.raises(KinjaxError):
        log_rebin([1.0, 2.0, 3.0], [1.0, 1.0])
    with pytest.raises(KinjaxError):
        log_rebin([1.0, 2.0, 3.0], [1.0, 1.0, 1.0], velscale=-1)
    with pytest.raises(KinjaxError):
        log_rebin([1.0, 2.0, 3.0], [1.0, 1.0, 1.0], velscale=1e7)


@pytest.mark.parametrize("uniform", [True, False])
@pytest.mark.parametrize("velscale", [None, 50.0])
def test_against_ppxf(uniform, velscale):
    util = pytest.importorskip("ppxf.ppxf_util")
    rng = np.random.default_rng(3)
    wave = np.linspace(4800, 5300, 450) if uniform else 4800 + np.cumsum(rng.uniform(0.6, 1.6, 450))
    flux = rng.normal(size=(4, wave.size)) + 3
    lam = wave[[0, -1]] if uniform else wave
    try:
        ref, ln_ref, vs_ref = util.log_rebin(lam, flux.T, velscale=velscale)
    except Exception as exc:  # pPXF 8.2.6 breaks under some numpy versions
        pytest.skip(f"ppxf.log_rebin failed: {exc!r}")
    ln_wave, new, vs = log_rebin(wave, flux, velscale)
    # pPXF 8.2.6 (flux=False) returns the mean density; with flux=True it would be the
    # bin integral. Compare the density; keep only the bins both codes produce.
    m = min(ln_ref.size, ln_wave.size)
    assert abs(ln_ref.size - ln_wave.size) <= 1
    np.testing.assert_allclose(vs, vs_ref, rtol=1e-12)
    np.testing.assert_allclose(ln_wave[:m], ln_ref[:m], atol=1e-12)
    np.testing.assert_allclose(new[:, :m], ref.T[:, :m], rtol=1e-9)


def test_rebinned_fwhm_adds_the_input_pixel_boxcar():
    """Linear pixels of Δλ: FWHM² + 8 ln 2 Δλ²/12 (a scalar); the input's own grid: unchanged;
    ``carried_fwhm`` keeps the nominal FWHM unless asked (pPXF's convention)."""
    from kinjax.rebin import carried_fwhm, rebinned_fwhm

    wave = np.arange(4800.0, 5400.0, 1.25)
    ln_wave = log_rebin_matrix(wave)[0]
    out = rebinned_fwhm(wave, 2.65, np.exp(ln_wave))
    assert isinstance(out, float)
    assert out == pytest.approx(np.sqrt(2.65**2 + 8 * np.log(2) * 1.25**2 / 12), rel=1e-12)  # 2.7844 Å
    assert rebinned_fwhm(wave, 2.65, wave) == 2.65
    fwhm_arr = np.linspace(2.5, 3.0, wave.size)
    np.testing.assert_allclose(rebinned_fwhm(wave, fwhm_arr, wave), fwhm_arr)
    arr = rebinned_fwhm(wave, fwhm_arr, np.exp(ln_wave))
    np.testing.assert_allclose(arr**2 - np.interp(np.exp(ln_wave), wave, fwhm_arr) ** 2,
                               8 * np.log(2) * 1.25**2 / 12, rtol=1e-9)
    assert carried_fwhm(wave, 2.65, np.exp(ln_wave), False) == 2.65
    assert carried_fwhm(wave, None, np.exp(ln_wave), True) is None


def test_rebinned_fwhm_of_a_nearly_log_uniform_grid():
    """MaNGA's log grid in air (vacuum-to-air breaks its uniformity by 2e-5): log-rebinning
    shifts every pixel by under 0.03 of a pixel, which broadens a line far less than the
    boxcar formula says. ``rebinned_fwhm`` follows the measured broadening of Gaussian
    lines (second moments, before and after rebinning)."""
    from kinjax.cube import vacuum_to_air
    from kinjax.rebin import rebinned_fwhm

    wave = vacuum_to_air(10 ** (3.5589 + 1e-4 * np.arange(4563)))  # 3621-10351 Å
    centres = np.linspace(4000.0, 9000.0, 11)
    s = 2.7 / (2 * np.sqrt(2 * np.log(2)))
    lines = 1 - 0.5 * np.exp(-0.5 * ((wave[None, :] - centres[:, None]) / s) ** 2)
    ln_new, rebinned, _ = log_rebin(wave, lines)
    wave_new = np.exp(ln_new)

    def fwhm(w, f, c):
        sel = np.abs(w - c) < 15
        p, x = 1 - f[sel], w[sel]
        m = np.sum(p * x) / p.sum()
        return np.sqrt(np.sum(p * (x - m) ** 2) / p.sum()) * 2 * np.sqrt(2 * np.log(2))

    measured = np.array([fwhm(wave_new, r, c) - fwhm(wave, f, c) for f, r, c in zip(lines, rebinned, centres)])
    predicted = np.interp(centres, wave_new, rebinned_fwhm(wave, 2.7, wave_new)) - 2.7
    width = np.interp(centres, wave, np.gradient(wave))
    boxcar = np.sqrt(2.7**2 + 8 * np.log(2) * width**2 / 12) - 2.7
    assert np.all(measured < 0.4 * boxcar)
    np.testing.assert_allclose(predicted, measured, atol=0.01)
