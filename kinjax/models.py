"""numpyro model of one spectrum (the only module of the single-spectrum path that uses numpyro).

The sampler sees only the non-linear parameters: the LOSVD's and the multiplicative
polynomial's. The linear parameters (template weights and additive polynomial) are
integrated out analytically (:func:`kinjax.linear.marginal_loglike`) under independent
Gaussian priors of width ``prior_scale``, wide compared with the data.

Priors (weakly informative, no galaxy-specific constants):

- every LOSVD parameter: uniform within the family's bounds (:mod:`kinjax.family`),
  times Normal(0, ``spec.h_prior``) on each Gauss–Hermite h_m; for the histogram, a
  random walk on neighbouring logits of scale ``spec.smoothness``;
- multiplicative Legendre coefficients: Normal(0, 1);
- linear parameters: Normal(0, prior_scale), integrated out.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpyro
import numpyro.distributions as dist
from numpyro.distributions import constraints

from kinjax.family import LosvdSpec
from kinjax.forward import ForwardModel
from kinjax.linear import marginal_loglike

__all__ = ["spectrum_model", "spectrum_model_whitened"]


def spectrum_model(forward: ForwardModel, spec: LosvdSpec, y, weights, prior_scale):
    """numpyro model of one log-rebinned spectrum.

    Parameters
    ----------
    forward : ForwardModel
    spec : LosvdSpec
    y : (n_pix,) flux; weights : (n_pix,) ``mask / noise``.
    prior_scale : (n_linear,) prior standard deviations of the linear parameters.

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
    design = forward.design_matrix(losvd, mult)
    numpyro.factor("loglike", marginal_loglike(design, y, weights, prior_scale))


def spectrum_model_whitened(forward: ForwardModel, spec: LosvdSpec, y, weights, prior_scale, loc, chol):
    """:func:`spectrum_model` with the non-linear parameters whitened by a Laplace fit.

    The sampler moves ``z`` (n_theta,) with ``theta = loc + chol @ z``, where ``loc`` and
    ``chol @ chol.T`` are the MAP and its Laplace covariance, so the posterior it sees is
    close to a unit Gaussian: warm-up is short and trajectories are short. The priors are
    those of :func:`spectrum_model` (uniform within the bounds, a random walk for the
    histogram, Normal(0, 1) on multiplicative coefficients); the change of variables is
    linear, so no Jacobian term is needed.

    The deterministic site ``theta`` holds the parameters (LOSVD then multiplicative).
    """
    dtype = y.dtype
    n = loc.shape[0]
    k = spec.n_params
    z = numpyro.sample("z", dist.ImproperUniform(constraints.real_vector, (), (n,)))
    theta = numpyro.deterministic("theta", loc + chol @ z)
    lv_theta = theta[:k]
    numpyro.factor("losvd_prior", -0.5 * jnp.sum(spec.prior_residuals(lv_theta) ** 2))
    if spec.family == "hist":
        inside = jnp.all(jnp.abs(lv_theta) < jnp.asarray(spec.upper, dtype))
    else:
        inside = jnp.all((lv_theta > jnp.asarray(spec.lower, dtype)) & (lv_theta < jnp.asarray(spec.upper, dtype)))
    numpyro.factor("bounds", jnp.where(inside, 0.0, -jnp.inf))
    mult = None
    if forward.mdegree:
        mult = theta[k:]
        numpyro.factor("mult_prior", -0.5 * jnp.sum(mult**2))
    # outside the bounds the LOSVD may be invalid: evaluate it at a clipped point
    safe = jnp.clip(lv_theta, jnp.asarray(spec.lower, dtype), jnp.asarray(spec.upper, dtype))
    losvd = spec.build(jnp.where(inside, lv_theta, safe))
    numpyro.deterministic("mean_v", losvd.mean)
    numpyro.deterministic("dispersion", losvd.dispersion)
    design = forward.design_matrix(losvd, mult)
    numpyro.factor("loglike", marginal_loglike(design, y, weights, prior_scale))
