"""Fitting IFU cubes: spaxel by spaxel, or all spaxels at once with GP priors.

:func:`fit_cube_spaxels` fits every usable spaxel independently with the single-spectrum
MAP machinery of :mod:`kinjax.optimize` (one forward model for the whole cube, ``vmap``
over chunks of spaxels). :func:`fit_cube_gp` (in :mod:`kinjax.cube_model`) couples the
spaxels through Gaussian-process priors on the LOSVD parameter maps. Both return a
:class:`CubeFit`, whose maps can be written to a ``MAPS.fits`` file.

Shapes: ``n_spaxels`` rows in the cube's order, ``n_params`` LOSVD parameters (then the
multiplicative polynomial's, if any), ``n_v`` points of the tabulated LOSVD.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from kinjax.errors import KinjaxError
from kinjax.sharding import spectra_mesh

__all__ = ["CubeFit", "fit_cube_spaxels", "fit_cube_spaxels_nuts", "prepare_cube", "select_spaxels",
           "losvd_summaries", "grid_moments", "laplace_batch", "spec_key"]

#: Laplace draws per spaxel used to propagate errors to the mean velocity and dispersion.
N_DRAWS = 64
#: families whose LOSVDs are true densities with closed-form mean and dispersion
EXACT_MOMENTS = ("se", "gauss2")


@dataclass(frozen=True)
class CubeFit:
    """Kinematic maps of a cube (one row per spaxel; NaN where not fitted).

    Attributes
    ----------
    cube : Cube
        The (log-rebinned) cube that was fitted; gives the grid for :meth:`to_maps`.
    names : tuple of str
        Names of the columns of ``theta`` (LOSVD parameters, then ``m1``… for the
        multiplicative polynomial).
    theta, theta_err : (n_spaxels, n_params)
        Best parameters (V and σ in km/s) and 1σ errors (Laplace approximation).
    mean_v, mean_v_err : (n_spaxels,)
        First moment of the fitted LOSVD and its error (km/s): exact for the
        non-negative families (Sanders–Evans, two Gaussians), from ``losvd`` with
        negative lobes clipped otherwise (see :func:`losvd_summaries`); errors from
        Laplace draws.
    dispersion, dispersion_err : (n_spaxels,)
        Square root of the second central moment of the fitted LOSVD and its error (km/s).
    velocity : (n_v,)
        Velocity grid of ``losvd`` (km/s).
    losvd : (n_spaxels, n_v)
        Fitted LOSVD on ``velocity`` (1/(km/s)).
    chi2, dof : (n_spaxels,)
        χ² of the fit and its degrees of freedom (good pixels − fitted parameters).
    fitted : (n_spaxels,) bool
        Spaxels that were fitted; the others are NaN everywhere.
    cov : (n_spaxels, n_params, n_params)
        Laplace covariance of ``theta``.
    family : str
        LOSVD family ("gh", "se", "hist", "gauss2").
    method : str
        "spaxels", "gp-map" or "gp-svi".
    info : dict
        Method-specific extras (e.g. GP hyperparameters, timings).
    """

    cube: object
    names: tuple
    theta: np.ndarray
    theta_err: np.ndarray
    mean_v: np.ndarray
    mean_v_err: np.ndarray
    dispersion: np.ndarray
    dispersion_err: np.ndarray
    velocity: np.ndarray
    losvd: np.ndarray
    chi2: np.ndarray
    dof: np.ndarray
    fitted: np.ndarray
    cov: np.ndarray
    family: str = "gh"
    method: str = "spaxels"
    info: dict | None = None

    @property
    def n_spaxels(self) -> int:
        return self.theta.shape[0]

    @property
    def reduced_chi2(self) -> np.ndarray:
        """(n_spaxels,) χ²/DOF."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return self.chi2 / self.dof

    def _map_columns(self) -> dict:
        """Per-spaxel columns of the maps, keyed by MAPS.fits extension name."""
        cols = {}
        for j, name in enumerate(self.names):
            key = {"v": "V", "sigma": "SIGMA"}.get(name, name.upper())
            cols[key] = self.theta[:, j]
            cols[key + "_ERR"] = self.theta_err[:, j]
        cols["MEAN_V"], cols["MEAN_V_ERR"] = self.mean_v, self.mean_v_err
        cols["DISPERSION"], cols["DISPERSION_ERR"] = self.dispersion, self.dispersion_err
        return cols

    def to_maps(self) -> dict:
        """Images of every quantity: ``{name: (n_y, n_x)}`` plus ``LOSVD`` (n_y, n_x, n_v).

        Names as in :meth:`write_maps` (``V``, ``V_ERR``, ``SIGMA``, …, ``MEAN_V``, …).
        NaN where a spaxel was not fitted or does not exist.
        """
        maps = {k: self.cube.to_image(v) for k, v in self._map_columns().items()}
        maps["LOSVD"] = self.cube.to_image(self.losvd)
        maps["RCHI2"] = self.cube.to_image(self.reduced_chi2)
        return maps

    def write_maps(self, path, overwrite: bool = True) -> None:
        """Write the maps to a FITS file (``MAPS.fits``).

        Image extensions ``V``, ``V_ERR``, ``SIGMA``, ``SIGMA_ERR``, ``H3``, ``H3_ERR``, …
        (the family's parameter names upper-cased), ``MEAN_V``, ``MEAN_V_ERR``,
        ``DISPERSION``, ``DISPERSION_ERR`` (each (n_y, n_x), km/s for velocities, NaN where
        not fitted), ``RCHI2`` and ``LOSVD`` (n_v, n_y, n_x) with the velocity axis
        described by CRVAL3/CDELT3/CRPIX3 and CUNIT3 = 'km/s'. The file is written to a
        temporary name and renamed, so a failure never leaves a partial file.
        """
        from astropy.io import fits

        path = os.fspath(path)
        if os.path.exists(path) and not overwrite:
            raise KinjaxError(f"{path} exists; pass overwrite=True or choose another name")
        maps = self.to_maps()
        primary = fits.PrimaryHDU()
        primary.header["ORIGIN"] = "kinjax"
        primary.header["METHOD"] = self.method
        primary.header["FAMILY"] = self.family
        primary.header["NFITTED"] = int(self.fitted.sum())
        wave = np.asarray(self.cube.wave)
        primary.header["WAVEMIN"] = (float(wave[0]), "first fitted pixel centre, observed (Angstrom)")
        primary.header["WAVEMAX"] = (float(wave[-1]), "last fitted pixel centre, observed (Angstrom)")
        primary.header["REDSHIFT"] = (float(self.cube.redshift), "velocities relative to c ln(1 + z)")
        fwhm = np.atleast_1d(np.asarray(self.cube.fwhm, float))
        primary.header["FWHM"] = (float(np.median(fwhm)), "LSF FWHM of fitted log-rebinned data (Angstrom)")
        hdus = [primary]
        for key, image in maps.items():
            if key == "LOSVD":
                continue
            hdu = fits.ImageHDU(np.asarray(image, dtype=np.float64), name=key)
            if key.removesuffix("_ERR") in ("V", "SIGMA", "MEAN_V", "DISPERSION"):
                hdu.header["BUNIT"] = "km/s"
            hdus.append(hdu)
        cube = np.moveaxis(np.asarray(maps["LOSVD"], dtype=np.float64), -1, 0)
        hdu = fits.ImageHDU(cube, name="LOSVD")
        hdu.header["CRVAL3"] = float(self.velocity[0])
        hdu.header["CDELT3"] = float(self.velocity[1] - self.velocity[0]) if self.velocity.size > 1 else 1.0
        hdu.header["CRPIX3"] = 1.0
        hdu.header["CUNIT3"] = "km/s"
        hdu.header["CTYPE3"] = "VELO"
        hdu.header["BUNIT"] = "s/km"
        hdus.append(hdu)
        directory = os.path.dirname(os.path.abspath(path))
        fd, tmp = tempfile.mkstemp(suffix=".fits.part", dir=directory)
        os.close(fd)
        try:
            fits.HDUList(hdus).writeto(tmp, overwrite=True)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)


# ---------------------------------------------------------------------- preparation
def prepare_cube(cube, templates, *, snr_min=None, velscale_ratio=2, vmax=2000.0,
                 degree=4, mdegree=0, losvd="gh", moments=4, dtype=None, mask_emission=True):
    """Log-rebin the cube if needed, pick usable spaxels, build one forward model.

    With ``mask_emission`` (default) the usual gas emission lines at the cube's systemic
    redshift (±800 km/s, pPXF's list: :func:`kinjax.spectrum.emission_line_mask`) are
    masked in every spaxel, as :func:`kinjax.fit.fit_spectrum` does for one spectrum.
    Spaxels are chosen (``valid``, ``snr_min``) before this mask is applied.

    Returns
    -------
    cube : Cube (log-rebinned)
    use : (n_spaxels,) bool, spaxels to fit
    forward : ForwardModel
    spec : LosvdSpec
    """
    from kinjax.family import losvd_spec
    from kinjax.forward import make_forward_model
    from kinjax.templates import prepare_templates

    cube, use = select_spaxels(cube, snr_min=snr_min, mask_emission=mask_emission)
    first = cube.spectrum(int(np.flatnonzero(use)[0]))
    tpl = prepare_templates(templates, first, velscale_ratio=velscale_ratio, vmax=vmax)
    # the model only uses the wavelength grid; the per-spaxel mask enters through weights
    spec = losvd_spec(losvd, moments=moments, velscale=cube.velscale)
    # one template set per kinematic component (two Gaussians: a population for each)
    forward = make_forward_model((tpl,) * spec.n_components, first, degree=degree, mdegree=mdegree, vmax=vmax,
                                 dtype=dtype)
    return cube, use, forward, spec


def select_spaxels(cube, *, snr_min=None, mask_emission=True):
    """The log-rebinned cube (emission lines masked if asked) and the spaxels to fit.

    The first half of :func:`prepare_cube`, without the templates: spaxels must be
    ``valid``, reach ``snr_min`` (before the emission mask) and keep 20 good pixels.

    Returns
    -------
    cube : Cube (log-rebinned)
    use : (n_spaxels,) bool
    """
    from kinjax.cube import Cube

    if not isinstance(cube, Cube):
        raise KinjaxError(f"expected a kinjax Cube, got {type(cube).__name__}")
    if cube.velscale is None:  # the rebinned cube's LSF includes the linear pixel's boxcar (kinjax.rebin)
        cube = cube.log_rebin(rebin_lsf=True)
    use = np.asarray(cube.valid, bool).copy()
    if snr_min is not None:
        with np.errstate(invalid="ignore"):
            use &= np.nan_to_num(cube.snr(), nan=-np.inf) >= float(snr_min)
    if not use.any():
        what = f" with S/N >= {snr_min}" if snr_min is not None else ""
        raise KinjaxError(f"no usable spaxel{what} in the cube (of {cube.n_spaxels}); lower snr_min or check the mask")
    if cube.fwhm is None:
        raise KinjaxError("the cube has no instrumental FWHM; pass fwhm=... when reading it")
    if mask_emission:
        import dataclasses

        from kinjax.spectrum import emission_line_mask

        cube = dataclasses.replace(cube, mask=cube.mask & emission_line_mask(cube.wave, cube.redshift)[None, :])
        use &= cube.mask.sum(axis=1) >= 20
        if not use.any():
            raise KinjaxError("no spaxel keeps 20 good pixels once emission lines are masked; "
                              "check the wavelength range or pass mask_emission=False")
    return cube, use


# Jitted batch functions take the ForwardModel as a traced argument and the LOSVD spec as
# a static key, so fits of cubes with the same shapes reuse one compilation.
_SPECS: dict = {}


def spec_key(spec) -> tuple:
    """A hashable key standing for ``spec`` in the jitted batch functions."""
    opts = tuple(sorted((k, np.asarray(v).tobytes() if isinstance(v, np.ndarray) else v)
                        for k, v in spec.options.items()))
    key = (spec.family, tuple(spec.names), np.asarray(spec.lower).tobytes(),
           np.asarray(spec.upper).tobytes(), float(spec.smoothness), spec.h_prior, spec.se_prior, opts)
    _SPECS.setdefault(key, spec)
    return key


@eqx.filter_jit
def _fit_batch(forward, key, y, w, mesh=None):
    """MAP fits (two starts, see :func:`kinjax.optimize.make_fitter`) of a batch (n, n_pix) of spectra.

    ``mesh``: split the batch over devices (:func:`kinjax.sharding.spectra_mesh`).
    """
    from kinjax.optimize import make_fitter, map_spectra

    return map_spectra(make_fitter(forward, _SPECS[key]), y, w, mesh=mesh)


@eqx.filter_jit
def laplace_batch(forward, key, y, w, theta, mesh=None):
    """Laplace covariance (n, n_theta, n_theta) and χ² (n,) at given ``theta`` (n, n_theta)."""
    from kinjax.optimize import make_map_solver, map_spectra

    sol = map_spectra(make_map_solver(forward, _SPECS[key], max_iter=0), y, w, theta, mesh=mesh)
    return sol.cov, sol.chi2


def _chunk_size(size, n_use, mesh):
    """Spaxels per batch: at most ``size`` and the ``n_use`` spaxels, whole blocks per device of ``mesh``."""
    n_dev = 1 if mesh is None else mesh.size
    size = int(max(1, min(size, n_use)))
    return -(-size // n_dev) * n_dev


def _chunks(idx, size):
    for a in range(0, idx.size, size):
        part = idx[a:a + size]
        pad = size - part.size
        yield part, np.concatenate([part, np.full(pad, part[0])]) if pad else part


def grid_moments(pdf, velocity):
    """Mean and dispersion (km/s) of a tabulated LOSVD, its negative lobes clipped to zero.

    A Gauss–Hermite series can dip below zero (and, for strongly negative h4, have a
    negative second moment); clipping and renormalising keeps both moments defined.
    ``pdf`` (..., n_v) on the uniform grid ``velocity`` (n_v,). Returns two (...,) arrays.
    """
    p = jnp.clip(pdf, 0.0, None)
    total = jnp.sum(p, axis=-1, keepdims=True)
    p = p / jnp.where(total > 0, total, 1.0)
    mean = jnp.sum(p * velocity, axis=-1)
    var = jnp.sum(p * (velocity - mean[..., None]) ** 2, axis=-1)
    ok = total[..., 0] > 0  # a LOSVD narrower than the grid, or entirely negative: undefined
    return jnp.where(ok, mean, jnp.nan), jnp.where(ok, jnp.sqrt(var), jnp.nan)


def losvd_summaries(spec, theta, cov, velocity, key, n_draws=N_DRAWS):
    """Mean velocity, dispersion (with Laplace-draw errors) and tabulated LOSVD.

    The moments are the LOSVD's exact ones where the family has them in closed form and
    is a true density (Sanders–Evans: V and σ themselves; two Gaussians: the mixture's),
    and :func:`grid_moments` of the tabulated LOSVD otherwise (Gauss–Hermite, whose
    negative lobes are clipped; the histogram, which is its grid). A grid of
    ``velscale / 2`` cannot represent a component narrower than that: point-sampled, a
    two-Gaussian component of σ ≈ 20 km/s on a 37 km/s grid snapped its mean towards the
    nearest node, and the Laplace draws of a 3D fit of counter-rotating discs at S/N 20
    gave MEAN_V errors of 26 km/s where the mean-velocity field's own posterior sd was 4.

    Parameters
    ----------
    spec : LosvdSpec
    theta : (n, n_params), cov : (n, n_params, n_params)
        Only the first ``spec.n_params`` entries (the LOSVD's) are used.
    velocity : (n_v,) uniform grid in km/s, wide enough to hold the LOSVDs.
    key : jax PRNG key

    Returns
    -------
    mean_v, mean_v_err, dispersion, dispersion_err : (n,) km/s (see :func:`grid_moments`);
    losvd : (n, n_v) in 1/(km/s).
    """
    velocity = jnp.asarray(velocity)
    keys = jax.random.split(key, theta.shape[0])
    best, spread, pdf = _summaries(spec_key(spec), velocity, jnp.asarray(theta), jnp.asarray(cov), keys, n_draws)
    best, spread = np.asarray(best), np.asarray(spread)
    return best[:, 0], spread[:, 0], best[:, 1], spread[:, 1], np.asarray(pdf)


@eqx.filter_jit
def _summaries(key, velocity, theta, cov, keys, n_draws):
    spec = _SPECS[key]
    k = spec.n_params
    lower, upper = jnp.asarray(spec.lower, theta.dtype), jnp.asarray(spec.upper, theta.dtype)

    def moments(th):
        los = spec.build(th)
        if spec.family in EXACT_MOMENTS:
            return jnp.stack([los.mean, los.dispersion])
        return jnp.stack(grid_moments(los.pdf(velocity), velocity))

    def one(th, c, rng):
        th, c = th[:k], c[:k, :k]
        evals, evecs = jnp.linalg.eigh(0.5 * (c + c.T))
        root = evecs * jnp.sqrt(jnp.clip(evals, 0.0, None))
        z = jax.random.normal(rng, (n_draws, k), dtype=th.dtype)
        draws = jnp.clip(th + z @ root.T, lower, upper)
        spread = jnp.nanstd(jax.vmap(moments)(draws), axis=0)  # ignore undefined draws
        return moments(th), spread, spec.build(th).pdf(velocity)

    return jax.vmap(one)(theta, cov, keys)


def _velocity_axis(forward, spec):
    if spec.family == "hist":
        return np.asarray(spec.options["centres"], float)
    from kinjax.losvd import velocity_grid

    return velocity_grid(forward.vmax, forward.velscale / 2)


def _progress(iterable, total, enabled, desc):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc)


def fit_cube_spaxels(cube, templates, *, losvd="gh", moments=4, degree=4, mdegree=0,
                     velscale_ratio=2, vmax=2000.0, snr_min=None, chunk_size=256,
                     progress=True, seed=0, mask_emission=True, devices=None) -> CubeFit:
    """Fit every usable spaxel of a cube independently (MAP + Laplace errors).

    Parameters
    ----------
    cube : Cube
        Gridded or binned cube; log-rebinned here if ``cube.velscale`` is None.
    templates : Templates
        Rest-frame library (prepared once on the cube's grid with ``prepare_templates``).
    losvd, moments : LOSVD family ("gh", "se", "hist", "gauss2") and Gauss–Hermite moments.
    degree, mdegree : additive / multiplicative Legendre degrees (pPXF's meaning).
    velscale_ratio : int
        Template pixels per galaxy pixel.
    vmax : float
        Largest LOSVD velocity (km/s) the model must reach (zero padding).
    snr_min : float, optional
        Spaxels whose median S/N per pixel is below this are not fitted (NaN).
    chunk_size : int
        Spaxels per vmapped batch (bounds the memory; one compilation).
    progress : bool
        Show a tqdm bar over the chunks.
    seed : int
        Seed of the Laplace draws used for the moment errors.
    mask_emission : bool
        Mask the usual gas emission lines (default; see :func:`prepare_cube`).
    devices : None, "all", int or sequence of jax devices
        Split each chunk of spaxels over these devices (:func:`kinjax.sharding.spectra_mesh`;
        ``chunk_size`` is then rounded up to a multiple of their number). None: one device.

    Returns
    -------
    CubeFit
        Spaxels that are not ``cube.valid`` or below ``snr_min`` are flagged
        (``fitted`` False) and NaN.
    """
    cube, use, forward, spec = prepare_cube(
        cube, templates, snr_min=snr_min, velscale_ratio=velscale_ratio, vmax=vmax,
        degree=degree, mdegree=mdegree, losvd=losvd, moments=moments, mask_emission=mask_emission)
    mesh = spectra_mesh(devices)
    chunk_size = _chunk_size(chunk_size, use.sum(), mesh)
    dtype = forward.additive.dtype
    key = spec_key(spec)
    flux = cube.flux.astype(dtype)
    weights = (cube.mask / cube.noise).astype(dtype)

    n, n_theta = cube.n_spaxels, spec.n_params + mdegree
    theta = np.full((n, n_theta), np.nan)
    cov = np.full((n, n_theta, n_theta), np.nan)
    chi2 = np.full(n, np.nan)
    dof = np.full(n, np.nan)
    idx = np.flatnonzero(use)
    chunks = _chunks(idx, chunk_size)
    for part, padded in _progress(chunks, -(-idx.size // chunk_size), progress, "spaxels"):
        y, w = jnp.asarray(flux[padded]), jnp.asarray(weights[padded])
        sol = _fit_batch(forward, key, y, w, mesh)
        m = part.size
        theta[part] = np.asarray(sol.theta)[:m]
        cov[part] = np.asarray(sol.cov)[:m]
        chi2[part] = np.asarray(sol.chi2)[:m]
        dof[part] = cube.mask[part].sum(axis=1) - n_theta - np.asarray(sol.n_active)[:m]
    return finish_fit(cube, spec, forward, theta, cov, chi2, dof, use, seed=seed, method="spaxels")


def fit_cube_spaxels_nuts(cube, templates, *, losvd="gh", moments=4, degree=4, mdegree=0,
                          velscale_ratio=2, vmax=2000.0, snr_min=None, num_warmup=150, num_samples=400,
                          num_chains=2, chunk_size=16, progress=True, seed=0, mask_emission=True,
                          devices=None) -> CubeFit:
    """Fit every usable spaxel independently with NUTS (MAP first, then the posterior).

    One jitted program per chunk of spaxels runs, for each spaxel, the two-start MAP fit,
    the sampler's whitening from its Laplace covariance (:func:`kinjax.fit.nuts_inputs`)
    and the NUTS chains of :func:`kinjax.models.make_nuts_program` (on a fixed number of
    templates); the chunk is mapped like the MAP fits (:func:`kinjax.optimize.map_spectra`:
    one spaxel after the other on a CPU, vectorised on accelerators, split over
    ``devices``), with a progress bar over the chunks. ``theta`` holds the posterior
    medians, ``theta_err`` half the 16-84 % widths and ``cov`` the sample covariances;
    ``info["r_hat_max"]`` and ``info["divergences"]`` (n_spaxels,) are the diagnostics.
    ``chunk_size`` spaxels per program call (on a GPU, the spaxels sampled at once). The
    default 150 warm-up steps and 400 draws per chain are ``fit_spectrum``'s (the chains
    start at the MAP, whitened). Other parameters as :func:`fit_cube_spaxels`.
    """
    from kinjax.fit import nuts_inputs
    from kinjax.models import make_nuts_program, whitened_to_theta
    from kinjax.optimize import make_fitter, map_spectra

    cube, use, forward, spec = prepare_cube(
        cube, templates, snr_min=snr_min, velscale_ratio=velscale_ratio, vmax=vmax,
        degree=degree, mdegree=mdegree, losvd=losvd, moments=moments, mask_emission=mask_emission)
    mesh = spectra_mesh(devices)
    dtype = forward.additive.dtype
    n, n_theta = cube.n_spaxels, spec.n_params + mdegree
    map_fit = make_fitter(forward, spec)
    run = make_nuts_program(spec, n_theta, num_warmup, num_samples, num_chains)

    def one(rng, y, w):
        sol = map_fit(y, w)
        fm_sub, terms, loc, chol = nuts_inputs(forward, spec, sol, weights=w)
        (z, div, _), _ = run(rng, fm_sub, y, w, terms, loc, chol)
        return z, jnp.sum(div), loc, chol, sol.chi2, sol.n_active

    batch = jax.jit(lambda keys, y, w: map_spectra(one, keys, y, w, mesh=mesh))
    theta = np.full((n, n_theta), np.nan)
    err = np.full((n, n_theta), np.nan)
    cov = np.full((n, n_theta, n_theta), np.nan)
    chi2, dof = np.full(n, np.nan), np.full(n, np.nan)
    rhat, divergences = np.full(n, np.nan), np.full(n, -1)
    idx = np.flatnonzero(use)
    keys = np.asarray(jax.random.split(jax.random.PRNGKey(seed), n))  # one per spaxel, whatever the chunks
    flux = cube.flux.astype(dtype)
    weights = (cube.mask / cube.noise).astype(dtype)
    chunk_size = _chunk_size(chunk_size, idx.size, mesh)
    chunks = _chunks(idx, chunk_size)
    for part, padded in _progress(chunks, -(-idx.size // chunk_size), progress, "spaxels (NUTS)"):
        out = batch(jnp.asarray(keys[padded]), jnp.asarray(flux[padded]), jnp.asarray(weights[padded]))
        z, div, loc, chol, chi2_b, n_active = (np.asarray(a)[: part.size] for a in out)
        for j, i in enumerate(part):
            draws = whitened_to_theta(z[j], spec, loc[j], chol[j])
            flat = draws.reshape(-1, n_theta)
            lo, med, hi = np.percentile(flat, [15.865, 50.0, 84.135], axis=0)
            theta[i], err[i], cov[i] = med, 0.5 * (hi - lo), np.atleast_2d(np.cov(flat.T))
            chi2[i] = float(chi2_b[j])
            dof[i] = cube.mask[i].sum() - n_theta - int(n_active[j])
            divergences[i] = int(div[j])
            if num_chains > 1:
                import arviz as az

                r = az.rhat(az.convert_to_dataset({f"p{k}": draws[..., k] for k in range(n_theta)}))
                rhat[i] = max(float(r[f"p{k}"]) for k in range(n_theta))
    out = finish_fit(cube, spec, forward, theta, cov, chi2, dof, use, seed=seed, method="spaxels-nuts",
                     info={"r_hat_max": rhat, "divergences": divergences})
    import dataclasses

    return dataclasses.replace(out, theta_err=np.where(use[:, None], err, np.nan))


def align_labels(spec, theta, cov, x, y, use):
    """Relabel exchangeable components so that their maps are continuous on the sky.

    For the two-Gaussian family each spaxel's fit is equally good with the components
    swapped (:meth:`~kinjax.family.LosvdSpec.label_swap`). Starting from the spaxel with
    the best-measured velocities, the labels are grown outwards: each next spaxel (the
    nearest to those already labelled) takes the labelling whose (V1, V2) is closer to
    a plane fitted to its labelled neighbours within 2.5 spaxels. Returns new
    ``(theta, cov)``; other families are returned unchanged.
    """
    swap = spec.label_swap()
    idx = np.flatnonzero(use & np.all(np.isfinite(theta[:, : spec.n_params]), axis=1))
    if swap is None or idx.size < 2:
        return theta, cov
    m, c = swap
    k = spec.n_params
    full_m = np.eye(theta.shape[1])
    full_m[:k, :k] = m
    full_c = np.r_[c, np.zeros(theta.shape[1] - k)]
    theta, cov = theta.copy(), cov.copy()
    xy = np.stack([x[idx], y[idx]], axis=1)
    with np.errstate(invalid="ignore"):
        err_v = np.sqrt(cov[idx, 0, 0] + cov[idx, 2, 2])
    start = int(np.nanargmin(np.where(np.isfinite(err_v), err_v, np.inf)))
    done = np.zeros(idx.size, bool)
    done[start] = True
    from scipy.spatial import cKDTree

    step = float(np.median(cKDTree(xy).query(xy, k=2)[0][:, 1]))  # the spaxel spacing
    # distances row by row (memory O(n), not an n x n matrix: 6400 spaxels would need 330 MB)
    d_done = np.linalg.norm(xy - xy[start], axis=1)  # distance to the nearest labelled spaxel
    for _ in range(idx.size - 1):
        j = int(np.argmin(np.where(done, np.inf, d_done)))
        dist_j = np.linalg.norm(xy - xy[j], axis=1)
        near = done & (dist_j <= max(2.5 * step, d_done[j] * 1.01))
        v_near = theta[idx[near]][:, [0, 2]]
        if near.sum() >= 2:
            # planar extrapolation of (V1, V2) from the labelled neighbours: the velocities of
            # counter-rotating discs pass through zero together on the minor axis, where
            # continuity of the values alone cannot tell the labels apart
            a = np.column_stack([np.ones(near.sum()), xy[near] - xy[j]])
            v_ref = np.linalg.lstsq(a, v_near, rcond=None)[0][0]
        else:
            v_ref = np.median(v_near, axis=0)
        v = theta[idx[j]][[0, 2]]
        if np.abs(v[::-1] - v_ref).sum() < np.abs(v - v_ref).sum():
            theta[idx[j]] = full_m @ theta[idx[j]] + full_c
            cov[idx[j]] = full_m @ cov[idx[j]] @ full_m.T
        done[j] = True
        np.minimum(d_done, dist_j, out=d_done)
    return theta, cov


def reparameterise(fn, theta, cov):
    """``(fn(θ), J cov Jᵀ)`` row by row with J = dfn/dθ (the covariance to first order).

    theta (n, p), cov (n, p, p); ``fn`` maps one (p,) vector (JAX-traceable); rows that are
    not finite stay NaN.
    """
    theta, cov = np.asarray(theta, float), np.asarray(cov, float)
    ok = np.all(np.isfinite(theta), axis=1)
    safe = jnp.asarray(np.where(ok[:, None], theta, 0.5))
    jac = np.asarray(jax.vmap(jax.jacfwd(fn))(safe))
    new_theta = np.where(ok[:, None], np.asarray(jax.vmap(fn)(safe)), np.nan)
    return new_theta, np.einsum("nij,njk,nlk->nil", jac, cov, jac)


def finish_fit(cube, spec, forward, theta, cov, chi2, dof, use, *, seed=0, method="spaxels", info=None):
    """Assemble a :class:`CubeFit` from per-spaxel parameters and covariances.

    Components with exchangeable labels (two Gaussians) are relabelled so that their maps
    are continuous (:func:`align_labels`). Parameters in the two Gaussians' mean form
    (:func:`kinjax.family.gauss2_mean_form`, the 3D model's) are returned in the family's
    own, (V1, σ1, V2, σ2, f1), with the covariance to first order; the LOSVD summaries and
    their errors come from draws in the form the covariance was computed in.
    """
    theta, cov = np.asarray(theta, float), np.asarray(cov, float)
    n = cube.n_spaxels
    velocity = _velocity_axis(forward, spec)
    mean_v, mean_v_err, disp, disp_err = (np.full(n, np.nan) for _ in range(4))
    pdf = np.full((n, velocity.size), np.nan)
    idx = np.flatnonzero(use)
    out = losvd_summaries(spec, theta[idx], cov[idx], velocity, jax.random.PRNGKey(seed))
    for arr, val in zip((mean_v, mean_v_err, disp, disp_err, pdf), out):
        arr[idx] = val
    if spec.mean_form:
        from kinjax.family import gauss2_from_mean_form

        theta, cov = reparameterise(gauss2_from_mean_form, theta, cov)
        spec = spec.components_spec()
    theta, cov = align_labels(spec, theta, cov, cube.x, cube.y, use)
    names = tuple(spec.names) + tuple(f"m{i + 1}" for i in range(theta.shape[1] - spec.n_params))
    with np.errstate(invalid="ignore"):
        err = np.sqrt(np.clip(np.diagonal(cov, axis1=1, axis2=2), 0, None))
    err[~use] = np.nan
    return CubeFit(cube=cube, names=names, theta=theta, theta_err=err, mean_v=mean_v,
                   mean_v_err=mean_v_err, dispersion=disp, dispersion_err=disp_err,
                   velocity=np.asarray(velocity), losvd=pdf, chi2=chi2, dof=dof,
                   fitted=use.copy(), cov=cov, family=spec.family, method=method,
                   info=dict(info or {}))
