"""Tests for kinjax.spectrum: validation, log-rebinning, emission-line masks, FITS reader."""

import dataclasses

import numpy as np
import pytest

from kinjax.constants import C_KMS
from kinjax.errors import KinjaxError
from kinjax.rebin import pixel_edges
from kinjax.spectrum import (
    EMISSION_LINES_EXTENDED,
    Spectrum,
    emission_line_mask,
    is_spectrum_file,
    read_sdss_spectrum,
    read_spectrum,
    read_table_spectrum,
)


def _spec(n=200, **kw):
    wave = np.linspace(4800, 5300, n)
    args = dict(wave=wave, flux=1 + 0.1 * np.sin(wave / 7), noise=np.full(n, 0.01),
                mask=np.ones(n, bool), fwhm=4.2)
    args.update(kw)
    return Spectrum(**args)


def test_validation_errors():
    n = 200
    with pytest.raises(KinjaxError, match="3 good pixels"):
        noise = np.full(n, 0.01)
        noise[[3, 4, 5]] = [0.0, -1.0, np.nan]
        _spec(noise=noise)
    with pytest.raises(KinjaxError, match="no usable pixel"):
        _spec(mask=np.zeros(n, bool))
    with pytest.raises(KinjaxError):
        _spec(wave=np.linspace(5300, 4800, n))
    with pytest.raises(KinjaxError):
        _spec(flux=np.ones(n + 1))
    with pytest.raises(KinjaxError):
        _spec(fwhm=0.0)
    with pytest.raises(KinjaxError):
        _spec(fwhm=np.full(n, np.nan))
    with pytest.raises(KinjaxError, match="not uniform"):
        _spec(velscale=60.0)  # linear wave is not log-uniform
    with pytest.raises(KinjaxError):
        _spec(redshift=-2.0)


def test_nan_flux_is_masked_and_sanitised():
    flux = np.ones(200)
    flux[10] = np.nan
    noise = np.full(200, 0.01)
    noise[10] = np.nan  # unusable noise is fine where the flux is unusable too
    s = _spec(flux=flux, noise=noise)
    assert not s.mask[10] and s.n_good == 199
    assert np.all(np.isfinite(s.flux)) and np.all(np.isfinite(s.noise))
    assert s.flux.dtype == np.float64 and not s.flux.flags.writeable
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.name = "x"
    with pytest.raises(ValueError):
        s.flux[0] = 2.0
    # masked pixels may carry zero noise
    mask = np.ones(200, bool)
    mask[:5] = False
    noise = np.full(200, 0.01)
    noise[:5] = 0
    assert _spec(mask=mask, noise=noise).n_good == 195


def test_log_rebin_noise_mask_and_fwhm():
    # Input already log-uniform at 30 km/s; rebinning at 60 km/s pairs pixels, so
    # σ_out = σ/√2 and an output pixel is bad iff one of its two inputs is bad.
    ln = np.log(4800) + 30 / C_KMS * np.arange(400)
    wave = np.exp(ln)
    mask = np.ones(400, bool)
    mask[101] = False
    fwhm = np.linspace(4.0, 5.0, 400)
    s = Spectrum(wave, np.ones(400), np.full(400, 0.02), mask, fwhm, velscale=30.0)
    assert s.is_log
    r = s.log_rebin(60.0)
    assert r.is_log and r.velscale == pytest.approx(60.0) and r.n_pix == 200
    # arithmetic-midpoint input edges are off the log grid by ~Δlnλ/8 of a pixel
    np.testing.assert_allclose(r.noise, 0.02 / np.sqrt(2), rtol=1e-4)
    bad = np.flatnonzero(~r.mask)  # pixel 101 sits in output 50 (and ~1e-5 of it in 51)
    assert 50 in bad and set(bad) <= {50, 51}
    np.testing.assert_allclose(r.fwhm, np.interp(r.wave, wave, fwhm))
    np.testing.assert_allclose(r.flux, 1.0, rtol=1e-12)


def test_log_rebin_mask_touching_linear():
    s = _spec()
    mask = np.ones(200, bool)
    mask[77] = False
    r = s.with_mask(mask).log_rebin()
    e = np.exp(np.concatenate([r.ln_wave - r.velscale / C_KMS / 2, [r.ln_wave[-1] + r.velscale / C_KMS / 2]]))
    pe = pixel_edges(s.wave)
    touches = (e[1:] > pe[77]) & (e[:-1] < pe[78])
    np.testing.assert_array_equal(~r.mask, touches)
    assert r.n_pix == 200 and r.fwhm == 4.2


def test_with_noise_and_mask():
    s = _spec()
    assert np.all(s.with_noise(0.5).noise == 0.5)
    good = np.ones(200, bool)
    good[:10] = False
    assert s.with_mask(good).n_good == 190
    with pytest.raises(KinjaxError):
        s.with_mask(good[:-1])
    with pytest.raises(KinjaxError):
        s.with_noise(0.0)


def test_emission_mask_convention():
    # Hβ at z=0: masked strictly within ±width km/s (half-width convention).
    wave = 4861.33 * np.exp(np.array([-801, -799, 0, 799, 801]) / C_KMS)
    np.testing.assert_array_equal(emission_line_mask(wave), [True, False, False, False, True])
    np.testing.assert_array_equal(emission_line_mask(wave, width=1000), [False] * 5)
    # [NI]5200 only with the extended list
    w = np.array([5199.0, 5199.5])
    assert emission_line_mask(w).all()
    assert not emission_line_mask(w, lines=EMISSION_LINES_EXTENDED).any()
    # redshift moves the lines
    assert emission_line_mask(wave * 1.01).all()
    np.testing.assert_array_equal(emission_line_mask(wave * 1.01, redshift=0.01),
                                  [True, False, False, False, True])


@pytest.mark.parametrize("z, width, lam_range_temp", [
    (0.0015, 800, None),          # the SAURON example's set-up
    (0.0, 800, None),
    (0.0015, 400, None),
    (0.0015, 800, (4500.0, 5250.0)),  # template edge inside the galaxy range
])
def test_mask_matches_ppxf_goodpixels(z, width, lam_range_temp):
    util = pytest.importorskip("ppxf.ppxf_util")
    from kinjax.datasets import ngc4550

    s = ngc4550().log_rebin()
    if lam_range_temp is None:
        # pPXF's example: templates cut to the galaxy range ± 2 %.
        lam_range_temp = (s.wave[0] / 1.02, s.wave[-1] * 1.02)
        ours = emission_line_mask(s.wave, redshift=z, width=width)
    else:
        ours = emission_line_mask(s.wave, redshift=z, width=width, template_range=lam_range_temp)
    try:
        goodpixels = util.determine_goodpixels(s.ln_wave, lam_range_temp, z, width=width)
    except Exception as exc:
        pytest.skip(f"ppxf.determine_goodpixels failed: {exc!r}")
    np.testing.assert_array_equal(np.flatnonzero(ours), goodpixels)
    assert 0 < ours.sum() < s.n_pix
    masked = s.masked_emission_lines(width, redshift=z)
    if lam_range_temp == (s.wave[0] / 1.02, s.wave[-1] * 1.02):
        np.testing.assert_array_equal(np.flatnonzero(masked.mask), goodpixels)


def _write(path, flux, header=None, ext=None):
    from astropy.io import fits

    hdus = [fits.PrimaryHDU(flux, header=fits.Header(header or {}))]
    for name, data in (ext or {}).items():
        hdus.append(fits.ImageHDU(data, name=name))
    fits.HDUList(hdus).writeto(path)
    return path


def test_read_spectrum(tmp_path):
    n = 50
    flux = np.linspace(1, 2, n)
    hdr = {"CRVAL1": 5000.0, "CDELT1": 2.0, "CRPIX1": 11.0, "FWHM": 3.0}
    p = _write(tmp_path / "a.fits", flux, hdr, {"NOISE": np.full(n, 0.1)})
    s = read_spectrum(p)
    np.testing.assert_allclose(s.wave, 5000 + 2 * (np.arange(n) - 10))
    np.testing.assert_allclose(s.flux, flux)
    assert s.fwhm == 3.0 and s.name == "a" and np.all(s.noise == 0.1)
    # IVAR extension: σ = 1/sqrt(ivar), ivar = 0 masks the pixel; CD1_1 and nm units
    ivar = np.full(n, 4.0)
    ivar[5] = 0
    hdr = {"CRVAL1": 500.0, "CD1_1": 0.2, "CUNIT1": "nm"}
    s = read_spectrum(_write(tmp_path / "b.fits", flux, hdr, {"IVAR": ivar}), fwhm=2.0)
    np.testing.assert_allclose(s.wave, 5000 + 2.0 * np.arange(n))
    assert s.noise[0] == pytest.approx(0.5) and not s.mask[5] and s.n_good == n - 1
    # VAR extension
    s = read_spectrum(_write(tmp_path / "v.fits", flux, hdr, {"VAR": np.full(n, 0.09)}), fwhm=2.0)
    np.testing.assert_allclose(s.noise, 0.3)
    # a linear axis that runs backwards (CDELT1 < 0) is read in increasing order
    ivar[5] = 4.0
    ivar[-1] = 0.0
    back = {"CRVAL1": 5098.0, "CDELT1": -2.0}
    s = read_spectrum(_write(tmp_path / "back.fits", flux, back, {"IVAR": ivar}), fwhm=2.0)
    np.testing.assert_allclose(s.wave, 5000 + 2.0 * np.arange(n))
    np.testing.assert_allclose(s.flux, flux[::-1])
    assert not s.mask[0] and s.n_good == n - 1
    # scalar noise argument
    s = read_spectrum(tmp_path / "b.fits", noise=0.2, fwhm=2.0, redshift=0.01, name="x")
    assert s.redshift == 0.01 and s.name == "x" and s.n_good == n


def test_read_spectrum_errors(tmp_path):
    n = 20
    hdr = {"CRVAL1": 5000.0, "CDELT1": 2.0}
    p = _write(tmp_path / "c.fits", np.ones(n), hdr)
    with pytest.raises(KinjaxError, match="pass noise"):
        read_spectrum(p, fwhm=2.0)
    with pytest.raises(KinjaxError, match="fwhm"):
        read_spectrum(p, noise=0.1)
    p2 = _write(tmp_path / "d.fits", np.ones((3, n)), hdr)
    with pytest.raises(KinjaxError, match="not a 1D spectrum"):
        read_spectrum(p2, noise=0.1, fwhm=2.0)
    with pytest.raises(KinjaxError, match="does not exist"):
        read_spectrum(tmp_path / "nope.fits", noise=0.1, fwhm=2.0)


def test_read_spectrum_log_axes(tmp_path):
    """Log-sampled images keep their grid (velscale set, no resampling): IRAF log10
    (DC-FLAG = 1) and FITS-WCS AWAV-LOG (Greisen et al. 2006, eq. 5) in nm, the latter
    in a DATA extension with a STAT (variance) extension as MPDAF writes it. Reference:
    the grid λ_k = λ_0 exp(k · velscale / c)."""
    from astropy.io import fits

    from kinjax.cube import detect_format

    n, lam0, velscale = 300, 4800.0, 60.0
    wave = lam0 * np.exp(np.arange(n) * velscale / C_KMS)
    flux = 1 + 0.1 * np.sin(np.arange(n) / 5)
    iraf = {"CRVAL1": np.log10(lam0), "CDELT1": velscale / C_KMS / np.log(10), "DC-FLAG": 1,
            "CTYPE1": "LINEAR", "FWHM": 2.5}
    s = read_spectrum(_write(tmp_path / "iraf.fits", flux, iraf, {"ERR": np.full(n, 0.02)}))
    np.testing.assert_allclose(s.wave, wave, rtol=1e-13)
    assert s.velscale == pytest.approx(velscale, rel=1e-12) and s.fwhm == 2.5 and np.all(s.noise == 0.02)
    # CRPIX1 = 11 puts λ_0 on pixel 11
    wcs = {"CRVAL1": lam0 / 10, "CDELT1": lam0 / 10 * velscale / C_KMS, "CRPIX1": 11.0, "CTYPE1": "AWAV-LOG",
           "CUNIT1": "nm"}
    path = tmp_path / "mpdaf.fits"
    fits.HDUList([fits.PrimaryHDU(header=fits.Header({"FWHM": 2.5})),
                  fits.ImageHDU(flux, fits.Header(wcs), name="DATA"),
                  fits.ImageHDU(np.full(n, 4e-4), name="STAT")]).writeto(path)
    s = read_spectrum(path)
    np.testing.assert_allclose(s.wave, wave * np.exp(-10 * velscale / C_KMS), rtol=1e-13)
    np.testing.assert_allclose(s.noise, 0.02)
    assert s.velscale == pytest.approx(velscale, rel=1e-12) and s.fwhm == 2.5
    with fits.open(path) as hdul:
        assert is_spectrum_file(hdul) and detect_format(hdul) == "spectrum"
    # axes that are not (or not only) wavelength are refused by name
    for bad in ({"CTYPE1": "MULTISPE"}, {"CTYPE1": "WAVE-TAB"}, {"CTYPE1": "FREQ"}, {"CTYPE1": "LOG-LINEAR"},
                {"DC-FLAG": 1, "CRVAL1": lam0}, {"CUNIT1": "km/s"}):
        hdr = {"CRVAL1": 3.7, "CDELT1": 1e-4, "FWHM": 2.5, **bad}
        with pytest.raises(KinjaxError, match="CTYPE1|DC-FLAG|unit"):
            read_spectrum(_write(tmp_path / "bad.fits", flux, hdr, {"ERR": np.full(n, 0.02)}), fwhm=2.5)
        (tmp_path / "bad.fits").unlink()


def _eso_table(path, wave_nm, flux, err, qual, header=None):
    """An ESO Phase 3 SCIENCE.SPECTRUM: one table row holding every column as an array."""
    from astropy.io import fits

    n = len(flux)
    cols = [fits.Column(name="WAVE", format=f"{n}D", unit="nm", array=[wave_nm]),
            fits.Column(name="FLUX", format=f"{n}E", array=[flux]),
            fits.Column(name="ERR", format=f"{n}E", array=[err]),
            fits.Column(name="QUAL", format=f"{n}J", array=[qual])]
    fits.HDUList([fits.PrimaryHDU(header=fits.Header(header or {})), fits.BinTableHDU.from_columns(cols)]).writeto(path)
    return path


def test_read_table_spectrum(tmp_path):
    """Spectrum tables: the ESO one-row layout in nm with SPEC_RES (FWHM = λ / R) and a
    QUAL flag, and a one-pixel-per-row table in Å with IVAR."""
    from astropy.io import fits

    n = 120
    wave = np.linspace(4800.0, 5400.0, n)
    flux = 1 + 0.1 * np.cos(np.arange(n) / 4)
    qual = np.zeros(n, np.int32)
    qual[7] = 4
    path = _eso_table(tmp_path / "eso.fits", wave / 10, flux, np.full(n, 0.05), qual, {"SPEC_RES": 2000.0})
    s = read_spectrum(path, redshift=0.002)
    np.testing.assert_allclose(s.wave, wave, rtol=1e-13)
    np.testing.assert_allclose(s.flux, flux, rtol=1e-7)  # stored as float32
    np.testing.assert_allclose(s.fwhm, wave / 2000.0, rtol=1e-13)
    assert not s.mask[7] and s.n_good == n - 1 and s.redshift == 0.002 and s.velscale is None
    with fits.open(path) as hdul:
        assert is_spectrum_file(hdul)
    ivar = np.full(n, 400.0)
    ivar[3] = 0.0
    cols = [fits.Column(name="lambda", format="D", unit="Angstrom", array=wave),
            fits.Column(name="flux", format="D", array=flux),
            fits.Column(name="ivar", format="D", array=ivar)]
    rows = tmp_path / "rows.fits"
    fits.HDUList([fits.PrimaryHDU(), fits.BinTableHDU.from_columns(cols)]).writeto(rows)
    s = read_table_spectrum(rows, fwhm=3.0)
    np.testing.assert_allclose(s.wave, wave)
    assert s.noise[0] == pytest.approx(0.05) and not s.mask[3] and s.n_good == n - 1 and s.fwhm == 3.0
    # rows in order of decreasing λ are put in increasing order, with their flags
    cols_back = [fits.Column(name=c.name, format=c.format, unit=c.unit, array=c.array[::-1]) for c in cols]
    fits.HDUList([fits.PrimaryHDU(), fits.BinTableHDU.from_columns(cols_back)]).writeto(tmp_path / "back.fits")
    s = read_spectrum(tmp_path / "back.fits", fwhm=3.0)
    np.testing.assert_allclose(s.wave, wave)
    np.testing.assert_allclose(s.flux, flux)
    assert not s.mask[3] and s.n_good == n - 1
    # a 'wavelength' column without SDSS's ivar / and_mask / wdisp is not an SDSS table:
    # its wavelengths are used as they are, not converted from vacuum to air
    generic = [fits.Column(name="wavelength", format="D", array=wave), cols[1],
               fits.Column(name="err", format="D", array=np.full(n, 0.05))]
    fits.HDUList([fits.PrimaryHDU(), fits.BinTableHDU.from_columns(generic)]).writeto(tmp_path / "generic.fits")
    s = read_spectrum(tmp_path / "generic.fits", fwhm=3.0)
    np.testing.assert_array_equal(s.wave, wave)
    assert np.all(s.noise == 0.05) and s.n_good == n
    # what a table lacks is asked for
    with pytest.raises(KinjaxError, match="no instrumental resolution"):
        read_spectrum(rows)
    path = _eso_table(tmp_path / "noq.fits", wave / 10, flux, np.zeros(n), np.zeros(n, np.int32), {"SPEC_RES": 2e3})
    with pytest.raises(KinjaxError, match="every pixel is flagged"):
        read_spectrum(path)
    s = read_spectrum(path, noise=0.1)  # a given noise replaces the unusable ERR column
    assert s.n_good == n and np.all(s.noise == 0.1)
    cols[0] = fits.Column(name="lambda", format="D", unit="km/s", array=wave)
    fits.HDUList([fits.PrimaryHDU(), fits.BinTableHDU.from_columns(cols)]).writeto(tmp_path / "kms.fits")
    with pytest.raises(KinjaxError, match="unknown wavelength unit"):
        read_spectrum(tmp_path / "kms.fits", fwhm=3.0)
    fits.HDUList([fits.PrimaryHDU(), fits.BinTableHDU.from_columns(cols[1:])]).writeto(tmp_path / "nowave.fits")
    with pytest.raises(KinjaxError, match="no extension holds a 1D spectrum"):
        read_spectrum(tmp_path / "nowave.fits", fwhm=3.0)


def _ppxf_spectrum(name):
    import os

    ppxf = pytest.importorskip("ppxf")
    return os.path.join(os.path.dirname(ppxf.__file__), "spectra", name)


def test_read_sdss_spectrum_coadd():
    """pPXF's SDSS DR12 spectrum of NGC 4636 (COADD table): vacuum log-λ converted to
    air, σ = 1/sqrt(ivar), FWHM = 2.3548 wdisp × the pixel width (Å)."""
    from astropy.io import fits

    from kinjax.cube import vacuum_to_air

    path = _ppxf_spectrum("NGC4636_SDSS_DR12.fits")
    t = fits.getdata(path, "COADD")
    s = read_spectrum(path, redshift=0.003129)
    wave_vac = 10.0 ** t["loglam"].astype(float)
    np.testing.assert_allclose(s.wave, vacuum_to_air(wave_vac), rtol=1e-12)
    assert np.all((wave_vac - s.wave) / wave_vac * C_KMS > 80) and s.velscale is None  # ~83 km/s
    np.testing.assert_allclose(s.noise, 1 / np.sqrt(t["ivar"].astype(float)), rtol=1e-6)
    np.testing.assert_allclose(s.fwhm, 2.3548200450309493 * t["wdisp"] * np.diff(pixel_edges(s.wave)), rtol=1e-6)
    assert 2.0 < np.median(s.fwhm) < 3.5 and s.n_good == t.size and s.redshift == 0.003129
    # left at z = 0, the pipeline's redshift (SPECOBJ Z) is pointed out
    z_pipeline = float(fits.getdata(path, "SPECOBJ")["Z"][0])
    with pytest.warns(UserWarning, match=f"catalogue redshift is z = {z_pipeline:.6g}"):
        read_spectrum(path)


def test_read_sdss_spectrum_table(tmp_path):
    """An older SDSS table (``wavelength``, ``inverse_variance``, ``and_mask``, no
    ``wdisp``): flagged pixels masked, the resolution must be given."""
    from astropy.io import fits

    n = 300
    wave = 10 ** (3.7 + 1e-4 * np.arange(n))
    ivar = np.full(n, 100.0)
    ivar[10] = 0.0
    and_mask = np.zeros(n, np.int32)
    and_mask[20] = 1 << 23  # BRIGHTSKY
    cols = [fits.Column(name="flux", format="D", array=np.ones(n)),
            fits.Column(name="wavelength", format="D", array=wave),
            fits.Column(name="inverse_variance", format="D", array=ivar),
            fits.Column(name="and_mask", format="J", array=and_mask)]
    path = tmp_path / "sdss.fits"
    fits.HDUList([fits.PrimaryHDU(), fits.BinTableHDU.from_columns(cols)]).writeto(path)
    with pytest.raises(KinjaxError, match="wdisp"):
        read_spectrum(path)
    s = read_sdss_spectrum(path, fwhm=2.76)
    assert s.fwhm == 2.76 and not s.mask[10] and not s.mask[20] and s.n_good == n - 2
    assert s.noise[0] == pytest.approx(0.1)
    # a constant noise replaces ivar, the flags still apply
    s = read_spectrum(path, fwhm=2.76, noise=0.5)
    assert np.all(s.noise == 0.5) and s.n_good == n - 2
    all_bad = tmp_path / "bad.fits"
    cols[2] = fits.Column(name="inverse_variance", format="D", array=np.zeros(n))
    fits.HDUList([fits.PrimaryHDU(), fits.BinTableHDU.from_columns(cols)]).writeto(all_bad)
    with pytest.raises(KinjaxError, match="every pixel is flagged"):
        read_spectrum(all_bad, fwhm=2.76)


def test_crop():
    spec = _spec(n=201, fwhm=np.linspace(4.0, 4.4, 201))  # 2.5 Å pixels
    cut = spec.crop(4900.0, 5000.0)
    np.testing.assert_allclose(cut.wave, spec.wave[40:81])
    np.testing.assert_array_equal(cut.flux, spec.flux[40:81])
    np.testing.assert_array_equal(cut.fwhm, spec.fwhm[40:81])
    with pytest.raises(KinjaxError, match="only 0 pixels"):
        spec.crop(6000.0, 7000.0)
