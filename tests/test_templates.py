"""Tests for kinjax.templates: loaders, resolution matching, coverage, PCA, npz."""
import re
import warnings

import numpy as np
import pytest

from kinjax.constants import C_KMS
from kinjax.errors import KinjaxError
from kinjax.spectrum import Spectrum
from kinjax.templates import (
    Templates,
    gaussian_smooth,
    load_emiles,
    load_templates,
    parse_miles_name,
    pca_templates,
    prepare_templates,
)

SIGMA = 1 / (2 * np.sqrt(2 * np.log(2)))


def _log_spectrum(lo=4800.0, n=300, velscale=60.0, fwhm=4.2, redshift=0.0):
    wave = lo * np.exp(velscale / C_KMS * np.arange(n))
    return Spectrum(wave, np.ones(n), np.full(n, 0.01), None, fwhm, redshift=redshift,
                    velscale=velscale)


def _line_templates(centres, fwhm_line=2.51, dlam=0.05, lo=4500.0, hi=5700.0):
    """Continuum 1 with Gaussian absorption lines of the given FWHM (Å), on a fine grid."""
    wave = np.arange(lo, hi, dlam)
    s = fwhm_line * SIGMA
    flux = 1 - 0.5 * np.exp(-0.5 * ((wave[:, None] - np.asarray(centres)) / s) ** 2).sum(1)
    return Templates(wave=wave, flux=np.stack([flux, 2 * flux]), fwhm=fwhm_line)


def _measured_fwhm(t, centre, half_window=15.0):
    """Line FWHM (Å) from the second moment of 1 - flux on the log grid, minus the output box."""
    sel = np.abs(t.wave - centre) < half_window
    p = 1 - t.flux[0, sel] / np.median(t.flux[0])
    x = t.ln_wave[sel]
    mu = np.sum(p * x) / p.sum()
    var_ln = np.sum(p * (x - mu) ** 2) / p.sum() - (t.velscale / C_KMS) ** 2 / 12
    lam = np.exp(mu)
    var = var_ln * lam**2 - 0.05**2 / 12  # minus the input pixel box
    return np.sqrt(var) / SIGMA, lam


# -- names and E-MILES ----------------------------------------------------------


def test_parse_miles_name():
    assert parse_miles_name("Eun1.30Zm1.71T00.0631_iPp0.00_baseFe_linear_FWHM_variable.fits") == (0.0631, -1.71)
    assert parse_miles_name("/x/Mun1.30Zp0.22T12.5893_iTp0.00_baseFe.fits") == (12.5893, 0.22)
    assert np.all(np.isnan(parse_miles_name("star_HD1234.fits")))


@pytest.fixture(scope="module")
def emiles():
    pytest.importorskip("ppxf")
    return load_emiles()


def test_load_emiles(emiles):
    t = emiles
    assert t.n_templates == 150 and t.n_pix == 53689 and not t.is_log
    # resolution per pixel: MILES's 2.51 Å in 3540.5-8950 Å; the headers' "2.51 - 23.57 Å"
    # range ends at the IRTF part's sigma = 60 km/s at 50000 Å
    optical = (t.wave > 3541) & (t.wave < 8949)
    assert np.all(t.fwhm[optical] == 2.51)
    assert t.fwhm.min() == 2.51 and t.fwhm.max() == pytest.approx(23.57, abs=0.01)
    red = t.wave > 8951
    np.testing.assert_allclose(t.fwhm[red] * SIGMA / t.wave[red] * C_KMS, 60.0)
    assert np.all(t.fwhm[t.wave < 3540] == 3.0)
    np.testing.assert_allclose(t.wave[[0, 1]], [1680.2, 1681.1])
    assert len(np.unique(t.metal)) == 6 and len(np.unique(t.age)) == 25
    np.testing.assert_allclose(np.unique(t.metal), [-1.71, -1.31, -0.71, -0.40, 0.0, 0.22])
    assert t.age.min() == 0.0631 and t.age.max() == pytest.approx(15.8489)
    order = np.lexsort((t.age, t.metal))
    np.testing.assert_array_equal(order, np.arange(150))  # sorted by (metal, age)
    assert t.names[0].startswith("Eun1.30Zm1.71T00.0631")


def test_select_templates(emiles):
    """``select`` keeps the chosen templates with their ages, metallicities and names, by
    indices (in their order) or by a mask."""
    solar = emiles.select(emiles.metal == 0.0)
    assert solar.n_templates == 25 and np.all(solar.metal == 0.0)
    np.testing.assert_array_equal(solar.age, emiles.age[emiles.metal == 0.0])
    two = emiles.select([7, 3])
    np.testing.assert_array_equal(two.flux, emiles.flux[[7, 3]])
    assert two.names == (emiles.names[7], emiles.names[3]) and two.age[0] == emiles.age[7]
    np.testing.assert_array_equal(two.fwhm, emiles.fwhm)
    assert two.wave is emiles.wave or np.array_equal(two.wave, emiles.wave)


def test_emiles_missing_directory(tmp_path):
    with pytest.raises(KinjaxError, match="ppxf==8.2.6"):
        load_emiles(tmp_path)


# -- convolution ------------------------------------------------------------------


def test_gaussian_smooth_matches_scipy():
    from scipy.ndimage import gaussian_filter1d

    rng = np.random.default_rng(0)
    flux = rng.normal(size=(3, 500))
    sigma = 1.9  # ceil(4σ) == int(4σ + 0.5): same kernel support as scipy's
    np.testing.assert_allclose(gaussian_smooth(flux, sigma),
                               gaussian_filter1d(flux, sigma, mode="nearest"), atol=1e-12)


def test_gaussian_smooth_variable_brute_force():
    rng = np.random.default_rng(1)
    flux = rng.normal(size=200)
    sigma = np.linspace(0.0, 3.0, 200)
    out = gaussian_smooth(flux, sigma)
    half = int(np.ceil(4 * sigma.max()))
    padded = np.pad(flux, half, mode="edge")
    ref = np.empty(200)
    for i in range(200):
        if sigma[i] == 0:
            ref[i] = flux[i]
            continue
        k = np.arange(-half, half + 1)
        w = np.exp(-0.5 * (k / sigma[i]) ** 2)
        ref[i] = np.sum(w * padded[i + half + k]) / w.sum()
    np.testing.assert_allclose(out, ref, atol=1e-13)


# -- prepare_templates --------------------------------------------------------------


@pytest.mark.parametrize("redshift", [0.0, 0.02])
def test_resolution_matched_to_galaxy(redshift):
    centres = [4850.0, 4950.0, 5050.0]
    spec = _log_spectrum(lo=4800 * (1 + redshift), fwhm=4.2, redshift=redshift)
    t = prepare_templates(_line_templates(centres), spec, normalise=None)
    expected = 4.2 / (1 + redshift)
    assert t.fwhm == pytest.approx(expected)
    for c in centres:
        fwhm, lam = _measured_fwhm(t, c)
        assert lam == pytest.approx(c, abs=1e-3)
        assert fwhm == pytest.approx(expected, rel=1e-3)
    np.testing.assert_allclose(t.flux[1], 2 * t.flux[0], rtol=1e-12)


def test_resolution_matched_variable_fwhm():
    centres = [4830.0, 4950.0, 5070.0]
    spec = _log_spectrum()
    fwhm = np.linspace(3.5, 5.5, spec.n_pix)
    spec = Spectrum(spec.wave, spec.flux, spec.noise, None, fwhm, velscale=spec.velscale)
    t = prepare_templates(_line_templates(centres), spec, normalise=None)
    np.testing.assert_allclose(t.fwhm, np.interp(t.wave, spec.wave, fwhm))
    for c in centres:
        measured, lam = _measured_fwhm(t, c)
        assert measured == pytest.approx(np.interp(lam, spec.wave, fwhm), rel=5e-3)


def test_grid_alignment_coverage_and_normalisation():
    spec = _log_spectrum(lo=4800 * 1.01, redshift=0.01)
    t = prepare_templates(_line_templates([5000.0]), spec, velscale_ratio=2, vmax=1000.0, normalise=None)
    pad = int(np.ceil(1000.0 / (spec.velscale / 2)))
    assert t.is_log and t.velscale == pytest.approx(spec.velscale / 2)
    assert t.n_pix == 2 * spec.n_pix + 2 * pad
    ln_rest = spec.ln_wave - np.log(1.01)
    np.testing.assert_allclose(0.5 * (t.ln_wave[pad::2][: spec.n_pix] + t.ln_wave[pad + 1::2][: spec.n_pix]),
                               ln_rest, atol=1e-12)
    # covers the rest-frame range ± vmax
    assert t.wave[0] < spec.wave[0] / 1.01 * np.exp(-1000 / C_KMS) * 1.001
    # far from the line the continuum is untouched (flux conserved): exactly 1
    np.testing.assert_allclose(t.flux[0, :50], 1.0, rtol=1e-12)
    med = prepare_templates(_line_templates([5000.0]), spec, normalise="median")
    assert np.median(med.flux) == pytest.approx(1.0)
    np.testing.assert_allclose(med.flux[1] / med.flux[0], 2.0, rtol=1e-12)  # ratios kept
    each = prepare_templates(_line_templates([5000.0]), spec, normalise="each")
    np.testing.assert_allclose(np.median(each.flux, axis=1), 1.0)


def test_prepare_errors():
    tpl = _line_templates([5000.0], lo=4900.0, hi=5200.0)
    with pytest.raises(KinjaxError, match="Å but the galaxy"):
        prepare_templates(tpl, _log_spectrum())
    with pytest.raises(KinjaxError, match="log-rebin the spectrum first"):
        lin = Spectrum(np.linspace(4800, 5300, 100), np.ones(100), 0.1, None, 4.2)
        prepare_templates(_line_templates([5000.0]), lin)
    with pytest.raises(KinjaxError):
        prepare_templates(_line_templates([5000.0]), _log_spectrum(), normalise="max")


def test_prepare_galaxy_sharper_than_templates():
    """A galaxy FWHM finer than the templates' (MUSE against E-MILES): the templates are used
    unbroadened (as pPXF does), with a warning that quantifies the excess width."""
    tpl = _line_templates([5000.0])
    with pytest.warns(UserWarning, match="finer than the templates") as record:
        sharp = prepare_templates(tpl, _log_spectrum(fwhm=2.0))
    same = prepare_templates(tpl, _log_spectrum(fwhm=2.51))  # equal FWHM: no broadening
    np.testing.assert_array_equal(sharp.flux, same.flux)
    assert "on 100% of the fitted range" in str(record[0].message)
    # the excess sigma (km/s) it reports is the FWHMs' quadrature difference at the blue end
    # of the galaxy's range (4800 Å)
    reported = float(re.search(r"up to ([0-9.]+) km/s", str(record[0].message)).group(1))
    assert reported == pytest.approx(C_KMS * np.sqrt(2.51**2 - 2.0**2) * SIGMA / 4800.0, abs=0.05)
    # a galaxy sharper than the templates only in the vmax margin, not in its own range: silent
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        margin_only = Templates(wave=tpl.wave, flux=tpl.flux, fwhm=np.where(tpl.wave < 4790, 2.8, 2.51))
        prepare_templates(margin_only, _log_spectrum(fwhm=2.6))
    # its line is measurably broader than the galaxy's FWHM asks for
    assert _measured_fwhm(sharp, 5000.0)[0] == pytest.approx(2.51, rel=0.02)


def test_prepare_emiles_like_ppxf_example(emiles):
    """Our prepared E-MILES for NGC 4550 equal pPXF's example pipeline (gaussian_filter1d +
    log_rebin), interpolated onto our grid."""
    util = pytest.importorskip("ppxf.ppxf_util")
    from scipy.ndimage import gaussian_filter1d

    from kinjax.datasets import ngc4550

    spec = ngc4550().log_rebin()
    ours = prepare_templates(emiles, spec, normalise="each")
    lam_gal = spec.wave[[0, -1]]
    good = (emiles.wave > lam_gal[0] / 1.02) & (emiles.wave < lam_gal[1] * 1.02)
    sigma = np.sqrt(4.2**2 - 2.51**2) / 2.355 / 0.9
    idx = [0, 77, 149]
    ssp = gaussian_filter1d(emiles.flux[idx][:, good], sigma, axis=1)
    try:
        ref, ln_ref, _ = util.log_rebin(emiles.wave[good][[0, -1]], ssp.T, velscale=spec.velscale / 2)
    except Exception as exc:
        pytest.skip(f"ppxf.log_rebin failed: {exc!r}")
    for k, j in enumerate(idx):
        r = np.interp(ours.ln_wave, ln_ref, ref[:, k])
        r /= np.median(r)
        np.testing.assert_allclose(ours.flux[j], r, rtol=3e-3)


# -- PCA ------------------------------------------------------------------------------


def test_pca_variance_kept_equals_reconstruction():
    rng = np.random.default_rng(2)
    wave = np.linspace(4800, 5300, 300)
    basis = np.stack([np.ones(300), np.sin(wave / 20), np.cos(wave / 7), wave / 5000])
    flux = rng.uniform(0.2, 1.0, (30, 4)) @ basis + 1e-3 * rng.normal(size=(30, 300))
    tpl = Templates(wave=wave, flux=flux, fwhm=2.5)
    for n in (1, 2, 4, 6):
        pca = pca_templates(tpl, n)
        assert pca.n_templates == n and pca.names[0] == "PC1" and np.all(np.isnan(pca.age))
        coef, *_ = np.linalg.lstsq(pca.flux.T, flux.T, rcond=None)
        err = np.sum((flux - (pca.flux.T @ coef).T) ** 2) / np.sum(flux**2)
        assert pca.variance_kept == pytest.approx(1 - err, abs=1e-12)
    assert pca_templates(tpl, 4).variance_kept > 0.9999
    full = pca_templates(Templates(wave=wave, flux=flux[:5], fwhm=2.5), 5)
    assert full.variance_kept == pytest.approx(1.0)
    with pytest.raises(KinjaxError):
        pca_templates(tpl, 31)


# -- other loaders --------------------------------------------------------------------


@pytest.mark.parametrize("alpha", [False, True])
def test_npz_round_trip(tmp_path, alpha):
    rng = np.random.default_rng(3)
    lam = np.linspace(3500, 7000, 80)
    ages, metals, alphas = np.array([0.1, 1.0, 10.0]), np.array([-0.5, 0.2]), np.array([0.0, 0.4])
    shape = (80, 3, 2, 2) if alpha else (80, 3, 2)
    grid = rng.uniform(1, 2, shape)
    extra = {"alphas": alphas} if alpha else {}
    np.savez(tmp_path / "lib.npz", templates=grid, lam=lam, fwhm=np.full(80, 2.5), ages=ages,
             metals=metals, masses=np.ones(shape[1:]), **extra)
    t = load_templates(tmp_path / "lib.npz")
    assert t.n_templates == np.prod(shape[1:]) and t.fwhm == 2.5
    np.testing.assert_allclose(t.wave, lam)
    for k in range(t.n_templates):
        i_age = np.flatnonzero(ages == t.age[k])[0]
        i_met = np.flatnonzero(metals == t.metal[k])[0]
        ref = grid[:, i_age, i_met]
        if alpha:
            ref = ref[:, int("alpha+0.40" in t.names[k])]
        np.testing.assert_allclose(t.flux[k], ref)
    np.testing.assert_array_equal(np.lexsort((t.age[:6], t.metal[:6])), np.arange(6))  # (metal, age) order
    np.savez(tmp_path / "bad.npz", lam=lam)
    with pytest.raises(KinjaxError, match="lacks the keys"):
        load_templates(tmp_path / "bad.npz")


def test_fits_directory(tmp_path):
    from astropy.io import fits

    hdr = fits.Header({"CRVAL1": 4000.0, "CDELT1": 1.0})
    for name, v in [("Mun1.30Zp0.00T10.0000_x.fits", 1.0), ("Mun1.30Zm0.40T01.0000_x.fits", 2.0)]:
        fits.PrimaryHDU(np.full(100, v), header=hdr).writeto(tmp_path / name)
    t = load_templates(tmp_path)
    assert t.fwhm == 2.51 and t.n_templates == 2
    np.testing.assert_allclose(t.metal, [-0.4, 0.0])
    np.testing.assert_allclose(t.flux[:, 0], [2.0, 1.0])
    fits.PrimaryHDU(np.ones(100), header=hdr).writeto(tmp_path / "star.fits")
    with pytest.raises(KinjaxError, match="pass fwhm"):
        load_templates(tmp_path)
    t = load_templates(tmp_path, fwhm=3.0)
    assert np.isnan(t.age[-1]) and t.names[-1] == "star"
    with pytest.raises(KinjaxError):
        load_templates(tmp_path / "nothing")


def test_templates_validation():
    with pytest.raises(KinjaxError):
        Templates(wave=np.arange(10.0) + 1, flux=np.ones((2, 9)), fwhm=2.5)
    with pytest.raises(KinjaxError):
        Templates(wave=np.arange(10.0) + 1, flux=np.full((2, 10), np.nan), fwhm=2.5)
    with pytest.raises(KinjaxError):
        Templates(wave=np.arange(10.0) + 1, flux=np.ones((2, 10)), fwhm=2.5, age=[1.0])
    with pytest.raises(KinjaxError, match="not uniform"):
        Templates(wave=np.arange(10.0) + 1, flux=np.ones((2, 10)), fwhm=2.5, velscale=50.0)
