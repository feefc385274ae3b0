"""The ``Spectrum`` container, 1D FITS readers and emission-line masks."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from kinjax.constants import C_KMS
from kinjax.errors import KinjaxError
from kinjax.rebin import carried_fwhm, log_rebin_matrix

__all__ = [
    "Spectrum",
    "read_spectrum",
    "read_sdss_spectrum",
    "read_table_spectrum",
    "is_spectrum_file",
    "emission_line_mask",
    "EMISSION_LINES",
    "EMISSION_LINES_EXTENDED",
]

#: Rest-frame air wavelengths (Å) of the gas emission lines masked by default:
#: [OII]3726,3729, Hδ, Hγ, Hβ, [OIII]4959,5007, [OI]6300, [NII]6548,6583, Hα,
#: [SII]6716,6731. This is the list pPXF's ``determine_goodpixels`` uses, so the
#: default mask reproduces pPXF's good pixels.
EMISSION_LINES = {
    "[OII]3726": 3726.03,
    "[OII]3729": 3728.82,
    "Hdelta": 4101.76,
    "Hgamma": 4340.47,
    "Hbeta": 4861.33,
    "[OIII]4959": 4958.92,
    "[OIII]5007": 5006.84,
    "[OI]6300": 6300.30,
    "[NII]6548": 6548.03,
    "[NII]6583": 6583.41,
    "Halpha": 6562.80,
    "[SII]6716": 6716.47,
    "[SII]6731": 6730.85,
}

#: ``EMISSION_LINES`` plus [OI]6364 and the [NI]5198,5200 doublet (air Å).
EMISSION_LINES_EXTENDED = {
    **EMISSION_LINES,
    "[OI]6364": 6363.67,
    "[NI]5198": 5197.90,
    "[NI]5200": 5200.26,
}

#: Pixels this close (km/s) to a template edge are masked when a template range is given.
_TEMPLATE_EDGE_KMS = 900.0


def _readonly(a, dtype=np.float64):
    a = np.array(a, dtype=dtype)  # a private copy
    a.flags.writeable = False
    return a


def _check_fwhm(fwhm, n_pix, what):
    """Validate an instrumental FWHM: scalar or (n_pix,), finite and > 0 (Å)."""
    arr = np.asarray(fwhm, dtype=np.float64)
    if arr.ndim == 0:
        if not (np.isfinite(arr) and arr > 0):
            raise KinjaxError(f"{what} fwhm must be finite and > 0 Å, got {float(arr)}")
        return float(arr)
    if arr.shape != (n_pix,):
        raise KinjaxError(f"{what} fwhm must be a scalar or shape ({n_pix},), got {arr.shape}")
    if not (np.all(np.isfinite(arr)) and np.all(arr > 0)):
        raise KinjaxError(f"{what} fwhm must be finite and > 0 Å at every pixel")
    return _readonly(arr)


def _check_log_sampling(wave, velscale, what):
    """Raise unless ln(wave) is uniform with step velscale / C_KMS (rtol 1e-6)."""
    velscale = float(velscale)
    if not (np.isfinite(velscale) and velscale > 0):
        raise KinjaxError(f"{what} velscale must be a positive number of km/s, got {velscale}")
    step = np.diff(np.log(wave))
    expected = velscale / C_KMS
    if np.any(np.abs(step - expected) > 1e-6 * expected):
        raise KinjaxError(
            f"{what} has velscale={velscale:g} km/s but ln(wave) is not uniform with that step "
            f"(found {C_KMS * step.min():.6g}..{C_KMS * step.max():.6g} km/s); log-rebin it "
            "or pass velscale=None"
        )
    return velscale


def _check_wave(wave, what):
    if wave.ndim != 1 or wave.size < 2:
        raise KinjaxError(f"{what} wave must be 1D with at least 2 pixels, got shape {wave.shape}")
    if not np.all(np.isfinite(wave)) or np.any(wave <= 0):
        raise KinjaxError(f"{what} wave must be finite and positive (Å)")
    if np.any(np.diff(wave) <= 0):
        raise KinjaxError(f"{what} wave must be strictly increasing; sort it by wavelength")


@dataclass(frozen=True)
class Spectrum:
    """One galaxy spectrum with its noise, mask and instrumental resolution.

    Parameters
    ----------
    wave : ndarray, shape (n_pix,)
        Pixel-centre wavelengths in Å (observed frame), strictly increasing.
    flux : ndarray, shape (n_pix,)
        Flux density (any units).
    noise : ndarray, shape (n_pix,)
        1σ error per pixel, same units as ``flux``.
    mask : ndarray of bool, shape (n_pix,)
        True = good pixel. ``None`` means all pixels good.
    fwhm : float or ndarray, shape (n_pix,)
        Instrumental FWHM in Å (observed frame).
    redshift : float
        Systemic redshift; fitted velocities are relative to ``C_KMS * ln(1 + redshift)``.
    velscale : float or None
        km/s per pixel if ``ln(wave)`` is uniform (log-rebinned), else None.
    name : str
        A label.

    Notes
    -----
    Validation (each failure raises ``KinjaxError``):

    * Pixels with non-finite flux are masked automatically. Good pixels (after
      that) must have finite noise > 0: a user who declared a pixel good but
      gave it zero, negative or non-finite noise gets an error, not a silent
      mask.
    * On masked pixels anything goes; to keep downstream arithmetic (and its
      gradients) free of NaN, non-finite flux there is stored as 0 and
      unusable noise as the median good-pixel noise. These pixels stay masked.
    * At least one good pixel must remain.

    All arrays are float64 (mask bool) private read-only copies.
    """

    wave: np.ndarray
    flux: np.ndarray
    noise: np.ndarray
    mask: np.ndarray | None
    fwhm: float | np.ndarray
    redshift: float = 0.0
    velscale: float | None = None
    name: str = ""

    def __post_init__(self):
        wave = np.array(self.wave, dtype=np.float64)
        _check_wave(wave, "Spectrum")
        n = wave.size
        flux = np.array(self.flux, dtype=np.float64)
        noise = np.array(self.noise, dtype=np.float64)
        if noise.ndim == 0:
            noise = np.full(flux.shape, float(noise))
        mask = np.ones(n, bool) if self.mask is None else np.array(self.mask, dtype=bool)
        for label, a in (("flux", flux), ("noise", noise), ("mask", mask)):
            if a.shape != (n,):
                raise KinjaxError(f"Spectrum {label} has shape {a.shape}, expected ({n},) like wave")
        good = mask & np.isfinite(flux)
        bad_noise = good & ~(np.isfinite(noise) & (noise > 0))
        if bad_noise.any():
            raise KinjaxError(
                f"{bad_noise.sum()} good pixels have zero, negative or non-finite noise; "
                "pass noise=... with positive values or mask those pixels"
            )
        if not good.any():
            raise KinjaxError(
                "Spectrum has no usable pixel (all masked or non-finite flux); check the data and mask"
            )
        flux[~good & ~np.isfinite(flux)] = 0.0
        fix = ~good & ~(np.isfinite(noise) & (noise > 0))
        noise[fix] = np.median(noise[good])
        redshift = float(self.redshift)
        if not (np.isfinite(redshift) and redshift > -1):
            raise KinjaxError(f"redshift must be finite and > -1, got {redshift}")
        velscale = None if self.velscale is None else _check_log_sampling(wave, self.velscale, "Spectrum")
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 (frozen dataclass)
        set_("wave", _readonly(wave))
        set_("flux", _readonly(flux))
        set_("noise", _readonly(noise))
        set_("mask", _readonly(good, bool))
        set_("fwhm", _check_fwhm(self.fwhm, n, "Spectrum"))
        set_("redshift", redshift)
        set_("velscale", velscale)
        set_("name", str(self.name))

    # -- properties -----------------------------------------------------------------
    @property
    def ln_wave(self) -> np.ndarray:
        """(n_pix,) natural log of the pixel-centre wavelengths (Å)."""
        return np.log(self.wave)

    @property
    def n_pix(self) -> int:
        """Number of pixels."""
        return self.wave.size

    @property
    def n_good(self) -> int:
        """Number of good (unmasked) pixels."""
        return int(self.mask.sum())

    @property
    def is_log(self) -> bool:
        """True if the spectrum is log-sampled (``velscale`` set)."""
        return self.velscale is not None

    # -- derived spectra ------------------------------------------------------------
    def log_rebin(self, velscale=None, *, rebin_lsf=False, **kwargs) -> "Spectrum":
        """Flux-conserving rebinning onto a ln λ grid (see ``kinjax.rebin.log_rebin``).

        Parameters
        ----------
        velscale : float, optional
            km/s per output pixel; ``None`` keeps the number of pixels.
        rebin_lsf : bool
            Record the rebinned data's effective FWHM (:func:`kinjax.rebin.rebinned_fwhm`:
            the input pixel's boxcar added in quadrature, unless the grid is unchanged)
            instead of keeping ``fwhm`` as given (pPXF's convention, the default).
        **kwargs
            ``ln_edge_start``, ``n_out`` as in ``kinjax.rebin.log_rebin``.

        Returns
        -------
        Spectrum
            Log-sampled copy. Noise is propagated as the square root of the
            rebinned variance (neighbouring pixels become correlated). An output
            pixel is good only if every input pixel overlapping it was good. An
            array ``fwhm`` is interpolated onto the new pixel centres.
        """
        ln_wave, w, velscale = log_rebin_matrix(self.wave, velscale, **kwargs)
        flux = w @ self.flux
        noise = np.sqrt(w.multiply(w) @ self.noise**2)
        touched_bad = w @ (~self.mask).astype(np.float64)
        mask = touched_bad == 0
        wave = np.exp(ln_wave)
        fwhm = carried_fwhm(self.wave, self.fwhm, wave, rebin_lsf)
        return replace(
            self, wave=wave, flux=flux, noise=noise, mask=mask, fwhm=fwhm, velscale=velscale
        )

    def crop(self, wave_min: float, wave_max: float) -> "Spectrum":
        """The pixels with ``wave_min <= wave <= wave_max`` (observed-frame Å).

        Like pPXF users' ``lam_range`` cut before fitting: crop a long spectrum (MUSE,
        MaNGA) to the range with good templates and no sky residuals.
        """
        keep = _crop_index(self.wave, wave_min, wave_max, self.name or "Spectrum")
        fwhm = self.fwhm if np.ndim(self.fwhm) == 0 else self.fwhm[keep]
        return replace(self, wave=self.wave[keep], flux=self.flux[keep], noise=self.noise[keep],
                       mask=self.mask[keep], fwhm=fwhm)

    def with_mask(self, good) -> "Spectrum":
        """Copy with ``mask = self.mask & good`` (good: (n_pix,) bool, True = keep)."""
        good = np.asarray(good, dtype=bool)
        if good.shape != (self.n_pix,):
            raise KinjaxError(f"mask has shape {good.shape}, expected ({self.n_pix},)")
        return replace(self, mask=self.mask & good)

    def with_noise(self, noise) -> "Spectrum":
        """Copy with a new 1σ noise: a scalar or (n_pix,) array (flux units)."""
        return replace(self, noise=noise)

    def masked_emission_lines(
        self, width=800.0, *, redshift=None, lines=None, template_range=None
    ) -> "Spectrum":
        """Copy with the gas emission-line regions masked (see ``emission_line_mask``).

        ``redshift`` defaults to ``self.redshift``; pass the galaxy's actual
        redshift if the systemic one is left at 0.
        """
        z = self.redshift if redshift is None else redshift
        good = emission_line_mask(
            self.wave, redshift=z, width=width, lines=lines, template_range=template_range
        )
        return self.with_mask(good)


def _crop_index(wave, wave_min, wave_max, what) -> slice:
    """Slice of ``wave`` within [wave_min, wave_max] Å; an error if fewer than 20 pixels are left."""
    lo, hi = float(wave_min), float(wave_max)
    if not (np.isfinite(lo) and np.isfinite(hi) and lo < hi):
        raise KinjaxError(f"wavelength range must be two finite numbers lo < hi (Å), got ({wave_min}, {wave_max})")
    i0, i1 = np.searchsorted(wave, lo, "left"), np.searchsorted(wave, hi, "right")
    if i1 - i0 < 20:
        raise KinjaxError(f"{what}: only {max(i1 - i0, 0)} pixels in {lo:g}-{hi:g} Å; the data cover "
                          f"{wave[0]:.1f}-{wave[-1]:.1f} Å (observed frame)")
    return slice(int(i0), int(i1))


def emission_line_mask(wave, redshift=0.0, width=800.0, lines=None, *, template_range=None):
    """Good-pixel mask that excludes the usual optical gas emission lines.

    Parameters
    ----------
    wave : array_like, shape (n_pix,)
        Pixel-centre wavelengths in Å (observed frame).
    redshift : float
        Redshift at which the lines are expected.
    width : float
        Half-width in km/s of each masked region: a pixel is masked when
        ``|ln(λ_pixel) − ln(λ_line (1 + z))| < width / C_KMS`` (strict). This is
        pPXF's ``determine_goodpixels`` convention (its default 800 km/s masks
        1600 km/s in all).
    lines : dict or array_like, optional
        Rest-frame wavelengths (Å) to mask; default ``EMISSION_LINES`` (the list
        pPXF uses). ``EMISSION_LINES_EXTENDED`` adds [OI]6364 and [NI]5198,5200.
    template_range : (float, float), optional
        Rest-frame [λ_min, λ_max] (Å) of the stellar templates. If given, pixels
        within 900 km/s of either edge, redshifted, are masked too, as pPXF does.

    Returns
    -------
    ndarray of bool, shape (n_pix,)
        True = good pixel.
    """
    ln_wave = np.log(np.asarray(wave, dtype=np.float64))
    if lines is None:
        lines = EMISSION_LINES
    if isinstance(lines, dict):
        lines = list(lines.values())
    lines = np.atleast_1d(np.asarray(lines, dtype=np.float64))
    if not (np.isfinite(width) and width > 0):
        raise KinjaxError(f"width must be a positive number of km/s, got {width}")
    centres = np.log(lines * (1 + redshift))
    hw = width / C_KMS
    bad = np.any(
        (ln_wave[:, None] > centres - hw) & (ln_wave[:, None] < centres + hw), axis=1
    )
    if template_range is not None:
        lo, hi = np.log(np.asarray(template_range, dtype=np.float64) * (1 + redshift))
        edge = _TEMPLATE_EDGE_KMS / C_KMS
        bad |= (ln_wave > hi - edge) | (ln_wave < lo + edge)
    return ~bad


# -- FITS reader -------------------------------------------------------------------

_SIGMA_EXT = ("NOISE", "ERROR", "ERR", "SIGMA")
_VAR_EXT = ("VAR", "VARIANCE", "STAT")
_IVAR_EXT = ("IVAR",)
_FLUX_EXT = ("DATA", "FLUX", "SCI", "SPECTRUM")
# CTYPE1 values of axes that are not wavelength (IRAF multispec, pixels, frequency, velocity, ...)
_NOT_WAVELENGTH = ("MULTISPE", "PIXEL", "FREQ", "ENER", "WAVN", "VRAD", "VOPT", "ZOPT", "VELO", "BETA")


def _angstrom_per_unit(unit, what):
    """Å per unit of a FITS unit string (CUNIT1 or TUNITn); blank means Å."""
    key = str(unit or "").strip()
    if key.lower() in ("", "a", "angstrom", "angstroms", "angstrom(s)"):
        return 1.0  # astropy reads a bare "A" as ampere
    from astropy import units as u

    try:
        return float(u.Unit(key, format="fits", parse_strict="raise").to(u.AA))
    except (ValueError, u.UnitConversionError):
        try:
            return float(u.Unit(key, parse_strict="raise").to(u.AA))
        except (ValueError, u.UnitConversionError):
            raise KinjaxError(f"{what}: unknown wavelength unit {key!r}; expected Angstrom, nm, um or m") from None


def _wave_axis(header, n, path):
    """Pixel-centre wavelengths (Å) of a 1D image, and its velscale if log-sampled.

    Three conventions, with p = 1..n and x = p − CRPIX1 (CRPIX1 default 1):

    * linear: λ = CRVAL1 + x · CDELT1 (or CD1_1), in CUNIT1 (default Å);
    * FITS WCS logarithmic, CTYPE1 ``WAVE-LOG`` / ``AWAV-LOG`` (Greisen et al. 2006,
      A&A 446, 747, eq. 5): λ = CRVAL1 · exp(x · CDELT1 / CRVAL1), in CUNIT1;
    * IRAF log-linear, DC-FLAG = 1: λ = 10^(CRVAL1 + x · CDELT1) Å.

    Returns
    -------
    (ndarray, float or None)
        Wavelengths (n,) in Å; velscale (km/s per pixel) for the two log axes, else None.
    """
    if "CRVAL1" not in header:
        raise KinjaxError(f"{path} has no CRVAL1 keyword; cannot build the wavelength axis")
    step = header.get("CDELT1", header.get("CD1_1"))
    if step is None:
        raise KinjaxError(f"{path} has neither CDELT1 nor CD1_1; cannot build the wavelength axis")
    crval, step = float(header["CRVAL1"]), float(step)
    x = np.arange(1, n + 1, dtype=np.float64) - float(header.get("CRPIX1", 1.0))
    ctype = str(header.get("CTYPE1", "")).strip().upper()
    if header.get("DC-FLAG", 0) == 1:
        if not (step > 0 and 0 < crval < 10):
            raise KinjaxError(f"{path}: DC-FLAG = 1 (log10 λ axis) but CRVAL1 = {crval:g}, CDELT1 = {step:g} "
                              "are not log10(Å) with a positive step")
        return 10.0 ** (crval + x * step), C_KMS * np.log(10.0) * step
    scale = _angstrom_per_unit(header.get("CUNIT1", ""), path)
    if ctype.endswith("-LOG"):
        if not (step > 0 and crval > 0):
            raise KinjaxError(f"{path}: CTYPE1 = {ctype} needs CRVAL1 > 0 and CDELT1 > 0")
        return crval * np.exp(x * step / crval) * scale, C_KMS * step / crval
    if "-" in ctype[4:] or "LOG" in ctype or ctype.startswith(_NOT_WAVELENGTH):
        raise KinjaxError(f"{path}: CTYPE1 = {ctype!r} is not a wavelength axis kinjax reads (linear, "
                          "WAVE-LOG / AWAV-LOG or IRAF DC-FLAG = 1); build the Spectrum from arrays instead")
    return (crval + x * step) * scale, None


def _ascending(wave, flux, noise, mask, fwhm):
    """The per-pixel arrays in order of increasing wavelength (a file may store them
    decreasing, e.g. CDELT1 < 0); scalars pass through."""
    wave = np.asarray(wave, dtype=np.float64)
    if wave.size < 2 or not np.all(np.diff(wave) < 0):
        return wave, flux, noise, mask, fwhm

    def flip(a):
        return a[::-1] if np.ndim(a) == 1 and np.size(a) == wave.size else a

    return tuple(flip(np.asarray(a)) if a is not None else None for a in (wave, flux, noise, mask, fwhm))


def _header_fwhm(headers, wave, path):
    """Instrumental FWHM (Å) from the first header with ``FWHM`` (Å) or, failing that,
    ``SPEC_RES`` (resolving power R, as in ESO Phase 3 products: FWHM = λ / R)."""
    for key in ("FWHM", "SPEC_RES"):
        for h in headers:
            if key in h:
                value = float(h[key])
                if not (np.isfinite(value) and value > 0):
                    raise KinjaxError(f"{path}: header {key} = {h[key]!r} is not a positive number; pass fwhm=...")
                return value if key == "FWHM" else wave / value
    raise KinjaxError(f"{path} gives no instrumental resolution (header FWHM or SPEC_RES); pass fwhm=... (Å, FWHM)")


def _image_hdu(hdul):
    """Index of the HDU that holds a 1D spectrum image: the primary, or else the first
    1D image extension (DATA, FLUX, SCI or SPECTRUM first, as MPDAF and ESO pipelines name
    it), or None."""
    from astropy.io import fits

    if _is_1d(hdul[0]):
        return 0
    images = [i for i, h in enumerate(hdul) if i > 0 and isinstance(h, fits.ImageHDU) and _is_1d(h)
              and h.name.upper() not in _SIGMA_EXT + _VAR_EXT + _IVAR_EXT]
    images.sort(key=lambda i: hdul[i].name.upper() not in _FLUX_EXT)
    return images[0] if images else None


def _is_1d(hdu) -> bool:
    """True for an image HDU whose data (read from the header, not loaded) is 1D once
    length-1 axes are dropped (IRAF writes (1, 1, n))."""
    shape = getattr(hdu, "shape", ())
    return bool(shape) and sum(k > 1 for k in shape) == 1


def is_spectrum_file(hdul) -> bool:
    """True if :func:`read_spectrum` reads this open FITS file as one spectrum: a 1D
    primary image, or an empty primary HDU with an SDSS table, a spectrum table or a 1D
    image extension."""
    if hdul[0].header.get("NAXIS", 0) > 0:
        return _is_1d(hdul[0])
    return _sdss_table(hdul) is not None or _spectrum_table(hdul) is not None or _image_hdu(hdul) is not None


def _sdss_table(hdul):
    """The HDU of an SDSS-style spectrum table (COADD first), or None."""
    from astropy.io import fits

    tables = [h for h in hdul[1:] if isinstance(h, fits.BinTableHDU)]
    tables.sort(key=lambda h: h.name.upper() != "COADD")
    for h in tables:
        names = {c.lower() for c in h.columns.names}
        sdss_columns = {"ivar", "inverse_variance", "and_mask", "or_mask", "wdisp"}
        if "flux" in names and ("loglam" in names or ("wavelength" in names and names & sdss_columns)):
            return h
    return None


# column names of a generic (ESO Phase 3, MPDAF, specutils) spectrum table, lower case
_TABLE_WAVE = ("wave", "wavelength", "lambda", "lam", "spectral_axis")
_TABLE_FLUX = ("flux", "flux_reduced", "data")
_TABLE_SIGMA = ("err", "error", "err_reduced", "noise", "sigma", "uncertainty")
_TABLE_VAR = ("var", "variance", "stat")
_TABLE_IVAR = ("ivar", "inverse_variance")
_TABLE_QUALITY = ("qual", "quality")


def _pick(names, candidates):
    """The first of ``candidates`` (lower case) among ``names`` (lower case → original), or None."""
    return next((names[c] for c in candidates if c in names), None)


def _spectrum_table(hdul):
    """The first binary table with a wavelength and a flux column (not an SDSS one), or None."""
    from astropy.io import fits

    for h in hdul[1:]:
        if isinstance(h, fits.BinTableHDU) and h.data is not None:
            names = {c.lower(): c for c in h.columns.names}
            if _pick(names, _TABLE_WAVE) and _pick(names, _TABLE_FLUX):
                return h
    return None


def _column(table, name, n_rows):
    """A column as a 1D float array: the cells of a one-row table of arrays (ESO Phase 3),
    or the column of a one-pixel-per-row table."""
    data = np.asarray(table.data[name], dtype=np.float64)
    return data.reshape(-1) if n_rows == 1 else data.squeeze()


def read_table_spectrum(path, *, noise=None, fwhm=None, redshift=0.0, name=None) -> Spectrum:
    """Read a spectrum stored as a FITS binary table (ESO Phase 3 ``SCIENCE.SPECTRUM``,
    MPDAF or specutils tables, and the like).

    The table is the first binary table with a wavelength column (``WAVE``,
    ``WAVELENGTH``, ``LAMBDA``, ``LAM``, ``SPECTRAL_AXIS``) and a flux column (``FLUX``,
    ``FLUX_REDUCED``, ``DATA``); names are matched without regard to case. Either one
    row holds every column as an array (the ESO layout) or each row is one pixel.
    Wavelengths are in the column's TUNIT (Å when blank; nm and µm are converted) and
    are taken to be in air, as the E-MILES templates are (ESO's optical pipelines give
    air wavelengths; convert a vacuum table with :func:`kinjax.cube.vacuum_to_air`
    and build the Spectrum from arrays). SDSS tables are read by
    :func:`read_sdss_spectrum`.

    Parameters
    ----------
    path : str or Path
    noise : float or array_like (n_pix,), optional
        1σ noise; default from a column ``ERR`` / ``ERROR`` / ``ERR_REDUCED`` / ``NOISE``
        / ``SIGMA`` / ``UNCERTAINTY`` (σ), ``VAR`` / ``VARIANCE`` / ``STAT`` or ``IVAR``
        (pixels with variance or ivar ≤ 0 are masked). A ``QUAL`` / ``QUALITY``
        column masks its non-zero pixels either way.
    fwhm : float or array_like (n_pix,), optional
        Instrumental FWHM in Å; default the header keyword ``FWHM`` (Å), else
        ``SPEC_RES`` (the resolving power R = λ / Δλ of ESO Phase 3: FWHM = λ / R).
    redshift : float
        Systemic redshift.
    name : str, optional
        Label; default the file stem.

    Returns
    -------
    Spectrum
        ``velscale=None``; call ``.log_rebin()`` before fitting (``setup_fit`` does).
    """
    from astropy.io import fits

    path = Path(path)
    if not path.exists():
        raise KinjaxError(f"{path} does not exist")
    with fits.open(path) as hdul:
        table = _spectrum_table(hdul)
        if table is None:
            raise KinjaxError(f"{path} has no spectrum table (a wavelength column such as WAVE and a FLUX column)")
        names = {c.lower(): c for c in table.columns.names}
        n_rows = len(table.data)
        wave_col, flux_col = _pick(names, _TABLE_WAVE), _pick(names, _TABLE_FLUX)
        scale = _angstrom_per_unit(table.columns[wave_col].unit, f"{path} column {wave_col}")
        wave = _column(table, wave_col, n_rows) * scale
        flux = _column(table, flux_col, n_rows)
        n = wave.size
        columns = {}
        for kind, candidates in (("sigma", _TABLE_SIGMA), ("var", _TABLE_VAR), ("ivar", _TABLE_IVAR),
                                 ("quality", _TABLE_QUALITY)):
            col = _pick(names, candidates)
            if col is not None:
                columns[kind] = _column(table, col, n_rows)
                if columns[kind].shape != (n,):
                    raise KinjaxError(f"{path}: column {col} has {columns[kind].size} values, {wave_col} has {n}")
        if fwhm is None:
            fwhm = _header_fwhm([table.header, hdul[0].header], wave, path)
    if flux.shape != (n,):
        raise KinjaxError(f"{path}: column {flux_col} has {flux.size} values, {wave_col} has {n}")
    mask = np.isfinite(flux)
    if "quality" in columns:
        mask &= columns["quality"] == 0
    if noise is None:
        with np.errstate(divide="ignore", invalid="ignore"):
            if "sigma" in columns:
                noise = columns["sigma"]
            elif "var" in columns:
                noise = np.where(columns["var"] > 0, np.sqrt(columns["var"]), np.nan)
            elif "ivar" in columns:
                noise = np.where(columns["ivar"] > 0, 1.0 / np.sqrt(columns["ivar"]), np.nan)
            else:
                raise KinjaxError(f"{path} has no ERR / VAR / IVAR column; pass noise=... (1σ per pixel)")
        mask &= np.isfinite(noise) & (noise > 0)
    if not mask.any():
        raise KinjaxError(f"{path}: every pixel is flagged (QUAL != 0, no positive noise or no finite flux)")
    wave, flux, noise, mask, fwhm = _ascending(wave, flux, noise, mask, fwhm)
    return Spectrum(wave=wave, flux=flux, noise=noise, mask=mask, fwhm=fwhm, redshift=redshift,
                    name=path.stem if name is None else name)


def _sdss_redshift(hdul, table):
    """The SDSS pipeline's redshift: ``Z`` in the table header or the SPECOBJ table, else None."""
    if "Z" in table.header:
        return float(table.header["Z"])
    if "SPECOBJ" in hdul and hdul["SPECOBJ"].data is not None:
        names = [c.upper() for c in hdul["SPECOBJ"].columns.names]
        if "Z" in names:
            return float(np.ravel(hdul["SPECOBJ"].data["Z"])[0])
    return None


def read_sdss_spectrum(path, *, noise=None, fwhm=None, redshift=0.0, name=None) -> Spectrum:
    """Read an SDSS / BOSS spectrum (``spec-PLATE-MJD-FIBER.fits`` or a table like it).

    The table is the ``COADD`` extension, or the first binary table with a ``flux``
    column. Wavelengths come from ``loglam`` (log10 Å) or ``wavelength`` (Å); both are
    vacuum wavelengths and are converted to air (:func:`kinjax.cube.vacuum_to_air`), as
    the E-MILES templates are in air. (pPXF's SDSS examples either scale the
    wavelengths by the median air/vacuum ratio or leave them in vacuum; the latter
    shifts V by about +83 km/s.)

    Parameters
    ----------
    path : str or Path
    noise : float or array_like (n_pix,), optional
        1σ noise; default from ``ivar`` / ``inverse_variance`` (pixels with ivar ≤ 0
        masked). Pixels with a non-zero ``and_mask`` are masked either way.
    fwhm : float or array_like (n_pix,), optional
        Instrumental FWHM in Å; default from ``wdisp`` (the 1σ line width in pixels:
        FWHM = 2.3548 × wdisp × the pixel width in Å). Older tables without ``wdisp``
        need it (SDSS: about 2.76 Å).
    redshift : float
        Systemic redshift (velocities are measured relative to it). Left at 0 for a
        file whose pipeline redshift (``Z``) exceeds 0.001, a warning gives that value.
    name : str, optional

    Returns
    -------
    Spectrum
        Air wavelengths, not exactly log-uniform (``velscale=None``).
    """
    from astropy.io import fits

    from kinjax.cube import SIGMA_TO_FWHM, vacuum_to_air
    from kinjax.rebin import pixel_edges

    path = Path(path)
    if not path.exists():
        raise KinjaxError(f"{path} does not exist")
    with fits.open(path) as hdul:
        table = _sdss_table(hdul)
        if table is None:
            raise KinjaxError(f"{path} has no SDSS-style table (a 'flux' column with 'loglam' or 'wavelength')")
        cols = {c.lower(): c for c in table.columns.names}
        data = table.data
        flux = np.asarray(data[cols["flux"]], dtype=np.float64)
        if "loglam" in cols:
            wave_vac = 10.0 ** np.asarray(data[cols["loglam"]], dtype=np.float64)
        else:
            wave_vac = np.asarray(data[cols["wavelength"]], dtype=np.float64)
        ivar_key = cols.get("ivar", cols.get("inverse_variance"))
        ivar = None if ivar_key is None else np.asarray(data[ivar_key], dtype=np.float64)
        and_mask = np.asarray(data[cols["and_mask"]]) if "and_mask" in cols else None
        wdisp = np.asarray(data[cols["wdisp"]], dtype=np.float64) if "wdisp" in cols else None
        catalogue_z = _sdss_redshift(hdul, table)
    if redshift == 0.0 and catalogue_z is not None and abs(catalogue_z) > 1e-3:
        import warnings

        warnings.warn(f"{path.name}: the file's catalogue redshift is z = {catalogue_z:.6g}, but velocities are "
                      "measured from z = 0 and emission lines masked there; pass redshift= (--redshift)",
                      stacklevel=2)
    mask = np.isfinite(flux)
    if and_mask is not None:
        mask &= and_mask == 0
    if ivar is not None:
        mask &= np.isfinite(ivar) & (ivar > 0)
    if noise is None:
        if ivar is None:
            raise KinjaxError(f"{path} has no ivar / inverse_variance column; pass noise=... (1σ per pixel)")
        with np.errstate(divide="ignore", invalid="ignore"):
            noise = np.where(ivar > 0, 1.0 / np.sqrt(ivar), np.nan)
    wave = vacuum_to_air(wave_vac)
    if fwhm is None:
        if wdisp is None:
            raise KinjaxError(f"{path} has no wdisp column to give the resolution; pass fwhm=... (Å; SDSS about 2.76)")
        good = np.isfinite(wdisp) & (wdisp > 0)
        if not good.any():
            raise KinjaxError(f"{path}: wdisp has no positive values; pass fwhm=... (Å)")
        fwhm = SIGMA_TO_FWHM * np.interp(wave, wave[good], wdisp[good]) * np.diff(pixel_edges(wave))
    if not mask.any():
        raise KinjaxError(f"{path}: every pixel is flagged (ivar <= 0 or and_mask set); nothing to fit")
    return Spectrum(wave=wave, flux=flux, noise=noise, mask=mask, fwhm=fwhm, redshift=redshift,
                    name=path.stem if name is None else name)


def _noise_from_extensions(hdul, n):
    """(noise, extra_good) from a NOISE/ERROR/ERR, VAR or IVAR extension, or None."""
    names = {h.name.upper(): h for h in hdul[1:]}
    for key in _SIGMA_EXT + _VAR_EXT + _IVAR_EXT:
        if key in names and names[key].data is not None:
            data = np.asarray(names[key].data, dtype=np.float64).squeeze()
            if data.shape != (n,):
                raise KinjaxError(f"extension {key} has shape {data.shape}, expected ({n},)")
            with np.errstate(divide="ignore", invalid="ignore"):
                if key in _SIGMA_EXT:
                    return data, np.ones(n, bool)
                if key in _VAR_EXT:
                    return np.sqrt(data), data > 0
                return 1 / np.sqrt(data), data > 0  # IVAR <= 0 flags unusable pixels
    return None


def read_spectrum(path, *, noise=None, fwhm=None, redshift=0.0, hdu=0, name=None) -> Spectrum:
    """Read a 1D FITS spectrum: an image, an SDSS spectrum or a spectrum table.

    Parameters
    ----------
    path : str or Path
        FITS file; HDU ``hdu`` holds the flux as a 1D image with CRVAL1, CDELT1
        (or CD1_1) and CRPIX1 (default 1) in Å (CUNIT1 nm, µm, m are converted). The
        axis is linear, FITS-WCS logarithmic (CTYPE1 ``WAVE-LOG`` or ``AWAV-LOG``) or
        IRAF log10 (DC-FLAG = 1); a log axis is kept as it is (``velscale`` set, no
        resampling). When the primary HDU is empty (and ``hdu`` is left at 0) the
        file is read as an SDSS spectrum (:func:`read_sdss_spectrum`), else as a
        spectrum table (:func:`read_table_spectrum`), else from its first 1D image
        extension (DATA, FLUX, SCI or SPECTRUM first, as MPDAF writes them).
    noise : float or array_like (n_pix,), optional
        1σ noise. If None, an extension NOISE/ERROR/ERR (σ), VAR/VARIANCE/STAT
        (variance) or IVAR (inverse variance; ivar <= 0 pixels are masked) is used.
    fwhm : float or array_like (n_pix,), optional
        Instrumental FWHM in Å; if None the header keyword FWHM is used.
    redshift : float
        Systemic redshift.
    hdu : int or str
        HDU holding the flux.
    name : str, optional
        Label; default the file stem.

    Returns
    -------
    Spectrum
        ``velscale`` set for a log axis, else None (``setup_fit`` log-rebins it).
    """
    from astropy.io import fits  # lazy: keeps `import kinjax` fast

    path = Path(path)
    if not path.exists():
        raise KinjaxError(f"{path} does not exist")
    with fits.open(path) as hdul:
        if hdu == 0 and hdul[0].data is None:
            if _sdss_table(hdul) is not None:
                return read_sdss_spectrum(path, noise=noise, fwhm=fwhm, redshift=redshift, name=name)
            if _spectrum_table(hdul) is not None:
                return read_table_spectrum(path, noise=noise, fwhm=fwhm, redshift=redshift, name=name)
            found = _image_hdu(hdul)
            if found is None:
                raise KinjaxError(f"{path}: the primary HDU is empty and no extension holds a 1D spectrum "
                                  "(an image, an SDSS table or a table with WAVE and FLUX columns)")
            hdu = found
        header = hdul[hdu].header
        data = hdul[hdu].data
        if data is None or np.asarray(data).squeeze().ndim != 1:
            shape = None if data is None else np.shape(data)
            raise KinjaxError(
                f"{path} HDU {hdu} is not a 1D spectrum (data shape {shape}); "
                "use kinjax.cube for cubes or pick another hdu"
            )
        flux = np.asarray(data, dtype=np.float64).squeeze()
        n = flux.size
        wave, velscale = _wave_axis(header, n, path)
        mask = np.ones(n, bool)
        if noise is None:
            found = _noise_from_extensions(hdul, n)
            if found is None:
                raise KinjaxError(
                    f"{path} has no NOISE/ERROR/ERR/VAR/IVAR extension; pass noise=... "
                    "(1σ per pixel, scalar or array)"
                )
            noise, mask = found
            mask = mask & np.isfinite(noise)  # the file flags these pixels as unusable
        if fwhm is None:
            fwhm = _header_fwhm([header, hdul[0].header], wave, path)
    if velscale is None:  # a linear axis may run backwards (CDELT1 < 0)
        wave, flux, noise, mask, fwhm = _ascending(wave, flux, noise, mask, fwhm)
    return Spectrum(
        wave=wave, flux=flux, noise=noise, mask=mask, fwhm=fwhm,
        redshift=redshift, velscale=velscale, name=path.stem if name is None else name,
    )
