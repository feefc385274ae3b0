"""Fitting one spectrum: point estimates with Laplace errors, and full posteriors with NUTS.

:func:`fit_spectrum` prepares the data and templates (log-rebinning, emission-line mask,
resolution matching) and then runs

- ``method="map"``: variable-projection Levenberg–Marquardt with non-negative template
  weights (:mod:`kinjax.optimize`, pPXF's scheme with no penalty), errors from the
  Laplace approximation with the linear parameters marginalised;
- ``method="nuts"``: the MAP fit first, then NUTS (numpyro) over the non-linear
  parameters only, with the template weights and additive polynomial at their best
  (non-negative least-squares) values at every step, i.e. profiled (:mod:`kinjax.models`).
  The templates are those with non-zero weight in the MAP fit (the support NNLS
  selects), so each likelihood evaluation is cheap.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from kinjax.errors import KinjaxError
from kinjax.family import LosvdSpec, losvd_spec
from kinjax.forward import ForwardModel, make_forward_model
from kinjax.losvd import velocity_grid
from kinjax.optimize import better_of, make_fitter, make_map_solver, make_start_finder, systemic_theta
from kinjax.result import FitResult
from kinjax.templates import Templates, load_emiles, prepare_templates

__all__ = ["FitSetup", "setup_fit", "fit_spectrum", "losvd_band", "losvd_band_arrays", "nuts_inputs", "single_threaded_blas",
           "template_slots", "sample_posterior", "ess_target_names", "MIN_ESS"]

#: Default NUTS target of :func:`fit_spectrum`: the smallest bulk ESS of the kinematic
#: parameters (:func:`ess_target_names`).
MIN_ESS = 400


@dataclass(frozen=True)
class FitSetup:
    """Everything a fit of one spectrum needs, prepared once.

    Attributes
    ----------
    spectrum : the log-rebinned, masked Spectrum
    templates : the prepared (log-rebinned, resolution-matched) Templates
    forward : ForwardModel
    spec : LosvdSpec
    nonneg : bool
        Template weights constrained to be non-negative (False for PCA templates).
    """

    spectrum: object
    templates: Templates
    forward: ForwardModel
    spec: LosvdSpec
    nonneg: bool = True

    @functools.cached_property
    def solver(self):
        """The jitted MAP solver (built and compiled once per set-up)."""
        return make_map_solver(self.forward, self.spec, nonneg=self.nonneg)

    @functools.cached_property
    def fitter(self):
        """The jitted two-start MAP fit (:func:`kinjax.optimize.make_fitter`)."""
        return make_fitter(self.forward, self.spec, nonneg=self.nonneg)

    @functools.cached_property
    def start_finder(self):
        """The jitted starting-point scan."""
        return make_start_finder(self.forward, self.spec)

    @functools.cached_property
    def _better_of(self):
        return jax.jit(functools.partial(better_of, self.spec))

    def map_fit(self, y, weights, threads: int | None = None):
        """The two-start MAP fit of :attr:`fitter`, its two starts run side by side.

        The Levenberg–Marquardt runs from the scan start and from the systemic start are
        independent, so on a multi-core CPU they run in two host threads, as the NUTS
        chains do, and the fit takes as long as the slower run instead of both (NGC 4550
        on two cores: 34 against 57 ms with the default prior, 49 against 74 ms with the
        flat one, whose runs take 12 and 29 iterations; benchmarks/RESULTS.md). BLAS runs
        one thread meanwhile (:func:`single_threaded_blas`; its own threads would take the
        second core). The result is that of :attr:`fitter` run with BLAS in one thread,
        to the last digit: the same solver and the same choice (:func:`kinjax.optimize.better_of`).

        Parameters
        ----------
        y, weights : (n_pix,) flux and ``mask / noise``.
        threads : int, optional
            Host threads (default: 2 on a CPU with two or more cores this process may
            use, else 1, which calls :attr:`fitter`).

        Returns
        -------
        MapSolution (``n_iter`` summed over both runs).
        """
        threads = _host_threads(2) if threads is None else threads
        if threads < 2:
            return self.fitter(y, weights)
        solver, finder, pick = self.solver, self.start_finder, self._better_of  # built here, not in the threads
        theta_sys = jnp.asarray(systemic_theta(self.spec, self.forward.mdegree), y.dtype)
        with single_threaded_blas(), ThreadPoolExecutor(max_workers=2) as pool:
            a = pool.submit(lambda: jax.block_until_ready(solver(y, weights, finder(y, weights))))
            b = pool.submit(lambda: jax.block_until_ready(solver(y, weights, theta_sys)))
            return pick(a.result(), b.result())

    @functools.cached_property
    def linear_at(self):
        """Jitted best linear parameters at a given theta (non-negative template weights)."""
        return jax.jit(functools.partial(_solve_at, self.forward, self.spec, self.nonneg))

    @functools.cached_property
    def nuts_cache(self) -> dict:
        """Compiled NUTS samplers of this set-up, by configuration."""
        return {}

    @functools.cached_property
    def band(self):
        """Jitted :func:`losvd_band` for this set-up's family."""
        return jax.jit(functools.partial(losvd_band_arrays, self.spec))

    @property
    def y(self):
        return jnp.asarray(self.spectrum.flux)

    @property
    def weights(self):
        return jnp.asarray(np.where(self.spectrum.mask, 1.0 / self.spectrum.noise, 0.0))


def setup_fit(
    spectrum,
    templates: Templates | None = None,
    *,
    losvd: str = "gh",
    moments: int = 4,
    kernel: str = "mixture",
    degree: int = 4,
    mdegree: int = 0,
    velscale_ratio: int = 2,
    vmax: float = 2000.0,
    noise: float | np.ndarray | None = None,
    mask_emission: bool = True,
    hist_vmax: float = 1000.0,
    hist_dv: float | None = None,
    h_prior: float | None = 0.1,
    n_pca: int | None = None,
    rebin_lsf: bool = False,
) -> FitSetup:
    """Prepare a spectrum and templates for fitting (see :func:`fit_spectrum`).

    With ``n_pca`` the prepared templates are compressed to that many principal
    components (:func:`kinjax.templates.pca_templates`) and their weights are
    unconstrained; otherwise the weights are non-negative, as in pPXF. ``rebin_lsf``:
    when a linear spectrum is log-rebinned here, widen its FWHM by the linear pixel's
    boxcar (:func:`kinjax.rebin.rebinned_fwhm`); the default keeps the FWHM as given,
    pPXF's convention.
    """
    if not spectrum.is_log:
        spectrum = spectrum.log_rebin(rebin_lsf=rebin_lsf)
    if noise is not None:
        # as in pPXF, the noise is the per-pixel 1σ of the log-rebinned spectrum
        spectrum = spectrum.with_noise(np.broadcast_to(np.asarray(noise, float), spectrum.flux.shape))
    if templates is None:
        templates = load_emiles()
    if not templates.is_log:
        templates = prepare_templates(templates, spectrum, velscale_ratio=velscale_ratio, vmax=vmax)
    if n_pca is not None:
        from kinjax.templates import pca_templates

        templates = pca_templates(templates, n_pca)
    if mask_emission:
        spectrum = spectrum.masked_emission_lines(template_range=(templates.wave[0], templates.wave[-1]))
    if spectrum.n_good < 20:
        raise KinjaxError(f"only {spectrum.n_good} unmasked pixels left: check the mask and the wavelength range")
    spec = losvd_spec(losvd, moments=moments, kernel=kernel, vmax=hist_vmax, dv=hist_dv, velscale=spectrum.velscale,
                      h_prior=h_prior)
    forward = make_forward_model((templates,) * spec.n_components, spectrum, degree=degree, mdegree=mdegree, vmax=vmax)
    return FitSetup(spectrum, templates, forward, spec, nonneg=n_pca is None)


def losvd_band_arrays(spec: LosvdSpec, thetas, velocity):
    """LOSVD pdf, mean and dispersion of each draw: (n_draws, n_v), (n_draws,), (n_draws,)."""

    def one(theta):
        lv = spec.build(theta)
        return lv.pdf(velocity), lv.mean, lv.dispersion

    return jax.vmap(one)(thetas)


def losvd_band(spec: LosvdSpec, thetas, velocity, _fn=None):
    """Median and 16-84 % band of the LOSVD over parameter draws.

    Parameters
    ----------
    thetas : (n_draws, n_losvd_params); velocity : (n_v,) km/s.

    Returns
    -------
    median, lo, hi : (n_v,) in 1/(km/s); mean_v, dispersion : (n_draws,) km/s.
    """

    fn = _fn if _fn is not None else functools.partial(losvd_band_arrays, spec)
    pdfs, mean_v, disp = fn(jnp.asarray(thetas), jnp.asarray(velocity))
    lo, med, hi = np.percentile(np.asarray(pdfs), [15.865, 50.0, 84.135], axis=0)
    return med, lo, hi, np.asarray(mean_v), np.asarray(disp)


def _velocity_axis(setup: FitSetup, centre: float) -> np.ndarray:
    if setup.spec.family == "hist":
        return np.asarray(setup.spec.options["centres"])
    dv = min(setup.spectrum.velscale / 4.0, 10.0)
    return centre + velocity_grid(1000.0, dv)


def _draws_laplace(theta, cov, lower, upper, n_draws, seed):
    rng = np.random.default_rng(seed)
    cov = 0.5 * (cov + cov.T)
    w, v = np.linalg.eigh(cov)
    root = v * np.sqrt(np.clip(w, 0, None))
    draws = theta + rng.standard_normal((n_draws, theta.size)) @ root.T
    return np.clip(draws, lower, upper)


def fit_spectrum(
    spectrum,
    templates: Templates | None = None,
    *,
    losvd: str = "gh",
    moments: int = 4,
    kernel: str = "mixture",
    degree: int = 4,
    mdegree: int = 0,
    velscale_ratio: int = 2,
    vmax: float = 2000.0,
    noise: float | np.ndarray | None = None,
    mask_emission: bool = True,
    method: str = "map",
    start=None,
    num_warmup: int = 150,
    num_samples: int = 400,
    num_chains: int = 4,
    n_draws: int = 1000,
    seed: int = 0,
    progress: bool = True,
    hist_vmax: float = 1000.0,
    hist_dv: float | None = None,
    setup: FitSetup | None = None,
    h_prior: float | None = 0.1,
    n_pca: int | None = None,
    rebin_lsf: bool = False,
    min_ess: float | None = MIN_ESS,
) -> FitResult:
    """Fit the kinematics of one spectrum.

    Parameters
    ----------
    spectrum : Spectrum
        Linear or log-sampled; velocities are relative to ``spectrum.redshift``
        (V = c ln(1 + z)).
    templates : Templates, optional
        Raw (linear) or already prepared templates; default: the 150 E-MILES SSPs.
    losvd : {"gh", "se", "hist", "gauss2"}
        LOSVD family; ``moments`` (GH), ``kernel`` (SE), ``hist_vmax``/``hist_dv``
        (histogram, km/s) set it up; ``h_prior`` is the Normal prior scale of each
        Gauss–Hermite h_m (None: flat, like pPXF with ``bias=0``).
    degree, mdegree : int
        Additive (-1: none) and multiplicative (0: none) Legendre degrees, as in pPXF.
    velscale_ratio : int
        Templates sampled this many times finer than the galaxy.
    vmax : float
        Largest velocity (km/s) the LOSVD may reach; sets the template margin.
    noise : float or (n_pix,), optional
        1σ noise of the log-rebinned spectrum (replaces the spectrum's own).
    mask_emission : bool
        Mask the usual emission lines (±800 km/s, pPXF's list).
    method : {"map", "nuts"}
    start : (n_params,), optional
        Starting LOSVD parameters (one local optimisation from there). Default: two
        optimisations, from a velocity/σ grid scan and from (V, σ) = (0, 150) km/s, the
        better kept (:func:`kinjax.optimize.make_fitter`; on a multi-core CPU the two
        run side by side, :meth:`FitSetup.map_fit`).
    num_warmup, num_samples, num_chains : int
        NUTS settings (on a multi-core CPU the chains run in parallel threads, on an
        accelerator side by side in one program). The chains start at the MAP in
        coordinates whitened by its Laplace covariance, so a short warm-up (step size and
        a diagonal mass matrix) suffices: 4 × (150 + 400) costs what 4 × (300 + 250) did
        and gave 1.2–1.8 times its median ESS (NGC 3073, seeds 1–5: 401 against 249;
        S/N-10 and Sanders–Evans mocks likewise). Without mass-matrix adaptation it was worse.
    min_ess : float or None
        NUTS: the chains go on, up to ``num_samples`` more draws each, until the smallest
        bulk ESS of the kinematic parameters (V, σ, h_m for Gauss–Hermite;
        :func:`ess_target_names`) reaches this (:func:`sample_posterior`); None: exactly
        ``num_samples`` draws per chain.
    n_draws : int
        MAP: draws from the Laplace approximation for the LOSVD band and moments.
    seed : int
    progress : bool
        Show numpyro's progress bar (NUTS).
    n_pca : int, optional
        Compress the templates to this many principal components with unconstrained
        weights (default: all templates, non-negative weights).
    rebin_lsf : bool
        A linear spectrum's FWHM is widened by its pixel's boxcar when it is log-rebinned
        here (:func:`kinjax.rebin.rebinned_fwhm`). Default False: the FWHM as given, as
        pPXF does (book: "Resolution after log-rebinning").
    setup : FitSetup, optional
        Reuse a prepared set-up (then the preparation keywords are ignored).

    Returns
    -------
    FitResult
    """
    if method not in ("map", "nuts"):
        raise KinjaxError(f"unknown method {method!r}: use 'map' or 'nuts'")
    if setup is None:
        setup = setup_fit(
            spectrum, templates, losvd=losvd, moments=moments, kernel=kernel, degree=degree,
            mdegree=mdegree, velscale_ratio=velscale_ratio, vmax=vmax, noise=noise,
            mask_emission=mask_emission, hist_vmax=hist_vmax, hist_dv=hist_dv, h_prior=h_prior,
            n_pca=n_pca, rebin_lsf=rebin_lsf,
        )
    fm, spec, y, w = setup.forward, setup.spec, setup.y, setup.weights
    k = spec.n_params
    solver = setup.solver
    t0 = time.perf_counter()
    with single_threaded_blas():
        if start is None:
            sol = jax.block_until_ready(setup.map_fit(y, w))
        else:
            theta0 = jnp.concatenate([jnp.asarray(start, y.dtype), jnp.zeros(fm.mdegree, y.dtype)])
            sol = jax.block_until_ready(solver(y, w, theta0))
    names = tuple(spec.names) + tuple(f"mult{i + 1}" for i in range(fm.mdegree))
    theta_map = np.asarray(sol.theta)
    n_good = int(setup.spectrum.n_good)

    if method == "map":
        lower = np.r_[spec.lower, np.full(fm.mdegree, -np.inf)]
        upper = np.r_[spec.upper, np.full(fm.mdegree, np.inf)]
        samples = _draws_laplace(theta_map, np.asarray(sol.cov), lower, upper, n_draws, seed)[None]
        samples[..., :k] = spec.identified(samples[..., :k])
        best = theta_map.copy()
        best[:k] = spec.identified(best[:k])
        linear = np.asarray(sol.linear)
        dof = n_good - int(sol.n_active) - len(names)
        chi2 = float(sol.chi2)
        at_bound = spec.on_bounds(theta_map[:k])
        diagnostics = {"n_iter": int(sol.n_iter), "n_active": int(sol.n_active), "at_bound": list(at_bound)}
        if at_bound:
            warnings.warn(_bound_message(spec, theta_map[:k], at_bound), stacklevel=2)
    else:
        samples, diagnostics = sample_posterior(setup, sol, num_warmup=num_warmup, num_samples=num_samples,
                                                num_chains=num_chains, seed=seed, progress=progress, names=names,
                                                min_ess=min_ess)
        best = np.median(samples.reshape(-1, len(names)), axis=0)
        # best-fit linear parameters at the posterior median
        linear = np.asarray(setup.linear_at(y, w, jnp.asarray(best)))
        dof = n_good - int(np.sum(linear != 0)) - len(names)
        chi2 = float(_chi2(fm, spec, y, w, jnp.asarray(best), jnp.asarray(linear)))
    seconds = time.perf_counter() - t0

    if spec.family == "hist":
        centre = 0.0
    elif spec.family == "gauss2":  # the blend's mean, between the two peaks
        centre = float(spec.build(jnp.asarray(best[:k])).mean)
    else:
        centre = float(best[0])
    velocity = _velocity_axis(setup, centre)
    flat = samples.reshape(-1, len(names))[:, :k]
    med, lo, hi, mean_v, disp = losvd_band(spec, flat, velocity, setup.band)
    best_losvd = spec.build(jnp.asarray(best[:k]))
    best_fit = np.asarray(_model(fm, spec, jnp.asarray(best), jnp.asarray(linear)))
    return FitResult(
        method=method,
        family=spec.family,
        names=names,
        best=best,
        samples=samples,
        mean_v=mean_v.reshape(samples.shape[:2]),
        dispersion=disp.reshape(samples.shape[:2]),
        mean_v_best=float(best_losvd.mean),
        dispersion_best=float(best_losvd.dispersion),
        velocity=np.asarray(velocity),
        losvd_median=med,
        losvd_lo=lo,
        losvd_hi=hi,
        wave=np.asarray(setup.spectrum.wave),
        flux=np.asarray(setup.spectrum.flux),
        noise=np.asarray(setup.spectrum.noise),
        mask=np.asarray(setup.spectrum.mask),
        best_fit=best_fit,
        weights=linear,
        chi2_dof=chi2 / max(dof, 1),
        dof=dof,
        seconds=seconds,
        diagnostics=diagnostics,
    )


def _bound_message(spec: LosvdSpec, theta, at_bound) -> str:
    """One-line warning for a MAP with parameters on their bounds."""
    where = ", ".join(f"{n} = {theta[spec.names.index(n)]:.4g}" for n in at_bound)
    return (f"the MAP has {where} on the bound of its range: the Laplace errors assume an interior optimum and "
            "are not valid there (those of the correlated parameters, V's included, come out too small). "
            "Typical at low S/N or for a line narrower than the instrument; use method='nuts' (kinjax fit "
            "--method nuts) for intervals that stay valid, or fit fewer moments")


def _split(fm, spec, theta):
    k = spec.n_params
    return spec.build(theta[:k]), (theta[k:] if fm.mdegree else None)


def _model(fm, spec, theta, linear):
    losvd, mult = _split(fm, spec, theta)
    n_t = fm.n_templates
    return fm(losvd, linear[:n_t], linear[n_t:], mult)


def _chi2(fm, spec, y, w, theta, linear):
    return jnp.sum(((_model(fm, spec, theta, linear) - y) * w) ** 2)


def _solve_at(fm, spec, nonneg_templates, y, w, theta):
    from kinjax.linear import solve_linear

    losvd, mult = _split(fm, spec, theta)
    nonneg = (np.arange(fm.n_templates + fm.degree + 1) < fm.n_templates) & nonneg_templates
    return solve_linear(*fm.linear_system(losvd, y, w, mult), nonneg)


#: Templates kept for NUTS: the MAP's non-zero ones, at most this many (a fixed number, so
#: one compiled sampler serves every spectrum of a set-up).
NUTS_TEMPLATES = 16

#: Template slots ``fit_spectrum`` gives the sampler: the smallest of these that holds the
#: MAP's non-zero templates (few compilations; fewer slots, cheaper steps: NGC 4636's
#: four templates in 8 slots instead of 16 made a gradient 0.64 ms instead of 0.94).
TEMPLATE_SLOTS = (4, 8, 12, NUTS_TEMPLATES)


def template_slots(n_nonzero: int) -> int:
    """Template slots for a MAP with ``n_nonzero`` non-zero template weights (:data:`TEMPLATE_SLOTS`)."""
    return next((n for n in TEMPLATE_SLOTS if n >= n_nonzero), NUTS_TEMPLATES)


#: Largest standard deviation of a sampler coordinate in the NUTS whitening (see
#: :func:`nuts_inputs`); the logistic map's own density has sd π/√3 ≈ 1.8.
WHITEN_SD_MAX = 1.0


def nuts_inputs(fm: ForwardModel, spec: LosvdSpec, sol, nonneg: bool = True, weights=None,
                n_templates: int = NUTS_TEMPLATES):
    """Inputs of the compiled NUTS program for one spectrum, from its MAP solution.

    Returns the forward model restricted to the MAP's template support (a fixed number
    ``n_templates`` of template slots, holding the MAP's largest weights), the
    :class:`~kinjax.linear.LinearTerms` the profile likelihood solves for (unused
    template slots dropped; template weights
    non-negative when ``nonneg``, as in the MAP fit), and the whitening: the MAP ``loc``
    in the sampler's unconstrained coordinates (:meth:`~kinjax.family.LosvdSpec.constrain`)
    and a square root ``chol`` of its Laplace covariance there;
    :func:`kinjax.models.whitened_to_theta` maps the draws back. Pure JAX with shapes
    fixed by the set-up, so it can be mapped over a batch of spectra inside ``jit``.

    With the spectrum's ``weights`` (n_pix,) (``mask / noise``) and in float64, the
    LinearTerms also hold the factorised additive polynomials
    (:class:`~kinjax.linear.FreeBlock`), which the sampler's likelihood then solves for
    by projection: the same values, a cheaper step.
    """
    from kinjax.linear import LinearTerms, free_block

    linear = jnp.asarray(sol.linear)
    n_t = fm.n_templates
    n_keep = min(n_templates, n_t)
    order = jnp.argsort(-jnp.abs(linear[:n_t]), stable=True)[:n_keep]
    used = linear[order] != 0
    used = used | ~used.any()  # no template at all: offer them all
    if fm.n_components == 1:
        # same shapes for every spectrum: unused slots are dropped by LinearTerms.use
        fm_sub = ForwardModel(
            template_fft=fm.template_fft[order], omega=fm.omega, phase=fm.phase, index=fm.index,
            additive=fm.additive, multiplicative=fm.multiplicative, goodpixels=fm.goodpixels, light=fm.light[order],
            n_pad=fm.n_pad, velscale=fm.velscale, velscale_ratio=fm.velscale_ratio,
            component_sizes=(n_keep,), vmax=fm.vmax,
        )
    else:  # several components: keep every template (rarely needed; slower)
        fm_sub, used = fm, jnp.ones(n_t, bool)
    n_add = fm_sub.additive.shape[0]
    free = None
    if weights is not None and n_add and jnp.finfo(fm_sub.additive.dtype).bits == 64:
        free = free_block(fm_sub.additive.T, jnp.asarray(weights, fm_sub.additive.dtype))
    terms = LinearTerms(use=jnp.concatenate([used, jnp.ones(n_add, bool)]),
                        nonneg=jnp.concatenate([jnp.full(used.size, nonneg), jnp.zeros(n_add, bool)]),
                        free=free)
    # whitening in the sampler's unconstrained coordinates s (LosvdSpec.constrain): the
    # MAP mapped to s, its Laplace covariance carried over by the Jacobian dθ/ds there
    k = spec.n_params
    theta = jnp.asarray(sol.theta)
    # (a MAP on a bound, e.g. σ = 5 km/s for an unresolved line, would sit at s = ±14 where
    # the map is flat and the whitening degenerate: start 2 % of the interval inside)
    loc = jnp.concatenate([spec.unconstrain(theta[:k], eps=0.02), theta[k:]])
    jac = jnp.concatenate([jnp.diag(jax.jacfwd(lambda s: spec.constrain(s)[0])(loc[:k])),
                           jnp.ones(theta.size - k, theta.dtype)])
    cov = jnp.asarray(sol.cov) / jnp.outer(jac, jac)
    # a MAP on a bound also has a useless Laplace covariance there: the Sanders–Evans MAP
    # often sits at σ_K = 0.01, where its s-space sd came out 643 against a posterior sd
    # of 0.6, and NUTS ran to tree depth 9. No coordinate of s is wider than about the
    # logistic density itself (sd 1.8), so cap each sd at WHITEN_SD_MAX, keeping correlations
    sd = jnp.sqrt(jnp.clip(jnp.diag(cov), 0.0, None))
    shrink = jnp.minimum(1.0, WHITEN_SD_MAX / jnp.where(sd > 0, sd, 1.0))
    cov = cov * jnp.outer(shrink, shrink)
    evals, evecs = jnp.linalg.eigh(0.5 * (cov + cov.T))
    chol = evecs * jnp.sqrt(jnp.clip(evals, 1e-12 * evals.max(), None))
    return fm_sub, terms, loc, chol


_BLAS_LIMITED = threading.local()


@contextlib.contextmanager
def single_threaded_blas():
    """Context: the BLAS/LAPACK library that XLA:CPU's small solves call runs one thread.

    The profile likelihood factorises a Gram matrix of a few dozen columns at every step
    (LAPACK, through scipy's OpenBLAS). OpenBLAS's own threads only spin on matrices this
    small, and with the NUTS chains in two host threads they fought over the cores: the
    NGC 4550 posterior took 3.0–3.2 s with two chain threads against 1.7–1.8 s with one;
    with one BLAS thread it takes 0.75 s against 1.46 s (two CPU cores, a scratch run).
    The MAP fit of NGC 4550 gains 15–25 % too, and its two starts side by side
    (:meth:`FitSetup.map_fit`) gain nothing without it (59 against 62 ms in turn; with it
    34 against 57 ms; benchmarks/RESULTS.md). The previous limits are restored on exit. Nested uses inside
    one thread cost nothing: only the outermost sets the limit (``threadpoolctl`` scans
    the loaded libraries, about 1 ms, each time it does).
    """
    if getattr(_BLAS_LIMITED, "active", False):
        yield
        return
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas"):
        _BLAS_LIMITED.active = True
        try:
            yield
        finally:
            _BLAS_LIMITED.active = False


def _host_threads(n_runs: int) -> int:
    """Host threads for ``n_runs`` independent runs on one spectrum (NUTS chains, the two MAP
    starts): one per CPU core this process may use; 1 on accelerators, which run them side
    by side in one program (vmap)."""
    if jax.default_backend() != "cpu":
        return 1
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(n_runs, cores))


def _nuts_sampler(setup, num_warmup, num_samples, num_chains, resume=False):
    """The compiled NUTS sampler of a set-up and configuration (built once, then reused).

    ``sample(start, forward, y, weights, linear, loc, chol) -> ((z, diverging, num_steps), states)``:
    on a multi-core CPU the chains run in host threads (:func:`kinjax.models.run_chains`),
    otherwise in one program (:func:`kinjax.models.make_nuts_program`). ``start`` is a
    PRNG key, or with ``resume`` the chains' states from an earlier run (``num_samples``
    more draws each).
    """
    from kinjax.models import make_nuts_chain, make_nuts_program, run_chains

    threads = _host_threads(num_chains)
    key = (num_warmup, num_samples, num_chains, threads, resume)
    cache = setup.nuts_cache
    if key not in cache:
        n_theta = setup.spec.n_params + setup.forward.mdegree
        if threads > 1:
            chain = make_nuts_chain(setup.spec, n_theta, num_warmup, num_samples, resume=resume)

            def sample(start, *args):
                starts = start if resume else jax.random.split(start, num_chains)
                return run_chains(chain, starts, args, threads)

            cache[key] = sample
        else:
            cache[key] = make_nuts_program(setup.spec, n_theta, num_warmup, num_samples, num_chains, resume=resume)
    return cache[key]


def ess_target_names(spec: LosvdSpec) -> tuple:
    """The parameters ``min_ess`` applies to: the kinematics a fit reports.

    Gauss–Hermite: V, σ and every h_m; two Gaussians: all five; Sanders–Evans: V and σ
    (its shape parameters σ_K, δ, κ are mostly set by their priors at moderate S/N and
    mix slowly: on NGC 4550 their ESS fell from 344 to 269 when the chains were doubled,
    the short chains having overstated it); the histogram: none (its bins have no
    summary of that kind, so it gets exactly ``num_samples``).
    """
    if spec.family in ("gh", "gauss2"):
        return tuple(spec.names)
    if spec.family == "se":
        return ("v", "sigma")
    return ()


def _min_ess(diagnostics, names) -> float:
    return min((diagnostics["ess_bulk"][n] for n in names), default=np.inf)


def sample_posterior(setup: FitSetup, sol, y=None, weights=None, *, num_warmup: int = 150, num_samples: int = 400,
                     num_chains: int = 4, seed: int = 0, progress: bool = False, names=None,
                     min_ess: float | None = MIN_ESS):
    """The NUTS posterior of one spectrum from its MAP solution, as ``fit_spectrum`` samples it.

    NUTS over the non-linear parameters, the linear ones profiled on the MAP's template
    support (:func:`nuts_inputs`).

    When the smallest bulk ESS of the kinematic parameters (:func:`ess_target_names`)
    comes out below ``min_ess``, the chains go on (same step size and mass matrix, no new
    warm-up: the draws are those of longer chains) one block of ``num_samples // 4`` draws
    at a time, at most ``num_samples`` more per chain; a warning says if the target is
    still missed. ``min_ess=None``: exactly ``num_samples`` draws per chain.

    For loops over many spectra of one set-up (Monte Carlo on mocks) without building a
    :class:`FitResult` for each: ``y``, ``weights`` (n_pix,) replace the set-up's own
    spectrum (``sol`` must be their MAP, e.g. ``setup.map_fit(y, weights)``). Settings as in
    :func:`fit_spectrum`; each configuration compiles once per set-up and number of
    template slots (:func:`template_slots`).

    Returns
    -------
    samples : (num_chains, n_draws, n_theta) array
        Parameters (LOSVD, then multiplicative); ``n_draws`` is ``num_samples`` plus the
        draws added for ``min_ess``.
    diagnostics : dict
        R-hat, bulk ESS, divergences and mean tree steps, keyed by ``names`` (default:
        the family's parameter names, then ``mult1``, …), and ``extra_samples``, the
        draws per chain added for ``min_ess``.
    """
    y = setup.y if y is None else jnp.asarray(y)
    weights = setup.weights if weights is None else jnp.asarray(weights)
    if names is None:
        names = tuple(setup.spec.names) + tuple(f"mult{i + 1}" for i in range(setup.forward.mdegree))
    n_nonzero = int(np.sum(np.asarray(sol.linear)[: setup.forward.n_templates] != 0))
    fm_sub, terms, loc, chol = nuts_inputs(setup.forward, setup.spec, sol, nonneg=setup.nonneg, weights=weights,
                                           n_templates=template_slots(n_nonzero))
    args = (fm_sub, y, weights, terms, loc, chol)
    from kinjax.models import PROGRESS, whitened_to_theta

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=num_chains * (num_warmup + num_samples), desc=f"NUTS ({num_chains} chains)",
                   unit="it", file=sys.stderr)
    PROGRESS["bar"], PROGRESS["done"] = bar, {}
    target_names = ess_target_names(setup.spec)
    block = max(num_samples // 4, 1)
    try:
        with single_threaded_blas():
            run = _nuts_sampler(setup, num_warmup, num_samples, num_chains)
            out, states = jax.block_until_ready(run(jax.random.PRNGKey(seed), *args))
            parts, extra = [out], 0
            while True:
                z, diverging, num_steps = (np.concatenate([np.asarray(p[i]) for p in parts], axis=1)
                                           for i in range(3))
                samples = whitened_to_theta(z, setup.spec, loc, chol)
                diagnostics = _nuts_diagnostics(samples, names, diverging, num_steps)
                if min_ess is None or extra + block > num_samples or _min_ess(diagnostics, target_names) >= min_ess:
                    break
                # one block at a time: ESS estimates from short chains scatter by tens of per
                # cent, so a block count predicted from the first one overshoots as often as not
                if bar is not None:
                    bar.total += block * num_chains
                    bar.refresh()
                more = _nuts_sampler(setup, num_warmup, block, num_chains, resume=True)
                out, states = jax.block_until_ready(more(states, *args))
                parts.append(out)
                extra += block
    finally:
        PROGRESS["bar"] = None
        if bar is not None:
            bar.update(bar.total - bar.n)
            bar.close()
    diagnostics["extra_samples"] = int(extra)
    if min_ess is not None and _min_ess(diagnostics, target_names) < min_ess:
        warnings.warn(f"NUTS: the smallest bulk ESS of {', '.join(target_names)} is "
                      f"{_min_ess(diagnostics, target_names):.0f} after {num_samples + extra} draws per chain, below "
                      f"min_ess = {min_ess:g}; ask for more draws (num_samples; kinjax fit --num-samples)",
                      stacklevel=2)
    return samples, diagnostics


def _nuts_diagnostics(samples, names, diverging, num_steps):
    import arviz as az

    data = {n: samples[..., i] for i, n in enumerate(names)}
    rhat = az.rhat(az.convert_to_dataset(data))
    ess = az.ess(az.convert_to_dataset(data), method="bulk")
    return {
        "r_hat": {n: float(rhat[n]) for n in names},
        "ess_bulk": {n: float(ess[n]) for n in names},
        "divergences": int(diverging.sum()),
        "mean_tree_steps": float(num_steps.mean()),
        "num_chains": int(samples.shape[0]),
        "num_samples": int(samples.shape[1]),
    }
