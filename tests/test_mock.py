"""Mock IFU cubes against their truth and independent references."""

from dataclasses import replace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("ppxf")  # the E-MILES templates ship with ppxf

from kinjax.cube import read_cube  # noqa: E402
from kinjax.errors import KinjaxError  # noqa: E402
from kinjax.forward import make_forward_model  # noqa: E402
from kinjax.losvd import Gaussian, GaussHermite, Mixture  # noqa: E402
from kinjax.mock import (  # noqa: E402
    Bulge,
    Disc,
    MockGalaxy,
    component_templates,
    convolve_psf,
    counter_rotating_discs,
    log_grid,
    log_to_linear,
    make_mock_cube,
    read_mock_truth,
    rotating_disc_with_bulge,
    spaxel_kinematics,
)


@pytest.fixture(scope="module")
def disc_bulge():
    return make_mock_cube(rotating_disc_with_bulge(snr=50, shape=(15, 15), seed=1))


@pytest.fixture(scope="module")
def counter():
    return make_mock_cube(counter_rotating_discs(snr=50, shape=(15, 15), seed=2))


@pytest.fixture(scope="module")
def written(disc_bulge, tmp_path_factory):
    path = tmp_path_factory.mktemp("mock") / "disc_bulge.fits"
    return disc_bulge.write(path)


def test_single_component_spaxel_equals_forward_model():
    """A one-component mock spectrum is the forward model of its template and LOSVD."""
    galaxy = MockGalaxy(components=(Bulge(sigma=150.0, v_rot=60.0),), shape=(5, 5), inclination=50.0)
    mock = make_mock_cube(galaxy)
    flux, v, sigma = spaxel_kinematics(galaxy, mock.cube.x, mock.cube.y)
    grid = log_grid(galaxy)
    (tpl,) = component_templates(galaxy, grid)
    model = make_forward_model([tpl], grid, degree=-1, vmax=1500.0)
    for k in (0, 6, 12):
        assert abs(v[k, 0]) > 1 or k == 12
        direct = np.asarray(model(Gaussian(v[k, 0], sigma[k, 0]), jnp.array([flux[k, 0]])))
        expected = log_to_linear(grid.wave, direct, galaxy.wave)
        np.testing.assert_allclose(mock.model[k], expected, rtol=1e-10, atol=0)
    # The template is the E-MILES SSP nearest to (12 Gyr, [M/H] = 0.22).
    assert tpl.age[0] == pytest.approx(12.5893, rel=1e-4) and tpl.metal[0] == pytest.approx(0.22)


def test_log_to_linear_against_brute_force():
    """Exact pixel means of the log-sampled step function, by dense sampling."""
    rng = np.random.default_rng(0)
    dln = 20.0 / 299792.458
    ln_w = np.log(4790.0) + dln * (np.arange(600) + 0.5)
    wave_log = np.exp(ln_w)
    flux = rng.uniform(0.5, 1.5, (2, wave_log.size))
    wave = 4800.0 + 1.25 * np.arange(40)
    out = log_to_linear(wave_log, flux, wave)
    np.testing.assert_allclose(log_to_linear(wave_log, np.ones_like(flux), wave), 1.0, rtol=1e-12)
    edges = np.exp(np.concatenate([ln_w - dln / 2, [ln_w[-1] + dln / 2]]))
    n_sub = 20000
    for j in (0, 13, 39):
        lam = wave[j] - 0.625 + 1.25 * (np.arange(n_sub) + 0.5) / n_sub
        brute = flux[:, np.searchsorted(edges, lam) - 1].mean(axis=1)
        np.testing.assert_allclose(out[:, j], brute, rtol=2e-4)


def _numerical_moments(velocity, pdf):
    norm = np.trapezoid(pdf, velocity, axis=-1)
    mean = np.trapezoid(pdf * velocity, velocity, axis=-1) / norm
    var = np.trapezoid(pdf * (velocity - mean[..., None]) ** 2, velocity, axis=-1) / norm
    return norm, mean, np.sqrt(var)


@pytest.mark.parametrize("which", ["disc_bulge", "counter", "hermite"])
def test_truth_moments(which, disc_bulge, counter):
    """mean_v, dispersion = moments of the tabulated LOSVD and of the analytic Mixture."""
    if which == "hermite":
        galaxy = MockGalaxy(components=(Disc(h3=0.06, h4=0.04), Bulge()), shape=(7, 7))
        mock = make_mock_cube(galaxy)
    else:
        mock = {"disc_bulge": disc_bulge, "counter": counter}[which]
        galaxy = mock.galaxy
    norm, mean, disp = _numerical_moments(mock.velocity, mock.losvd)
    np.testing.assert_allclose(norm, 1.0, atol=1e-6)
    np.testing.assert_allclose(mock.mean_v, mean, atol=0.05)
    np.testing.assert_allclose(mock.dispersion, disp, atol=0.05)
    flux, v, sigma = spaxel_kinematics(galaxy, mock.cube.x, mock.cube.y)
    for k in (0, mock.cube.n_spaxels // 2, mock.cube.n_spaxels - 3):
        parts = [
            Gaussian(v[k, c], sigma[k, c]) if comp.h3 == comp.h4 == 0
            else GaussHermite(v[k, c], sigma[k, c], [comp.h3, comp.h4])
            for c, comp in enumerate(galaxy.components)
        ]
        m, s = _mixture_moments(Mixture(parts, flux[k]))
        assert mock.mean_v[k] == pytest.approx(m, abs=1e-8)
        assert mock.dispersion[k] == pytest.approx(s, rel=1e-8)


def _mixture_moments(mixture):
    """Mean and dispersion from derivatives of the analytic transform at ω = 0:
    ft(ω) e^{iωm} = 1 − ω² σ² / 2 + ..."""
    zero = jnp.zeros(())
    mean = -jax.grad(lambda w: jnp.imag(mixture.ft(w)))(zero)
    second = jax.grad(jax.grad(lambda w: jnp.real(mixture.ft(w) * jnp.exp(1j * w * mean))))(zero)
    return float(mean), float(np.sqrt(-second))


def test_written_cube_reads_back(disc_bulge, written):
    cube_path, truth_path = written
    assert truth_path.name == "disc_bulge_truth.fits"
    cube = read_cube(cube_path, fwhm=2.65)
    mock = disc_bulge.cube
    assert cube.format == "muse" and cube.grid_shape == (15, 15) and cube.flux.shape == (225, 481)
    np.testing.assert_allclose(cube.wave, disc_bulge.galaxy.wave, atol=1e-6)
    np.testing.assert_allclose(cube.wave[[0, -1]], [4800.0, 5400.0])
    np.testing.assert_allclose(cube.x, mock.x, atol=1e-9)
    np.testing.assert_allclose(cube.y, mock.y, atol=1e-9)
    np.testing.assert_allclose(cube.flux, mock.flux, rtol=1e-6)  # float32 on disk
    pull = (cube.flux - disc_bulge.model) / cube.noise
    assert abs(pull.mean()) < 0.02 and pull.std() == pytest.approx(1.0, abs=0.02)
    truth = read_mock_truth(cube_path)
    np.testing.assert_allclose(truth.velocity, disc_bulge.velocity, atol=1e-9)
    np.testing.assert_allclose(truth.losvd, disc_bulge.losvd, rtol=1e-12)
    np.testing.assert_allclose(truth.mean_v, disc_bulge.mean_v)
    np.testing.assert_allclose(truth.dispersion, disc_bulge.dispersion)
    assert set(truth.maps) == {"disc_sb", "disc_v", "disc_sigma", "bulge_sb", "bulge_v", "bulge_sigma"}
    np.testing.assert_allclose(truth.maps["disc_v"], disc_bulge.maps["disc_v"])
    from astropy.io import fits

    header = fits.getheader(cube_path)
    assert header["MOCKZ"] == 0.0 and header["MOCKFWHM"] == 2.65


def test_snr_follows_surface_brightness(written):
    cube = read_cube(written[0], fwhm=2.65)
    snr = cube.snr().reshape(15, 15)
    assert snr[7, 7] == pytest.approx(50.0, rel=0.1)
    assert snr[7, 7] == snr.max()
    # Declines outward along both axes and to the corners.
    assert np.all(np.diff(snr[7, 7:]) < 0) and np.all(np.diff(snr[7:, 7]) < 0)
    assert snr[0, 0] < 0.2 * snr[7, 7]


def test_counter_rotating_losvd_is_bimodal_on_major_axis(counter):
    mock = counter
    v = mock.velocity
    losvd = mock.truth.image(mock.losvd)  # (15, 15, n_v)
    for ix in (0, 1, 13, 14):  # 3-3.5" along the major axis (row 7)
        pdf = losvd[7, ix]
        peaks = np.flatnonzero((pdf[1:-1] > pdf[:-2]) & (pdf[1:-1] > pdf[2:])) + 1
        assert len(peaks) == 2
        v_comp = abs(mock.maps["primary_v"][7, ix])
        np.testing.assert_allclose(np.sort(v[peaks]), [-v_comp, v_comp], atol=10.0)
        assert pdf[np.argmin(abs(v))] < 0.3 * pdf[peaks].min()
    # Where the two discs are equally bright the mean velocity is near zero.
    ratio = mock.maps["primary_sb"][7] / mock.maps["counter_sb"][7]
    ix = np.argmin(abs(ratio[:7] - 1))
    assert abs(mock.truth.image(mock.mean_v)[7, ix]) < 0.1 * abs(mock.maps["primary_v"][7, ix])
    assert abs(mock.maps["primary_v"][7, ix]) > 100


def test_velocity_field_antisymmetric_about_minor_axis(disc_bulge):
    galaxy = replace(disc_bulge.galaxy, position_angle=0.0, shape=(9, 9))
    flux, v, sigma = spaxel_kinematics(galaxy, *_centres(9, 9, galaxy.pixel_scale))
    v_img = v.reshape(9, 9, -1)
    np.testing.assert_allclose(v_img[::-1, :], -v_img, atol=1e-9)  # PA 0: minor axis along x
    # The made cube's truth map (PA 90: minor axis along y).
    vmap = disc_bulge.truth.image(disc_bulge.mean_v)
    np.testing.assert_allclose(vmap[:, ::-1], -vmap, atol=1e-9)
    np.testing.assert_allclose(disc_bulge.truth.image(disc_bulge.dispersion)[:, ::-1],
                               disc_bulge.truth.image(disc_bulge.dispersion), rtol=1e-9)
    assert np.all(vmap[7, :7] > 0)  # PA 90: the major axis points to -x, which recedes


def _centres(n_y, n_x, scale):
    iy, ix = np.indices((n_y, n_x)).reshape(2, -1)
    return (ix - (n_x - 1) / 2) * scale, (iy - (n_y - 1) / 2) * scale


def test_psf_conserves_flux():
    image = np.zeros((3, 41, 41))
    image[:, 20, 20] = [1.0, 2.0, 3.0]
    out = convolve_psf(image, 4.0)
    np.testing.assert_allclose(out.sum(axis=(1, 2)), [1.0, 2.0, 3.0], rtol=1e-12)
    yy, xx = np.indices((41, 41)) - 20
    var = (out[0] * xx**2).sum()
    assert var == pytest.approx((4.0 / 2.3548) ** 2, rel=0.01)
    # In a cube: blurred centre, same total light in the field (to the light lost at the edges).
    galaxy = rotating_disc_with_bulge(shape=(9, 9))
    sharp = make_mock_cube(galaxy)
    blurred = make_mock_cube(replace(galaxy, psf_fwhm=1.0))
    assert blurred.model.sum() == pytest.approx(sharp.model.sum(), rel=0.03)
    assert blurred.model[40].sum() < 0.8 * sharp.model[40].sum()
    assert blurred.dispersion[40] < sharp.dispersion[40]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(fwhm=2.4), "fwhm"),
        (dict(fwhm=2.6), "finer than E-MILES"),
        (dict(snr=0.0), "snr"),
        (dict(snr=-5.0), "snr"),
        (dict(inclination=95.0), "inclination"),
        (dict(inclination=-1.0), "inclination"),
        (dict(shape=(0, 5)), "shape"),
        (dict(wave_range=(3000.0, 4000.0)), "E-MILES"),
    ],
)
def test_bad_input(kwargs, match):
    with pytest.raises(KinjaxError, match=match):
        rotating_disc_with_bulge(**kwargs)


def test_bad_components():
    with pytest.raises(KinjaxError, match="unique"):
        MockGalaxy(components=(Disc(), Disc()))
    with pytest.raises(KinjaxError, match="sigma0"):
        Disc(sigma0=-1.0)
    with pytest.raises(KinjaxError, match="q0"):
        Bulge(q0=1.5)
    with pytest.raises(KinjaxError, match="components"):
        MockGalaxy(components=())


def test_noise_free_dispersion_with_the_rebinned_lsf():
    """Noise-free Gaussian LOSVDs (σ ≈ 93 km/s, FWHM 2.65 Å on 1.25 Å linear pixels): fitted
    with the nominal FWHM after log-rebinning, σ comes out ~4.4 km/s high (pPXF 8.2.6 gives
    the same on these spectra); with the rebinning boxcar added (``rebin_lsf``) within ~1 km/s
    of the mock truth (the rest is the coarse sampling, 2.1 pixels per FWHM)."""
    from kinjax.cube_fit import fit_cube_spaxels
    from kinjax.templates import load_emiles

    lib = load_emiles()
    near = np.argsort((np.log10(lib.age) - np.log10(3.0)) ** 2 + lib.metal**2)[:4]  # the mock's SSP and 3 more
    lib = lib.select(near)
    disc = Disc(name="disc", r_eff=4.0, v_max=200.0, r_turn=1.0, sigma0=100.0, sigma_out=50.0, sigma_scale=3.0,
                age=3.0, metal=0.0, luminosity=1.0)
    mock = make_mock_cube(MockGalaxy(components=(disc,), snr=1000, shape=(2, 2), seed=1))
    noise_free = replace(mock.cube, flux=np.asarray(mock.model, mock.cube.flux.dtype))
    bias = {}
    for rebin_lsf in (False, True):
        fit = fit_cube_spaxels(noise_free.log_rebin(rebin_lsf=rebin_lsf), lib, moments=2, progress=False,
                               mask_emission=False)
        bias[rebin_lsf] = fit.dispersion - mock.dispersion
    assert np.all(bias[False] > 3.0), bias
    assert np.all(np.abs(bias[True]) < 1.6), bias


def test_counter_rotating_mean_velocity_needs_a_population_per_disc():
    """The mock's truth is the light-weighted LOSVD. Along the major axis of the counter-rotating
    preset (noise-free spectra) one template mix for both discs, Gauss–Hermite, returns a mean
    velocity off by up to ~15 km/s (the 10 Gyr disc's absorption lines are deeper per unit light
    than the 2 Gyr disc's, so its velocity weighs more), whereas two Gaussians with a template mix
    each recover it to ~1 km/s; with two discs of the same age Gauss–Hermite recovers it too."""
    from kinjax.cube_fit import fit_cube_spaxels
    from kinjax.templates import load_emiles

    lib = load_emiles()

    def noise_free(galaxy):
        mock = make_mock_cube(galaxy)
        return replace(mock.cube, flux=np.asarray(mock.model, mock.cube.flux.dtype)).log_rebin(rebin_lsf=True), mock

    def error(cube, mock, losvd):
        fit = fit_cube_spaxels(cube, lib, losvd=losvd, moments=4, progress=False, mask_emission=False)
        return fit.mean_v - mock.mean_v

    two_ages = counter_rotating_discs(snr=1000, shape=(1, 8), seed=0)
    cube, mock = noise_free(two_ages)
    assert np.ptp(mock.mean_v) > 8.0  # the truth varies along the strip
    gh, g2 = error(cube, mock, "gh"), error(cube, mock, "gauss2")
    assert np.abs(gh).max() > 8.0 and gh[0] * gh[-1] < 0, gh  # towards the old disc, on both sides
    assert np.abs(g2).max() < 2.5, g2
    same_age = replace(two_ages, components=tuple(replace(c, age=10.0) for c in two_ages.components))
    cube, mock = noise_free(same_age)
    gh_same = error(cube, mock, "gh")
    assert np.abs(gh_same).max() < 2.5, gh_same
