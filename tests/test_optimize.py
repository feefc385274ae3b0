"""MAP machinery: the start scan, the two-start fitter and the CPU/accelerator batching."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kinjax.datasets import ngc4550
from kinjax.fit import setup_fit
from kinjax.losvd import Gaussian, Mixture
from kinjax.optimize import make_fitter, make_map_solver, make_start_finder, map_spectra


@pytest.fixture(scope="module")
def setup():
    return setup_fit(ngc4550(), noise=0.0047)


def _column(fm, v, sigma, seed):
    """A 3-template mixture convolved with a Gaussian at (v, sigma), normalised to median 1."""
    rng = np.random.default_rng(seed)
    w = np.zeros(fm.n_templates)
    w[rng.choice(fm.n_templates, 3, replace=False)] = rng.uniform(0.2, 1.0, 3)
    col = np.asarray(fm(Gaussian(v, sigma), w / w.sum()))
    return col / np.median(col)


def test_start_scan_ignores_anticorrelated_features(setup):
    """Lines in emission (a negative template amplitude) must not attract the velocity scan."""
    fm = setup.forward
    w = jnp.asarray(setup.spectrum.mask / 0.01)
    start = make_start_finder(fm, setup.spec)
    # an ordinary absorption spectrum at +300 km/s is found ...
    absorption = jnp.asarray(_column(fm, 300.0, 120.0, 0))
    assert abs(float(start(absorption, w)[0]) - 300.0) <= 40.0
    # ... but the same spectrum turned upside down (a perfect fit with a negative amplitude) is not
    inverted = 2.0 - absorption
    assert abs(float(start(inverted, w)[0]) - 300.0) > 100.0


def test_fitter_keeps_the_better_of_two_starts(setup):
    """Double-peaked LOSVD: the fitter's objective is the lower of the two local optima."""
    fm, spec = setup.forward, setup.spec
    losvd = Mixture((Gaussian(-160.0, 50.0), Gaussian(160.0, 50.0)), jnp.asarray([0.55, 0.45]))
    rng = np.random.default_rng(3)
    w_t = np.zeros(fm.n_templates)
    w_t[rng.choice(fm.n_templates, 3, replace=False)] = 1.0
    clean = np.asarray(fm(losvd, w_t / 3))
    noise = np.median(clean) / 30.0
    y = jnp.asarray(clean + noise * rng.standard_normal(clean.size))
    w = jnp.asarray(setup.spectrum.mask / noise)
    solve = make_map_solver(fm, spec)

    def objective(sol):
        return float(sol.chi2 + jnp.sum(spec.prior_residuals(sol.theta[:4]) ** 2))

    a = solve(y, w, make_start_finder(fm, spec)(y, w))
    b = solve(y, w, jnp.asarray(spec.initial(0.0, 150.0)))
    best = make_fitter(fm, spec)(y, w)
    assert objective(best) == pytest.approx(min(objective(a), objective(b)), rel=1e-10)
    assert int(best.n_iter) == int(a.n_iter) + int(b.n_iter)
    # the blend: V near the light-weighted mean (-16 km/s), not at one peak
    assert abs(float(best.theta[0]) - (-16.0)) < 60.0, np.asarray(best.theta)
    # fit_spectrum's fit, its two starts in two host threads, makes the same choice
    side = setup.map_fit(y, w, threads=2)
    assert objective(side) == pytest.approx(objective(best), rel=1e-10)
    np.testing.assert_allclose(np.asarray(side.theta), np.asarray(best.theta), rtol=1e-8)
    assert int(side.n_iter) == int(best.n_iter)


def test_map_spectra_matches_vmap(setup):
    fm, spec = setup.forward, setup.spec
    w = jnp.asarray(setup.spectrum.mask / 0.02)
    rng = np.random.default_rng(5)
    truths = [(-100.0, 90.0), (50.0, 200.0), (300.0, 140.0)]
    ys = jnp.asarray(np.stack([_column(fm, v, s, i) + 0.02 * rng.standard_normal(setup.y.size)
                               for i, (v, s) in enumerate(truths)]))
    ws = jnp.broadcast_to(w, ys.shape)
    fit = make_fitter(fm, spec)
    seq = jax.jit(lambda y, w: map_spectra(fit, y, w))(ys, ws)
    vec = jax.vmap(fit)(ys, ws)
    np.testing.assert_allclose(np.asarray(seq.theta), np.asarray(vec.theta), rtol=1e-8, atol=1e-8)
    np.testing.assert_allclose(np.asarray(seq.theta)[:, 0], [-100.0, 50.0, 300.0], atol=15.0)


def test_design_covariance_is_accurate_in_float32():
    """The Laplace covariance (FᵀF)⁻¹ of a design like a two-Gaussian fit's (parameter columns
    of very different scales, 50 nearly collinear templates, 10 inactive): float32 within
    1e-4 of the float64 inverse of the kept columns; inverting FᵀF in float32 is off by ~40 %."""
    from kinjax.optimize import design_covariance

    rng = np.random.default_rng(0)
    n, k, n_t = 500, 5, 50
    x = np.linspace(0, 1, n)
    base = np.sin(40 * x) + 0.3 * np.cos(90 * x)
    tpl = np.stack([base * (1 + 0.02 * i * x) + 1e-3 * rng.standard_normal(n) for i in range(n_t)], 1)
    cols = rng.standard_normal((n, k)) * np.array([1e-3, 3e-3, 1e-3, 3e-3, 5.0])
    design = np.concatenate([cols, 50 * tpl, 20 * np.stack([x**d for d in range(5)], 1)], 1)
    keep = np.ones(design.shape[1], bool)
    keep[k + 10:k + 20] = False
    kept = design[:, keep]
    ref = np.linalg.inv(kept.T @ kept)[:k, :k]
    assert np.linalg.cond(kept) > 1e5
    for dtype, rtol in ((jnp.float64, 1e-9), (jnp.float32, 1e-4)):
        with jax.enable_x64(dtype == jnp.float64):
            cov = np.asarray(design_covariance(jnp.asarray(design, dtype), jnp.asarray(keep), k), float)
        np.testing.assert_allclose(cov, ref, rtol=rtol, atol=rtol * np.sqrt(np.outer(np.diag(ref), np.diag(ref))).max())
    with jax.enable_x64(False):
        m = jnp.asarray(kept, jnp.float32)
        naive = np.asarray(jnp.linalg.inv(m.T @ m)[:k, :k], float)
    # why the QR route: the float32 inverse of the normal equations is off by a hundred times the
    # tolerance met above (the size depends on the CPU's kernels: 9-10 % on the machines seen)
    assert np.max(np.abs(np.diag(naive) / np.diag(ref) - 1)) > 100 * 1e-4


def _profiled_residuals(setup, y, w):
    """Weighted residuals of a Gauss–Hermite fit as a NumPy function of θ = (V, σ, h3, h4),
    the linear parameters solved at each θ (what the solver minimises, for scipy)."""
    from kinjax.losvd import GaussHermite

    fm, n_t = setup.forward, setup.forward.n_templates

    def residuals(theta):
        theta = jnp.asarray(theta)
        x = setup.linear_at(y, w, theta)
        return np.asarray((fm(GaussHermite.from_vector(theta), x[:n_t], x[n_t:]) - y) * w, float)

    return residuals


def test_solver_holds_a_parameter_that_its_bound_stops():
    """NGC 3522 (SDSS DR8, additive degree 20) with flat priors, started where the velocity
    scan starts it (V = -40, σ = 40 km/s), runs into a local optimum with h4 on its bound
    of 0.3. A parameter that the gradient pushes outwards, before and after the step taken
    with it held, is held on its bound, so the others converge in a few iterations, to
    the optimum with h4 fixed there (scipy's least_squares on the same profiled
    residuals). Clipping the step alone crawled along the bound and used all 100
    iterations allowed."""
    import os

    from astropy.io import fits
    from scipy.optimize import least_squares

    from kinjax.spectrum import read_spectrum

    ppxf = pytest.importorskip("ppxf")
    path = os.path.join(os.path.dirname(ppxf.__file__), "spectra", "NGC3522_SDSS_DR8.fits")
    with pytest.warns(UserWarning, match="finer than the templates"):
        flat = setup_fit(read_spectrum(path, redshift=float(fits.getheader(path, 1)["Z"]), fwhm=2.76), degree=20,
                         h_prior=None)
    y, w = flat.y, flat.weights
    sol = flat.solver(y, w, jnp.asarray([-40.0, 40.0, 0.0, 0.0]))
    assert float(sol.theta[3]) == pytest.approx(0.3), np.asarray(sol.theta)
    assert int(sol.n_iter) <= 30, int(sol.n_iter)

    residuals = _profiled_residuals(flat, y, w)
    free = np.asarray(sol.theta)[:3]
    ref = least_squares(lambda f: residuals(np.r_[f, 0.3]), free + [1.0, 1.0, 0.01], x_scale=[1.0, 1.0, 0.01])
    assert float(sol.chi2) <= 2.0 * ref.cost + 0.01, (float(sol.chi2), 2.0 * ref.cost)
    assert np.all(np.abs(free - ref.x) <= [0.3, 0.3, 0.003]), (free, ref.x, float(sol.chi2), 2.0 * ref.cost)


@pytest.fixture(scope="module")
def flat():
    return setup_fit(ngc4550(), noise=0.0047, h_prior=None)


def _bounded_reference(setup, y, w, theta):
    """scipy's bounded least_squares on the solver's profiled residuals, started next to
    ``theta``: the optimum (and χ²) that the solver must reach."""
    from scipy.optimize import least_squares

    lower, upper = np.asarray(setup.spec.lower), np.asarray(setup.spec.upper)
    scale = np.array([1.0, 1.0, 0.01, 0.01])
    ref = least_squares(_profiled_residuals(setup, y, w), np.clip(theta + scale, lower, upper), x_scale=scale,
                        bounds=(lower, upper))
    return ref.x, 2.0 * ref.cost


def test_solver_does_not_hold_a_parameter_that_the_step_frees(flat):
    """NGC 4550 with flat priors from its scan start (V = 400, σ = 40 km/s): the first
    steps put h3, then h4, on their bounds of 0.3 with the gradient pushing outwards but
    the Levenberg–Marquardt step (which sees how they trade off against σ) pulling them
    back. Holding them there on the gradient alone took 32 iterations (58 in float32);
    the active-set rule takes 12, to the optimum that scipy's least_squares finds on the
    same profiled residuals."""
    sol = flat.solver(flat.y, flat.weights, jnp.asarray([400.0, 40.0, 0.0, 0.0]))
    assert int(sol.n_iter) <= 20, int(sol.n_iter)
    theta = np.asarray(sol.theta, float)
    ref, chi2 = _bounded_reference(flat, flat.y, flat.weights, theta)
    assert float(sol.chi2) <= chi2 + 0.01, (float(sol.chi2), chi2)
    # within a tenth of pPXF's formal errors (2.4, 5.2, 0.018, 0.032)
    assert np.all(np.abs(theta - ref) <= [0.24, 0.52, 0.0018, 0.0032]), (theta, ref)


def test_solver_holds_a_parameter_that_the_reduced_step_still_pushes_out(flat):
    """An S/N-10 mock (NGC 4550's templates, flat priors) whose optimum has h3 = 0.3 and
    h4 = -0.3 on their bounds. Releasing a parameter on its bound whenever the full step
    points inwards (the full step is dragged there by its coupling to σ) let the fit
    alternate between rejected and crawling steps: the 100 iterations allowed, from both
    starts. Holding what the gradient pushes outwards unless the quadratic model's
    gradient after the step taken with it held points inwards takes 7 and 10."""
    from kinjax.losvd import GaussHermite

    fm = flat.forward
    rng = np.random.default_rng(32)
    truth = np.r_[rng.uniform(-300, 300), rng.uniform(60, 250), rng.uniform(-0.1, 0.1, 2)]
    x = np.zeros(fm.n_templates)
    x[rng.choice(fm.n_templates, 3, replace=False)] = rng.dirichlet(np.ones(3))
    clean = np.array(fm(GaussHermite.from_vector(jnp.asarray(truth)), jnp.asarray(x)))
    y = jnp.asarray(clean / np.median(clean) + 0.1 * rng.standard_normal(clean.shape))
    w = jnp.asarray(np.where(np.asarray(flat.spectrum.mask), 10.0, 0.0))
    sols = [flat.solver(y, w, t0) for t0 in (flat.start_finder(y, w), jnp.asarray([0.0, 150.0, 0.0, 0.0]))]
    iters = [int(s.n_iter) for s in sols]
    assert iters[0] <= 15 and iters[1] <= 18, iters
    theta = np.asarray(sols[0].theta, float)
    assert np.allclose(theta[2:], [0.3, -0.3]), theta
    assert np.all(np.abs(np.asarray(sols[1].theta, float) - theta) <= [0.5, 0.5, 1e-3, 1e-3]), sols[1].theta
    ref, chi2 = _bounded_reference(flat, y, w, theta)
    assert float(sols[0].chi2) <= chi2 + 0.01, (float(sols[0].chi2), chi2)
    assert np.all(np.abs(theta - ref) <= [0.5, 0.5, 0.005, 0.005]), (theta, ref)


def test_support_first_solve_gives_the_full_solves_fit(setup, monkeypatch):
    """In the Levenberg–Marquardt loop the linear parameters are first solved on the
    previous step's template support, and that solution is kept only where it meets the
    NNLS optimality conditions. Fits with it equal fits that solve the full NNLS at every
    step, on mocks whose support changes on the way (started far from the optimum); and
    the full solve runs on only some of the steps (counted through a wrapper of it)."""
    import kinjax.optimize as opt

    fm, spec = setup.forward, setup.spec
    calls = []
    full_solve = opt.solve_linear

    def counted(*args):
        jax.debug.callback(lambda: calls.append(1))
        return full_solve(*args)

    monkeypatch.setattr(opt, "solve_linear", counted)
    support_first = make_map_solver(fm, spec)
    w = jnp.asarray(setup.spectrum.mask / 0.02)
    rng = np.random.default_rng(5)
    fits = []
    for seed, (v, sigma, start) in enumerate(((120.0, 90.0, (-200.0, 250.0)), (-60.0, 200.0, (100.0, 60.0)))):
        y = jnp.asarray(_column(fm, v, sigma, seed) + 0.02 * rng.standard_normal(fm.n_pix))
        theta0 = jnp.asarray(spec.initial(*start))
        calls.clear()
        sol = jax.block_until_ready(support_first(y, w, theta0))
        fits.append((y, theta0, sol, len(calls)))
    monkeypatch.setattr(opt, "SUPPORT_SLOTS", 10**6)  # more slots than templates: always the full solve
    always_full = make_map_solver(fm, spec)
    for y, theta0, sol, n_full in fits:
        calls.clear()
        ref = jax.block_until_ready(always_full(y, w, theta0))
        assert len(calls) == int(ref.n_iter) + 1  # the start and every step
        # the start, and at least one step whose support changed, took the full solve; the
        # other steps kept the support's solution (here 9 and 4 full solves of 16 and 10)
        assert 2 <= n_full < len(calls), (n_full, len(calls))
        assert int(sol.n_iter) == int(ref.n_iter)
        np.testing.assert_allclose(np.asarray(sol.theta), np.asarray(ref.theta), rtol=1e-8, atol=1e-10)
        np.testing.assert_allclose(np.asarray(sol.linear), np.asarray(ref.linear), rtol=1e-6,
                                   atol=1e-9 * float(jnp.max(jnp.abs(ref.linear))))
        assert float(sol.chi2) == pytest.approx(float(ref.chi2), rel=1e-10)


def test_start_scan_is_a_brute_force_least_squares_scan(setup):
    """The start finder's scan (the additive polynomials projected out once) picks what a
    NumPy scan picks that solves the full least-squares problem [column, polynomials] at
    every grid point: the lowest χ² among trials with a positive template amplitude,
    first over velocity at σ = 150 km/s, then over σ at that velocity."""
    from kinjax.losvd import Gaussian

    fm = setup.forward
    rng = np.random.default_rng(11)
    y = _column(fm, 230.0, 180.0, 4) + 0.03 * rng.standard_normal(fm.n_pix)
    w = setup.spectrum.mask / 0.03
    mean_w = np.full(fm.n_templates, 1.0 / fm.n_templates)
    poly = np.asarray(fm.additive).T

    def chi2(v, s):
        a = np.c_[np.asarray(fm(Gaussian(v, s), mean_w)), poly] * w[:, None]
        x = np.linalg.lstsq(a, y * w, rcond=None)[0]
        return np.sum((a @ x - y * w) ** 2) if x[0] > 0 else np.inf

    velocities = np.arange(-1200.0, 1220.0, 40.0)
    v0 = velocities[np.argmin([chi2(v, 150.0) for v in velocities])]
    sigmas = np.array([40.0, 80.0, 150.0, 250.0, 400.0])
    s0 = sigmas[np.argmin([chi2(v0, s) for s in sigmas])]
    theta = np.asarray(make_start_finder(fm, setup.spec)(jnp.asarray(y), jnp.asarray(w)))
    assert (theta[0], theta[1]) == (v0, s0), (theta, v0, s0)
    assert abs(v0 - 230.0) <= 40.0
