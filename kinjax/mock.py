"""Mock galaxies and IFU cubes with known truth.

A mock galaxy is a sum of components (`Disc`, `Bulge`), each with a Sérsic surface
brightness, a rotation curve, a dispersion profile and one E-MILES SSP spectrum. On the
sky a component is a thin (or thick) axisymmetric system seen at ``inclination`` with
its major axis at ``position_angle``. In each spaxel the true LOSVD is the
light-weighted `kinjax.losvd.Mixture` of the component LOSVDs, and the spectrum is

    F(λ) = Σ_c w_c [T_c * L_c](λ),

with ``w_c`` the component's flux in the spaxel, ``T_c`` its template (normalised to a
median of 1 over the mock's range) and ``*`` the convolution in velocity, evaluated for
all spaxels at once by the Fourier forward model (`kinjax.forward.make_forward_model`
with one template per kinematic component, vmapped over spaxels).

Wavelengths: the spectra are made on a fine ln λ grid (``oversample`` pixels per
linear pixel) and rebinned flux-conservingly (`log_to_linear`) onto a linear,
MUSE-like grid. The instrumental FWHM of the mock (``MockGalaxy.fwhm``) is that of the
*pixelated* cube, as arc lines in a real cube would measure it: the spectra are made at
``sqrt(fwhm² − 8 ln 2 · step² / 12)`` Å so that, with the linear pixel's boxcar
(variance step²/12) added, the line-spread function has the variance of a Gaussian of
FWHM ``fwhm``. A fit that assumes ``fwhm`` then recovers unbiased dispersions.

Sky coordinates: x grows with the column index, y with the row index, in arcsec from
the field centre (as `kinjax.cube.read_muse` reads them). ``position_angle`` is
measured from +y towards −x (North through East with East to the left); the major axis
unit vector is (−sin PA, cos PA) and the side it points to recedes (V > 0) for a
prograde component.

Truth: everything the cube shows is also returned without noise. With a PSF the truth
is the PSF-convolved one (what the cube contains): each component's light, light ×
mean and light × second moment, and the light-weighted LOSVDs are convolved with the
same PSF as the spectra.

Noise: Gaussian, constant along wavelength in a spaxel, with 1σ
``sqrt(S · S_max) / snr`` where S is the spaxel's median noiseless flux and S_max the
largest S: the S/N per pixel is ``snr · sqrt(S / S_max)`` (photon-noise-like) and
equals ``snr`` at the brightest spaxel (the centre).
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from scipy.special import gamma, gammaincinv

from kinjax.constants import C_KMS
from kinjax.cube import Cube
from kinjax.errors import KinjaxError
from kinjax.forward import make_forward_model
from kinjax.losvd import GaussHermite, Gaussian, velocity_grid
from kinjax.templates import MILES_FWHM, Templates, load_emiles, prepare_templates

__all__ = [
    "Disc",
    "Bulge",
    "MockGalaxy",
    "MockTruth",
    "MockCube",
    "make_mock_cube",
    "read_mock_truth",
    "rotating_disc_with_bulge",
    "counter_rotating_discs",
    "sersic_profile",
    "sky_to_galaxy",
    "apparent_axis_ratio",
    "component_maps",
    "spaxel_kinematics",
    "log_grid",
    "component_templates",
    "log_to_linear",
    "convolve_psf",
    "generating_fwhm",
]

#: E-MILES validity range (Å, rest frame) where its FWHM is 2.51 Å.
EMILES_RANGE = (3540.0, 8950.0)
_FWHM_PER_SIGMA = 2.0 * np.sqrt(2.0 * np.log(2.0))
_NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")
_TRUTH_EXTS = ("PRIMARY", "MEAN_V", "DISPERSION", "LOSVD")


def _positive(value, name, what, *, allow_zero=False):
    value = float(value)
    ok = np.isfinite(value) and (value >= 0 if allow_zero else value > 0)
    if not ok:
        raise KinjaxError(f"{what}: {name} must be finite and {'>= 0' if allow_zero else '> 0'}, got {value}")
    return value


def _check_name(name, what):
    if not _NAME_RE.match(str(name)):
        raise KinjaxError(f"{what}: name {name!r} must start with a letter and use only letters, digits, _")


# --------------------------------------------------------------------- components
@dataclass(frozen=True)
class Disc:
    """A rotating disc.

    Parameters
    ----------
    r_eff : float
        Half-light radius along the major axis (arcsec).
    v_max : float
        Asymptotic circular speed (km/s): v(R) = v_max (2/π) arctan(R / r_turn).
    r_turn : float
        Turn-over radius of the rotation curve (arcsec, in the disc plane).
    sigma0, sigma_out : float
        Dispersion at the centre and far out (km/s):
        σ(R) = sigma_out + (sigma0 − sigma_out) exp(−R / sigma_scale).
    sigma_scale : float
        e-folding radius of the dispersion profile (arcsec).
    counter_rotating : bool
        Rotate the other way (line-of-sight velocities change sign).
    age, metal : float
        Age (Gyr) and [M/H] (dex) of the SSP spectrum (the nearest E-MILES model).
    luminosity : float
        Total flux of the component (its template is normalised to a median of 1).
    sersic_n : float
        Sérsic index of the surface brightness (1 = exponential).
    q0 : float
        Intrinsic axis ratio (thickness), in (0, 1].
    h3, h4 : float
        Gauss–Hermite moments of the component's LOSVD (0, 0 = Gaussian).
    name : str
        Label used in the truth maps ("<name>_sb", "<name>_v", "<name>_sigma").
    """

    r_eff: float = 4.0
    v_max: float = 200.0
    r_turn: float = 1.0
    sigma0: float = 100.0
    sigma_out: float = 50.0
    sigma_scale: float = 3.0
    counter_rotating: bool = False
    age: float = 3.0
    metal: float = 0.0
    luminosity: float = 1.0
    sersic_n: float = 1.0
    q0: float = 0.15
    h3: float = 0.0
    h4: float = 0.0
    name: str = "disc"

    def __post_init__(self):
        for key in ("r_eff", "r_turn", "sigma0", "sigma_out", "sigma_scale", "age", "luminosity", "sersic_n", "q0"):
            _positive(getattr(self, key), key, "Disc")
        _positive(self.v_max, "v_max", "Disc", allow_zero=True)
        if self.q0 > 1:
            raise KinjaxError(f"Disc: q0 must be in (0, 1], got {self.q0}")
        _check_name(self.name, "Disc")

    def rotation(self, radius):
        """Circular speed (km/s) at disc-plane radii ``radius`` (arcsec, any shape)."""
        return self.v_max * (2.0 / np.pi) * np.arctan(np.asarray(radius) / self.r_turn)

    def sigma(self, radius):
        """Dispersion (km/s) at disc-plane radii ``radius`` (arcsec, any shape)."""
        decay = np.exp(-np.asarray(radius) / self.sigma_scale)
        return self.sigma_out + (self.sigma0 - self.sigma_out) * decay

    @property
    def spin(self) -> float:
        """+1 for prograde, −1 for counter-rotating."""
        return -1.0 if self.counter_rotating else 1.0


@dataclass(frozen=True)
class Bulge:
    """A slowly rotating, pressure-supported bulge.

    Parameters
    ----------
    r_eff : float
        Half-light radius along the major axis (arcsec).
    sigma : float
        Central dispersion (km/s); σ(R) = sigma (1 + R / r_eff)^(−sigma_slope).
    sigma_slope : float
        Logarithmic decline of the dispersion (≥ 0).
    v_rot : float
        Rotation amplitude (km/s): v(R) = v_rot (2/π) arctan(R / r_eff).
    age, metal, luminosity, sersic_n, q0, h3, h4, name
        As for `Disc` (defaults: 12 Gyr, [M/H] = 0.22, n = 4, q0 = 0.8).
    """

    r_eff: float = 1.5
    sigma: float = 180.0
    sigma_slope: float = 0.2
    v_rot: float = 30.0
    age: float = 12.0
    metal: float = 0.22
    luminosity: float = 1.0
    sersic_n: float = 4.0
    q0: float = 0.8
    h3: float = 0.0
    h4: float = 0.0
    name: str = "bulge"

    def __post_init__(self):
        for key in ("r_eff", "sigma", "age", "luminosity", "sersic_n", "q0"):
            _positive(getattr(self, key), key, "Bulge")
        _positive(self.sigma_slope, "sigma_slope", "Bulge", allow_zero=True)
        _positive(abs(self.v_rot), "abs(v_rot)", "Bulge", allow_zero=True)
        if self.q0 > 1:
            raise KinjaxError(f"Bulge: q0 must be in (0, 1], got {self.q0}")
        _check_name(self.name, "Bulge")

    def rotation(self, radius):
        """Rotation speed (km/s) at radii ``radius`` (arcsec, any shape)."""
        return self.v_rot * (2.0 / np.pi) * np.arctan(np.asarray(radius) / self.r_eff)

    def sigma_profile(self, radius):
        """Dispersion (km/s) at radii ``radius`` (arcsec, any shape)."""
        return self.sigma * (1.0 + np.asarray(radius) / self.r_eff) ** (-self.sigma_slope)

    spin = 1.0


# ------------------------------------------------------------------------ galaxy
@dataclass(frozen=True)
class MockGalaxy:
    """A mock galaxy and how it is observed.

    Parameters
    ----------
    components : tuple of Disc / Bulge
        At least one; names must be unique.
    inclination : float
        Degrees, in [0, 90] (0 = face-on).
    position_angle : float
        Degrees, of the major axis from +y towards −x (see the module docstring).
    redshift : float
        Systemic redshift; velocities are relative to ``C_KMS * ln(1 + z)``.
    fwhm : float
        Instrumental FWHM of the pixelated cube (Å, observed frame); the spectra need
        ``generating_fwhm(fwhm, wave_step) / (1 + z)`` ≥ 2.51 Å (E-MILES), which for
        1.25 Å pixels at z = 0 means fwhm ≥ 2.65 Å (MUSE's value, the default).
    shape : (n_y, n_x)
        Spaxels.
    pixel_scale : float
        Spaxel size (arcsec).
    snr : float
        S/N per pixel at the brightest spaxel (> 0).
    psf_fwhm : float
        FWHM of the Gaussian spatial PSF (arcsec); 0 = none.
    seed : int
        Seed of the noise (NumPy ``default_rng``).
    wave_range : (float, float)
        First and last linear pixel centre (Å, observed frame).
    wave_step : float
        Linear pixel size (Å).
    """

    components: tuple
    inclination: float = 60.0
    position_angle: float = 90.0
    redshift: float = 0.0
    fwhm: float = 2.65
    shape: tuple = (15, 15)
    pixel_scale: float = 0.5
    snr: float = 50.0
    psf_fwhm: float = 0.0
    seed: int = 0
    wave_range: tuple = (4800.0, 5400.0)
    wave_step: float = 1.25

    def __post_init__(self):
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 (frozen dataclass)
        comps = tuple(self.components) if isinstance(self.components, (list, tuple)) else (self.components,)
        if not comps or not all(isinstance(c, (Disc, Bulge)) for c in comps):
            raise KinjaxError("MockGalaxy: components must be a non-empty sequence of Disc / Bulge")
        names = [c.name.lower() for c in comps]
        if len(set(names)) != len(names):
            raise KinjaxError(f"MockGalaxy: component names must be unique (case-insensitive), got {names}")
        set_("components", comps)
        inc = float(self.inclination)
        if not (np.isfinite(inc) and 0.0 <= inc <= 90.0):
            raise KinjaxError(f"MockGalaxy: inclination must be in [0, 90] degrees, got {self.inclination}")
        if not np.isfinite(float(self.position_angle)):
            raise KinjaxError("MockGalaxy: position_angle must be finite (degrees)")
        z = float(self.redshift)
        if not (np.isfinite(z) and z > -1):
            raise KinjaxError(f"MockGalaxy: redshift must be finite and > -1, got {self.redshift}")
        fwhm = float(self.fwhm)
        if not (np.isfinite(fwhm) and fwhm >= MILES_FWHM):
            raise KinjaxError(f"MockGalaxy: fwhm must be >= {MILES_FWHM} Å (the E-MILES resolution), got {self.fwhm}")
        step = _positive(self.wave_step, "wave_step", "MockGalaxy")
        need = generating_fwhm(fwhm, step)
        if not need / (1 + z) >= MILES_FWHM * (1 - 1e-9):
            lowest = np.sqrt((MILES_FWHM * (1 + z)) ** 2 + _FWHM_PER_SIGMA**2 * step**2 / 12)
            raise KinjaxError(
                f"MockGalaxy: fwhm {fwhm} Å with {step} Å pixels at z = {z} is finer than E-MILES "
                f"(2.51 Å rest frame) once the pixel width is removed; use fwhm >= {lowest:.4f} Å"
            )
        snr = float(self.snr)
        if not (np.isfinite(snr) and snr > 0):
            raise KinjaxError(f"MockGalaxy: snr must be finite and > 0, got {self.snr}")
        shape = tuple(int(n) for n in np.atleast_1d(self.shape))
        if len(shape) != 2 or min(shape) < 1:
            raise KinjaxError(f"MockGalaxy: shape must be (n_y, n_x) with n >= 1, got {self.shape}")
        set_("shape", shape)
        _positive(self.pixel_scale, "pixel_scale", "MockGalaxy")
        _positive(self.psf_fwhm, "psf_fwhm", "MockGalaxy", allow_zero=True)
        lo, hi = (float(w) for w in self.wave_range)
        if not (np.isfinite(lo) and np.isfinite(hi) and hi - lo >= 2 * step):
            raise KinjaxError(f"MockGalaxy: wave_range must be (lo, hi) Å with hi - lo >= 2 wave_step, got {self.wave_range}")
        rest = np.array([lo, hi]) / (1 + z)
        if rest[0] < EMILES_RANGE[0] or rest[1] > EMILES_RANGE[1]:
            raise KinjaxError(
                f"MockGalaxy: rest-frame range {rest[0]:.0f}-{rest[1]:.0f} Å leaves the E-MILES "
                f"range {EMILES_RANGE[0]:.0f}-{EMILES_RANGE[1]:.0f} Å"
            )
        set_("wave_range", (lo, hi))

    @property
    def wave(self) -> np.ndarray:
        """(n_wave,) linear pixel centres (Å, observed frame)."""
        lo, hi = self.wave_range
        n = int(np.floor((hi - lo) / self.wave_step + 1e-9)) + 1
        return lo + self.wave_step * np.arange(n)

    @property
    def names(self) -> tuple[str, ...]:
        """Lower-case component names."""
        return tuple(c.name.lower() for c in self.components)


def generating_fwhm(fwhm, wave_step):
    """FWHM (Å) at which to make spectra so that, after averaging over linear pixels of
    ``wave_step`` Å (a boxcar of variance step²/12), the line-spread function has the
    variance of a Gaussian of FWHM ``fwhm`` Å: sqrt(fwhm² − 8 ln 2 · step² / 12).
    NaN when ``fwhm`` is too small for that pixel size.
    """
    value = fwhm**2 - _FWHM_PER_SIGMA**2 * wave_step**2 / 12.0
    return float(np.sqrt(value)) if value > 0 else float("nan")


# -------------------------------------------------------------------- projection
def sersic_profile(radius, r_eff, n):
    """Sérsic surface brightness with unit total flux for a round system.

    Parameters
    ----------
    radius : array_like
        Radius (arcsec), any shape.
    r_eff : float
        Half-light radius (arcsec).
    n : float
        Sérsic index.

    Returns
    -------
    ndarray, shape of ``radius``
        I(R) = exp(−b_n ((R / r_eff)^(1/n) − 1)) / (2π n r_eff² e^{b_n} Γ(2n) / b_n^{2n})
        in 1/arcsec², with b_n = gammaincinv(2n, 1/2) (exact half light).
    """
    b = gammaincinv(2.0 * n, 0.5)
    total = 2.0 * np.pi * n * r_eff**2 * np.exp(b) * gamma(2.0 * n) / b ** (2.0 * n)
    return np.exp(-b * ((np.asarray(radius) / r_eff) ** (1.0 / n) - 1.0)) / total


def sky_to_galaxy(x, y, position_angle):
    """Rotate sky offsets onto the galaxy's major/minor axes.

    Parameters
    ----------
    x, y : array_like
        Sky offsets (arcsec), same shape.
    position_angle : float
        Degrees, from +y towards −x.

    Returns
    -------
    x_maj, y_min : ndarray
        Coordinates along the major axis (towards (−sin PA, cos PA)) and the minor axis
        (towards (−cos PA, −sin PA)), arcsec.
    """
    pa = np.deg2rad(position_angle)
    x, y = np.asarray(x, float), np.asarray(y, float)
    return -x * np.sin(pa) + y * np.cos(pa), -x * np.cos(pa) - y * np.sin(pa)


def apparent_axis_ratio(inclination, q0):
    """Projected axis ratio sqrt(cos² i + q0² sin² i) of an oblate system (i in degrees)."""
    i = np.deg2rad(inclination)
    return float(np.sqrt(np.cos(i) ** 2 + (q0 * np.sin(i)) ** 2))


def component_maps(component, x, y, inclination, position_angle):
    """Surface brightness and LOSVD parameters of one component at sky positions.

    The disc-plane radius is R = sqrt(x_maj² + (y_min / q)²) with q the apparent axis
    ratio, cos φ = x_maj / R, and the line-of-sight velocity v(R) cos φ sin i (sign
    flipped for a counter-rotating disc).

    Parameters
    ----------
    component : Disc or Bulge
    x, y : ndarray, shape (n,)
        Sky offsets (arcsec).
    inclination, position_angle : float
        Degrees.

    Returns
    -------
    sb : ndarray, shape (n,)
        Surface brightness (component flux per arcsec²; integrates to ``luminosity``).
    v : ndarray, shape (n,)
        Line-of-sight velocity V of the LOSVD (km/s).
    sigma : ndarray, shape (n,)
        σ of the LOSVD (km/s).
    """
    q = apparent_axis_ratio(inclination, component.q0)
    x_maj, y_min = sky_to_galaxy(x, y, position_angle)
    radius = np.hypot(x_maj, y_min / q)
    cos_phi = np.divide(x_maj, radius, out=np.zeros_like(radius), where=radius > 0)
    sb = component.luminosity * sersic_profile(radius, component.r_eff, component.sersic_n) / q
    v = component.spin * component.rotation(radius) * cos_phi * np.sin(np.deg2rad(inclination))
    sigma = component.sigma(radius) if isinstance(component, Disc) else component.sigma_profile(radius)
    return sb, v, sigma


# ------------------------------------------------------------------ wavelengths
def log_grid(galaxy: MockGalaxy, oversample: int = 4):
    """The fine ln λ grid on which the mock spectra are made, as a dummy `Spectrum`.

    Parameters
    ----------
    galaxy : MockGalaxy
    oversample : int
        velscale = C_KMS × wave_step / λ_max / oversample (km/s): ``oversample`` log
        pixels per linear pixel at the red end, more at the blue end.

    Returns
    -------
    Spectrum
        Flux and noise ones, ``velscale`` set, covering the linear pixels' edges with
        one log pixel to spare at each end, ``fwhm = generating_fwhm(...)``, the
        galaxy's redshift.
    """
    from kinjax.spectrum import Spectrum

    if int(oversample) != oversample or oversample < 1:
        raise KinjaxError(f"oversample must be a positive integer, got {oversample}")
    wave = galaxy.wave
    step = galaxy.wave_step
    velscale = C_KMS * step / wave[-1] / int(oversample)
    dln = velscale / C_KMS
    start = np.log(wave[0] - step / 2) - dln
    n = int(np.ceil((np.log(wave[-1] + step / 2) - start) / dln)) + 1
    ln_wave = start + dln * (np.arange(n) + 0.5)
    return Spectrum(np.exp(ln_wave), np.ones(n), np.ones(n), None,
                    generating_fwhm(galaxy.fwhm, step), redshift=galaxy.redshift, velscale=velscale)


@functools.lru_cache(maxsize=1)
def _emiles():
    return load_emiles()


def component_templates(galaxy: MockGalaxy, spectrum, library: Templates | None = None, *, vmax=1500.0):
    """One prepared template per component: the library SSP nearest in (log age, [M/H]).

    Parameters
    ----------
    galaxy : MockGalaxy
    spectrum : Spectrum
        The log grid (`log_grid`).
    library : Templates, optional
        With ``age`` (Gyr) and ``metal``; default `kinjax.templates.load_emiles` (cached).
    vmax : float
        Velocity margin (km/s) passed to `prepare_templates`.

    Returns
    -------
    tuple of Templates
        One single-template set per component, log-sampled at ``spectrum.velscale``
        (velscale_ratio 1), each normalised to a median of 1 (so that weights are
        fluxes of the component over the mock's range).
    """
    library = _emiles() if library is None else library
    if library.age is None or library.metal is None or not np.all(np.isfinite(library.age)):
        raise KinjaxError("component_templates: the library needs ages and metallicities")
    picks = []
    for c in galaxy.components:
        dist = (np.log10(library.age) - np.log10(c.age)) ** 2 + (library.metal - c.metal) ** 2
        picks.append(int(np.argmin(dist)))
    chosen = Templates(wave=library.wave, flux=library.flux[picks], fwhm=library.fwhm,
                       age=library.age[picks], metal=library.metal[picks],
                       names=tuple(library.names[i] for i in picks) if library.names else ())
    prepared = prepare_templates(chosen, spectrum, velscale_ratio=1, vmax=vmax, normalise="each")
    return tuple(
        Templates(wave=prepared.wave, flux=prepared.flux[k], fwhm=prepared.fwhm, velscale=prepared.velscale,
                  age=prepared.age[k:k + 1], metal=prepared.metal[k:k + 1],
                  names=prepared.names[k:k + 1] if prepared.names else ())
        for k in range(len(picks))
    )


def log_to_linear(wave_log, flux, wave):
    """Flux-conserving rebinning from a ln λ grid onto linear pixels.

    The input is a step function (constant flux density in each log pixel, edges at
    ln λ midpoints); each output pixel gets its exact mean, from the piecewise-linear
    cumulative integral: f_j = (F(e_{j+1}) − F(e_j)) / (e_{j+1} − e_j).

    Parameters
    ----------
    wave_log : ndarray, shape (n_log,)
        Log-uniform pixel centres (Å).
    flux : array_like, shape (..., n_log)
        Flux density per Å.
    wave : ndarray, shape (n_wave,)
        Linear pixel centres (Å); their edges must lie inside the log grid's.

    Returns
    -------
    ndarray, shape (..., n_wave)
    """
    ln_w = np.log(np.asarray(wave_log, float))
    dln = ln_w[1] - ln_w[0]
    edges_in = np.exp(np.concatenate([ln_w - dln / 2, ln_w[-1:] + dln / 2]))
    wave = np.asarray(wave, float)
    step = np.diff(wave)
    edges_out = np.concatenate([[wave[0] - step[0] / 2], wave[:-1] + step / 2, [wave[-1] + step[-1] / 2]])
    if edges_out[0] < edges_in[0] or edges_out[-1] > edges_in[-1]:
        raise KinjaxError("log_to_linear: the linear pixels reach beyond the log grid")
    flux = np.asarray(flux)
    cum = np.concatenate([np.zeros(flux.shape[:-1] + (1,)), np.cumsum(flux * np.diff(edges_in), axis=-1)], axis=-1)
    k = np.clip(np.searchsorted(edges_in, edges_out, side="right") - 1, 0, edges_in.size - 2)
    frac = (edges_out - edges_in[k]) / (edges_in[k + 1] - edges_in[k])
    at_edges = cum[..., k] * (1 - frac) + cum[..., k + 1] * frac
    return np.diff(at_edges, axis=-1) / np.diff(edges_out)


def convolve_psf(images, fwhm_pix):
    """Convolve images with a circular Gaussian PSF by FFT (zero padding, no wrap-around).

    Parameters
    ----------
    images : array_like, shape (..., n_y, n_x)
        Images (e.g. one per wavelength), spatial axes last.
    fwhm_pix : float
        PSF FWHM in pixels (0 = return a copy).

    Returns
    -------
    ndarray, shape (..., n_y, n_x)
        The kernel is the Gaussian sampled at pixel centres out to 4σ and normalised to
        unit sum, so the total flux is conserved whenever no light falls off the edges.
    """
    images = np.asarray(images, dtype=float)
    fwhm_pix = _positive(fwhm_pix, "fwhm_pix", "convolve_psf", allow_zero=True)
    if fwhm_pix == 0:
        return images.copy()
    sigma = fwhm_pix / _FWHM_PER_SIGMA
    half = int(np.ceil(4 * sigma))
    k = np.arange(-half, half + 1)
    kernel = np.exp(-0.5 * (k[:, None] ** 2 + k[None, :] ** 2) / sigma**2)
    kernel /= kernel.sum()
    n_y, n_x = images.shape[-2:]
    size = (n_y + 2 * half, n_x + 2 * half)  # linear (not circular) convolution
    product = np.fft.rfft2(images, s=size) * np.fft.rfft2(kernel, s=size)
    full = np.fft.irfft2(product, s=size)
    return full[..., half:half + n_y, half:half + n_x]


# ------------------------------------------------------------------------ truth
@dataclass(frozen=True)
class MockTruth:
    """What the mock cube contains, without noise.

    Parameters
    ----------
    velocity : ndarray, shape (n_v,)
        Velocity grid (km/s, relative to the systemic redshift).
    losvd : ndarray, shape (n_spaxels, n_v)
        True (PSF-convolved) LOSVD of each spaxel on ``velocity`` (1/(km/s)).
    mean_v, dispersion : ndarray, shape (n_spaxels,)
        Mean and standard deviation of each spaxel's LOSVD (km/s), exact (from the
        components' moments), not from the tabulated ``losvd``.
    maps : dict of str to ndarray (n_y, n_x)
        Per component: "<name>_sb" (flux per arcsec²), "<name>_v" and "<name>_sigma"
        (mean and dispersion of the component's LOSVD, km/s).
    grid_shape : (n_y, n_x)
    """

    velocity: np.ndarray
    losvd: np.ndarray
    mean_v: np.ndarray
    dispersion: np.ndarray
    maps: dict = field(default_factory=dict)
    grid_shape: tuple = ()

    def image(self, values) -> np.ndarray:
        """Reshape (n_spaxels, ...) values to (n_y, n_x, ...)."""
        values = np.asarray(values)
        return values.reshape(tuple(self.grid_shape) + values.shape[1:])


@dataclass(frozen=True)
class MockCube:
    """A mock IFU cube with its truth.

    Parameters
    ----------
    cube : Cube
        Linear-λ cube (format "mock"): flux with noise, noise, x/y in arcsec, grid_shape.
    truth : MockTruth
    model : ndarray, shape (n_spaxels, n_wave)
        Noiseless flux.
    galaxy : MockGalaxy
    templates : tuple of Templates
        The prepared template of each component (on the generating log grid).
    """

    cube: Cube
    truth: MockTruth
    model: np.ndarray
    galaxy: MockGalaxy
    templates: tuple = ()

    @property
    def velocity(self):
        """(n_v,) truth velocity grid (km/s)."""
        return self.truth.velocity

    @property
    def losvd(self):
        """(n_spaxels, n_v) true LOSVDs."""
        return self.truth.losvd

    @property
    def mean_v(self):
        """(n_spaxels,) true mean velocity (km/s)."""
        return self.truth.mean_v

    @property
    def dispersion(self):
        """(n_spaxels,) true velocity dispersion (km/s)."""
        return self.truth.dispersion

    @property
    def maps(self):
        """Per-component truth maps, (n_y, n_x) each."""
        return self.truth.maps

    def write(self, path):
        """Write a MUSE-layout cube and its truth beside it.

        Parameters
        ----------
        path : str or Path
            The cube file; the truth goes to ``<stem>_truth.fits`` in the same folder.

        Returns
        -------
        (Path, Path)
            The cube and truth files. The cube has DATA and STAT (variance) float32
            images (n_λ, n_y, n_x) with CRVAL3/CD3_3/CRPIX3 in Å, CTYPE3 'AWAV', and
            spatial CD1_1/CD2_2 in degrees; the primary header carries MOCKZ (redshift)
            and MOCKFWHM (Å). Read it with ``read_cube(path, fwhm=MOCKFWHM)``.
        """
        from astropy.io import fits

        path = Path(path)
        g, cube = self.galaxy, self.cube
        n_y, n_x = cube.grid_shape
        to_fits = lambda a: np.ascontiguousarray(a.reshape(n_y, n_x, -1).transpose(2, 0, 1))  # noqa: E731
        primary = fits.PrimaryHDU()
        primary.header["OBJECT"] = (cube.name, "kinjax mock")
        primary.header["MOCKZ"] = (g.redshift, "systemic redshift")
        primary.header["MOCKFWHM"] = (g.fwhm, "instrumental FWHM (Angstrom)")
        primary.header["MOCKSNR"] = (g.snr, "S/N per pixel at the brightest spaxel")
        primary.header["MOCKSEED"] = (g.seed, "noise seed")
        hdr = fits.Header()
        hdr["CTYPE1"], hdr["CTYPE2"] = "RA---TAN", "DEC--TAN"
        hdr["CUNIT1"], hdr["CUNIT2"] = "deg", "deg"
        hdr["CRPIX1"], hdr["CRPIX2"] = (n_x + 1) / 2.0, (n_y + 1) / 2.0
        hdr["CRVAL1"], hdr["CRVAL2"] = 0.0, 0.0
        hdr["CD1_1"], hdr["CD2_2"] = -g.pixel_scale / 3600.0, g.pixel_scale / 3600.0
        hdr["CD1_2"], hdr["CD2_1"] = 0.0, 0.0
        hdr["CTYPE3"], hdr["CUNIT3"] = "AWAV", "Angstrom"
        hdr["CRVAL3"], hdr["CRPIX3"], hdr["CD3_3"] = float(cube.wave[0]), 1.0, float(g.wave_step)
        data = fits.ImageHDU(to_fits(cube.flux).astype(np.float32), header=hdr.copy(), name="DATA")
        hdr["BUNIT"] = "(flux)**2"
        stat = fits.ImageHDU(to_fits(cube.noise**2).astype(np.float32), header=hdr, name="STAT")
        fits.HDUList([primary, data, stat]).writeto(path, overwrite=True)

        truth_path = path.with_name(path.stem + "_truth.fits")
        t = self.truth
        thdr = fits.PrimaryHDU()
        thdr.header["MOCKZ"] = g.redshift
        thdr.header["MOCKFWHM"] = g.fwhm
        thdr.header["NCOMP"] = len(g.components)
        for i, name in enumerate(g.names):
            thdr.header[f"COMP{i + 1}"] = name
        vhdr = fits.Header()
        vhdr["CTYPE3"], vhdr["CUNIT3"] = "VELO", "km/s"
        vhdr["CRVAL3"], vhdr["CRPIX3"] = float(t.velocity[0]), 1.0
        vhdr["CDELT3"] = float(t.velocity[1] - t.velocity[0])
        hdus = [thdr,
                fits.ImageHDU(t.image(t.mean_v), name="MEAN_V"),
                fits.ImageHDU(t.image(t.dispersion), name="DISPERSION"),
                fits.ImageHDU(to_fits(t.losvd), header=vhdr, name="LOSVD")]
        hdus += [fits.ImageHDU(np.asarray(m), name=k.upper()) for k, m in t.maps.items()]
        fits.HDUList(hdus).writeto(truth_path, overwrite=True)
        return path, truth_path


def read_mock_truth(path) -> MockTruth:
    """Read the truth written by `MockCube.write`.

    Parameters
    ----------
    path : str or Path
        The cube file (its ``<stem>_truth.fits`` is read) or the truth file itself.

    Returns
    -------
    MockTruth
    """
    from astropy.io import fits

    path = Path(path)
    if not path.stem.endswith("_truth"):
        path = path.with_name(path.stem + "_truth.fits")
    if not path.exists():
        raise KinjaxError(f"{path}: no mock truth file (write it with MockCube.write)")
    with fits.open(path) as hdul:
        missing = [e for e in _TRUTH_EXTS[1:] if e not in hdul]
        if missing:
            raise KinjaxError(f"{path}: not a kinjax mock truth file: missing {', '.join(missing)}")
        mean_v = np.asarray(hdul["MEAN_V"].data, dtype=float)
        grid_shape = mean_v.shape
        cube = np.asarray(hdul["LOSVD"].data, dtype=float)
        h = hdul["LOSVD"].header
        velocity = h["CRVAL3"] + (np.arange(cube.shape[0]) + 1 - h.get("CRPIX3", 1.0)) * h["CDELT3"]
        maps = {hdu.name.lower(): np.asarray(hdu.data, dtype=float)
                for hdu in hdul if hdu.name not in _TRUTH_EXTS}
        return MockTruth(
            velocity=velocity,
            losvd=cube.reshape(cube.shape[0], -1).T.copy(),
            mean_v=mean_v.reshape(-1),
            dispersion=np.asarray(hdul["DISPERSION"].data, dtype=float).reshape(-1),
            maps=maps,
            grid_shape=tuple(grid_shape),
        )


# ----------------------------------------------------------------------- making
def _component_losvd(component, v, sigma):
    if component.h3 == 0 and component.h4 == 0:
        return Gaussian(v, sigma)
    return GaussHermite(v, sigma, jnp.array([component.h3, component.h4], dtype=jnp.result_type(sigma)))


def spaxel_kinematics(galaxy: MockGalaxy, x, y, subsample: int = 8):
    """Flux and Gaussian LOSVD parameters of each component in square spaxels.

    Every spaxel is split into ``subsample × subsample`` sub-pixels where
    `component_maps` is evaluated (an even ``subsample`` keeps sub-pixel centres off a
    cusp at the centre). The component's flux is the sum over sub-pixels, and its V and
    σ in the spaxel are the light-weighted moments over the sub-pixels:
    V = Σ I v / Σ I, σ² = Σ I (σ_i² + v_i²) / Σ I − V², so the spaxel's component
    LOSVD is the Gaussian (or Gauss–Hermite) with that mean and width.

    Parameters
    ----------
    galaxy : MockGalaxy
    x, y : ndarray, shape (n,)
        Spaxel centres (arcsec).
    subsample : int
        Sub-pixels per side.

    Returns
    -------
    flux, v, sigma : ndarray, shape (n, n_comp)
        Component flux in the spaxel (``luminosity`` units), V and σ (km/s).
    """
    if int(subsample) != subsample or subsample < 1:
        raise KinjaxError(f"subsample must be a positive integer, got {subsample}")
    s = int(subsample)
    offsets = ((np.arange(s) + 0.5) / s - 0.5) * galaxy.pixel_scale
    ox, oy = (a.reshape(-1) for a in np.meshgrid(offsets, offsets))
    xs = np.asarray(x, float)[:, None] + ox[None, :]
    ys = np.asarray(y, float)[:, None] + oy[None, :]
    out = []
    for c in galaxy.components:
        sb, v, sigma = component_maps(c, xs, ys, galaxy.inclination, galaxy.position_angle)
        light = sb.sum(axis=1)
        mean = (sb * v).sum(axis=1) / light
        second = (sb * (sigma**2 + v**2)).sum(axis=1) / light
        out.append((light * galaxy.pixel_scale**2 / s**2, mean, np.sqrt(np.clip(second - mean**2, 0, None))))
    return tuple(np.stack(q, axis=1) for q in zip(*out))


@jax.jit
def _pdf(losvd, v):
    return losvd.pdf(v)


def _standard_moments(component):
    """(mean, dispersion) of the component's LOSVD shape at V = 0, σ = 1 (quadrature).

    The Gauss–Hermite density is a Gaussian times a polynomial: the trapezoid rule on
    [-12, 12] with step 1e-3 is exact to round-off.
    """
    if component.h3 == 0 and component.h4 == 0:
        return 0.0, 1.0
    y = np.linspace(-12.0, 12.0, 24001)
    pdf = np.asarray(_pdf(_component_losvd(component, 0.0, 1.0), jnp.asarray(y)), dtype=float)
    norm = np.trapezoid(pdf, y)
    mean = np.trapezoid(pdf * y, y) / norm
    return mean, float(np.sqrt(np.trapezoid(pdf * (y - mean) ** 2, y) / norm))


def make_mock_cube(galaxy: MockGalaxy, *, library: Templates | None = None, oversample: int = 4,
                   subsample: int = 8, vmax: float = 1500.0, dv: float = 5.0,
                   losvd_vmax: float | None = None) -> MockCube:
    """Make a mock IFU cube and its truth.

    Parameters
    ----------
    galaxy : MockGalaxy
    library : Templates, optional
        SSP library with ages and metallicities (default E-MILES).
    oversample : int
        Log pixels per linear pixel (see `log_grid`).
    subsample : int
        Sub-pixels per spaxel side for the light and kinematics (`spaxel_kinematics`).
    vmax : float
        Velocity margin (km/s) of the templates and the forward model; every LOSVD
        must lie inside ±vmax (mean ± 6 dispersions).
    dv, losvd_vmax : float
        Step and half-width (km/s) of the truth velocity grid; the default half-width
        is max(abs(V) + 6σ) over components and spaxels, rounded up to 100 km/s.

    Returns
    -------
    MockCube
        Noisy cube, noiseless model, truth. All spaxels are computed at once
        (vmap over spaxels of the forward model).
    """
    if not isinstance(galaxy, MockGalaxy):
        raise KinjaxError("make_mock_cube needs a MockGalaxy")
    comps = galaxy.components
    n_y, n_x = galaxy.shape
    margin = int(np.ceil(2 * galaxy.psf_fwhm / galaxy.pixel_scale)) if galaxy.psf_fwhm > 0 else 0
    ny_e, nx_e = n_y + 2 * margin, n_x + 2 * margin
    iy, ix = np.indices((ny_e, nx_e)).reshape(2, -1)
    x = (ix - (nx_e - 1) / 2.0) * galaxy.pixel_scale
    y = (iy - (ny_e - 1) / 2.0) * galaxy.pixel_scale
    area = galaxy.pixel_scale**2

    weights, vel, sig = spaxel_kinematics(galaxy, x, y, subsample)  # (n_e, n_comp) each
    reach = np.max(np.abs(vel) + 6 * sig)
    if reach > vmax:
        raise KinjaxError(f"make_mock_cube: LOSVDs reach {reach:.0f} km/s beyond vmax = {vmax:g} km/s; raise vmax")

    spectrum = log_grid(galaxy, oversample)
    templates = component_templates(galaxy, spectrum, library, vmax=vmax)
    model = make_forward_model(list(templates), spectrum, degree=-1, vmax=vmax)
    dtype = model.omega.dtype
    if losvd_vmax is None:
        losvd_vmax = 100.0 * np.ceil(reach / 100.0)
    velocity = velocity_grid(losvd_vmax, dv)

    def one(v_c, s_c, w_c):
        losvds = [_component_losvd(c, v_c[k], s_c[k]) for k, c in enumerate(comps)]
        pdfs = jnp.stack([lv.pdf(jnp.asarray(velocity, dtype)) for lv in losvds])
        return model(losvds, w_c), pdfs

    as_j = lambda a: jnp.asarray(a, dtype)  # noqa: E731
    flux_log, pdfs = (np.asarray(a, dtype=float) for a in
                      jax.jit(jax.vmap(one))(as_j(vel), as_j(sig), as_j(weights)))
    # Component moments: mean = V + σ a and dispersion = σ b, with (a, b) those of the
    # standardised LOSVD (V = 0, σ = 1), fixed per component since h3, h4 are.
    shape = np.array([_standard_moments(c) for c in comps])
    means, disps = vel + sig * shape[:, 0], sig * shape[:, 1]
    wave = galaxy.wave
    flux = log_to_linear(spectrum.wave, flux_log, wave)  # (n_e, n_wave)

    # Light-weighted quantities, PSF-convolved and cropped to the field (as images).
    fwhm_pix = galaxy.psf_fwhm / galaxy.pixel_scale
    crop = (slice(margin, margin + n_y), slice(margin, margin + n_x))

    def observe(a):  # (n_e, ...) -> (n_y * n_x, ...)
        img = np.moveaxis(a.reshape((ny_e, nx_e) + a.shape[1:]), (0, 1), (-2, -1))
        img = convolve_psf(img, fwhm_pix)[(...,) + crop]
        return np.moveaxis(img, (-2, -1), (0, 1)).reshape((n_y * n_x,) + a.shape[1:])

    flux = observe(flux)
    light = observe(weights)  # (n, n_comp)
    first = observe(weights * means)
    second = observe(weights * (disps**2 + means**2))
    weighted_pdf = observe(weights[:, :, None] * pdfs).sum(axis=1)
    total = light.sum(axis=1)
    mean_v = first.sum(axis=1) / total
    dispersion = np.sqrt(np.clip(second.sum(axis=1) / total - mean_v**2, 0, None))
    maps = {}
    for k, name in enumerate(galaxy.names):
        v_c = first[:, k] / light[:, k]
        maps[f"{name}_sb"] = (light[:, k] / area).reshape(n_y, n_x)
        maps[f"{name}_v"] = v_c.reshape(n_y, n_x)
        maps[f"{name}_sigma"] = np.sqrt(np.clip(second[:, k] / light[:, k] - v_c**2, 0, None)).reshape(n_y, n_x)
    truth = MockTruth(velocity=velocity, losvd=weighted_pdf / total[:, None], mean_v=mean_v,
                      dispersion=dispersion, maps=maps, grid_shape=(n_y, n_x))

    # Photon-noise-like S/N: snr at the brightest spaxel, ∝ sqrt(signal) elsewhere.
    signal = np.median(flux, axis=1)
    sigma_noise = np.sqrt(signal * signal.max()) / galaxy.snr
    rng = np.random.default_rng(galaxy.seed)
    noisy = flux + sigma_noise[:, None] * rng.standard_normal(flux.shape)
    gx, gy, grid_index = _cube_positions(n_y, n_x, galaxy.pixel_scale)
    cube = Cube(wave, noisy, np.broadcast_to(sigma_noise[:, None], flux.shape), None, gx, gy, galaxy.fwhm,
                redshift=galaxy.redshift, grid_shape=(n_y, n_x), grid_index=grid_index, format="mock",
                name="mock")
    return MockCube(cube=cube, truth=truth, model=flux, galaxy=galaxy, templates=templates)


def _cube_positions(n_y, n_x, scale):
    """x, y (arcsec) and (iy, ix) of spaxel k = iy * n_x + ix, as `kinjax.cube.read_muse`."""
    iy, ix = np.indices((n_y, n_x)).reshape(2, -1)
    return (ix - (n_x - 1) / 2.0) * scale, (iy - (n_y - 1) / 2.0) * scale, np.stack([iy, ix], axis=1)


# ----------------------------------------------------------------------- presets
def rotating_disc_with_bulge(snr=50.0, shape=(15, 15), seed=0, **kwargs) -> MockGalaxy:
    """A young (3 Gyr) rotating disc (v_max 200 km/s) with an old (12 Gyr) bulge.

    Disc: exponential, r_eff 4", 70 % of the light, σ 100 → 50 km/s; bulge: n = 4,
    r_eff 1.2", 30 % of the light, σ 180 km/s, v_rot 30 km/s. Inclination 60°, major
    axis along x (PA 90°), 0.5" spaxels. ``kwargs`` override other `MockGalaxy` fields.
    """
    comps = (
        Disc(name="disc", r_eff=4.0, v_max=200.0, r_turn=1.0, sigma0=100.0, sigma_out=50.0,
             sigma_scale=3.0, age=3.0, metal=0.0, luminosity=0.7),
        Bulge(name="bulge", r_eff=1.2, sigma=180.0, sigma_slope=0.2, v_rot=30.0, age=12.0,
              metal=0.22, luminosity=0.3),
    )
    return MockGalaxy(components=comps, snr=snr, shape=shape, seed=seed,
                      **{"inclination": 60.0, "position_angle": 90.0, **kwargs})


def counter_rotating_discs(snr=50.0, shape=(15, 15), seed=0, **kwargs) -> MockGalaxy:
    """Two counter-rotating discs of different ages, like NGC 4550.

    An old (10 Gyr) prograde disc with r_eff 4" and 55 % of the light and a young
    (2 Gyr) counter-rotating disc with r_eff 3" and 45 %, both with v_max 150 km/s and
    σ 60 → 40 km/s. Near the centre the young disc dominates and further out the old
    one: the mean velocity changes sign where their surface brightnesses cross (about
    2.7" along the major axis), and along the major axis the LOSVD has two peaks at ±V. Inclination 75°, major axis along x (PA 90°), 0.5" spaxels.
    """
    common = dict(v_max=150.0, r_turn=1.0, sigma0=60.0, sigma_out=40.0, sigma_scale=3.0)
    comps = (
        Disc(name="primary", r_eff=4.0, age=10.0, metal=0.0, luminosity=0.55, **common),
        Disc(name="counter", r_eff=3.0, age=2.0, metal=0.0, luminosity=0.45, counter_rotating=True, **common),
    )
    return MockGalaxy(components=comps, snr=snr, shape=shape, seed=seed,
                      **{"inclination": 75.0, "position_angle": 90.0, **kwargs})
