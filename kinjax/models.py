"""numpyro model of one spectrum (the only module of the single-spectrum path that uses numpyro).

The sampler sees only the non-linear parameters: the LOSVD's and the multiplicative
polynomial's. The linear parameters (template weights ≥ 0 and additive polynomial) are
profiled: at every step they take their best (non-negative least-squares) values, as in
the MAP fit and in pPXF (:func:`kinjax.linear.profile_loglike`), so the posterior is the
profile posterior of the non-linear parameters.

Why not integrate them out under a wide Gaussian prior (:func:`kinjax.linear.marginal_loglike`,
what kinjax did before)? The ``log det`` of that integral rewards the LOSVDs that make
the template columns most collinear. On S/N-30 mocks it pulled posteriors far from the
truth (σ = 247 km/s → median 503 km/s); profiling brought the median back to the MAP's
(286 km/s) and raised the σ coverage of 40 such mocks (h3, h4 drawn from the prior) from
0.50 to 0.57. Marginalising without that term gave the same medians as profiling, so the
``log det`` was the cause and the sign of the weights was not (benchmarks/RESULTS.md,
NUTS calibration).

Priors (weakly informative, no galaxy-specific constants):

- every LOSVD parameter: uniform within the family's bounds (:mod:`kinjax.family`),
  times Normal(0, ``spec.h_prior``) on each Gauss–Hermite h_m; for the histogram, a
  random walk on the third differences of neighbouring logits of scale
  ``spec.smoothness`` and a Normal(−12, 3) prior on the log mass of the edge bins;
- multiplicative Legendre coefficients: Normal(0, 1);
- linear parameters: none (profiled; template weights ≥ 0 unless PCA components).
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from numpyro.distributions import constraints

from kinjax.family import LosvdSpec
from kinjax.forward import ForwardModel
from kinjax.linear import LinearTerms, profile_loglike, solve_linear, solve_projected

__all__ = ["forward_profile_loglike", "spectrum_model", "spectrum_model_whitened", "log_posterior_whitened", "whitened_to_theta",
           "make_nuts_program", "make_nuts_chain", "run_chains"]


def forward_profile_loglike(forward: ForwardModel, losvd, y, weights, linear: LinearTerms, mult=None):
    """:func:`kinjax.linear.profile_loglike` of ``forward``'s linear system, with a cheap gradient.

    The value is the same. The gradient is the same too (envelope theorem: the best
    linear parameters ``x`` enter as constants), but it is taken through the model
    ``forward(losvd, x)``, which mixes the templates before convolving them: one inverse
    FFT to differentiate instead of one per template column of the design matrix. The
    design matrix itself is only needed for the solve, without a gradient. When
    ``linear.free`` holds the additive polynomials' factorisation, they are solved for by
    projection (:func:`kinjax.linear.solve_projected`), which makes the solve's Gram matrix
    2–3 times cheaper (NGC 3073's 3856 SDSS pixels with 16 templates and degree 20: a
    gradient of 1.10 ms instead of 1.47 ms).

    Parameters
    ----------
    forward : ForwardModel; losvd : LOSVD; y, weights : (n_pix,) (``mask / noise``);
    linear : LinearTerms; mult : (mdegree,) multiplicative coefficients or None.
    """
    if forward.light_constraints(losvd) is not None:  # equal-light rows depend on the LOSVD too
        return profile_loglike(*forward.linear_system(losvd, y, weights, mult), linear)
    n_t = forward.n_templates
    if linear.free is not None:  # additive polynomials solved by projection (solve_projected)
        use = linear.use[:n_t]
        t = jax.lax.stop_gradient(forward.convolved_templates(losvd, mult)).T * use
        x_t, x_p = jax.lax.stop_gradient(
            solve_projected(t, y, weights, linear.nonneg[:n_t] | ~use, use, linear.free))
    else:
        a = jax.lax.stop_gradient(forward.design_matrix(losvd, mult)) * linear.use
        x = jax.lax.stop_gradient(solve_linear(a, y, weights, linear.nonneg | ~linear.use, passive=linear.use))
        x_t, x_p = x[:n_t], x[n_t:]
    r = (forward(losvd, x_t, x_p, mult) - y) * weights
    return -0.5 * (r @ r)


def spectrum_model(forward: ForwardModel, spec: LosvdSpec, y, weights, linear: LinearTerms):
    """numpyro model of one log-rebinned spectrum.

    Parameters
    ----------
    forward : ForwardModel
    spec : LosvdSpec
    y : (n_pix,) flux; weights : (n_pix,) ``mask / noise``.
    linear : LinearTerms
        Which design-matrix columns are used and which are non-negative
        (:func:`kinjax.fit.nuts_inputs` builds it from a MAP fit).

    Sample sites: one per LOSVD parameter (``spec.names``; the histogram's logits as one
    vector site ``logits``) and ``mult`` (mdegree,) when there is a multiplicative
    polynomial. The deterministic sites ``mean_v`` and ``dispersion`` are the first
    moment and the square root of the second central moment of the LOSVD (km/s).
    """
    dtype = y.dtype
    lower = jnp.asarray(spec.lower, dtype)
    upper = jnp.asarray(spec.upper, dtype)
    if spec.family == "hist":
        n = spec.n_params
        theta = numpyro.sample("logits", dist.Normal(jnp.zeros(n, dtype), 10.0).to_event(1))
        numpyro.factor("smoothness", -0.5 * jnp.sum(spec.prior_residuals(theta) ** 2))
    else:
        theta = jnp.stack(
            [numpyro.sample(name, dist.Uniform(lower[i], upper[i])) for i, name in enumerate(spec.names)]
        )
        numpyro.factor("losvd_prior", -0.5 * jnp.sum(spec.prior_residuals(theta) ** 2))
    mult = None
    if forward.mdegree:
        mult = numpyro.sample("mult", dist.Normal(jnp.zeros(forward.mdegree, dtype), 1.0).to_event(1))
    losvd = spec.build(theta)
    numpyro.deterministic("mean_v", losvd.mean)
    numpyro.deterministic("dispersion", losvd.dispersion)
    numpyro.factor("loglike", forward_profile_loglike(forward, losvd, y, weights, linear, mult))


def _unconstrained_theta(s, spec: LosvdSpec):
    """Parameters (LOSVD then multiplicative) and log Jacobian from the sampler's ``s``."""
    k = spec.n_params
    lv_theta, log_jac = spec.constrain(s[:k])
    return jnp.concatenate([lv_theta, s[k:]]), log_jac


def spectrum_model_whitened(forward: ForwardModel, y, weights, linear: LinearTerms, loc, chol, *, spec: LosvdSpec):
    """:func:`spectrum_model` in unconstrained coordinates whitened by a Laplace fit.

    The LOSVD parameters are first mapped to unconstrained coordinates ``s`` with
    :meth:`~kinjax.family.LosvdSpec.constrain` (a logistic map of each interval; of ln σ
    for dispersions), so the posterior falls smoothly to zero at the bounds instead of
    ending at a wall, which NUTS reports as a divergence. The sampler then moves ``z``
    (n_theta,) with ``s = loc + chol @ z``, where ``loc`` and ``chol @ chol.T`` are the
    MAP and its Laplace covariance in ``s`` (:func:`kinjax.fit.nuts_inputs`), so the
    posterior it sees is close to a unit Gaussian: warm-up is short and trajectories are
    short. The priors are those of :func:`spectrum_model` (uniform within the bounds, a
    random walk for the histogram, Normal(0, 1) on multiplicative coefficients): the log
    Jacobian of the map is added, so uniform in θ stays uniform in θ.

    The deterministic site ``theta`` holds the parameters (LOSVD then multiplicative).
    """
    n = loc.shape[0]
    z = numpyro.sample("z", dist.ImproperUniform(constraints.real_vector, (), (n,)))
    theta, log_jac = _unconstrained_theta(loc + chol @ z, spec)
    theta = numpyro.deterministic("theta", theta)
    k = spec.n_params
    numpyro.factor("jacobian", log_jac)
    numpyro.factor("losvd_prior", -0.5 * jnp.sum(spec.prior_residuals(theta[:k]) ** 2))
    mult = None
    if forward.mdegree:
        mult = theta[k:]
        numpyro.factor("mult_prior", -0.5 * jnp.sum(mult**2))
    losvd = spec.build(theta[:k])
    numpyro.deterministic("mean_v", losvd.mean)
    numpyro.deterministic("dispersion", losvd.dispersion)
    numpyro.factor("loglike", forward_profile_loglike(forward, losvd, y, weights, linear, mult))


def log_posterior_whitened(z, forward: ForwardModel, y, weights, linear: LinearTerms, loc, chol, spec: LosvdSpec):
    """Log posterior of :func:`spectrum_model_whitened` at ``z`` (n_theta,), as a pure function.

    Equal to numpyro's log density of that model up to a constant; used by the compiled
    NUTS program so that one compilation serves every spectrum of the same shape.
    """
    k = spec.n_params
    theta, log_jac = _unconstrained_theta(loc + chol @ z, spec)
    logp = log_jac - 0.5 * jnp.sum(spec.prior_residuals(theta[:k]) ** 2)
    mult = None
    if forward.mdegree:
        mult = theta[k:]
        logp = logp - 0.5 * jnp.sum(mult**2)
    losvd = spec.build(theta[:k])
    return logp + forward_profile_loglike(forward, losvd, y, weights, linear, mult)


def whitened_to_theta(z, spec: LosvdSpec, loc, chol) -> np.ndarray:
    """Parameters (..., n_theta) from whitened draws ``z`` (..., n_theta) of the NUTS program.

    Histogram logits come back centred on their mean (:meth:`LosvdSpec.identified`).
    """
    s = np.asarray(loc) + np.einsum("ij,...j->...i", np.asarray(chol), np.asarray(z))
    k = spec.n_params
    lv_theta, _ = spec.constrain(jnp.asarray(s[..., :k]))
    # histogram: centred logits (LosvdSpec.identified; the mean logit is unidentified)
    return np.concatenate([spec.identified(np.asarray(lv_theta)), s[..., k:]], axis=-1)


#: The progress bar the compiled NUTS programs report to (set by the driver around a run):
#: it counts iterations summed over the chains, num_chains × (num_warmup + num_samples);
#: ``done`` holds each chain's count (the chains may run at the same time, in threads).
PROGRESS = {"bar": None, "done": {}}
_TICK = 25
_PROGRESS_LOCK = threading.Lock()


def _tick(chain, i):
    bar = PROGRESS["bar"]
    if bar is None:
        return
    with _PROGRESS_LOCK:
        done = PROGRESS["done"]
        done[int(chain)] = max(done.get(int(chain), 0), int(i))
        total = sum(done.values())
        if total > bar.n:
            bar.update(total - bar.n)


def _nuts_chain(spec: LosvdSpec, n_theta: int, num_warmup: int, num_samples: int, target_accept_prob: float,
                resume: bool = False):
    """``one_chain(start, chain, args) -> ((z, diverging, num_steps), state)``: one NUTS chain, traceable.

    ``start`` is a PRNG key: warm-up from z = 0 (the MAP), then ``num_samples`` draws. With
    ``resume`` it is instead the final ``state`` of an earlier run of the same
    configuration: ``num_samples`` more draws with that run's adapted step size and mass
    matrix, no warm-up. ``state`` is numpyro's ``HMCState``.
    """
    from numpyro.infer.hmc import hmc

    def potential_gen(forward, y, weights, linear, loc, chol):
        return lambda z: -log_posterior_whitened(z, forward, y, weights, linear, loc, chol, spec)

    init_kernel, sample_kernel = hmc(potential_fn_gen=potential_gen, algo="NUTS")

    def one_chain(start, chain, args):
        def step(state, i):
            state = sample_kernel(state, model_args=args)
            # report progress to the host every _TICK iterations (see PROGRESS)
            jax.lax.cond(i % _TICK == 0, lambda: jax.debug.callback(_tick, chain, i), lambda: None)
            return state, (state.z, state.diverging, state.num_steps)

        z0 = jnp.zeros(n_theta, args[1].dtype)
        if resume:
            # init_kernel sets the kernel's settings (warm-up length, tree depth) when it is
            # traced; called as for a fresh chain, its result unused, it sets the same ones,
            # and the saved state, past the warm-up, no longer adapts
            init_kernel(z0, num_warmup, target_accept_prob=target_accept_prob, model_args=args,
                        rng_key=start.rng_key)
            state, first = start, start.i + 1
        else:
            state = init_kernel(z0, num_warmup, target_accept_prob=target_accept_prob, model_args=args,
                                rng_key=start)
            state, _ = jax.lax.scan(step, state, jnp.arange(1, num_warmup + 1))
            first = num_warmup + 1
        state, out = jax.lax.scan(step, state, first + jnp.arange(num_samples))
        return out, state

    return one_chain


def make_nuts_program(spec: LosvdSpec, n_theta: int, num_warmup: int, num_samples: int, num_chains: int,
                      target_accept_prob: float = 0.85, resume: bool = False):
    """A jitted NUTS run (warm-up with step-size and diagonal mass adaptation, then sampling).

    Built on numpyro's functional ``hmc`` kernel, with the loop compiled once: calling the
    returned function again with new data (same shapes) does not recompile, and it can be
    ``vmap``-ped over spectra. The chains run one after the other on a CPU (``lax.map``)
    and side by side on accelerators (``vmap``), the choice of
    :func:`kinjax.optimize.map_spectra` and of numpyro's own ``chain_method``: under
    ``vmap`` every step waits for the chain with the longest trajectory, which on two CPU
    cores made a posterior 1.7 times slower (NGC 4550: 5.5–6.0 s against 3.2–3.3 s;
    NGC 4636's 3838 SDSS pixels: 50–60 s against 28–31 s). For one spectrum on a
    multi-core CPU, :func:`make_nuts_chain` and :func:`run_chains` are faster still.

    With ``resume``, the program continues the chains of an earlier run of the same
    ``num_warmup`` instead: pass their final states in place of the key, and it draws
    ``num_samples`` more per chain, without warm-up.

    Returns
    -------
    run(start, forward, y, weights, linear, loc, chol) -> ((z, diverging, num_steps), states),
    z of shape (num_chains, num_samples, n_theta) (whitened; :func:`whitened_to_theta`
    turns them into parameters) and ``states`` the chains' final states (stacked).
    """
    one_chain = _nuts_chain(spec, n_theta, num_warmup, num_samples, target_accept_prob, resume)

    @jax.jit
    def run(start, forward, y, weights, linear, loc, chol):
        args = (forward, y, weights, linear, loc, chol)
        starts = start if resume else jax.random.split(start, num_chains)
        chains = (starts, jnp.arange(num_chains))
        if jax.default_backend() == "cpu":
            return jax.lax.map(lambda sc: one_chain(sc[0], sc[1], args), chains)
        return jax.vmap(lambda s, c: one_chain(s, c, args))(*chains)

    return run


def make_nuts_chain(spec: LosvdSpec, n_theta: int, num_warmup: int, num_samples: int,
                    target_accept_prob: float = 0.85, resume: bool = False):
    """One chain of :func:`make_nuts_program`, jitted on its own, for :func:`run_chains`.

    Returns
    -------
    chain(start, index, forward, y, weights, linear, loc, chol) -> ((z, diverging, num_steps), state),
    z of shape (num_samples, n_theta); ``start`` a PRNG key, or with ``resume`` the final
    state of an earlier run; ``index`` numbers the chain for the progress bar.
    """
    one_chain = _nuts_chain(spec, n_theta, num_warmup, num_samples, target_accept_prob, resume)
    return jax.jit(lambda start, index, *args: one_chain(start, index, args))


def run_chains(chain, starts, args, threads: int):
    """Run the chains of :func:`make_nuts_chain` from ``starts`` in ``threads`` host threads.

    ``starts`` holds one start per chain, stacked: PRNG keys (``jax.random.split(key,
    num_chains)`` gives the draws of ``make_nuts_program(...)(key, *args)``: same keys,
    same algorithm) or, for a resumed chain, the final states of an earlier run. On a
    multi-core CPU the chains run at the same time, each at its own pace: XLA releases
    Python's lock while it computes, and one small spectrum keeps about one core busy. On
    two cores a posterior of NGC 4636 (3838 SDSS pixels) took 7.8 s against 17.8 s for
    the chains one after the other. Run it with BLAS limited to one thread
    (:func:`kinjax.fit.single_threaded_blas`, as ``fit_spectrum`` does): OpenBLAS's own
    threads otherwise compete with the chains, and NGC 4550 ran slower in two threads
    than in one.

    Returns
    -------
    ((z, diverging, num_steps), states), stacked over the chains as :func:`make_nuts_program` returns them.
    """
    num_chains = jax.tree_util.tree_leaves(starts)[0].shape[0]

    def one(c):
        start = jax.tree_util.tree_map(lambda a: a[c], starts)
        return jax.block_until_ready(chain(start, c, *args))

    if threads <= 1:
        outs = [one(c) for c in range(num_chains)]
    else:
        with ThreadPoolExecutor(max_workers=threads) as pool:
            outs = list(pool.map(one, range(num_chains)))
    return jax.tree_util.tree_map(lambda *a: jnp.stack(a), *outs)
