"""Tests for kinjax.cube: readers for each layout, S/N, log-rebinning, Voronoi binning."""

import numpy as np
import pytest
from astropy.io import fits

from kinjax.cube import (
    SAURON_FWHM,
    Cube,
    detect_format,
    read_atlas3d,
    read_cube,
    read_manga,
    read_muse,
    vacuum_to_air,
)
from kinjax.errors import KinjaxError

N_WAVE, N_Y, N_X = 200, 3, 4


def absorption_spectrum(wave, amplitude, centre=5100.0, sigma=5.0, depth=0.3):
    """Continuum ``amplitude`` with one Gaussian absorption line."""
    return amplitude * (1.0 - depth * np.exp(-0.5 * ((wave - centre) / sigma) ** 2))


def muse_arrays():
    """(n_wave, n_y, n_x) DATA/STAT with a NaN spaxel, NaN pixels and bad variances."""
    wave = 4800.0 + 2.5 * np.arange(N_WAVE)  # CRVAL3 at CRPIX3 = 1
    amp = 1.0 + np.arange(N_Y * N_X).reshape(N_Y, N_X)
    data = absorption_spectrum(wave[:, None, None], amp[None])
    stat = (0.05 * amp[None]) ** 2 * np.ones((N_WAVE, 1, 1))
    data[:, 0, 0] = np.nan  # edge spaxel without data
    data[10:15, 1, 2] = np.nan  # a few bad pixels
    stat[20, 2, 3] = 0.0  # non-positive variance
    stat[21, 2, 3] = -1.0
    return wave, data, stat


def write_muse(path, cunit="Angstrom", ctype="AWAV", dq=False):
    wave, data, stat = muse_arrays()
    hdr = fits.Header()
    scale = {"Angstrom": 1.0, "nm": 0.1, "m": 1e-10}[cunit]
    hdr.update(CRVAL3=4800.0 * scale, CD3_3=2.5 * scale, CRPIX3=1.0, CTYPE3=ctype, CUNIT3=cunit,
               CD1_1=-0.2 / 3600, CD1_2=0.0, CD2_1=0.0, CD2_2=0.2 / 3600)
    hdus = [fits.PrimaryHDU(header=fits.Header({"OBJECT": "MOCK"})),
            fits.ImageHDU(data.astype(np.float32), header=hdr, name="DATA"),
            fits.ImageHDU(stat.astype(np.float32), header=hdr, name="STAT")]
    if dq:
        flags = np.zeros(data.shape, dtype=np.int32)
        flags[50, 2, 1] = 4
        hdus.append(fits.ImageHDU(flags, name="DQ"))
    fits.HDUList(hdus).writeto(path)
    return wave, data, stat


def write_manga(path, resolution="SPECRES"):
    wave_vac = 10 ** (3.68 + 1e-4 * np.arange(N_WAVE))  # ~4786–5005 Å, log-spaced
    amp = 2.0 + np.arange(N_Y * N_X).reshape(N_Y, N_X)
    flux = absorption_spectrum(wave_vac[:, None, None], amp[None], centre=4900.0)
    ivar = np.full(flux.shape, 400.0)
    ivar[:, 2, 3] = 0.0  # no coverage
    ivar[30, 1, 1] = 0.0
    mask = np.zeros(flux.shape, dtype=np.int32)
    mask[40:43, 0, 1] = 1024  # DONOTUSE
    mask[60, 0, 1] = 2  # LOWCOV alone: still usable
    mask[70, 0, 1] = 8  # FORESTAR: a foreground star
    hdus = [fits.PrimaryHDU(header=fits.Header({"PLATEIFU": "1-1"})),
            fits.ImageHDU(flux, name="FLUX"), fits.ImageHDU(ivar, name="IVAR"),
            fits.ImageHDU(mask, name="MASK"), fits.ImageHDU(wave_vac, name="WAVE")]
    res = np.linspace(1800.0, 2200.0, N_WAVE)
    sigma = np.broadcast_to((wave_vac / res / 2.3548200450309493)[:, None, None], flux.shape).copy()
    sigma[:, 0, 0] *= 1.5  # one odd spaxel: the median ignores it
    if resolution == "SPECRES":
        hdus.append(fits.ImageHDU(res, name="SPECRES"))
    elif resolution == "PREDISP":
        hdus.append(fits.ImageHDU(sigma, name="PREDISP"))
    elif resolution == "both":  # DR15+: post- and pre-pixelised (here 10 % sharper) resolution
        hdus.append(fits.ImageHDU(res, name="SPECRES"))
        hdus.append(fits.ImageHDU(1.1 * res, name="PRESPECRES"))
    fits.HDUList(hdus).writeto(path)
    return wave_vac, flux, ivar, mask, res


def write_e3d(path, crpix=None, columns=("DATA_SPE", "STAT_SPE", "XPOS", "YPOS")):
    n_spax = 7
    wave = 4825.0 + 1.1 * np.arange(N_WAVE)
    flux = absorption_spectrum(wave[None, :], 1.0 + np.arange(n_spax)[:, None])
    var = np.full(flux.shape, 0.01)
    var[3, 5:9] = 0.0
    x = np.linspace(-3.0, 3.0, n_spax)
    y = 0.5 * x
    values = {"DATA_SPE": flux, "STAT_SPE": var, "XPOS": x, "YPOS": y}
    cols = [fits.Column(name=c, format=f"{N_WAVE}E" if c.endswith("SPE") else "E", array=values[c])
            for c in columns]
    table = fits.BinTableHDU.from_columns(cols)
    crval = 4825.0 if crpix is None else 4825.0 + (crpix - 1) * 1.1
    table.header.update(CRVALS=crval, CDELTS=1.1)
    if crpix is not None:
        table.header["CRPIXS"] = crpix
    fits.HDUList([fits.PrimaryHDU(), table]).writeto(path)
    return wave, flux, var, x, y


# ---------------------------------------------------------------------- wavelengths
def test_vacuum_to_air_against_published_values():
    # Morton (2000) at 5000 Å: n - 1 = 2.78973e-4 (hand evaluation of the formula)
    assert vacuum_to_air(5000.0) == pytest.approx(4998.6055, abs=2e-4)
    # ADAS vacuum2air (Edlen 1966): 5300 Å -> 5298.52575; Ciddor 5298.52567
    assert vacuum_to_air(5300.0) == pytest.approx(5298.5257, abs=1e-3)
    # astrolibR airtovac (Ciddor 1996): H beta 4861.363 air = 4862.721 vacuum
    assert vacuum_to_air(4862.721) == pytest.approx(4861.363, abs=2e-3)


def test_vacuum_to_air_inverts_piskunov_air_to_vacuum():
    # VALD's independent air-to-vacuum fit (N. Piskunov) must undo the conversion
    wave_vac = np.linspace(3000.0, 10000.0, 50)
    wave_air = vacuum_to_air(wave_vac)
    s2 = (1e4 / wave_air) ** 2
    n = (1 + 0.00008336624212083 + 0.02408926869968 / (130.1065924522 - s2)
         + 0.0001599740894897 / (38.92568793293 - s2))
    np.testing.assert_allclose(wave_air * n, wave_vac, atol=2e-4)


# ---------------------------------------------------------------------- MUSE
def test_read_muse_shapes_wavelengths_noise_mask_positions(tmp_path):
    path = tmp_path / "muse.fits"
    wave, data, stat = write_muse(path)
    cube = read_cube(path, fwhm=2.6)
    assert cube.format == "muse" and cube.name == "MOCK"
    assert cube.flux.shape == cube.noise.shape == cube.mask.shape == (N_Y * N_X, N_WAVE)
    assert cube.grid_shape == (N_Y, N_X) and cube.velscale is None and cube.fwhm == 2.6
    np.testing.assert_allclose(cube.wave, wave)
    # spaxel k = iy * n_x + ix; flux transposed from (n_wave, n_y, n_x)
    k = 1 * N_X + 3
    np.testing.assert_allclose(cube.flux[k], data[:, 1, 3], rtol=1e-6)
    np.testing.assert_allclose(cube.noise[k], np.sqrt(stat[:, 1, 3]), rtol=1e-6)
    # masks: NaN spaxel, NaN pixels, non-positive variance
    assert not cube.mask[0].any() and not cube.valid[0]
    bad = ~cube.mask[1 * N_X + 2]
    assert np.array_equal(np.flatnonzero(bad), np.arange(10, 15))
    assert np.array_equal(np.flatnonzero(~cube.mask[2 * N_X + 3]), [20, 21])
    assert cube.valid[1:].all()
    assert np.all(np.isfinite(cube.flux)) and np.all(cube.noise > 0)
    # positions: 0.2" spaxels centred on the cube centre
    np.testing.assert_allclose(np.unique(cube.x), 0.2 * (np.arange(N_X) - 1.5))
    np.testing.assert_allclose(np.unique(cube.y), 0.2 * (np.arange(N_Y) - 1.0))
    assert cube.x[k] == pytest.approx(0.2 * 1.5) and cube.y[k] == pytest.approx(0.0)
    assert tuple(cube.grid_index[k]) == (1, 3)


def test_read_muse_needs_fwhm_unless_told_otherwise(tmp_path):
    path = tmp_path / "muse.fits"
    write_muse(path)
    with pytest.raises(KinjaxError, match="fwhm"):
        read_muse(path)
    assert read_muse(path, require_fwhm=False).fwhm is None


@pytest.mark.parametrize("cunit", ["nm", "m"])
def test_read_muse_converts_wavelength_units(tmp_path, cunit):
    path = tmp_path / "muse.fits"
    wave, _, _ = write_muse(path, cunit=cunit)
    np.testing.assert_allclose(read_muse(path, fwhm=2.6).wave, wave, rtol=1e-10)


def test_read_muse_vacuum_axis_and_dq(tmp_path):
    path = tmp_path / "muse.fits"
    wave, _, _ = write_muse(path, ctype="WAVE", dq=True)
    cube = read_muse(path, fwhm=2.6)
    np.testing.assert_allclose(cube.wave, vacuum_to_air(wave))
    assert not cube.mask[2 * N_X + 1, 50] and cube.mask[2 * N_X + 1, 49]


# ---------------------------------------------------------------------- MaNGA
def test_read_manga_air_wavelengths_noise_bits_and_specres(tmp_path):
    path = tmp_path / "manga-1-1-LOGCUBE.fits"
    wave_vac, flux, ivar, bits, res = write_manga(path)
    cube = read_cube(path)
    assert cube.format == "manga" and cube.velscale is None and cube.grid_shape == (N_Y, N_X)
    np.testing.assert_allclose(cube.wave, vacuum_to_air(wave_vac))
    assert np.all(cube.wave < wave_vac) and np.all(wave_vac - cube.wave < 1.5)
    np.testing.assert_allclose(cube.flux[5], flux[:, 1, 1])
    np.testing.assert_allclose(cube.noise[0], 0.05)  # 1/sqrt(400)
    assert not cube.mask[5, 30] and cube.mask[5, 29]  # IVAR = 0
    assert not cube.mask[2 * N_X + 3].any()  # no coverage at all
    assert np.array_equal(np.flatnonzero(~cube.mask[1]), [40, 41, 42, 70])  # DONOTUSE, FORESTAR
    np.testing.assert_allclose(cube.fwhm, cube.wave / res)
    np.testing.assert_allclose(np.unique(cube.x), 0.5 * (np.arange(N_X) - 1.5))


def test_read_manga_fwhm_from_predisp(tmp_path):
    path = tmp_path / "manga-1-1-LOGCUBE.fits"
    wave_vac, _, _, _, res = write_manga(path, resolution="PREDISP")
    cube = read_manga(path)
    # median over spaxels of sigma (the odd spaxel ignored) times 2 sqrt(2 ln 2)
    np.testing.assert_allclose(cube.fwhm, wave_vac / res, rtol=1e-5)


def test_read_manga_prefers_the_pre_pixelised_resolution(tmp_path):
    """kinjax's model integrates over pixels, so it matches the pre-pixelised LSF (as the
    MaNGA DAP does with pPXF): PRESPECRES over SPECRES when a file has both."""
    path = tmp_path / "manga-1-1-LOGCUBE.fits"
    wave_vac, _, _, _, res = write_manga(path, resolution="both")
    cube = read_manga(path)
    np.testing.assert_allclose(cube.fwhm, cube.wave / (1.1 * res))


def test_read_manga_without_resolution_needs_fwhm(tmp_path):
    path = tmp_path / "manga.fits"
    write_manga(path, resolution=None)
    with pytest.raises(KinjaxError, match="fwhm"):
        read_manga(path)
    assert read_manga(path, fwhm=2.7).fwhm == 2.7


# ---------------------------------------------------------------------- ATLAS3D / E3D
@pytest.mark.parametrize("crpix", [None, 11.0])
def test_read_atlas3d(tmp_path, crpix):
    path = tmp_path / "e3d.fits"
    wave, flux, var, x, y = write_e3d(path, crpix=crpix)
    cube = read_cube(path)
    assert cube.format == "atlas3d" and cube.grid_shape is None and cube.fwhm == SAURON_FWHM
    np.testing.assert_allclose(cube.wave, wave, rtol=1e-12)
    np.testing.assert_allclose(cube.flux, flux, rtol=1e-6)
    np.testing.assert_allclose(cube.noise[0], 0.1, rtol=1e-6)
    np.testing.assert_allclose(cube.x, x, rtol=1e-6)
    np.testing.assert_allclose(cube.y, y, rtol=1e-6)
    assert np.array_equal(np.flatnonzero(~cube.mask[3]), [5, 6, 7, 8])
    with pytest.raises(KinjaxError, match="no spatial grid"):
        cube.to_image(np.zeros(cube.n_spaxels))


def test_table_without_data_spe_is_rejected(tmp_path):
    path = tmp_path / "table.fits"
    col = fits.Column(name="FOO", format="E", array=np.arange(3.0))
    fits.HDUList([fits.PrimaryHDU(), fits.BinTableHDU.from_columns([col])]).writeto(path)
    with pytest.raises(KinjaxError, match="unrecognised FITS layout"):
        read_cube(path)
    with pytest.raises(KinjaxError, match="DATA_SPE"):
        read_atlas3d(path)


def test_bare_image_and_1d_spectrum_are_not_cubes(tmp_path):
    image = tmp_path / "image.fits"
    fits.PrimaryHDU(np.ones((3, 3))).writeto(image)
    with fits.open(image) as hdul, pytest.raises(KinjaxError, match="unrecognised FITS layout.*--format"):
        detect_format(hdul)
    with pytest.raises(KinjaxError, match="image.fits: unrecognised"):
        read_cube(image)
    spec = tmp_path / "spec.fits"
    fits.PrimaryHDU(np.ones(50), header=fits.Header({"CRVAL1": 5000.0, "CDELT1": 1.0})).writeto(spec)
    with fits.open(spec) as hdul:
        assert detect_format(hdul) == "spectrum"
    with pytest.raises(KinjaxError, match="read_spectrum"):
        read_cube(spec)


# ---------------------------------------------------------------------- container
def mock_cube(n_y=3, n_x=4, amp=None, noise=0.5, wave=None):
    wave = np.linspace(4800.0, 5300.0, N_WAVE) if wave is None else wave
    n = n_y * n_x
    amp = np.full(n, 10.0) if amp is None else amp
    flux = absorption_spectrum(wave[None, :], amp[:, None])
    iy, ix = np.indices((n_y, n_x)).reshape(2, -1)
    return Cube(wave, flux, np.full(flux.shape, noise), np.ones(flux.shape, bool),
                ix - (n_x - 1) / 2, iy - (n_y - 1) / 2, 2.5, grid_shape=(n_y, n_x),
                grid_index=np.stack([iy, ix], 1), format="mock")


def test_all_masked_cube_is_an_error():
    wave = np.linspace(4800.0, 5300.0, 20)
    with pytest.raises(KinjaxError, match="every spaxel is fully masked"):
        Cube(wave, np.full((4, 20), np.nan), np.ones((4, 20)), np.ones((4, 20), bool),
             np.zeros(4), np.zeros(4), 2.5)
    with pytest.raises(KinjaxError, match="wavelength last"):
        Cube(wave, np.ones((20, 4)), np.ones((20, 4)), None, np.zeros(20), np.zeros(20), 2.5)


def test_snr_of_known_cube():
    wave = np.linspace(4800.0, 5300.0, N_WAVE)
    amp = np.arange(1.0, 13.0)
    flux = np.broadcast_to(amp[:, None], (12, N_WAVE)).copy()
    flux[0] = np.nan  # invalid spaxel
    flux[1, : N_WAVE // 2 + 1] = np.nan  # fewer than half the pixels good: invalid
    flux[2, :10] = 1e6  # masked outliers must not count
    mask = np.ones(flux.shape, bool)
    mask[2, :10] = False
    cube = Cube(wave, flux, 0.25, mask, np.zeros(12), np.zeros(12), 2.5)
    sn = cube.snr()
    assert np.isnan(sn[0]) and np.isnan(sn[1])
    np.testing.assert_allclose(sn[2:], amp[2:] / 0.25)


def test_log_rebin_cube_equals_log_rebin_of_each_spectrum():
    from kinjax.rebin import log_rebin

    cube = mock_cube(amp=np.linspace(1.0, 5.0, 12))
    mask = cube.mask.copy()
    mask[4, 100:103] = False
    cube = Cube(cube.wave, cube.flux, cube.noise, mask, cube.x, cube.y,
                np.linspace(2.4, 2.8, N_WAVE), grid_shape=cube.grid_shape, grid_index=cube.grid_index)
    out = cube.log_rebin(velscale=60.0)
    assert out.velscale == 60.0 and out.flux.shape[0] == 12
    np.testing.assert_allclose(np.diff(np.log(out.wave)), 60.0 / 299792.458, rtol=1e-9)
    for i in (0, 7, 11):
        ln_wave, flux, var, _ = log_rebin(cube.wave, cube.flux[i], 60.0, variance=cube.noise[i] ** 2)
        np.testing.assert_allclose(np.exp(ln_wave), out.wave)
        np.testing.assert_allclose(out.flux[i], flux, rtol=1e-12)
        np.testing.assert_allclose(out.noise[i], np.sqrt(var), rtol=1e-12)
        assert out.mask[i].all()
    # the masked input pixels make the output bins that overlap them bad, only those
    bad = np.flatnonzero(~out.mask[4])
    lo, hi = cube.wave[100] - 0.5 * np.diff(cube.wave)[0], cube.wave[102] + 0.5 * np.diff(cube.wave)[0]
    edges = np.exp(np.log(out.wave) + 0.5 * np.array([[-1], [1]]) * 60.0 / 299792.458)
    overlaps = np.flatnonzero((edges[1] > lo + 1e-9) & (edges[0] < hi - 1e-9))
    assert np.array_equal(bad, overlaps)
    np.testing.assert_allclose(out.fwhm, np.interp(out.wave, cube.wave, cube.fwhm))
    spec = out.spectrum(7)
    np.testing.assert_array_equal(spec.flux, out.flux[7])
    assert spec.velscale == pytest.approx(60.0)


def test_select_spectrum_and_to_image():
    cube = mock_cube(amp=np.arange(1.0, 13.0))
    image = cube.to_image(np.arange(12.0))
    np.testing.assert_array_equal(image, np.arange(12.0).reshape(3, 4))
    sub = cube.select(cube.x > 0)
    assert sub.n_spaxels == 6 and sub.n_wave == N_WAVE
    img = sub.to_image(sub.flux[:, 0])
    assert np.isnan(img[:, :2]).all()
    np.testing.assert_allclose(img[:, 2:], cube.to_image(cube.flux[:, 0])[:, 2:])
    vec = cube.to_image(np.ones((12, 2)))
    assert vec.shape == (3, 4, 2)
    spec = cube.spectrum(5)
    np.testing.assert_array_equal(spec.flux, cube.flux[5])
    assert spec.fwhm == 2.5
    with pytest.raises(KinjaxError):
        cube.spectrum(12)


def test_voronoi_bin_conserves_flux_and_reaches_target_sn():
    n_y = n_x = 16
    iy, ix = np.indices((n_y, n_x)).reshape(2, -1)
    r = np.hypot(ix - 7.5, iy - 7.5)
    amp = 12.0 / (1.0 + (r / 4.0) ** 2)  # S/N per spaxel 24 at the centre, 1.3 in the corners
    cube = mock_cube(n_y, n_x, amp=amp, noise=0.5)
    flux = cube.flux.copy()
    flux[0] = np.nan  # corner spaxel without data: bin -1
    cube = Cube(cube.wave, flux, cube.noise, cube.mask, cube.x, cube.y, 2.5,
                grid_shape=cube.grid_shape, grid_index=cube.grid_index, format="mock")
    target = 20.0
    binned, bin_number = cube.voronoi_bin(target)
    assert bin_number.shape == (n_y * n_x,) and bin_number[0] == -1
    assert np.all(bin_number[1:] >= 0)
    assert binned.format == "binned" and binned.grid_shape is None
    assert binned.n_spaxels == bin_number.max() + 1 < cube.n_spaxels
    # flux is conserved: the bins hold exactly the used spaxels' flux
    np.testing.assert_allclose(binned.flux.sum(axis=0), cube.flux[1:].sum(axis=0), rtol=1e-12)
    np.testing.assert_allclose((binned.noise**2).sum(axis=0), (cube.noise[1:] ** 2).sum(axis=0), rtol=1e-12)
    # multi-spaxel bins reach the target S/N (vorbin's scatter is ~10 %)
    sn = binned.snr()
    members = np.bincount(bin_number[1:])
    assert np.all(sn[members > 1] > 0.75 * target)
    assert abs(np.median(sn[members > 1]) / target - 1) < 0.1
    # single-spaxel bins are those (nearly) at the target already
    assert np.all(sn[members == 1] > 0.8 * target)
    # centroids are flux weighted: a bin of one spaxel sits on it
    one = np.flatnonzero(members == 1)[0]
    k = np.flatnonzero(bin_number == one)[0]
    assert (binned.x[one], binned.y[one]) == pytest.approx((cube.x[k], cube.y[k]))
    image = cube.to_image(sn, bin_number=bin_number)
    assert np.isnan(image[0, 0]) and image[5, 5] == pytest.approx(sn[bin_number[5 * n_x + 5]])


def test_voronoi_bin_masks_and_edge_cases():
    cube = mock_cube(amp=np.full(12, 10.0), noise=0.5)  # S/N ~ 20 everywhere
    binned, bin_number = cube.voronoi_bin(5.0)  # already above target: no binning
    np.testing.assert_array_equal(bin_number, np.arange(12))
    np.testing.assert_allclose(binned.flux, cube.flux)
    mask = cube.mask.copy()
    mask[3, 50] = False
    cube = Cube(cube.wave, cube.flux, cube.noise, mask, cube.x, cube.y, 2.5,
                grid_shape=cube.grid_shape, grid_index=cube.grid_index)
    binned, bin_number = cube.voronoi_bin(60.0)
    assert not binned.mask[bin_number[3], 50]  # AND of the member masks
    assert binned.mask[bin_number[3], 49]
    with pytest.raises(KinjaxError, match="min_sn"):
        cube.voronoi_bin(60.0, min_sn=100.0)
    with pytest.raises(KinjaxError, match="Not enough S/N"):
        cube.voronoi_bin(1e4)


def test_forced_format_on_the_wrong_file_names_what_is_missing(tmp_path):
    path = tmp_path / "data_only.fits"
    fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(np.ones((4, 3, 3)), name="DATA")]).writeto(path)
    with pytest.raises(KinjaxError, match="not a MUSE file: missing extension.*STAT"):
        read_cube(path, "muse", fwhm=2.6)
    with pytest.raises(KinjaxError, match="missing extension.*FLUX, IVAR, WAVE"):
        read_cube(path, "manga")


def test_crop_keeps_the_pixels_in_range_for_every_spaxel():
    wave = np.linspace(4800.0, 5300.0, 101)  # 5 Å pixels
    rng = np.random.default_rng(1)
    flux = rng.normal(1.0, 0.1, (3, 101))
    mask = np.ones((3, 101), bool)
    mask[1, 30] = False
    fwhm = np.linspace(2.5, 2.7, 101)
    cube = Cube(wave, flux, 0.1, mask, np.arange(3.0), np.zeros(3), fwhm)
    cut = cube.crop(4900.0, 5102.0)  # pixel 20 (4900 Å) to 60 (5100 Å)
    np.testing.assert_array_equal(cut.wave, wave[20:61])
    np.testing.assert_array_equal(cut.flux, flux[:, 20:61])
    np.testing.assert_array_equal(cut.fwhm, fwhm[20:61])
    assert not cut.mask[1, 10] and cut.mask.sum() == 3 * 41 - 1
    np.testing.assert_array_equal(cut.x, cube.x)
    with pytest.raises(KinjaxError, match="4800.0-5300.0"):
        cube.crop(5400.0, 6000.0)
    with pytest.raises(KinjaxError, match="lo < hi"):
        cube.crop(5100.0, 4900.0)


def test_neighbour_mean_against_a_loop():
    """Cube.neighbour_mean: each spaxel the mean of the valid spaxels within the radius
    (good pixels only, noise propagated), checked against a direct loop."""
    rng = np.random.default_rng(3)
    n_y, n_x, n_w = 4, 5, 30
    yy, xx = np.mgrid[0:n_y, 0:n_x]
    x, y = 0.5 * xx.ravel(), 0.5 * yy.ravel()
    flux = rng.normal(1.0, 0.1, (n_y * n_x, n_w))
    noise = rng.uniform(0.05, 0.2, flux.shape)
    mask = rng.random(flux.shape) > 0.1
    mask[7] = False  # one invalid spaxel: never averaged in
    cube = Cube(np.linspace(5000, 5100, n_w), flux, noise, mask, x, y, 2.65)
    out, n_avg = cube.neighbour_mean(1.5)
    for i in range(cube.n_spaxels):
        near = [j for j in range(cube.n_spaxels) if np.hypot(x[j] - x[i], y[j] - y[i]) <= 0.75 + 1e-9 and j != 7]
        assert n_avg[i] == len(near)
        for p in range(n_w):
            good = [j for j in near if mask[j, p]]
            if not good:
                assert not out.mask[i, p]
                continue
            assert out.flux[i, p] == pytest.approx(np.mean(flux[good, p]), rel=1e-12)
            assert out.noise[i, p] == pytest.approx(np.sqrt(np.sum(noise[good, p] ** 2)) / len(good), rel=1e-12)
    assert n_avg[0] == 4 and n_avg[6] == 8  # a corner (3 + itself) and an interior spaxel next to the invalid one
    with pytest.raises(KinjaxError):
        cube.neighbour_mean(-1.0)
