"""IFU data cubes: the `Cube` container, MUSE / MaNGA / ATLAS3D readers, S/N, binning.

A cube is stored as a *set of spectra*: ``flux`` has shape ``(n_spaxels, n_wave)`` with
the wavelength axis last (FITS cubes ``(n_wave, n_y, n_x)`` are transposed on reading).
Every spaxel of a gridded cube is kept, so that maps can be rebuilt with
`Cube.to_image`; the boolean ``mask`` (True = good) says which pixels are usable and
`Cube.valid` which spaxels are.

Pixels that are NaN/inf in flux, or whose noise is non-finite or not positive, are
masked on construction and their values replaced by flux 0 and noise 1, so that every
array is finite (a masked pixel must never poison a sum or a JAX computation).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, replace

import numpy as np

from kinjax.errors import KinjaxError

__all__ = [
    "Cube",
    "MIN_GOOD_FRACTION",
    "SAURON_FWHM",
    "detect_format",
    "read_atlas3d",
    "read_cube",
    "read_manga",
    "read_muse",
    "vacuum_to_air",
]

#: A spaxel is `Cube.valid` when at least this fraction of its pixels is good.
MIN_GOOD_FRACTION = 0.5
#: Instrumental FWHM of SAURON (Å), used for ATLAS3D/SAURON files when none is given.
SAURON_FWHM = 4.2
#: Default MUSE WFM spaxel size (arcsec) when the header carries no pixel scale.
MUSE_PIXEL_SCALE = 0.2
#: MaNGA DRP cube spaxel size (arcsec).
MANGA_PIXEL_SCALE = 0.5
#: MANGA_DRP3PIXMASK bit 10 (DONOTUSE): the pixel should not be used for science.
MANGA_DONOTUSE = 1 << 10
#: MANGA_DRP3PIXMASK bit 3 (FORESTAR): a foreground star; the MaNGA DAP skips it too.
MANGA_FORESTAR = 1 << 3
#: Gaussian FWHM / sigma.
SIGMA_TO_FWHM = 2.0 * np.sqrt(2.0 * np.log(2.0))

_UNRECOGNISED = (
    "{name}: unrecognised FITS layout (expected a MUSE cube with DATA/STAT, a MaNGA "
    "LOGCUBE with FLUX/IVAR/WAVE or an ATLAS3D/SAURON E3D table); pass --format or "
    "convert the file"
)


def _float_array(a, name):
    """Copy ``a`` to a floating NumPy array (float32 kept, anything else float64)."""
    a = np.array(a)
    if a.dtype not in (np.float32, np.float64):
        try:
            a = a.astype(np.float64)
        except (TypeError, ValueError):
            raise KinjaxError(f"Cube: {name} must be numeric, got dtype {a.dtype}")
    return a


@dataclass(frozen=True)
class Cube:
    """A set of spectra on a common wavelength grid with sky positions.

    Parameters
    ----------
    wave : ndarray, shape (n_wave,)
        Wavelength in Å (air unless stated), observed frame, strictly increasing.
    flux : ndarray, shape (n_spaxels, n_wave)
        Flux density of each spaxel; wavelength axis last.
    noise : ndarray, shape (n_spaxels, n_wave)
        1σ error of ``flux`` (same units).
    mask : ndarray of bool, shape (n_spaxels, n_wave)
        True = good pixel. Non-finite flux and non-finite or non-positive noise are
        masked in addition.
    x, y : ndarray, shape (n_spaxels,)
        Position of each spaxel in arcsec, relative to the field centre.
    fwhm : float or ndarray of shape (n_wave,) or None
        Instrumental FWHM in Å; None means unknown (fitting then needs one).
    redshift : float
        Systemic redshift guess; velocities are relative to ``C_KMS * ln(1 + z)``.
    velscale : float or None
        km/s per pixel when ``wave`` is log-uniform, else None.
    grid_shape : (n_y, n_x) or None
        Shape of the spatial grid for gridded cubes.
    grid_index : ndarray of int, shape (n_spaxels, 2), or None
        ``(iy, ix)`` of each spaxel in ``grid_shape``.
    format : str
        Where the cube came from: "muse", "manga", "atlas3d", "mock" or "binned".
    name : str
        Label used in plots and reports.
    """

    wave: np.ndarray
    flux: np.ndarray
    noise: np.ndarray
    mask: np.ndarray
    x: np.ndarray
    y: np.ndarray
    fwhm: float | np.ndarray | None
    redshift: float = 0.0
    velscale: float | None = None
    grid_shape: tuple[int, int] | None = None
    grid_index: np.ndarray | None = None
    format: str = ""
    name: str = ""

    def __post_init__(self):
        set_ = object.__setattr__
        wave = np.array(self.wave, dtype=np.float64)
        if wave.ndim != 1 or wave.size < 2:
            raise KinjaxError(f"Cube: wave must be 1D with at least 2 pixels, got shape {wave.shape}")
        if not np.all(np.isfinite(wave)) or np.any(np.diff(wave) <= 0):
            raise KinjaxError("Cube: wave must be finite and strictly increasing; sort or fix the wavelength axis")
        n_wave = wave.size

        flux = _float_array(self.flux, "flux")
        if flux.ndim == 1:
            flux = flux[None, :]
        if flux.ndim != 2 or flux.shape[1] != n_wave:
            raise KinjaxError(
                f"Cube: flux must have shape (n_spaxels, n_wave={n_wave}) with wavelength last, "
                f"got {flux.shape}; transpose FITS cubes (n_wave, n_y, n_x) first"
            )
        n_spaxels = flux.shape[0]
        noise = _float_array(self.noise, "noise").astype(flux.dtype, copy=False)
        if noise.shape != flux.shape:
            try:  # a scalar or a (n_wave,) noise applies to every spaxel
                noise = np.broadcast_to(noise, flux.shape).copy()
            except ValueError:
                raise KinjaxError(f"Cube: noise must have the shape of flux {flux.shape}, got {noise.shape}") from None
        if self.mask is None:
            mask = np.ones(flux.shape, dtype=bool)
        else:
            mask = np.array(self.mask)
            if mask.dtype != bool:
                raise KinjaxError("Cube: mask must be boolean (True = good pixel)")
            if mask.shape != flux.shape:
                raise KinjaxError(f"Cube: mask must have the shape of flux {flux.shape}, got {mask.shape}")

        bad_flux = ~np.isfinite(flux)
        bad_noise = ~(np.isfinite(noise) & (noise > 0))
        mask = mask & ~bad_flux & ~bad_noise
        flux[bad_flux] = 0.0
        noise[bad_noise] = 1.0
        if not mask.any():
            raise KinjaxError(
                f"Cube {self.name!r}: every spaxel is fully masked (no finite flux with positive noise); "
                "check the file's data and variance extensions"
            )

        x = np.array(self.x, dtype=np.float64).reshape(-1)
        y = np.array(self.y, dtype=np.float64).reshape(-1)
        if x.shape != (n_spaxels,) or y.shape != (n_spaxels,):
            raise KinjaxError(f"Cube: x and y must have shape (n_spaxels,) = ({n_spaxels},), got {x.shape}, {y.shape}")
        if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
            raise KinjaxError("Cube: spaxel positions x, y must be finite")

        fwhm = self.fwhm
        if fwhm is not None:
            fwhm = np.array(fwhm, dtype=np.float64)
            if fwhm.ndim == 0:
                fwhm = float(fwhm)
                ok = np.isfinite(fwhm) and fwhm > 0
            else:
                ok = fwhm.shape == (n_wave,) and np.all(np.isfinite(fwhm) & (fwhm > 0))
            if not ok:
                raise KinjaxError(f"Cube: fwhm must be a positive number of Å or an array of shape ({n_wave},)")

        velscale = self.velscale
        if velscale is not None:
            velscale = float(velscale)
            if not (np.isfinite(velscale) and velscale > 0):
                raise KinjaxError(f"Cube: velscale must be a positive number of km/s, got {self.velscale}")

        grid_shape, grid_index = self.grid_shape, self.grid_index
        if (grid_shape is None) != (grid_index is None):
            raise KinjaxError("Cube: give both grid_shape and grid_index, or neither")
        if grid_shape is not None:
            grid_shape = tuple(int(n) for n in grid_shape)
            grid_index = np.array(grid_index, dtype=np.int64)
            if len(grid_shape) != 2 or grid_index.shape != (n_spaxels, 2):
                raise KinjaxError(
                    f"Cube: grid_shape must be (n_y, n_x) and grid_index (n_spaxels, 2), got {grid_shape}, {grid_index.shape}"
                )
            if np.any(grid_index < 0) or np.any(grid_index >= np.array(grid_shape)):
                raise KinjaxError(f"Cube: grid_index out of range for grid_shape {grid_shape}")

        for key, value in dict(wave=wave, flux=flux, noise=noise, mask=mask, x=x, y=y, fwhm=fwhm,
                               velscale=velscale, grid_shape=grid_shape, grid_index=grid_index,
                               redshift=float(self.redshift)).items():
            set_(self, key, value)

    # ------------------------------------------------------------------ properties
    @property
    def n_spaxels(self) -> int:
        """Number of spaxels (rows of ``flux``)."""
        return self.flux.shape[0]

    @property
    def n_wave(self) -> int:
        """Number of wavelength pixels."""
        return self.wave.size

    @property
    def valid(self) -> np.ndarray:
        """(n_spaxels,) bool: at least `MIN_GOOD_FRACTION` of the spaxel's pixels are good."""
        return self.mask.mean(axis=1) >= MIN_GOOD_FRACTION

    # ------------------------------------------------------------------ methods
    def snr(self) -> np.ndarray:
        """Median of flux/noise over the good pixels of each spaxel.

        Returns
        -------
        ndarray, shape (n_spaxels,)
            S/N per pixel; NaN for spaxels that are not `valid`.
        """
        ratio = np.where(self.mask, self.flux / self.noise, np.nan)
        out = np.full(self.n_spaxels, np.nan)
        valid = self.valid
        if valid.any():
            out[valid] = np.nanmedian(ratio[valid], axis=1)
        return out

    def log_rebin(self, velscale: float | None = None, *, rebin_lsf: bool = False) -> "Cube":
        """Rebin every spaxel onto a ln λ grid at once (`kinjax.rebin.log_rebin`).

        Flux is the mean flux density per new pixel and the variance is propagated.
        A new pixel is good only if no bad input pixel contributes to it.

        Parameters
        ----------
        velscale : float, optional
            km/s per output pixel; default keeps the number of pixels.
        rebin_lsf : bool
            Record the rebinned data's effective FWHM (:func:`kinjax.rebin.rebinned_fwhm`:
            the input pixel's boxcar added in quadrature) instead of ``fwhm`` as given.
            The cube fits log-rebin with True.

        Returns
        -------
        Cube
            With ``wave = exp(ln_wave)`` (Å) and ``velscale`` set; a wavelength-dependent
            ``fwhm`` is interpolated onto the new grid.
        """
        from kinjax.rebin import carried_fwhm, log_rebin

        # bad pixels enter as NaN: log_rebin makes every output bin they touch non-finite
        flux = np.where(self.mask, self.flux, np.nan)
        var = np.where(self.mask, self.noise**2, np.nan)
        ln_wave, flux_new, var_new, velscale = log_rebin(self.wave, flux, velscale, variance=var)
        mask_new = np.isfinite(flux_new) & np.isfinite(var_new)
        wave_new = np.exp(ln_wave)
        fwhm = carried_fwhm(self.wave, self.fwhm, wave_new, rebin_lsf)
        with np.errstate(invalid="ignore"):
            noise_new = np.sqrt(var_new)  # NaN where masked: replaced on construction
        return replace(self, wave=wave_new, flux=flux_new, noise=noise_new, mask=mask_new,
                       fwhm=fwhm, velscale=float(velscale))

    def neighbours(self, radius: float):
        """(n_spaxels, n_spaxels) scipy CSR matrix: 1 where spaxel j is valid and within
        ``radius`` spaxel spacings of spaxel i (i itself included if valid), else 0."""
        import scipy.sparse as sp
        from scipy.spatial import cKDTree

        if not (np.isfinite(radius) and radius >= 0):
            raise KinjaxError(f"radius must be a non-negative number of spaxels, got {radius}")
        xy = np.stack([self.x, self.y], axis=1)
        tree = cKDTree(xy)
        step = float(np.median(tree.query(xy, k=2)[0][:, 1])) if self.n_spaxels > 1 else 1.0
        pairs = tree.sparse_distance_matrix(tree, (radius + 1e-9) * step, output_type="coo_matrix")
        near = sp.coo_matrix((np.ones(pairs.nnz), (pairs.row, pairs.col)), shape=pairs.shape).tocsr()
        return (near + sp.identity(self.n_spaxels, format="csr")).sign() @ sp.diags(self.valid.astype(float))

    def neighbour_mean(self, radius: float) -> tuple["Cube", np.ndarray]:
        """Each spaxel replaced by the mean of the valid spaxels within ``radius`` (in units
        of the spaxel spacing) around it, pixel by pixel over the good pixels.

        A higher-S/N copy of the cube for starting values (e.g. the two-Gaussian 3D fit's
        start, :func:`kinjax.cube_model.fit_cube_gp` ``start_radius``); not for science.

        Returns
        -------
        (Cube, n_avg)
            The averaged cube (noise propagated; a pixel is good where any neighbour's
            is) and, per spaxel, the number of spaxels averaged (n_spaxels,).
        """
        near = self.neighbours(radius)
        good = (self.mask & self.valid[:, None]).astype(float)
        count = near @ good
        with np.errstate(invalid="ignore", divide="ignore"):
            flux = (near @ np.where(good > 0, self.flux, 0.0)) / count
            noise = np.sqrt(near @ np.where(good > 0, self.noise**2, 0.0)) / count
        n_avg = np.asarray(near.sum(axis=1)).ravel()
        return replace(self, flux=np.nan_to_num(flux), noise=np.where(count > 0, noise, np.inf),
                       mask=count > 0), n_avg

    def crop(self, wave_min: float, wave_max: float) -> "Cube":
        """The wavelength pixels with ``wave_min <= wave <= wave_max`` (observed-frame Å), every spaxel.

        E.g. a MUSE cube (4750–9350 Å) cut to 4750–5500 Å before fitting, as pPXF users do.
        """
        from kinjax.spectrum import _crop_index

        keep = _crop_index(self.wave, wave_min, wave_max, self.name or "Cube")
        fwhm = self.fwhm if self.fwhm is None or np.ndim(self.fwhm) == 0 else np.asarray(self.fwhm)[keep]
        return replace(self, wave=self.wave[keep], flux=self.flux[:, keep], noise=self.noise[:, keep],
                       mask=self.mask[:, keep], fwhm=fwhm)

    def spectrum(self, i: int):
        """The spectrum of spaxel ``i`` as a `kinjax.spectrum.Spectrum`."""
        from kinjax.spectrum import Spectrum

        i = int(i)
        if not -self.n_spaxels <= i < self.n_spaxels:
            raise KinjaxError(f"Cube: spaxel index {i} out of range (cube has {self.n_spaxels} spaxels)")
        name = f"{self.name}[{i % self.n_spaxels}]" if self.name else f"spaxel {i % self.n_spaxels}"
        return Spectrum(self.wave, self.flux[i], self.noise[i], self.mask[i], self.fwhm,
                        redshift=self.redshift, velscale=self.velscale, name=name)

    def select(self, indices) -> "Cube":
        """A cube with the spaxels ``indices`` (int array or (n_spaxels,) bool mask)."""
        idx = np.asarray(indices)
        if idx.dtype == bool:
            if idx.shape != (self.n_spaxels,):
                raise KinjaxError(f"Cube.select: boolean selection must have shape ({self.n_spaxels},)")
            idx = np.flatnonzero(idx)
        idx = idx.astype(np.int64).reshape(-1)
        if idx.size == 0 or np.any(idx < -self.n_spaxels) or np.any(idx >= self.n_spaxels):
            raise KinjaxError(f"Cube.select: indices must be a non-empty selection of 0..{self.n_spaxels - 1}")
        return replace(self, flux=self.flux[idx], noise=self.noise[idx], mask=self.mask[idx],
                       x=self.x[idx], y=self.y[idx],
                       grid_index=None if self.grid_index is None else self.grid_index[idx])

    def to_image(self, values, bin_number=None) -> np.ndarray:
        """Map per-spaxel (or per-bin) values onto the spatial grid.

        Parameters
        ----------
        values : array_like, shape (n_spaxels, ...) or (n_bins, ...)
            One value (or vector) per spaxel; per bin when ``bin_number`` is given.
        bin_number : array_like of int, shape (n_spaxels,), optional
            Bin of each spaxel as returned by `voronoi_bin` (−1 = not binned).

        Returns
        -------
        ndarray, shape (n_y, n_x, ...)
            NaN where no spaxel (or no bin) gives a value.
        """
        if self.grid_shape is None:
            raise KinjaxError(
                "Cube.to_image: this cube has no spatial grid (e.g. an E3D table or a binned cube); "
                "plot values against cube.x, cube.y instead"
            )
        values = np.asarray(values, dtype=np.float64)
        if bin_number is not None:
            bin_number = np.asarray(bin_number, dtype=np.int64)
            if bin_number.shape != (self.n_spaxels,) or np.any(bin_number >= len(values)):
                raise KinjaxError("Cube.to_image: bin_number must be (n_spaxels,) ints below the number of values")
            per_spaxel = np.full((self.n_spaxels,) + values.shape[1:], np.nan)
            used = bin_number >= 0
            per_spaxel[used] = values[bin_number[used]]
            values = per_spaxel
        if values.shape[:1] != (self.n_spaxels,):
            raise KinjaxError(f"Cube.to_image: values must have {self.n_spaxels} rows (one per spaxel), got {values.shape}")
        image = np.full(self.grid_shape + values.shape[1:], np.nan)
        image[self.grid_index[:, 0], self.grid_index[:, 1]] = values
        return image

    def voronoi_bin(self, target_sn: float, *, min_sn: float = 0.0) -> tuple["Cube", np.ndarray]:
        """Adaptive Voronoi binning (Cappellari & Copin 2003, `vorbin`) to a target S/N.

        Spaxels that are `valid` with median S/N ≥ ``min_sn`` are binned with
        ``vorbin.voronoi_2d_binning.voronoi_2d_binning`` (signal and noise per spaxel:
        the medians of flux and noise over its good pixels). If every used spaxel already
        reaches ``target_sn``, each becomes its own bin.

        The binned spectra are: flux = sum of the member spectra (bad pixels contribute
        0), noise = sqrt(sum of member variances), mask = AND of the member masks (a
        binned pixel is good only where every member is good, so the sum is complete),
        x/y = the bins' luminosity-weighted centroids (weights: the members' signal).

        Parameters
        ----------
        target_sn : float
            Target S/N per pixel of the binned spectra.
        min_sn : float
            Spaxels with lower median S/N are left out (``bin_number`` −1).

        Returns
        -------
        binned : Cube
            One spectrum per bin, ``format="binned"``, no grid.
        bin_number : ndarray of int, shape (n_spaxels,)
            Bin of each spaxel, −1 for spaxels not used.
        """
        if not (np.isfinite(target_sn) and target_sn > 0):
            raise KinjaxError(f"Cube.voronoi_bin: target_sn must be positive, got {target_sn}")
        sn = self.snr()
        used = self.valid & (sn >= min_sn)
        if used.sum() == 0:
            raise KinjaxError(f"Cube.voronoi_bin: no valid spaxel has S/N >= min_sn={min_sn}; lower min_sn")
        idx = np.flatnonzero(used)
        good = self.mask[idx]
        signal = np.array([np.median(f[g]) for f, g in zip(self.flux[idx], good)])
        noise = np.array([np.median(n[g]) for n, g in zip(self.noise[idx], good)])
        if np.any(signal <= 0):
            raise KinjaxError("Cube.voronoi_bin: some spaxels have non-positive median flux; raise min_sn to exclude them")

        if np.min(signal / noise) >= target_sn:
            classes = np.arange(idx.size)
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # vorbin's deprecation notice
                from vorbin.voronoi_2d_binning import voronoi_2d_binning

                try:
                    classes = voronoi_2d_binning(self.x[idx], self.y[idx], signal, noise, target_sn,
                                                 plot=False, quiet=True)[0]
                except ValueError as exc:
                    raise KinjaxError(f"Cube.voronoi_bin: {' '.join(str(exc).split())}") from None
        classes = np.asarray(classes, dtype=np.int64)
        n_bins = int(classes.max()) + 1

        # one-hot membership (n_bins, n_used): sums become matrix products, no loop
        member = np.zeros((n_bins, idx.size))
        member[classes, np.arange(idx.size)] = 1.0
        flux = member @ np.where(good, self.flux[idx], 0.0)
        var = member @ np.where(good, self.noise[idx] ** 2, 0.0)
        n_bad = member @ (~good).astype(np.float64)
        w = member * signal[None, :]
        xb = (w @ self.x[idx]) / w.sum(axis=1)
        yb = (w @ self.y[idx]) / w.sum(axis=1)

        bin_number = np.full(self.n_spaxels, -1, dtype=np.int64)
        bin_number[idx] = classes
        binned = replace(self, flux=flux, noise=np.sqrt(var), mask=n_bad == 0, x=xb, y=yb,
                         grid_shape=None, grid_index=None, format="binned")
        return binned, bin_number


# ---------------------------------------------------------------------- wavelengths
def vacuum_to_air(wave_vac):
    """Convert vacuum wavelengths to air (IAU standard, Morton 2000, ApJS 130, 403).

    n = 1 + 8.34254e-5 + 2.406147e-2 / (130 − s²) + 1.5998e-4 / (38.9 − s²), with
    s = 10⁴ / λ_vac (λ in Å); λ_air = λ_vac / n (Birch & Downs 1994, dry air, 15 °C,
    1 atm). Valid above 2000 Å.

    Parameters
    ----------
    wave_vac : array_like
        Vacuum wavelengths in Å.

    Returns
    -------
    ndarray
        Air wavelengths in Å, same shape.
    """
    wave_vac = np.asarray(wave_vac, dtype=np.float64)
    s2 = (1e4 / wave_vac) ** 2
    n = 1.0 + 8.34254e-5 + 2.406147e-2 / (130.0 - s2) + 1.5998e-4 / (38.9 - s2)
    return wave_vac / n


_WAVE_UNITS = {"": 1.0, "ANGSTROM": 1.0, "ANGSTROMS": 1.0, "A": 1.0, "AA": 1.0,
               "NM": 10.0, "UM": 1e4, "MICRON": 1e4, "M": 1e10}


def _unit_to_angstrom(unit, name):
    key = str(unit or "").strip().upper()
    if key not in _WAVE_UNITS:
        raise KinjaxError(f"{name}: unknown wavelength unit {unit!r} (expected Angstrom, nm, um or m)")
    return _WAVE_UNITS[key]


def _grid_positions(n_y, n_x, scale_y, scale_x):
    """Offsets (arcsec) of a (n_y, n_x) grid from its centre, spaxel k = iy * n_x + ix."""
    iy, ix = np.indices((n_y, n_x)).reshape(2, -1)
    x = (ix - (n_x - 1) / 2.0) * scale_x
    y = (iy - (n_y - 1) / 2.0) * scale_y
    return x, y, np.stack([iy, ix], axis=1)


def _pixel_scales(header, default):
    """Spaxel size (arcsec) along the cube's x (columns) and y (rows) from a celestial WCS."""
    def scale(i):
        cd = [header.get(f"CD{j}_{i}") for j in (1, 2)]
        if any(c is not None for c in cd):
            return 3600.0 * float(np.hypot(cd[0] or 0.0, cd[1] or 0.0))
        if header.get(f"CDELT{i}") is not None:
            return 3600.0 * abs(float(header[f"CDELT{i}"]))
        return default

    sx, sy = scale(1), scale(2)
    return (sx if sx > 0 else default), (sy if sy > 0 else default)


def _require(hdul, extnames, path, layout):
    """KinjaxError unless every extension in ``extnames`` is present with data."""
    missing = [e for e in extnames if e not in hdul or hdul[e].data is None]
    if missing:
        raise KinjaxError(f"{path}: not a {layout} file: missing extension(s) {', '.join(missing)}")


def _flatten_cube(data):
    """(n_wave, n_y, n_x) → (n_y * n_x, n_wave)."""
    n_wave = data.shape[0]
    return np.ascontiguousarray(data.reshape(n_wave, -1).T)


# ---------------------------------------------------------------------- detection
def detect_format(hdul) -> str:
    """Recognise the layout of an open FITS file.

    Parameters
    ----------
    hdul : astropy.io.fits.HDUList

    Returns
    -------
    str
        "muse" (DATA + STAT images), "manga" (FLUX + IVAR + WAVE), "atlas3d" (a binary
        table with DATA_SPE) or "spectrum" (not a cube: what
        :func:`kinjax.spectrum.is_spectrum_file` accepts, a 1D image or a spectrum table).

    Raises
    ------
    KinjaxError
        For any other layout (a 2D image, a table without DATA_SPE, ...).
    """
    names = {h.name.upper() for h in hdul}
    label = hdul.filename() or "FITS file"

    def ndim(extname):
        data = hdul[extname].data
        return None if data is None else np.ndim(data)

    if {"DATA", "STAT"} <= names and ndim("DATA") == 3:
        return "muse"
    if {"FLUX", "IVAR", "WAVE"} <= names and ndim("FLUX") == 3:
        return "manga"
    for h in hdul[1:]:
        cols = getattr(h, "columns", None)
        if cols is not None and "DATA_SPE" in [c.upper() for c in cols.names]:
            return "atlas3d"
    from kinjax.spectrum import is_spectrum_file

    if is_spectrum_file(hdul):
        return "spectrum"  # a 1D image, an SDSS table or a spectrum table (kinjax.spectrum.read_spectrum)
    raise KinjaxError(_UNRECOGNISED.format(name=label))


def read_cube(path, format=None, *, fwhm=None, redshift=0.0, require_fwhm=True) -> Cube:
    """Read an IFU cube, recognising its layout (see `detect_format`).

    Parameters
    ----------
    path : str or path-like
        FITS file.
    format : {"muse", "manga", "atlas3d"}, optional
        Skip the detection.
    fwhm : float or ndarray, optional
        Instrumental FWHM in Å; required for MUSE (unless ``require_fwhm=False``).
    redshift : float
        Systemic redshift guess stored in the cube.
    require_fwhm : bool
        If False, a missing FWHM is left as None instead of raising (for summaries).

    Returns
    -------
    Cube
    """
    from astropy.io import fits

    readers = {"muse": read_muse, "manga": read_manga, "atlas3d": read_atlas3d}
    if format is None:
        with fits.open(path) as hdul:
            format = detect_format(hdul)
    format = str(format).lower()
    if format == "spectrum":
        raise KinjaxError(f"{path}: is a 1D spectrum, not a cube; read it with kinjax.read_spectrum")
    if format not in readers:
        raise KinjaxError(f"unknown cube format {format!r}; use one of {sorted(readers)}")
    return readers[format](path, fwhm=fwhm, redshift=redshift, require_fwhm=require_fwhm)


def read_muse(path, *, fwhm=None, redshift=0.0, require_fwhm=True) -> Cube:
    """Read a MUSE cube: image extensions DATA and STAT (variance), (n_λ, n_y, n_x).

    λ_i = CRVAL3 + (i + 1 − CRPIX3) × CD3_3 (or CDELT3), in CUNIT3 (Å, nm or m; converted
    to Å). CTYPE3 'AWAV' is air; 'WAVE' (vacuum) is converted to air with
    `vacuum_to_air`. A DQ extension, if present, masks pixels with non-zero flags.
    x/y are offsets in arcsec from the cube centre along the pixel columns/rows (no
    rotation to North/East), pixel size from CD1_1/CD2_1 etc. or CDELT1/2 (degrees),
    else 0.2". The instrumental FWHM is not read from the file: pass ``fwhm`` (Å).
    """
    from astropy.io import fits

    if fwhm is None and require_fwhm:
        raise KinjaxError(f"{path}: MUSE files do not carry the instrumental FWHM reliably; pass fwhm=... / --fwhm (Å)")
    with fits.open(path) as hdul:
        _require(hdul, ("DATA", "STAT"), path, "MUSE")
        hdr = hdul["DATA"].header
        data = np.asarray(hdul["DATA"].data)
        stat = np.asarray(hdul["STAT"].data)
        dq = np.asarray(hdul["DQ"].data) if "DQ" in hdul else None
        primary = hdul[0].header
    if data.ndim != 3 or stat.shape != data.shape:
        raise KinjaxError(f"{path}: DATA must be (n_wave, n_y, n_x) and STAT the same shape, got {data.shape}, {stat.shape}")
    n_wave, n_y, n_x = data.shape
    step = hdr.get("CD3_3", hdr.get("CDELT3"))
    if step is None or "CRVAL3" not in hdr:
        raise KinjaxError(f"{path}: DATA header lacks CRVAL3 and CD3_3/CDELT3; cannot build the wavelength axis")
    pix = np.arange(n_wave)
    wave = float(hdr["CRVAL3"]) + (pix + 1 - float(hdr.get("CRPIX3", 1.0))) * float(step)
    wave = wave * _unit_to_angstrom(hdr.get("CUNIT3", "Angstrom"), str(path))
    if str(hdr.get("CTYPE3", "AWAV")).upper().startswith("WAVE"):
        wave = vacuum_to_air(wave)
    flux = _flatten_cube(data)
    with np.errstate(invalid="ignore"):
        var = _flatten_cube(stat)
        noise = np.sqrt(np.where(var > 0, var, np.nan))
    mask = np.ones(flux.shape, dtype=bool)
    if dq is not None and dq.shape == data.shape:
        mask &= _flatten_cube(dq) == 0
    x, y, grid_index = _grid_positions(n_y, n_x, *_pixel_scales(hdr, MUSE_PIXEL_SCALE)[::-1])
    name = str(primary.get("OBJECT", "")).strip()
    return Cube(wave, flux, noise, mask, x, y, fwhm, redshift=redshift, grid_shape=(n_y, n_x),
                grid_index=grid_index, format="muse", name=name)


def _manga_fwhm(hdul, wave_air):
    """Instrumental FWHM (Å, shape (n_wave,)): the pre-pixelised LSF first (PRESPECRES, else
    the median over spaxels of PREDISP / LSFPRE), else the post-pixelised SPECRES.

    kinjax's forward model integrates the LOSVD-broadened templates over each pixel, so
    the LSF to match is the one before pixelisation, as the MaNGA DAP uses with pPXF.
    """

    def from_resolution(ext):
        res = np.asarray(hdul[ext].data, dtype=np.float64).reshape(-1)
        ok = np.isfinite(res) & (res > 0)
        if res.size == wave_air.size and ok.any():
            return wave_air / np.interp(wave_air, wave_air[ok], res[ok])
        return None

    def from_sigma(ext):
        sig = np.asarray(hdul[ext].data, dtype=np.float64)
        sig = np.where(np.isfinite(sig) & (sig > 0), sig, np.nan).reshape(sig.shape[0], -1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            med = np.nanmedian(sig, axis=1)
        ok = np.isfinite(med)
        if med.size == wave_air.size and ok.any():
            return SIGMA_TO_FWHM * np.interp(wave_air, wave_air[ok], med[ok])
        return None

    for ext, read in (("PRESPECRES", from_resolution), ("PREDISP", from_sigma), ("LSFPRE", from_sigma),
                      ("SPECRES", from_resolution)):
        if ext in hdul and hdul[ext].data is not None:
            fwhm = read(ext)
            if fwhm is not None:
                return fwhm
    return None


def read_manga(path, *, fwhm=None, redshift=0.0, require_fwhm=True) -> Cube:
    """Read a MaNGA DRP LOGCUBE: FLUX, IVAR, MASK (n_λ, n_y, n_x) and WAVE (vacuum Å).

    Pixels with IVAR ≤ 0 or the DONOTUSE (10, value 1024) or FORESTAR (3, value 8) bit
    of MASK are masked, as the MaNGA DAP does;
    noise = 1/sqrt(IVAR). Wavelengths are converted to air (`vacuum_to_air`), so the
    axis is no longer exactly log-uniform: ``velscale`` is None (call `Cube.log_rebin`).

    The FWHM (Å, per wavelength) comes from ``fwhm`` if given, else from the DRP's
    pre-pixelised line-spread function, which is what the MaNGA DAP gives pPXF and what
    kinjax's forward model (which integrates over pixels) must match: PRESPECRES (the
    median resolution R = λ/Δλ_FWHM; FWHM = λ/R), else PREDISP (DR15) or LSFPRE (DR17),
    the per-spaxel 1σ width in Å (FWHM = 2.3548 × the median over spaxels); failing
    those, the post-pixelised SPECRES. Spaxels are 0.5" (or the WCS scale).
    """
    from astropy.io import fits

    with fits.open(path) as hdul:
        _require(hdul, ("FLUX", "IVAR", "WAVE"), path, "MaNGA LOGCUBE")
        flux_c = np.asarray(hdul["FLUX"].data)
        ivar_c = np.asarray(hdul["IVAR"].data)
        bits_c = np.asarray(hdul["MASK"].data) if "MASK" in hdul else None
        wave_vac = np.asarray(hdul["WAVE"].data, dtype=np.float64).reshape(-1)
        wave = vacuum_to_air(wave_vac)
        if fwhm is None:
            fwhm = _manga_fwhm(hdul, wave)
        hdr = hdul["FLUX"].header
        primary = hdul[0].header
    if flux_c.ndim != 3 or ivar_c.shape != flux_c.shape or wave_vac.size != flux_c.shape[0]:
        raise KinjaxError(f"{path}: FLUX and IVAR must be (n_wave, n_y, n_x) with len(WAVE) = n_wave")
    if fwhm is None and require_fwhm:
        raise KinjaxError(f"{path}: no PRESPECRES, PREDISP, LSFPRE or SPECRES extension to give the FWHM; "
                          "pass fwhm=... / --fwhm (Å)")
    n_wave, n_y, n_x = flux_c.shape
    ivar = _flatten_cube(ivar_c).astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        noise = np.where(ivar > 0, 1.0 / np.sqrt(ivar), np.nan)
    mask = ivar > 0
    if bits_c is not None:
        mask &= (_flatten_cube(bits_c).astype(np.int64) & (MANGA_DONOTUSE | MANGA_FORESTAR)) == 0
    x, y, grid_index = _grid_positions(n_y, n_x, *_pixel_scales(hdr, MANGA_PIXEL_SCALE)[::-1])
    name = str(primary.get("PLATEIFU", primary.get("OBJECT", ""))).strip()
    return Cube(wave, _flatten_cube(flux_c), noise, mask, x, y, fwhm, redshift=redshift,
                grid_shape=(n_y, n_x), grid_index=grid_index, format="manga", name=name)


def read_atlas3d(path, *, fwhm=None, redshift=0.0, require_fwhm=True) -> Cube:
    """Read an ATLAS3D / SAURON cube in E3D (Euro3D-like) form.

    Extension 1 is a binary table with one row per lens: DATA_SPE (flux), STAT_SPE
    (variance), XPOS, YPOS (arcsec). The linear wavelength axis comes from CRVALS,
    CDELTS and CRPIXS (table header, else primary header): λ_i = CRVALS + (i + 1 −
    CRPIXS) × CDELTS for pixel index i from 0, the FITS 1-based reference-pixel
    convention; with no CRPIXS the first pixel is at CRVALS (CRPIXS = 1). Lenses do not
    lie on a grid (``grid_shape`` None). FWHM defaults to SAURON's 4.2 Å (`SAURON_FWHM`).
    """
    from astropy.io import fits

    with fits.open(path) as hdul:
        table = None
        for h in hdul[1:]:
            cols = getattr(h, "columns", None)
            if cols is not None and "DATA_SPE" in [c.upper() for c in cols.names]:
                table = h
                break
        if table is None:
            raise KinjaxError(f"{path}: no binary table with a DATA_SPE column; not an ATLAS3D/SAURON E3D file")
        names = [c.upper() for c in table.columns.names]
        missing = [c for c in ("STAT_SPE", "XPOS", "YPOS") if c not in names]
        if missing:
            raise KinjaxError(f"{path}: E3D table lacks column(s) {', '.join(missing)}; cannot read noise/positions")
        flux = np.asarray(table.data["DATA_SPE"], dtype=np.float64)
        var = np.asarray(table.data["STAT_SPE"], dtype=np.float64)
        x = np.asarray(table.data["XPOS"], dtype=np.float64)
        y = np.asarray(table.data["YPOS"], dtype=np.float64)
        if "SPEC_STA" in names and np.unique(table.data["SPEC_STA"]).size > 1:
            raise KinjaxError(f"{path}: spectra start at different pixels (SPEC_STA varies); not supported")
        hdr, primary = table.header, hdul[0].header
    key = lambda k, default=None: hdr.get(k, primary.get(k, default))  # noqa: E731
    if key("CRVALS") is None or key("CDELTS") is None:
        raise KinjaxError(f"{path}: E3D header lacks CRVALS/CDELTS; cannot build the wavelength axis")
    if flux.ndim != 2 or var.shape != flux.shape:
        raise KinjaxError(f"{path}: DATA_SPE and STAT_SPE must be (n_spaxels, n_wave) arrays of the same shape")
    pix = np.arange(flux.shape[1])
    wave = float(key("CRVALS")) + (pix + 1 - float(key("CRPIXS", 1.0))) * float(key("CDELTS"))
    wave = wave * _unit_to_angstrom(key("CUNITS", "Angstrom"), str(path))
    with np.errstate(invalid="ignore"):
        noise = np.sqrt(np.where(var > 0, var, np.nan))
    if fwhm is None:
        fwhm = SAURON_FWHM
    name = str(primary.get("OBJECT", "")).strip()
    return Cube(wave, flux, noise, None, x, y, fwhm, redshift=redshift, format="atlas3d", name=name)

