"""Point estimates: variable-projection Levenberg–Marquardt, starting grid, Laplace errors.

The non-linear parameters ``theta`` (the LOSVD's, then the multiplicative polynomial's)
are optimised with Levenberg–Marquardt; for every trial ``theta`` the linear parameters
(template weights ≥ 0 and additive polynomial) are solved exactly by NNLS — pPXF's
scheme (Golub & Pereyra's variable projection with Kaufman's Jacobian). Everything is
pure JAX inside ``lax.while_loop``: one spectrum is a jitted call, a cube is the same
call under ``vmap``.

:func:`make_map_solver` returns ``solve(y, weights, theta0) -> MapSolution``; ``y`` and
``weights = mask / noise`` are ``(n_pix,)``.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from kinjax.family import LosvdSpec
from kinjax.forward import ForwardModel
from kinjax.linear import lstsq, solve_linear

__all__ = ["MapSolution", "make_map_solver", "make_start_finder", "MULT_BOUND"]

#: Bound on the multiplicative Legendre coefficients.
MULT_BOUND = 5.0


class MapSolution(NamedTuple):
    """Result of :func:`make_map_solver` (all arrays; batched under vmap).

    Attributes
    ----------
    theta : (n_theta,)
        Non-linear parameters (LOSVD, then multiplicative polynomial).
    linear : (n_templates + degree + 1,)
        Template weights, then additive polynomial coefficients.
    chi2 : scalar
        χ² of the data at the solution (prior terms excluded).
    cov : (n_theta, n_theta)
        Laplace covariance of theta (linear parameters marginalised at a fixed active set).
    n_iter : scalar
        Levenberg–Marquardt iterations used.
    n_active : scalar
        Number of linear parameters not held at zero.
    """

    theta: jax.Array
    linear: jax.Array
    chi2: jax.Array
    cov: jax.Array
    n_iter: jax.Array
    n_active: jax.Array


def _bounds(spec: LosvdSpec, mdegree: int):
    lower = np.r_[spec.lower, np.full(mdegree, -MULT_BOUND)]
    upper = np.r_[spec.upper, np.full(mdegree, MULT_BOUND)]
    return lower, upper


def _nonneg_mask(forward: ForwardModel, nonneg: bool):
    n_lin = forward.n_templates + forward.degree + 1
    return np.r_[np.full(forward.n_templates, nonneg), np.zeros(n_lin - forward.n_templates, bool)]


def make_map_solver(forward: ForwardModel, spec: LosvdSpec, *, nonneg: bool = True, max_iter: int = 100,
                    xtol: float = 1e-7, ftol_abs: float = 1e-4):
    """Build the jitted MAP solver for one spectrum (vmap it for many).

    Parameters
    ----------
    forward : ForwardModel
    spec : LosvdSpec
    nonneg : bool
        Template weights ≥ 0 (pPXF) or unconstrained (PCA templates).
    max_iter : int
        Maximum Levenberg–Marquardt iterations.
    xtol, ftol_abs : float
        Stop when an accepted step decreases the objective (χ² plus prior terms) by less
        than ``xtol * objective + ftol_abs``: a change of 1e-4 in χ² moves no parameter
        by more than 1 % of its error.

    Returns
    -------
    solve(y, weights, theta0) -> MapSolution, jitted.
    """
    k = spec.n_params
    mdeg = forward.mdegree
    lower, upper = _bounds(spec, mdeg)  # NumPy constants: safe to build under a trace
    nonneg_mask = _nonneg_mask(forward, nonneg)
    n_t = forward.n_templates

    def design(theta):
        mult = theta[k:] if mdeg else None
        return forward.design_matrix(spec.build(theta[:k]), mult)

    def model(theta, x):
        mult = theta[k:] if mdeg else None
        return forward(spec.build(theta[:k]), x[:n_t], x[n_t:], mult)

    def residuals(theta, x, y, w):
        return jnp.concatenate([(model(theta, x) - y) * w, spec.prior_residuals(theta[:k])])

    def profile(theta, y, w, passive=None):
        x = solve_linear(design(theta), y, w, nonneg_mask, passive)
        r = residuals(theta, x, y, w)
        return x, r, r @ r

    def solve(y, w, theta0):
        theta0 = jnp.clip(theta0, lower, upper)
        x0, r0, f0 = profile(theta0, y, w)

        def body(state):
            theta, x, r, f, lam, it, _ = state
            jac = jax.jacfwd(lambda th: residuals(th, x, y, w))(theta)
            g = jac.T @ r
            h = jac.T @ jac
            d = jnp.diag(h)
            step = jnp.linalg.solve(h + lam * jnp.diag(d + 1e-12 * jnp.max(d)), -g)
            new = jnp.clip(theta + step, lower, upper)
            x_new, r_new, f_new = profile(new, y, w, x > 0)
            ok = f_new < f
            theta, x, r = (jnp.where(ok, a, b) for a, b in ((new, theta), (x_new, x), (r_new, r)))
            # converged: a nearly Gauss-Newton step (small damping) that barely helps
            small = ok & (f - f_new <= xtol * f + ftol_abs) & (lam <= 1.0)
            f = jnp.where(ok, f_new, f)
            lam = jnp.where(ok, lam * 0.3, lam * 4.0)
            done = small | (lam > 1e8)
            return theta, x, r, f, lam, it + 1, done

        def cond(state):
            return (~state[-1]) & (state[-2] < max_iter)

        dtype = y.dtype
        state = (theta0, x0, r0, f0, jnp.asarray(1e-3, dtype), 0, jnp.asarray(False))
        theta, x, r, f, lam, it, _ = jax.lax.while_loop(cond, body, state)
        cov, n_active = _laplace(theta, x, y, w)
        chi2 = jnp.sum(((model(theta, x) - y) * w) ** 2)
        return MapSolution(theta, x, chi2, cov, it, n_active)

    def _laplace(theta, x, y, w):
        jac = jax.jacfwd(lambda th: residuals(th, x, y, w))(theta)
        a = design(theta) * w[:, None]
        a = jnp.concatenate([a, jnp.zeros((jac.shape[0] - a.shape[0], a.shape[1]), a.dtype)])
        active = (~nonneg_mask) | (x > 0)
        full = jnp.concatenate([jac, a * active], axis=1)
        keep = jnp.concatenate([jnp.ones(theta.shape[0], bool), active])
        m = full.T @ full
        m = jnp.where(keep[:, None] & keep[None, :], m, jnp.eye(m.shape[0], dtype=m.dtype))
        cov = jnp.linalg.inv(m)[: theta.shape[0], : theta.shape[0]]
        return cov, jnp.sum(active)

    return jax.jit(solve)


def make_start_finder(forward: ForwardModel, spec: LosvdSpec, *, vmax: float = 1200.0, dv: float = 40.0,
                      sigmas=(40.0, 80.0, 150.0, 250.0, 400.0)):
    """Build a jitted function giving a robust starting ``theta`` for the LM solver.

    Scans a velocity grid (±``vmax`` in steps of ``dv`` km/s) with a Gaussian LOSVD at
    σ = 150 km/s applied to the mean template, then a set of σ at the best velocity;
    each trial solves the linear continuum exactly. Returns ``start(y, weights) ->
    theta0`` with the family's other parameters at their symmetric defaults and zero
    multiplicative coefficients.
    """
    from kinjax.losvd import Gaussian

    n_t = forward.n_templates
    dtype = forward.additive.dtype
    # NumPy constants, so that the finder can be built inside a traced function
    mean_w = np.full(n_t, 1.0 / n_t, dtype=dtype)
    velocities = np.arange(-vmax, vmax + dv / 2, dv).astype(dtype)
    sig = np.asarray(sigmas, dtype=dtype)
    base = np.asarray(spec.initial(0.0, 150.0), dtype=dtype)
    n_comp = forward.n_components

    def chi2(v, s, y, w):
        col = forward((Gaussian(v, s),) * n_comp, mean_w)
        a = jnp.concatenate([col[None], forward.additive]).T
        x = lstsq(a, y, w)
        return jnp.sum(((a @ x - y) * w) ** 2)

    def start(y, w):
        c_v = jax.vmap(lambda v: chi2(v, 150.0, y, w))(velocities)
        v0 = jnp.asarray(velocities)[jnp.argmin(c_v)]
        c_s = jax.vmap(lambda s: chi2(v0, s, y, w))(sig)
        s0 = jnp.asarray(sig)[jnp.argmin(c_s)]
        if spec.family == "hist":
            c = np.asarray(spec.options["centres"], dtype=y.dtype)
            theta = -0.5 * ((c - v0) / s0) ** 2
        else:
            theta = jnp.asarray(base).at[0].set(v0).at[1].set(s0)
        return jnp.concatenate([theta, jnp.zeros(forward.mdegree, dtype=theta.dtype)])

    return jax.jit(start)
