"""The ``Templates`` container, template loaders, preparation for a fit and PCA.

Loaders read E-MILES / MILES FITS files (one SSP per file, linear λ) and pPXF ≥ 9
``.npz`` SSP grids. ``prepare_templates`` turns a library into what the forward
model needs for one galaxy spectrum: cut to the galaxy's rest-frame range plus a
velocity margin, convolved to the galaxy's instrumental resolution, log-rebinned
at a fraction of the galaxy's velscale on a grid aligned with the galaxy's, and
normalised.
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kinjax.constants import C_KMS
from kinjax.errors import KinjaxError
from kinjax.rebin import log_rebin, pixel_edges
from kinjax.spectrum import _check_fwhm, _check_log_sampling, _check_wave, _readonly

__all__ = [
    "Templates",
    "load_emiles",
    "load_templates",
    "prepare_templates",
    "pca_templates",
    "parse_miles_name",
    "gaussian_smooth",
    "MILES_FWHM",
    "emiles_fwhm",
]

#: Instrumental FWHM (Å) of MILES / E-MILES SSPs (valid 3540–8950 Å for E-MILES).
MILES_FWHM = 2.51
_FWHM_TO_SIGMA = 1.0 / (2.0 * np.sqrt(2.0 * np.log(2.0)))  # 1 / 2.3548
_MILES_RE = re.compile(r"Z([mp])(\d+(?:\.\d+)?)T(\d+(?:\.\d+)?)")
_EMILES_GLOB = "Eun1.30Z*T*_iPp0.00_baseFe_linear_FWHM_variable.fits"
#: E-MILES's pieces (Vazdekis et al. 2016): FWHM 3.0 Å from NGSL below 3540.5 Å, MILES's
#: 2.51 Å up to 8950 Å, IRTF's sigma = 60 km/s above (the files' headers: "2.51 - 23.57 Å").
_EMILES_UV = (3540.5, 3.0)
_EMILES_IR = (8950.0, 60.0)


def emiles_fwhm(wave):
    """E-MILES's instrumental FWHM (Å) at rest wavelengths ``wave`` (Å).

    3.0 Å below 3540.5 Å, 2.51 Å in 3540.5–8950 Å, and a constant σ = 60 km/s
    (FWHM = 2.3548 × 60 / c × λ, 4.2 Å at 8950 Å, 23.6 Å at 50000 Å) above.
    """
    wave = np.asarray(wave, dtype=np.float64)
    ir = wave * _EMILES_IR[1] / C_KMS / _FWHM_TO_SIGMA
    return np.where(wave < _EMILES_UV[0], _EMILES_UV[1], np.where(wave > _EMILES_IR[0], ir, MILES_FWHM))


@dataclass(frozen=True)
class Templates:
    """A set of template spectra on a common wavelength grid.

    Parameters
    ----------
    wave : ndarray, shape (n_pix,)
        Rest-frame pixel-centre wavelengths in Å, strictly increasing.
    flux : ndarray, shape (n_templates, n_pix)
        Template spectra (a 1D array is taken as one template).
    fwhm : float or ndarray, shape (n_pix,)
        Instrumental FWHM in Å.
    velscale : float or None
        km/s per pixel when ln(wave) is uniform, else None.
    age : ndarray, shape (n_templates,), optional
        Age in Gyr (NaN where unknown).
    metal : ndarray, shape (n_templates,), optional
        Metallicity [M/H] in dex (NaN where unknown).
    names : tuple of str
        One label per template, or empty.
    variance_kept : float or None
        Fraction of Σ flux² kept by ``pca_templates``.
    """

    wave: np.ndarray
    flux: np.ndarray
    fwhm: float | np.ndarray
    velscale: float | None = None
    age: np.ndarray | None = None
    metal: np.ndarray | None = None
    names: tuple[str, ...] = ()
    variance_kept: float | None = None

    def __post_init__(self):
        wave = np.array(self.wave, dtype=np.float64)
        _check_wave(wave, "Templates")
        flux = np.array(self.flux, dtype=np.float64)
        if flux.ndim == 1:
            flux = flux[None, :]
        if flux.ndim != 2 or flux.shape[1] != wave.size or flux.shape[0] < 1:
            raise KinjaxError(
                f"Templates flux must have shape (n_templates, {wave.size}), got {flux.shape}"
            )
        if not np.all(np.isfinite(flux)):
            raise KinjaxError(
                f"Templates flux has {np.sum(~np.isfinite(flux))} non-finite values; "
                "cut or repair the templates"
            )
        n_t = flux.shape[0]
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 (frozen dataclass)
        for key in ("age", "metal"):
            value = getattr(self, key)
            if value is not None:
                value = np.array(value, dtype=np.float64).reshape(-1)
                if value.shape != (n_t,):
                    raise KinjaxError(f"Templates {key} must have shape ({n_t},), got {value.shape}")
                set_(key, _readonly(value))
        names = tuple(str(s) for s in self.names)
        if names and len(names) != n_t:
            raise KinjaxError(f"Templates names has {len(names)} entries for {n_t} templates")
        velscale = None
        if self.velscale is not None:
            velscale = _check_log_sampling(wave, self.velscale, "Templates")
        set_("wave", _readonly(wave))
        set_("flux", _readonly(flux))
        set_("fwhm", _check_fwhm(self.fwhm, wave.size, "Templates"))
        set_("velscale", velscale)
        set_("names", names)
        if self.variance_kept is not None:
            set_("variance_kept", float(self.variance_kept))

    def select(self, index) -> "Templates":
        """The templates ``index`` (integer indices or a boolean mask over the templates),
        with their ages, metallicities and names."""
        index = np.arange(self.n_templates)[np.asarray(index)]
        pick = lambda v: None if v is None else v[index]  # noqa: E731
        names = tuple(self.names[i] for i in index) if self.names else ()
        return dataclasses.replace(self, flux=self.flux[index], age=pick(self.age), metal=pick(self.metal),
                                   names=names)

    @property
    def ln_wave(self) -> np.ndarray:
        """(n_pix,) natural log of the pixel-centre wavelengths (Å)."""
        return np.log(self.wave)

    @property
    def n_templates(self) -> int:
        """Number of templates."""
        return self.flux.shape[0]

    @property
    def n_pix(self) -> int:
        """Number of pixels per template."""
        return self.wave.size

    @property
    def is_log(self) -> bool:
        """True if log-sampled (``velscale`` set)."""
        return self.velscale is not None


# -- loaders ---------------------------------------------------------------------


def parse_miles_name(name):
    """Age (Gyr) and [M/H] (dex) from a MILES-style file name.

    ``...Zm1.71T00.0631...`` → (0.0631, -1.71); ``Zp0.22`` → +0.22. Names that do
    not match give (nan, nan).
    """
    match = _MILES_RE.search(Path(name).name)
    if match is None:
        return np.nan, np.nan
    sign = -1.0 if match.group(1) == "m" else 1.0
    return float(match.group(3)), sign * float(match.group(2))


def _read_fits_templates(files, fwhm):
    """Read one-spectrum-per-file FITS templates sharing one λ axis (linear or logarithmic, see ``kinjax.spectrum._wave_axis``)."""
    from astropy.io import fits  # lazy import

    from kinjax.spectrum import _wave_axis

    wave, spectra, header_fwhm = None, [], None
    for f in files:
        with fits.open(f) as hdul:
            data = np.asarray(hdul[0].data, dtype=np.float64).squeeze()
            if data.ndim != 1:
                raise KinjaxError(f"{f} is not a 1D template spectrum (shape {data.shape})")
            w, _ = _wave_axis(hdul[0].header, data.size, f)
            header_fwhm = hdul[0].header.get("FWHM", header_fwhm)
        if wave is None:
            wave = w
        elif w.shape != wave.shape or not np.allclose(w, wave, rtol=0, atol=1e-6):
            raise KinjaxError(f"{f} has a different wavelength axis from {files[0]}; resample it")
        spectra.append(data)
    ages, metals = np.array([parse_miles_name(f) for f in files]).T
    if fwhm is None:
        if header_fwhm is not None:
            fwhm = float(header_fwhm)
        elif np.all(np.isfinite(ages)):
            fwhm = MILES_FWHM
        else:
            raise KinjaxError("the templates' resolution is unknown; pass fwhm=... (Å, FWHM)")
    order = np.lexsort((np.array([Path(f).name for f in files]), ages, metals))
    return Templates(
        wave=wave, flux=np.array(spectra)[order], fwhm=fwhm, age=ages[order],
        metal=metals[order], names=tuple(Path(files[i]).stem for i in order),
    )


def load_emiles(directory=None) -> Templates:
    """The 150 E-MILES SSPs (Salpeter-like IMF 1.30, baseFe) shipped in ppxf 8.2.6.

    Parameters
    ----------
    directory : str or Path, optional
        Folder with the ``Eun1.30Z*T*_iPp0.00_baseFe_linear_FWHM_variable.fits``
        files; default the installed ppxf package's ``miles_models``.

    Returns
    -------
    Templates
        150 templates (6 metallicities × 25 ages) sorted by (metal, age); linear
        λ from 1680.2 Å in 0.9 Å steps (53689 pixels), ``fwhm`` per pixel from
        :func:`emiles_fwhm` (2.51 Å in 3540.5–8950 Å, coarser outside), age in
        Gyr, metal [M/H].
    """
    if directory is None:
        from kinjax.datasets import emiles_directory

        directory = emiles_directory()
    files = sorted(str(f) for f in Path(directory).glob(_EMILES_GLOB))
    if not files:
        raise KinjaxError(
            f"no E-MILES files ({_EMILES_GLOB}) in {directory}; "
            "`pip install ppxf==8.2.6` or pass directory="
        )
    library = _read_fits_templates(files, MILES_FWHM)
    return dataclasses.replace(library, fwhm=emiles_fwhm(library.wave))


def _load_npz(path) -> Templates:
    """A pPXF ≥ 9 SSP grid: templates (n_pix, n_ages, n_metals[, n_alpha]), lam, fwhm, ages, metals."""
    with np.load(path) as data:
        missing = {"templates", "lam", "fwhm"} - set(data.files)
        if missing:
            raise KinjaxError(f"{path} lacks the keys {sorted(missing)} of a pPXF SSP .npz file")
        spectra = np.asarray(data["templates"], dtype=np.float64)
        lam = np.asarray(data["lam"], dtype=np.float64).reshape(-1)
        fwhm = np.asarray(data["fwhm"], dtype=np.float64)
        keys = {k: data[k] for k in ("ages", "metals", "alphas", "alpha") if k in data.files}
    if spectra.ndim not in (3, 4) or spectra.shape[0] != lam.size:
        raise KinjaxError(
            f"{path}: templates must be (n_pix, n_ages, n_metals[, n_alpha]) with n_pix = "
            f"len(lam) = {lam.size}, got {spectra.shape}"
        )
    has_alpha = spectra.ndim == 4
    grid = spectra.shape[1:] + (() if has_alpha else (1,))

    def axis(key, n):
        value = keys.get(key)
        if value is None:
            return np.full(n, np.nan)
        value = np.asarray(value, dtype=np.float64).reshape(-1)
        if value.size != n:
            raise KinjaxError(f"{path}: {key} has {value.size} values for {n} grid points")
        return value

    ages, metals = axis("ages", grid[0]), axis("metals", grid[1])
    alphas = axis("alphas" if "alphas" in keys else "alpha", grid[2]) if has_alpha else np.full(1, np.nan)
    # Template order: age fastest, then metal, then alpha (sorted like load_emiles).
    flux = spectra.reshape(lam.size, *grid).transpose(3, 2, 1, 0).reshape(-1, lam.size)
    age_g, metal_g, alpha_g = (
        g.transpose(2, 1, 0).reshape(-1)
        for g in np.meshgrid(ages, metals, alphas, indexing="ij")
    )
    names = tuple(
        f"age{a:.4g}_metal{m:+.2f}" + (f"_alpha{al:+.2f}" if has_alpha else "")
        for a, m, al in zip(age_g, metal_g, alpha_g)
    )
    if fwhm.size == 1 or np.all(fwhm == fwhm.flat[0]):
        fwhm = float(fwhm.flat[0])
    return Templates(wave=lam, flux=flux, fwhm=fwhm, age=age_g, metal=metal_g, names=names)


def load_templates(path, *, fwhm=None) -> Templates:
    """Load a template library from a folder of FITS files or a pPXF ``.npz`` grid.

    Parameters
    ----------
    path : str or Path
        A directory of one-spectrum FITS files with a linear or log λ axis (MILES
        naming ``...Z[mp]<metal>T<age>...`` gives ages and metallicities, other
        names give NaN), or a pPXF ≥ 9 ``.npz`` file with ``templates`` (n_pix,
        n_ages, n_metals[, n_alpha]), ``lam``, ``fwhm``, ``ages`` (Gyr), ``metals``.
    fwhm : float or ndarray, optional
        Template FWHM in Å for FITS folders; default the header keyword FWHM, or
        2.51 Å if every file name is MILES-like.

    Returns
    -------
    Templates
    """
    path = Path(path)
    if path.suffix == ".npz" and path.is_file():
        return _load_npz(path)
    if path.is_dir():
        files = sorted(str(f) for f in path.iterdir() if f.suffix.lower() in (".fits", ".fit"))
        if not files:
            raise KinjaxError(f"{path} contains no .fits templates")
        return _read_fits_templates(files, fwhm)
    raise KinjaxError(f"{path} is neither a folder of FITS templates nor a .npz file")


# -- preparation -----------------------------------------------------------------


def gaussian_smooth(flux, sigma_pix):
    """Convolve spectra with a Gaussian whose width may change from pixel to pixel.

    Parameters
    ----------
    flux : ndarray, shape (..., n)
        Spectra, wavelength axis last.
    sigma_pix : float or ndarray, shape (n,)
        Gaussian σ in pixels at each output pixel (0 = no smoothing there).

    Returns
    -------
    ndarray, shape (..., n)
        ``out[i] = Σ_k w_ik flux[i + k]`` with ``w_ik ∝ exp(-k² / 2σ_i²)``,
        abs(k) ≤ ceil(4 max σ), normalised to Σ_k w_ik = 1; edges are padded with
        the end values.
    """
    flux = np.asarray(flux, dtype=np.float64)
    n = flux.shape[-1]
    sigma = np.broadcast_to(np.asarray(sigma_pix, dtype=np.float64), (n,))
    if np.any(sigma < 0) or not np.all(np.isfinite(sigma)):
        raise KinjaxError("sigma_pix must be finite and >= 0")
    half = int(np.ceil(4 * sigma.max()))
    if half == 0:
        return flux.copy()
    k = np.arange(-half, half + 1)
    safe = np.where(sigma > 0, sigma, 1.0)
    w = np.exp(-0.5 * (k / safe[:, None]) ** 2)
    w = np.where(sigma[:, None] > 0, w, (k == 0).astype(np.float64))
    w /= w.sum(axis=1, keepdims=True)
    pad = [(0, 0)] * (flux.ndim - 1) + [(half, half)]
    windows = np.lib.stride_tricks.sliding_window_view(np.pad(flux, pad, mode="edge"), 2 * half + 1, axis=-1)
    return np.einsum("...nk,nk->...n", windows, w)


def _rest_fwhm(spectrum, wave_rest):
    """Galaxy instrumental FWHM in the rest frame (Å) at rest wavelengths ``wave_rest``."""
    z1 = 1.0 + spectrum.redshift
    if np.ndim(spectrum.fwhm) == 0:
        return spectrum.fwhm / z1
    return np.interp(wave_rest, spectrum.wave / z1, spectrum.fwhm / z1)


def prepare_templates(templates, spectrum, *, velscale_ratio=2, vmax=2000.0, normalise="median"):
    """Cut, resolution-match, log-rebin and normalise templates for one spectrum.

    Parameters
    ----------
    templates : Templates
        Rest-frame library, any sampling (typically linear).
    spectrum : Spectrum
        The log-rebinned galaxy spectrum (``spectrum.is_log``).
    velscale_ratio : int
        Templates are sampled at ``spectrum.velscale / velscale_ratio`` km/s.
    vmax : float
        Velocity margin in km/s: the templates must cover the galaxy's rest-frame
        range extended by ``vmax`` on both sides, and the output covers exactly that.
    normalise : {"median", "each", None}
        "median": divide all templates by one scalar, the median of the whole
        array (weights stay proportional to light fractions); "each": each by its
        own median; None: leave as is.

    Returns
    -------
    Templates
        Log-sampled at ``velscale = spectrum.velscale / velscale_ratio``, with
        ``fwhm`` = the galaxy's rest-frame FWHM. The grid is aligned with the
        galaxy's rest-frame grid (ln λ_gal − ln(1 + z)): galaxy pixel edges fall
        on every ``velscale_ratio``-th template edge, and the first template edge
        lies ``ceil(vmax / velscale_t)`` template pixels below the first galaxy edge.

    Notes
    -----
    Resolution matching convolves the (linear) templates with a Gaussian of
    σ(λ) = sqrt(FWHM_gal_rest(λ)² − FWHM_tpl(λ)²) / 2.3548 Å, FWHM_gal_rest =
    spectrum.fwhm / (1 + z); a wavelength-dependent FWHM uses a per-pixel kernel.
    The kernel is a sampled Gaussian, accurate when σ ≳ 1 template pixel. Where the
    galaxy's rest-frame FWHM is finer than the templates' (e.g. MUSE's 2.5 Å against
    E-MILES's 2.51 Å at z > 0), the templates are used unbroadened, as pPXF does, and a
    warning gives the excess width in km/s.
    """
    if not spectrum.is_log:
        raise KinjaxError("the spectrum is not log-sampled; log-rebin the spectrum first (spectrum.log_rebin())")
    if int(velscale_ratio) != velscale_ratio or velscale_ratio < 1:
        raise KinjaxError(f"velscale_ratio must be a positive integer, got {velscale_ratio}")
    if not (np.isfinite(vmax) and vmax >= 0):
        raise KinjaxError(f"vmax must be >= 0 km/s, got {vmax}")
    if normalise not in ("median", "each", None):
        raise KinjaxError(f"normalise must be 'median', 'each' or None, got {normalise!r}")
    ratio = int(velscale_ratio)
    velscale_t = spectrum.velscale / ratio
    step = velscale_t / C_KMS
    pad_pix = int(np.ceil(vmax / velscale_t))
    ln_start = np.log(spectrum.wave[0] / (1 + spectrum.redshift)) - ratio * step / 2 - pad_pix * step
    n_out = spectrum.n_pix * ratio + 2 * pad_pix
    lo, hi = np.exp(ln_start), np.exp(ln_start + n_out * step)

    # (1) coverage
    edges = pixel_edges(templates.wave)
    if edges[0] > lo * (1 + 1e-12) or edges[-1] < hi * (1 - 1e-12):
        raise KinjaxError(
            f"templates cover {edges[0]:.1f}-{edges[-1]:.1f} Å but the galaxy's rest-frame range "
            f"±{vmax:g} km/s needs {lo:.1f}-{hi:.1f} Å; use wider templates or a smaller vmax"
        )

    # (3, checked first) resolution difference on the used range
    wave = templates.wave
    fwhm_gal = _rest_fwhm(spectrum, wave)
    fwhm_tpl = np.broadcast_to(templates.fwhm, wave.shape)
    used = (edges[1:] > lo) & (edges[:-1] < hi)
    diff2 = fwhm_gal**2 - fwhm_tpl**2
    # pPXF's convention: where the galaxy is sharper than the templates, use the templates as
    # they are. The fitted sigma then absorbs the excess width in quadrature, so say how large
    # it is. Judged on the galaxy's own rest-frame range: the vmax margin only feeds the
    # convolution.
    z1 = 1.0 + spectrum.redshift
    fitted = used & (wave > spectrum.wave[0] / z1) & (wave < spectrum.wave[-1] / z1)
    bad = fitted & (diff2 < -1e-12)
    if bad.any():
        i = np.flatnonzero(bad)[np.argmin(diff2[bad])]
        gal_i = np.broadcast_to(fwhm_gal, wave.shape)[i]
        excess = C_KMS * np.sqrt(-diff2[i]) * _FWHM_TO_SIGMA / wave[i]
        warnings.warn(
            f"the galaxy's rest-frame FWHM ({gal_i:.3f} Å at {wave[i]:.1f} Å) is finer than the "
            f"templates' ({fwhm_tpl[i]:.3f} Å) on {bad.sum() / fitted.sum():.0%} of the fitted range; "
            f"the templates are used unbroadened there (as pPXF does), so they are up to "
            f"{excess:.1f} km/s too broad in quadrature (a fitted sigma of 100 km/s comes out "
            f"{100 - np.sqrt(max(100**2 - excess**2, 0)):.1f} km/s low); use higher-resolution "
            "templates to avoid this",
            stacklevel=2,
        )
    sigma_pix = np.sqrt(np.clip(diff2, 0, None)) * _FWHM_TO_SIGMA / np.gradient(wave)

    # (2) cut with a safety margin for the convolution kernel
    idx = np.flatnonzero(used)
    margin = int(np.ceil(4 * sigma_pix[idx].max())) + 2
    cut = slice(max(idx[0] - margin, 0), min(idx[-1] + margin + 1, wave.size))
    flux = gaussian_smooth(templates.flux[:, cut], sigma_pix[cut])

    # (4) log-rebin onto the grid aligned with the galaxy
    ln_wave, flux, _ = log_rebin(wave[cut], flux, velscale_t, ln_edge_start=ln_start, n_out=n_out)

    # (5) normalise
    if normalise == "median":
        scale = np.median(flux)
        if not scale > 0:
            raise KinjaxError("the templates' median flux is not positive; use normalise=None")
        flux = flux / scale
    elif normalise == "each":
        scale = np.median(flux, axis=1, keepdims=True)
        if np.any(scale <= 0):
            raise KinjaxError("some templates have a median flux <= 0; use normalise='median' or None")
        flux = flux / scale
    new_wave = np.exp(ln_wave)
    return Templates(
        wave=new_wave, flux=flux, fwhm=_rest_fwhm(spectrum, new_wave), velscale=velscale_t,
        age=templates.age, metal=templates.metal, names=templates.names,
    )


def pca_templates(templates, n_components) -> Templates:
    """Compress templates to their leading principal components (no mean subtraction).

    Parameters
    ----------
    templates : Templates
        Shape (n_templates, n_pix) flux.
    n_components : int
        Number of components, 1 ≤ n_components ≤ min(n_templates, n_pix).

    Returns
    -------
    Templates
        ``flux[k] = s_k v_k`` (right singular vectors scaled by singular values,
        so they keep flux units; each signed to have a positive sum), names
        "PC1"..., NaN ages and metallicities, and ``variance_kept`` =
        Σ_{k<n} s_k² / Σ_k s_k² (= 1 − the relative squared Frobenius error of
        the best rank-n reconstruction).
    """
    n_max = min(templates.flux.shape)
    if int(n_components) != n_components or not 1 <= n_components <= n_max:
        raise KinjaxError(f"n_components must be an integer in 1..{n_max}, got {n_components}")
    n = int(n_components)
    _, s, vt = np.linalg.svd(templates.flux, full_matrices=False)
    comps = s[:n, None] * vt[:n]
    comps *= np.where(comps.sum(axis=1, keepdims=True) < 0, -1.0, 1.0)
    nan = np.full(n, np.nan)
    return Templates(
        wave=templates.wave, flux=comps, fwhm=templates.fwhm, velscale=templates.velscale,
        age=nan, metal=nan, names=tuple(f"PC{k + 1}" for k in range(n)),
        variance_kept=float(np.sum(s[:n] ** 2) / np.sum(s**2)),
    )
