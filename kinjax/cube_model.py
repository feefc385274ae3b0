"""The 3D model: LOSVD parameter maps as Gaussian-process fields over the sky.

Every LOSVD parameter (for Gauss–Hermite: V, ln σ, h3, h4) is a latent field over
spaxel position with a GP prior: a constant mean, an amplitude ``A`` and a length scale
``ℓ`` per field, and a *separable* kernel

    k(Δx, Δy) = A² [k₁(Δx / ℓ) k₁(Δy / ℓ) + jitter δ]

with k₁ the Matérn-3/2 ``(1 + √3 r) exp(−√3 r)`` (default), the Matérn-1/2 (exponential)
``exp(−r)`` or the squared exponential ``exp(−r²/2)`` (tinygp's conventions; for the
squared exponential the product is the isotropic kernel). Separability makes the covariance of a full spaxel grid a Kronecker
product ``K = A² (K_y ⊗ K_x + jitter I)``: with the eigendecompositions of the two small
1D matrices, solves and log-determinants cost O(n_y n_x (n_y + n_x)) instead of O(n³)
(:class:`GridGP`). Irregular positions (Voronoi bins) use the same kernel densely
(:class:`DenseGP`; tinygp's ``GaussianProcess`` in the numpyro model).

The template weights and the additive polynomial are *profiled*: for each spaxel and
trial θ they are solved by NNLS and held fixed with ``jax.lax.stop_gradient``; by the
envelope theorem the gradient of the profiled χ² is then exact. The objective is

    Σ_spaxels ½ [χ²_s(θ_s) + ‖r(θ_s)‖²] + Σ_fields ½ (θ_f − m_f)ᵀ K_f⁻¹ (θ_f − m_f) (+ ½ log det K_f)

with r the family's prior residuals *without* the priors on single parameter values that
the GP priors replace (:meth:`kinjax.family.LosvdSpec.without_value_priors`): nothing for
Gauss–Hermite and the two Gaussians, the shape priors for Sanders–Evans (without them
(δ, κ) are unidentified when σ_K is small). The Laplace errors use the same terms. The
histogram is the exception: its smoothness and edge priors enter the errors but not the
objective. On the seed-100 counter-rotating benchmark cube at S/N 20 the objective with
them gave MEAN_V / DISPERSION RMSE 7.6 / 46.3 km/s (dispersion bias +42, as for its
spaxel fits, +47) and without them 9.0 / 7.4; errors without them were 120 / 57 km/s.

:func:`fit_cube_gp` proceeds in three steps:

1. **hyperparameters** (empirical Bayes): for each field, the spaxel-by-spaxel values and
   their Laplace errors are treated as noisy data of the field, and (m, A, ℓ) maximise
   the GP marginal likelihood ``N(θ̂ | m, K + diag(err²))`` times weak hyperpriors
   (ℓ log-normal around 3 spaxels, A half-normal), on at most ``hyper_max`` spaxels.
   A start fitted on the neighbour-averaged cube (``start_radius``) gives averages of
   the field, whose errors are far below one spaxel's: there the likelihood is that of
   the averages, ``N(θ̂ | m, W (K + diag(err²)) Wᵀ + τ² I)`` with W the averaging weights,
   τ a scatter of the fits' own, and ℓ at least the averaging radius (:func:`_hyper_loss`).
   For Gauss–Hermite the single-spectrum Normal(0, 0.1) prior on h_m is first divided
   out of each spaxel's Laplace approximation (:func:`likelihood_only`): the GP prior
   takes its place, and estimates shrunk towards zero made the h4 field look flat;
2. **Gaussian start**: the closed-form posterior mean of each field under that linear-
   Gaussian approximation;
3. **MAP** (``method="map"``): L-BFGS (optax) on the exact profiled χ² plus the GP prior,
   in coordinates whitened by the approximate posterior covariance, so that a few dozen
   steps suffice. With ``free_mean`` (default) a common shift of each field is optimised
   too (a flat prior on the field means): the spaxel estimates the hyperparameters come
   from are noisy and, for h3/h4, shrunk by the single-spectrum prior, and on a
   disc + bulge mock at S/N 20 (true GH h4 ≈ +0.05) the h4 field's mean moved from
   −0.007 to +0.026, lowering the RMSE of DISPERSION from 10.1 to 9.2 km/s.
   Errors are Laplace: jointly over all fields and spaxels (each spaxel's data
   precision block, with the per-spaxel prior terms r above (the histogram's too), plus each
   field's GP precision,
   with the field means marginalised)
   up to ``joint_max`` unknowns; beyond that per field ``Σ_post = (Λ_data + K⁻¹)⁻¹``
   with ``Λ_data`` the diagonal data precision at the optimum (fields independent).
   Finally the errors are widened for the uncertainty of each field's amplitude and
   length scale (``hyper_draws`` draws from their Laplace approximation; law of total
   variance in the linear-Gaussian approximation; up to ``hyper_nodes_max`` nodes):
   on a disc + bulge mock at S/N 20 this widened the h3/h4 errors by ≈ 1.5–1.7× and
   those of V and ln σ by 2–3 %.
   ``method="svi"`` instead fits the numpyro model :func:`cube_model` (hyperparameters
   sampled too) with an AutoNormal / low-rank guide, started at the MAP.

**Two Gaussians**: the fields are the blend's mean velocity V = f1 V1 + (1 − f1) V2, the
separation ΔV = V2 − V1, ln σ1, ln σ2 and logit f1 (:func:`kinjax.family.gauss2_mean_form`;
results are returned in V1, σ1, V2, σ2, f1). On three counter-rotating mocks at S/N 20
this lowered the RMSE of MEAN_V from 7.9–12.5 to 5.8–7.2 km/s (benchmarks/CUBE_RESULTS.md).

**Mean function of V** (``v_mean="rotation"``): an arctan rotation curve of an inclined
disc (:mod:`kinjax.rotation`) is fitted once to the spaxel-by-spaxel velocities and the
V field's GP models the departures from it. The curve's own uncertainty (its parameters'
covariance, propagated to first order) is marginalised in the joint Laplace errors like
the constant mean; the per-field error path ignores it. On three disc + bulge mocks at
S/N 20 it lowered the RMSE of MEAN_V from 7.8 to 6.7 km/s (pooled) with coverage 0.85,
0.55, 0.69 (constant mean: 0.67, 0.69, 0.65); DISPERSION was unchanged.

Dense n × n work (``eigh``) is used for the posterior covariance up to ``dense_max``
field nodes. Beyond that a full grid keeps its Kronecker structure throughout: the MAP
starts at each field's Gaussian posterior mean given the spaxel fits (conjugate
gradients, preconditioned by the posterior covariance for a uniform data precision λ̄,
which is diagonal in the Kronecker eigenbasis) and L-BFGS runs in coordinates whitened by
that same covariance; the errors are each field's exact Gaussian posterior variances
(dense NumPy once, up to ``errors_dense_max`` nodes). On a 12 × 12 mock the grid path
reaches the dense path's optimum (maps within 0.05 errors, errors within 2 %); the
diagonal start and preconditioner it replaced stopped 100 L-BFGS steps short of it.
Irregular positions beyond ``dense_max`` still use the diagonal approximation.
numpyro is imported only inside :func:`cube_model` and the SVI path.

Measured on a shared 2-core CPU (float64): the GP log-density and its gradient take
0.18 / 0.23 / 0.48 ms for 100 / 400 / 1600 grid spaxels with the Kronecker algebra,
against 17 / 420 / 1900 ms for tinygp's exact (Cholesky) GP. The data term dominates:
χ² and its gradient for 100 spaxels of 481 pixels and 150 templates take 0.31 s (NNLS
warm-started, gradient through one mixed template per spaxel). A 10 × 10 mock cube with
481 pixels: spaxel-by-spaxel 7 s after compilation, GP MAP 28 s including compilation.
The SVI path is exact-GP (tinygp) and meant for small cubes; its AutoNormal guide
starts at scale 0.1 in field units, so it needs thousands of steps for V (km/s).
"""

from __future__ import annotations

import dataclasses
import time
import warnings

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from kinjax.errors import KinjaxError
from kinjax.family import exp_where, log_where
from kinjax.sharding import spectra_mesh

__all__ = [
    "likelihood_only",
    "KERNELS",
    "kernel_1d",
    "tinygp_kernel",
    "GridGP",
    "DenseGP",
    "kronecker_logpdf",
    "make_profiled_chi2",
    "cube_model",
    "fit_cube_gp",
]

KERNELS = ("matern32", "matern12", "expsquared")
#: Relative diagonal jitter of every GP covariance (float32-safe).
JITTER = 1e-5


# ---------------------------------------------------------------------- kernels
def kernel_1d(kind, d, scale):
    """Unit-amplitude 1D stationary kernel at separations ``d`` (any shape, same units as ``scale``)."""
    r = jnp.abs(d) / scale
    if kind == "matern32":
        arg = np.sqrt(3.0) * r
        return (1.0 + arg) * jnp.exp(-arg)
    if kind == "matern12":
        return jnp.exp(-r)
    if kind == "expsquared":
        return jnp.exp(-0.5 * r**2)
    raise KinjaxError(f"unknown kernel {kind!r}: use one of {KERNELS}")


def tinygp_kernel(kind, amplitude, scale):
    """The same separable kernel as a tinygp kernel on 2D inputs (x, y), times ``amplitude²``."""
    from tinygp import kernels, transforms

    base = {"matern32": kernels.Matern32, "matern12": kernels.Exp, "expsquared": kernels.ExpSquared}.get(kind)
    if base is None:
        raise KinjaxError(f"unknown kernel {kind!r}: use one of {KERNELS}")
    return amplitude**2 * transforms.Subspace(0, base(scale)) * transforms.Subspace(1, base(scale))


def _dense_kernel(kind, xy, scale):
    """(n, n) unit-amplitude separable kernel matrix at positions ``xy`` (n, 2)."""
    d = xy[:, None, :] - xy[None, :, :]
    return kernel_1d(kind, d[..., 0], scale) * kernel_1d(kind, d[..., 1], scale)


# ---------------------------------------------------------------------- GP priors
class GridGP(eqx.Module):
    """GP prior of one field on a full (n_y, n_x) grid, Kronecker-factored.

    Covariance ``A² (K_y ⊗ K_x + jitter I)``; field values are ``(n_y, n_x)`` images
    (row-major, i.e. flattened index ``iy * n_x + ix``).
    """

    qy: jax.Array  # (n_y, n_y) eigenvectors of K_y
    qx: jax.Array  # (n_x, n_x)
    eig: jax.Array  # (n_y, n_x) eigenvalues of the covariance
    mean: jax.Array  # scalar

    @classmethod
    def build(cls, kind, ycoord, xcoord, mean, amplitude, scale, jitter=JITTER):
        """From 1D coordinates of the rows (n_y,) and columns (n_x,), same units as ``scale``."""
        ly, qy = jnp.linalg.eigh(kernel_1d(kind, ycoord[:, None] - ycoord[None, :], scale))
        lx, qx = jnp.linalg.eigh(kernel_1d(kind, xcoord[:, None] - xcoord[None, :], scale))
        eig = amplitude**2 * (jnp.clip(ly, 0.0)[:, None] * jnp.clip(lx, 0.0)[None, :] + jitter)
        return cls(qy, qx, eig, jnp.asarray(mean))

    @property
    def n(self):
        return self.eig.size

    def _to(self, v):  # v (n,) -> coefficients in the eigenbasis (n_y, n_x)
        return self.qy.T @ v.reshape(self.eig.shape) @ self.qx

    def _from(self, c):
        return (self.qy @ c @ self.qx.T).reshape(-1)

    def quad(self, values):
        """(θ − m)ᵀ K⁻¹ (θ − m) for ``values`` (n,)."""
        return jnp.sum(self._to(values - self.mean) ** 2 / self.eig)

    def logdet(self):
        return jnp.sum(jnp.log(self.eig))

    def logpdf(self, values):
        """Log-density of the field ``values`` (n,)."""
        return -0.5 * (self.quad(values) + self.logdet() + self.n * np.log(2 * np.pi))

    def sqrt_matvec(self, z):
        """L z with L Lᵀ = K (z (n,))."""
        return self._from(jnp.sqrt(self.eig) * z.reshape(self.eig.shape))

    def root(self):
        """(n, n) dense L with L Lᵀ = K."""
        return jax.vmap(self.sqrt_matvec, in_axes=1, out_axes=1)(jnp.eye(self.n, dtype=self.eig.dtype))

    def precision_diag(self):
        """(n,) diagonal of K⁻¹."""
        return ((self.qy**2) @ (1.0 / self.eig) @ (self.qx**2).T).reshape(-1)

    def precond_matvec(self, z, lam_bar):
        """M^½ z with M = (K⁻¹ + λ̄ I)⁻¹, the posterior covariance for a uniform data precision λ̄.

        Diagonal in the Kronecker eigenbasis, so O(n^1.5); with λ̄ the typical data
        precision it whitens the MAP objective of a full grid (see :func:`posterior_mean`).
        """
        return self._from(jnp.sqrt(self.eig / (1.0 + lam_bar * self.eig)) * z.reshape(self.eig.shape))

    def posterior_mean(self, lam, target, lam_bar, tol=1e-10, maxiter=2000):
        """Mean of the Gaussian posterior given data ``target`` (n,) of precision ``lam`` (n,).

        Solves (K⁻¹ + Λ) x = Λ (target − m) by conjugate gradients preconditioned with
        (K⁻¹ + λ̄ I)⁻¹ (exact in the eigenbasis); returns m + x. Nodes with ``lam = 0``
        carry no data.
        """
        d = target - self.mean
        kinv = lambda x: self._from(self._to(x) / self.eig)  # noqa: E731
        pre = lambda x: self._from(self._to(x) * (self.eig / (1.0 + lam_bar * self.eig)))  # noqa: E731
        from jax.scipy.sparse.linalg import cg

        x, _ = cg(lambda x: kinv(x) + lam * x, lam * d, M=pre, tol=tol, maxiter=maxiter)
        return self.mean + x


class DenseGP(eqx.Module):
    """GP prior of one field at irregular positions, via a dense eigendecomposition."""

    q: jax.Array  # (n, n)
    eig: jax.Array  # (n,)
    mean: jax.Array

    @classmethod
    def build(cls, kind, xy, mean, amplitude, scale, jitter=JITTER):
        """``xy`` (n, 2) positions in the units of ``scale``."""
        lam, q = jnp.linalg.eigh(_dense_kernel(kind, xy, scale))
        return cls(q, amplitude**2 * (jnp.clip(lam, 0.0) + jitter), jnp.asarray(mean))

    @property
    def n(self):
        return self.eig.size

    def quad(self, values):
        return jnp.sum((self.q.T @ (values - self.mean)) ** 2 / self.eig)

    def logdet(self):
        return jnp.sum(jnp.log(self.eig))

    def logpdf(self, values):
        return -0.5 * (self.quad(values) + self.logdet() + self.n * np.log(2 * np.pi))

    def sqrt_matvec(self, z):
        return self.q @ (jnp.sqrt(self.eig) * z)

    def root(self):
        return self.q * jnp.sqrt(self.eig)

    def precision_diag(self):
        return (self.q**2) @ (1.0 / self.eig)


def kronecker_logpdf(image, mean, amplitude, scale, ycoord, xcoord, kind="matern32", jitter=JITTER):
    """Log-density of a field image (n_y, n_x) under the separable GP (Kronecker algebra).

    Equals tinygp's ``GaussianProcess(tinygp_kernel(kind, A, ℓ), X, diag=A² jitter,
    mean=m).log_probability(image.ravel())`` for X the grid positions, at a cost of
    O(n_y n_x (n_y + n_x)).
    """
    gp = GridGP.build(kind, jnp.asarray(ycoord), jnp.asarray(xcoord), mean, amplitude, scale, jitter)
    return gp.logpdf(jnp.ravel(image))


# ---------------------------------------------------------------------- data term
def make_profiled_chi2(forward, spec, mdegree=0):
    """χ²(θ, y, w, passive=None) of one spectrum with the linear parameters profiled (NNLS).

    ``θ`` is the spec's vector (V, σ, …) then the multiplicative coefficients; its
    gradient is exact by the envelope theorem (the NNLS solution is held fixed under
    differentiation). ``passive`` (n_lin,) bool optionally warm-starts the NNLS active
    set (same result, less work). Map over spaxels with
    :func:`kinjax.optimize.map_spectra`.
    """
    from kinjax.optimize import _nonneg_mask
    from kinjax.linear import solve_linear

    k = spec.n_params
    nonneg = _nonneg_mask(forward, True)

    n_t = forward.n_templates

    def chi2(theta, y, w, passive=None):
        fixed = jax.lax.stop_gradient(theta)
        system = forward.linear_system(spec.build(fixed[:k]), y, w, fixed[k:] if mdegree else None)
        x = jax.lax.stop_gradient(solve_linear(*system, nonneg, passive))
        # the model with x fixed: one mixed template per spectrum, so differentiating
        # costs one FFT rather than one per template
        model = forward(spec.build(theta[:k]), x[:n_t], x[n_t:], theta[k:] if mdegree else None)
        r = (model - y) * w
        return r @ r

    return chi2


def _linear_support(forward, spec, mdegree):
    """(θ, y, w) -> (n_lin,) bool, the non-zero linear parameters of the NNLS solution at θ."""
    from kinjax.optimize import _nonneg_mask
    from kinjax.linear import solve_linear

    k = spec.n_params
    nonneg = _nonneg_mask(forward, True)

    def support(theta, y, w):
        mult = theta[k:] if mdegree else None
        x = solve_linear(*forward.linear_system(spec.build(theta[:k]), y, w, mult), nonneg)
        return (x != 0) | ~nonneg

    return support


# ---------------------------------------------------------------------- fields ↔ θ
def _field_names(spec):
    """Field names: ``ln_`` + name for scales (σ), ``logit_`` + name for fractions."""
    return tuple(("ln_" if lg else "logit_" if fr else "") + n
                 for n, lg, fr in zip(spec.names, spec.log_scale, spec.fraction))


def _to_fields(spec, theta):
    """Spec parameters (..., k) → field values (σ → ln σ, a fraction f → logit f)."""
    theta = jnp.asarray(theta)
    lg, fr = jnp.asarray(spec.log_scale), jnp.asarray(spec.fraction)
    p = jnp.clip(jnp.where(fr, theta, 0.5), 1e-6, 1 - 1e-6)
    return log_where(jnp.where(fr, jnp.log(p) - jnp.log1p(-p), theta), lg)


def _from_fields(spec, f):
    f = jnp.asarray(f)
    lg, fr = jnp.asarray(spec.log_scale), jnp.asarray(spec.fraction)
    return exp_where(jnp.where(fr, jax.nn.sigmoid(f), f), lg)


def _field_jac(spec, theta):
    """d θ / d field (..., k) at ``theta`` (NumPy): σ for ln σ, f (1 − f) for logit f, else 1."""
    theta = np.asarray(theta)
    return np.where(spec.log_scale, theta, np.where(spec.fraction, theta * (1 - theta), 1.0))


def _field_scales(spec):
    """Prior scale of each field's amplitude (half-normal) in the field's units."""
    out = []
    for name, lo, hi, lg, fr in zip(spec.names, spec.lower, spec.upper, spec.log_scale, spec.fraction):
        if lg:
            out.append(1.0)
        elif fr:
            out.append(2.0)
        elif name.startswith(("v", "dv")):
            out.append(300.0)
        else:
            out.append(0.1 if name.startswith("h") else (hi - lo) / 4)
    return np.asarray(out)


# ---------------------------------------------------------------------- hyperparameters
def _hyper_loss(p, values, errors, xy, kind, ell0, amp_scale, weights=None, ell_min=0.0):
    """−log of N(values | m, A²(K₀+jI) + diag(err²)) × hyperpriors at p = (m, ln A, ln ℓ).

    With ``weights`` W (n_values, n_xy) the values are averages ``W θ`` of the field θ at
    ``xy`` (fits of a neighbour-averaged cube) with per-spaxel errors ``errors`` (n_xy,),
    plus an independent scatter τ of their own, and p = (m, ln A, ln(ℓ − ℓ_min), ln τ):
    N(values | m, W (A²(K₀+jI) + diag(err²)) Wᵀ + τ² I), τ ~ HalfNormal(median error).
    The τ term is the fits' departure from linear averages of the field: without it the
    likelihood explained the start values' components along the averaging's near-null
    directions with amplitudes of hundreds of km/s and length scales of 0.1 spaxel.
    Averages over a radius carry no information on shorter scales: ℓ = ``ell_min`` + e^p₂,
    and the prior below is the same LogNormal on ℓ, truncated at ``ell_min``.
    """
    m, log_a, log_l = p[:3]
    a, ell = jnp.exp(log_a), ell_min + jnp.exp(log_l)
    prior_cov = _dense_kernel(kind, xy, ell) + JITTER * jnp.eye(errors.size, dtype=values.dtype)
    if weights is None:
        cov = a**2 * prior_cov + jnp.diag(errors**2)
        extra = 0.0
    else:
        tau, tau_scale = jnp.exp(p[3]), jnp.median(errors)
        noise = (weights * errors**2) @ weights.T
        cov = (a**2 * (weights @ prior_cov @ weights.T) + noise + tau**2 * jnp.eye(values.size, dtype=values.dtype)
               + JITTER * jnp.diag(jnp.diagonal(noise)))
        extra = 0.5 * (tau / tau_scale) ** 2 - p[3]
    lu = jax.scipy.linalg.lu_factor(cov)  # LU: float64 Cholesky is slow on XLA:CPU
    r = values - m
    quad = r @ jax.scipy.linalg.lu_solve(lu, r)
    logdet = jnp.sum(jnp.log(jnp.abs(jnp.diagonal(lu[0]))))
    nll = 0.5 * (quad + logdet)
    # hyperpriors: ℓ ~ LogNormal(ln ℓ0, 1); A ~ HalfNormal(amp_scale) (+ log-Jacobian of ln A)
    # (in p₂ = ln(ℓ − ℓ_min): the density of ln ℓ times d ln ℓ / d p₂ = e^p₂ / ℓ)
    nlp = (0.5 * (jnp.log(ell) - jnp.log(ell0)) ** 2 + jnp.log(ell) - log_l
           + 0.5 * (a / amp_scale) ** 2 - log_a + extra)
    return nll + nlp


def _fit_hyper(values, errors, xy, kind, ell0, amp_scale, weights=None, ell_min=0.0, n_steps=150):
    """Empirical-Bayes (m, A, ℓ) of one field: maximise N(values | m, A²(K₀+jI) + diag(err²)) × hyperpriors.

    values, errors : (n,); xy : (n, 2); or, with ``weights`` (n, n_xy), averaged values
    (see :func:`_hyper_loss`) with errors and xy of the n_xy spaxels averaged. Returns
    (mean, amplitude, scale) scalars and the (2, 2) Laplace covariance of (ln A, ln ℓ) at
    the optimum.
    """
    dtype = values.dtype

    def loss(p):
        return _hyper_loss(p, values, errors, xy, kind, ell0, amp_scale, weights, ell_min)

    med = jnp.median(values)
    spread = jnp.maximum(jnp.std(values), 0.1 * amp_scale)
    p0 = [med, jnp.log(spread), jnp.log(jnp.asarray(ell0, dtype))]
    if weights is not None:  # ln τ, from a tenth of the errors' median
        p0.append(jnp.log(0.1 * jnp.median(errors)))
    p0 = jnp.stack(p0).astype(dtype)
    p = _lbfgs_loop(loss, p0, n_steps)
    lam, vec = jnp.linalg.eigh(jax.hessian(loss)(p))
    cov = (vec / jnp.clip(lam, 1e-6, None)) @ vec.T
    ell = ell_min + jnp.exp(p[2])
    jac = jnp.stack([1.0, jnp.exp(p[2]) / ell]).astype(dtype)  # (ln A, p₂) -> (ln A, ln ℓ)
    return p[0], jnp.exp(p[1]), ell, cov[1:3, 1:3] * jac[:, None] * jac[None, :]


def _hyper_design(weights, n_fit, hyper_max, seed):
    """The spaxels whose start values fit the hyperparameters: (rows, columns, weights).

    Without averaging weights (None): at most ``hyper_max`` spaxels at random, columns the
    same, weights None. With the (n_fit, n_fit) averaging matrix of a neighbour-averaged
    start: rows in random order while the spaxels they average number at most
    ``hyper_max`` (all rows when they fit), and the dense rows-by-columns weights.
    """
    rng = np.random.default_rng(seed)
    if weights is None:
        sub = np.arange(n_fit)
        if n_fit > hyper_max:
            sub = np.sort(rng.choice(sub, hyper_max, replace=False))
        return sub, sub, None
    weights = weights.tocsr()
    if n_fit <= hyper_max:
        rows = np.arange(n_fit)
    else:
        rows, cols = [], set()
        for i in rng.permutation(n_fit):
            new = cols | set(weights[i].indices)
            if len(new) > hyper_max and rows:
                break
            rows.append(i)
            cols = new
        rows = np.sort(np.asarray(rows, int))
    cols = np.unique(weights[rows].indices)
    dense = weights[rows][:, cols].toarray()
    return rows, cols, dense / dense.sum(axis=1, keepdims=True)


def _lbfgs_loop(loss, p0, max_steps, gtol=1e-6):
    """optax L-BFGS inside ``lax.while_loop``, stopped when the gradient norm < ``gtol`` (jittable)."""
    import optax

    opt = optax.lbfgs()
    vg = optax.value_and_grad_from_state(loss)

    def body(carry):
        p, state, _, it = carry
        value, grad = vg(p, state=state)
        updates, state = opt.update(grad, state, p, value=value, grad=grad, value_fn=loss)
        return optax.apply_updates(p, updates), state, jnp.sqrt(jnp.sum(grad**2)), it + 1

    def cond(carry):
        _, _, gnorm, it = carry
        return (it < max_steps) & (gnorm > gtol) & jnp.isfinite(gnorm)

    init = (p0, opt.init(p0), jnp.asarray(1e10, p0.dtype), 0)
    return jax.lax.while_loop(cond, body, init)[0]


# ---------------------------------------------------------------------- geometry
def _geometry(cube, use, dense_max):
    """Field nodes: the full grid (Kronecker) when the cube is a complete grid, else the fitted spaxels.

    Returns dict with ``nodes`` (spaxel index of each node), ``data`` (node index of each
    fitted spaxel), ``grid`` (ycoord, xcoord) or None, ``xy`` (n_nodes, 2), ``pixel``.
    """
    fitted = np.flatnonzero(use)
    gi = cube.grid_index
    full_grid = (
        cube.grid_shape is not None
        and cube.n_spaxels == cube.grid_shape[0] * cube.grid_shape[1]
        and np.unique(gi[:, 0] * cube.grid_shape[1] + gi[:, 1]).size == cube.n_spaxels
    )
    if full_grid:
        n_y, n_x = cube.grid_shape
        order = np.empty(cube.n_spaxels, int)
        order[gi[:, 0] * n_x + gi[:, 1]] = np.arange(cube.n_spaxels)
        nodes = order  # node j (row-major) is spaxel order[j]
        xs = np.array([cube.x[order[ix]] for ix in range(n_x)])
        ys = np.array([cube.y[order[iy * n_x]] for iy in range(n_y)])
        grid = (ys, xs)
    else:
        nodes, grid = fitted, None
    node_of = np.full(cube.n_spaxels, -1)
    node_of[nodes] = np.arange(nodes.size)
    xy = np.stack([cube.x[nodes], cube.y[nodes]], axis=1)
    if nodes.size > 1:
        from scipy.spatial import cKDTree

        dist, _ = cKDTree(xy).query(xy, k=2)
        pixel = float(np.median(dist[:, 1])) or 1.0
    else:
        pixel = 1.0
    return dict(nodes=nodes, data=node_of[fitted], fitted=fitted, grid=grid, xy=xy, pixel=pixel,
                dense=nodes.size <= dense_max)


def _prior(geo, kind, mean, amp, scale, dtype):
    if geo["grid"] is not None:
        ys, xs = (jnp.asarray(c, dtype) for c in geo["grid"])
        return GridGP.build(kind, ys, xs, mean, amp, scale)
    return DenseGP.build(kind, jnp.asarray(geo["xy"], dtype), mean, amp, scale)


def _posterior(prior, lam, dense):
    """Gaussian posterior of one field given diagonal data precision ``lam`` (n_nodes,).

    Returns (root C with C Cᵀ = Σ_post (n, n), or None; variances (n,)).
    """
    if dense:
        ell = prior.root()
        m = jnp.eye(ell.shape[0], dtype=ell.dtype) + (ell.T * lam) @ ell
        s, v = jnp.linalg.eigh(m)
        c = ell @ (v / jnp.sqrt(s))
        return c, jnp.sum(c**2, axis=1)
    var = 1.0 / (lam + prior.precision_diag())
    return None, var


# ---------------------------------------------------------------------- the numpyro model
def cube_model(chi2_of_fields, xy, field_names, *, kind="matern32", amp_scales=None, ell0=1.0,
               mean_locs=None, mean_scales=None, jitter=JITTER):
    """numpyro model of a cube: GP fields over spaxel positions + profiled-χ² likelihood.

    Parameters
    ----------
    chi2_of_fields : callable
        ``(n_nodes, n_fields) field values -> scalar`` total χ² of the data (profiled
        linear parameters; see :func:`make_profiled_chi2`).
    xy : (n_nodes, 2)
        Node positions (arcsec).
    field_names : sequence of str
        Sample-site names of the fields (e.g. "v", "ln_sigma", "h3", "h4").
    kind : kernel ("matern32", "matern12" or "expsquared"), separable in x and y.
    amp_scales : (n_fields,)
        Half-normal scales of the amplitudes (field units).
    ell0 : float
        Median of the log-normal length-scale prior (arcsec; σ of ln ℓ is 1).
    mean_locs, mean_scales : (n_fields,)
        Normal prior of each field's constant mean.

    Notes
    -----
    Sample sites for each field named F: F_mean, F_amp, F_scale and F itself, shape
    (n_nodes,), drawn from the numpyro distribution of a tinygp GaussianProcess. The data
    enter through a numpyro factor named "data" equal to minus half the χ².
    """
    import numpyro
    import numpyro.distributions as dist
    from tinygp import GaussianProcess

    xy = jnp.asarray(xy)
    k = len(field_names)
    amp_scales = np.ones(k) if amp_scales is None else np.asarray(amp_scales)
    mean_locs = np.zeros(k) if mean_locs is None else np.asarray(mean_locs)
    mean_scales = 10 * amp_scales if mean_scales is None else np.asarray(mean_scales)
    fields = []
    for j, name in enumerate(field_names):
        mean = numpyro.sample(f"{name}_mean", dist.Normal(mean_locs[j], mean_scales[j]))
        amp = numpyro.sample(f"{name}_amp", dist.HalfNormal(amp_scales[j]))
        ell = numpyro.sample(f"{name}_scale", dist.LogNormal(np.log(ell0), 1.0))
        gp = GaussianProcess(tinygp_kernel(kind, amp, ell), xy, diag=amp**2 * jitter, mean=mean)
        fields.append(numpyro.sample(name, gp.numpyro_dist()))
    numpyro.factor("data", -0.5 * chi2_of_fields(jnp.stack(fields, axis=-1)))


# ---------------------------------------------------------------------- driver
def fit_cube_gp(cube, templates, *, losvd="gh", moments=4, degree=4, mdegree=0, kernel=None,
                method="map", init=None, num_steps=None, seed=0, progress=True, snr_min=None,
                velscale_ratio=2, vmax=2000.0, dense_max=2500, joint_max=6000, errors_dense_max=12000,
                guide="normal", learning_rate=0.01, free_mean=True, hyper_max=600, hyper_draws=32,
                hyper_nodes_max=900, mask_emission=True, v_mean="constant", start_radius=None, devices=None):
    """Fit all spaxels at once with GP priors on the LOSVD parameter maps.

    Parameters
    ----------
    cube, templates, losvd, moments, degree, mdegree, velscale_ratio, vmax, snr_min, mask_emission :
        As in :func:`kinjax.cube_fit.fit_cube_spaxels` (used for the initial fit when
        ``init`` is None).
    kernel : {"matern32", "matern12", "expsquared"}, optional
        1D kernel of the separable GP prior. Default: "matern12" for the two Gaussians,
        "matern32" otherwise. The two-Gaussian mean-velocity field of counter-rotating
        discs changes sign across the major axis over about a spaxel; on the three
        counter-rotating S/N-20 benchmark cubes Matérn-1/2 covered its 68 % errors at
        0.69 / 0.70 (MEAN_V / DISPERSION, pooled) against Matérn-3/2's 0.57 / 0.69, at
        RMSE 7.7 / 12.1 against 7.6 / 11.1 km/s (benchmarks/CUBE_RESULTS.md).
    method : {"map", "svi"}
        Joint MAP with Laplace errors, or SVI on :func:`cube_model`.
    init : CubeFit, optional
        A spaxel-by-spaxel fit of the same cube and settings (computed if None).
    num_steps : int, optional
        L-BFGS iterations (MAP, default 100) or SVI steps (default 2000).
    seed : int
    progress : bool
    dense_max : int
        Largest number of field nodes for dense algebra inside the optimiser (posterior
        square roots as its preconditioner). Beyond it a full grid uses its Kronecker
        structure: the start is the Gaussian posterior mean by preconditioned conjugate
        gradients and the preconditioner is the posterior covariance for a uniform data
        precision, both O(n^1.5) per field.
    errors_dense_max : int
        Above ``dense_max`` and up to this many nodes the MAP errors are each field's exact
        Gaussian posterior variances (dense NumPy once, O(n³), 8 n² bytes); beyond it a
        diagonal approximation, which is too small (a warning says so).
    joint_max : int
        Largest ``n_nodes * n_fields`` for the joint Laplace covariance (all fields and
        spaxels together, keeping each spaxel's correlations between parameters);
        beyond it the fields are taken independent.
    guide : {"normal", "lowrank"}
        SVI guide: AutoNormal or AutoLowRankMultivariateNormal.
    hyper_max : int
        Largest number of spaxels (a random subset) used to fit the hyperparameters,
        whose marginal likelihood costs a dense O(n³) factorisation per step.
    hyper_draws : int
        MAP: draws of each field's (amplitude, length scale) from the Laplace
        approximation of their marginal likelihood, used to widen the errors for the
        hyperparameters' uncertainty (0: plug-in errors). Applied up to
        ``hyper_nodes_max`` field nodes (dense work per draw).
    hyper_nodes_max : int
    free_mean : bool
        MAP: optimise a common shift of every field with the maps (its mean set by the
        χ² of all spaxels jointly rather than taken from the spaxel-by-spaxel
        estimates) and include the mean's uncertainty in the joint Laplace errors.
    learning_rate : float
        SVI Adam step size.
    v_mean : {"constant", "rotation"}
        Mean function of the velocity field ``v``. "rotation": an arctan rotation curve
        of an inclined disc (:mod:`kinjax.rotation`), fitted once to the spaxel-by-spaxel
        velocities; the GP then models the departures from it (with their own constant
        mean, shifted freely like every field's). Families with a field named ``v``
        (Gauss–Hermite, Sanders–Evans; two Gaussians: their mean velocity).
    start_radius : float, optional
        Without ``init``: fit the spaxel-by-spaxel start on the cube averaged over the
        spaxels within this many spaxel spacings (:meth:`kinjax.cube.Cube.neighbour_mean`;
        the start's errors scaled to one spaxel) instead of the cube itself (0: the cube
        itself). Default: 1.5 for the two Gaussians, 0 otherwise. For families
        whose single-spaxel fits are unstable at low S/N: the two-Gaussian fits of a
        counter-rotating S/N-20 mock started this way reached a mean-velocity /
        dispersion RMSE of 6.6 / 9.1 km/s (coverage 0.73 / 0.67), started from their own
        spaxel fits 27 / 29 km/s (benchmarks/CUBE_RESULTS.md). The hyperparameters then
        treat the start's values as averages of the fields (:func:`_hyper_loss`).
    devices : None, "all", int or sequence of jax devices
        Split the spectra over these devices (:func:`kinjax.sharding.spectra_mesh`): the
        start's spaxel fits, the χ² of every objective evaluation and its gradient, and
        the Laplace errors. The hyperparameters and the GP algebra (one field at a time,
        O(n_nodes) memory on a grid) stay on the first device. None: one device.

    Returns
    -------
    CubeFit with ``method`` "gp-map" or "gp-svi" and ``info`` holding the
    hyperparameters per field (``mean``, ``amplitude``, ``scale`` in arcsec; for the
    rotation mean, the mean of the departures), the fitted ``rotation_curve`` when
    ``v_mean="rotation"``, and timings.
    """
    from kinjax.cube_fit import finish_fit, fit_cube_spaxels, laplace_batch, prepare_cube, spec_key
    from kinjax.optimize import map_spectra

    if kernel is None:
        kernel = "matern12" if losvd == "gauss2" else "matern32"
    if kernel not in KERNELS:
        raise KinjaxError(f"unknown kernel {kernel!r}: use one of {KERNELS}")
    if method not in ("map", "svi"):
        raise KinjaxError(f"unknown method {method!r}: use 'map' or 'svi'")
    if v_mean not in ("constant", "rotation"):
        raise KinjaxError(f"unknown v_mean {v_mean!r}: use 'constant' or 'rotation'")
    t0 = time.perf_counter()
    mesh = spectra_mesh(devices)
    if init is None:
        settings = dict(losvd=losvd, moments=moments, degree=degree, mdegree=mdegree, velscale_ratio=velscale_ratio,
                        vmax=vmax, snr_min=snr_min, progress=progress, seed=seed, mask_emission=mask_emission,
                        devices=devices)
        if start_radius is None:  # the family's default
            start_radius = 1.5 if losvd == "gauss2" else 0.0
        if start_radius:
            init = _smoothed_start(cube, templates, float(start_radius), settings)
        else:
            init = fit_cube_spaxels(cube, templates, **settings)
    cube, _, forward, spec = prepare_cube(init.cube, templates, velscale_ratio=velscale_ratio, vmax=vmax,
                                          degree=degree, mdegree=mdegree, losvd=losvd, moments=moments,
                                          mask_emission=mask_emission)
    use = init.fitted
    if init.theta.shape[1] != spec.n_params + mdegree:
        raise KinjaxError("init was fitted with other LOSVD settings (moments/mdegree); refit or drop init")
    if spec.family == "gauss2":  # GP fields on (V, ΔV, σ1, σ2, f1): see gauss2_mean_form
        from kinjax.cube_fit import reparameterise
        from kinjax.family import gauss2_mean_form, gauss2_to_mean_form

        spec = gauss2_mean_form(spec)
        th_m, cov_m = reparameterise(gauss2_to_mean_form, init.theta, init.cov)
        init = dataclasses.replace(init, theta=th_m, cov=cov_m)
    if use.sum() < 3:
        raise KinjaxError("a GP fit needs at least 3 fitted spaxels")
    t_init = time.perf_counter() - t0
    dtype = forward.additive.dtype
    k = spec.n_params
    geo = _geometry(cube, use, dense_max)
    n_nodes = geo["nodes"].size
    fitted = geo["fitted"]
    data = jnp.asarray(geo["data"])
    y = jnp.asarray(cube.flux[fitted], dtype)
    w = jnp.asarray(cube.mask[fitted] / cube.noise[fitted], dtype)
    mult = jnp.asarray(init.theta[fitted, k:], dtype)

    # ---- step 1: hyperparameters from the spaxel fits, their single-spectrum prior divided out
    # (the GP prior takes its place; the shrunk estimates flattened the h4 field)
    prior_weight = 1.0 / np.asarray((init.info or {}).get("start_n_avg", np.ones(cube.n_spaxels)))[fitted]
    th_lik, cov_lik = likelihood_only(spec, init.theta[fitted, :k], init.cov[fitted][:, :k, :k], prior_weight)
    th0 = jnp.asarray(th_lik, dtype)
    f0 = _to_fields(spec, th0)
    var0 = np.diagonal(cov_lik, axis1=1, axis2=2) / _field_jac(spec, th_lik) ** 2
    err0 = np.sqrt(np.clip(var0, 1e-30, None))
    # a spaxel whose start or Laplace variance is not finite and positive carries no
    # information about a field: give it the field's median and an error far larger than
    # the field's range
    f0_np = np.asarray(f0)
    bad = ~(np.isfinite(f0_np) & np.isfinite(var0) & (var0 > 0))
    if bad.any():
        med = np.nanmedian(np.where(bad, np.nan, f0_np), axis=0)
        f0_np = np.where(bad, med, f0_np)
        err0 = np.where(bad, 1e3 * _field_scales(spec), err0)
        f0 = jnp.asarray(f0_np, dtype)
    # a mean function: the fields below are departures from `offset` (n_nodes, k)
    offset = np.zeros((n_nodes, k))
    rotation = None
    if v_mean == "rotation":
        from kinjax.rotation import fit_rotation_curve

        if "v" not in spec.names:
            raise KinjaxError(f"v_mean='rotation' needs a velocity field 'v'; the {spec.family!r} family has {spec.names}")
        iv = spec.names.index("v")
        xy_data = geo["xy"][np.asarray(data)]
        rotation = fit_rotation_curve(xy_data[:, 0], xy_data[:, 1], np.where(bad[:, iv], np.nan, f0_np[:, iv]),
                                      err0[:, iv])
        offset[:, iv] = rotation.velocity(geo["xy"][:, 0], geo["xy"][:, 1])
        f0 = f0 - jnp.asarray(offset[np.asarray(data)], dtype)
    offset = jnp.asarray(offset, dtype)
    err0 = jnp.asarray(err0, dtype)
    # a neighbour-averaged start's values are averages of the field over several spaxels,
    # with errors far below their per-spaxel ones: the hyperparameters' likelihood says so
    # (without it the amplitudes came out small and the maps over-smoothed)
    start_weights = (init.info or {}).get("start_weights")
    sub, cols, weights = _hyper_design(None if start_weights is None else start_weights[fitted][:, fitted],
                                       fitted.size, hyper_max, seed)
    xy_fit = jnp.asarray(np.stack([cube.x[fitted], cube.y[fitted]], 1)[cols], dtype)
    weights = None if weights is None else jnp.asarray(weights, dtype)
    ell0 = 3.0 * geo["pixel"]
    ell_min = 0.0 if weights is None else float((init.info or {}).get("start_radius", 0.0)) * geo["pixel"]
    amp_scales = jnp.asarray(_field_scales(spec), dtype)
    # one field after the other on CPU: XLA:CPU hung (all threads idle) on the vmapped
    # 400 x 400 LU inside the optimiser's while-loop (jax 0.10.2), and lax.map is as fast
    hyper = jax.jit(lambda v, e, a: map_spectra(
        lambda *r: _fit_hyper(*r[:2], xy_fit, kernel, ell0, r[2], weights, ell_min), v, e, a))
    means, amps, scales, hyper_cov = hyper(f0[sub].T, err0[cols].T, amp_scales)
    t_hyper = time.perf_counter() - t0 - t_init

    # ---- step 2: Gaussian posterior per field (start point and preconditioner)
    priors = [_prior(geo, kernel, means[j], amps[j], scales[j], dtype) for j in range(k)]

    # typical data precision of each field (mean over the nodes): sets the preconditioner of
    # a full grid too large for dense algebra
    lam_bar = [float(np.sum(1.0 / np.asarray(err0[:, j]) ** 2) / n_nodes) for j in range(k)]

    def gaussian_posterior(fields_fit, err):
        roots, variances, mus = [], [], []
        for j, prior in enumerate(priors):
            lam = jnp.zeros(n_nodes, dtype).at[data].set(1.0 / err[:, j] ** 2)
            target = jnp.full(n_nodes, prior.mean, dtype).at[data].set(fields_fit[:, j])
            c, var = _posterior(prior, lam, geo["dense"])
            if c is not None:
                mu = prior.mean + c @ (c.T @ (lam * (target - prior.mean)))
            elif isinstance(prior, GridGP):  # exact, by preconditioned conjugate gradients
                mu = prior.posterior_mean(lam, target, lam_bar[j])
            else:
                mu = prior.mean + var * lam * (target - prior.mean)
            roots.append(c)
            variances.append(var)
            mus.append(mu)
        return jnp.stack(mus, 1), roots, jnp.stack(variances, 1)

    mu, roots, variances = gaussian_posterior(f0, err0)

    chi2_one = make_profiled_chi2(forward, spec, mdegree)
    # per-spaxel prior terms: the family's, less the priors on single values that the GP
    # priors replace; the same terms in the objective and the errors, except that the
    # histogram's stay out of the objective (see the module docstring for the measurements)
    spec_field = spec.without_value_priors()
    n_res = 0 if spec.family == "hist" else jax.eval_shape(spec_field.prior_residuals, jnp.zeros(k, dtype)).shape[0]

    def prior_chi2(theta):  # Σ_spaxels ‖prior residuals‖², i.e. −2 log prior up to a constant
        if n_res == 0:
            return 0.0
        return jnp.sum(jax.vmap(lambda t: jnp.sum(spec_field.prior_residuals(t) ** 2))(theta))

    # NNLS warm start: the active set of each spaxel's linear solution at the start
    th_start = jnp.asarray(init.theta[fitted, :k], dtype)  # the spaxel fits, inside the bounds
    passive = jax.jit(lambda th: map_spectra(_linear_support(forward, spec, mdegree), th, y, w, mesh=mesh))(
        jnp.concatenate([th_start, mult], axis=1) if mdegree else th_start)

    def total_chi2(fields):  # fields (n_nodes, k): departures from the mean function
        theta = _from_fields(spec, (fields + offset)[data])
        if mdegree:
            theta = jnp.concatenate([theta, mult], axis=1)
        return jnp.sum(map_spectra(chi2_one, theta, y, w, passive, mesh=mesh)) + prior_chi2(theta[:, :k])

    def prior_quad(fields):
        return sum(p.quad(fields[:, j]) for j, p in enumerate(priors))

    def unwhiten(u):
        cols = []
        for j in range(k):
            if geo["dense"]:
                cols.append(mu[:, j] + roots[j] @ u[:, j])
            elif isinstance(priors[j], GridGP):
                cols.append(mu[:, j] + priors[j].precond_matvec(u[:, j], lam_bar[j]))
            else:
                cols.append(mu[:, j] + jnp.sqrt(variances[:, j]) * u[:, j])
        return jnp.stack(cols, 1)

    # a common shift of each field (its mean) is left free in the MAP: the mean of a
    # field is then set by all spaxels' χ² jointly, not by the noisy (and, for h_m,
    # prior-shrunk) spaxel-by-spaxel estimates the hyperparameters came from
    n_fit = fitted.size
    shift_scale = jnp.asarray(np.median(np.asarray(err0), axis=0) / np.sqrt(n_fit), dtype)

    def split(z):
        return z[: n_nodes * k].reshape(n_nodes, k), shift_scale * z[n_nodes * k:]

    def objective(z):
        u, shift = split(z)
        base = unwhiten(u)
        return 0.5 * total_chi2(base + shift) + 0.5 * prior_quad(base)

    t1 = time.perf_counter()
    history = []
    shift = jnp.zeros(k, dtype)
    if method == "map":
        z0 = jnp.zeros(n_nodes * k + (k if free_mean else 0), dtype)
        if free_mean:
            z = _lbfgs(objective, z0, num_steps or 100, progress, history)
            u, shift = split(z)
        else:
            u = _lbfgs(lambda u: objective(jnp.concatenate([u.reshape(-1), jnp.zeros(k, dtype)])),
                       z0.reshape(n_nodes, k), num_steps or 100, progress, history)
        fields = unwhiten(u) + shift
        means = means + shift
    else:
        fields, extra = _svi(total_chi2, geo, spec, kernel, ell0, amp_scales, means, amps, scales, mu,
                             num_steps or 2000, seed, progress, guide, learning_rate, history)
    fields = fields + offset
    t_opt = time.perf_counter() - t1

    # ---- Laplace errors at the optimum: data precision from the per-spaxel Gauss-Newton
    theta_fit = _from_fields(spec, fields[data])
    full = jnp.concatenate([theta_fit, mult], axis=1) if mdegree else theta_fit
    # the precision of the per-spaxel terms: the data and the priors the GP priors do not
    # replace (SE shape; the histogram's, see above)
    cov_data, chi2_fit = laplace_batch(forward, spec_key(spec_field), y, w, full, mesh)
    cov_data = np.asarray(cov_data)
    theta_np = np.asarray(full)
    var_d = np.diagonal(cov_data, axis1=1, axis2=2)[:, :k] / _field_jac(spec, theta_np[:, :k]) ** 2
    err_d = jnp.asarray(np.sqrt(np.clip(var_d, 1e-30, None)), dtype)
    # per-spaxel covariance: posterior variances with the data's correlations (fallback)
    sd_data = np.sqrt(np.clip(np.diagonal(cov_data, axis1=1, axis2=2), 1e-300, None))
    corr = cov_data / sd_data[:, :, None] / sd_data[:, None, :]
    joint = method == "map" and geo["dense"] and n_nodes * k <= joint_max
    if joint:
        # the full Laplace posterior: per-spaxel data blocks (all fields) + GP precision per field
        # the uncertain parts of each field's mean, marginalised: a constant shift (free_mean)
        # and the fitted rotation curve's parameters (first-order, `RotationFit.basis`)
        bases = [[] for _ in range(k)]
        if free_mean:
            for j in range(k):
                bases[j].append(np.full((n_nodes, 1), 100 * float(amp_scales[j])))
        if rotation is not None:
            bases[iv].append(rotation.basis(geo["xy"][:, 0], geo["xy"][:, 1]))
        cov_fields = _joint_laplace(priors, cov_data[:, :k, :k], theta_np, spec, np.asarray(data), n_nodes,
                                    mean_bases=[np.concatenate(b, axis=1) if b else None for b in bases])
        sd = sd_data.copy()
        sd[:, :k] = np.sqrt(np.diagonal(cov_fields, axis1=1, axis2=2))
        cov_post = corr * sd[:, :, None] * sd[:, None, :]
        cov_post[:, :k, :k] = cov_fields
    else:
        if method == "map" and not geo["dense"] and n_nodes <= errors_dense_max:
            # each field's exact Gaussian posterior variance (dense NumPy, once)
            lam_d = np.zeros((n_nodes, k))
            lam_d[np.asarray(data)] = 1.0 / np.asarray(err_d, float) ** 2
            post_var = np.stack([_field_posterior_var(prior, lam_d[:, j]) for j, prior in enumerate(priors)],
                                1)[np.asarray(data)]
        elif method == "map":
            if not geo["dense"]:
                warnings.warn(f"{n_nodes} field nodes exceed errors_dense_max={errors_dense_max}: the 3D "
                              "errors use the diagonal (Jacobi) approximation of the posterior covariance "
                              "and are too small", RuntimeWarning, stacklevel=2)
            _, _, post_var = gaussian_posterior(_to_fields(spec, theta_fit) - offset[data], err_d)
            post_var = np.asarray(post_var)[np.asarray(data)]
        else:
            post_var = np.asarray(extra["var"])[np.asarray(data)]
        post_var = post_var * _field_jac(spec, theta_np[:, :k]) ** 2
        sd = sd_data.copy()
        sd[:, :k] = np.sqrt(post_var)
        cov_post = corr * sd[:, :, None] * sd[:, None, :]

    # empirical Bayes plugs in the best (A, ℓ) of every field; their uncertainty widens the
    # posterior. Law of total variance over draws of (ln A, ln ℓ) from their Laplace
    # approximation, in the linear-Gaussian approximation of the spaxel estimates:
    # (E[var] + Var[mean]) / var at the best values, per spaxel and field.
    inflation = np.ones((fitted.size, k))
    if method == "map" and hyper_draws and geo["dense"] and n_nodes <= hyper_nodes_max:
        inflation = _hyper_inflation(geo, kernel, means, amps, scales, hyper_cov, f0, err0, data, dtype,
                                     hyper_draws, seed)
        f = np.sqrt(inflation)
        cov_post[:, :k, :] *= f[:, :, None]
        cov_post[:, :, :k] *= f[:, None, :]

    n = cube.n_spaxels
    theta = np.full((n, k + mdegree), np.nan)
    cov = np.full((n, k + mdegree, k + mdegree), np.nan)
    theta[fitted], cov[fitted] = theta_np, cov_post
    chi2 = np.full(n, np.nan)
    chi2[fitted] = np.asarray(chi2_fit)
    dof = init.dof.copy()
    names = _field_names(spec)
    info = dict(
        hyper={nm: dict(mean=float(means[j]), amplitude=float(amps[j]), scale=float(scales[j]))
               for j, nm in enumerate(names)},
        kernel=kernel, start_radius=(init.info or {}).get("start_radius"),
        kronecker=geo["grid"] is not None, dense=geo["dense"], n_nodes=int(n_nodes),
        joint_laplace=bool(joint),
        rotation_curve=None if rotation is None else {f: float(v) for f, v in rotation.curve._asdict().items()},
        hyper_inflation={nm: float(np.median(np.sqrt(inflation[:, j]))) for j, nm in enumerate(names)},
        seconds=dict(init=t_init, hyper=t_hyper, optimise=t_opt, total=time.perf_counter() - t0),
        objective=history,
    )
    # (the mean form's summaries come from draws in its own parameters; finish_fit returns the family's)
    return finish_fit(cube, spec, forward, theta, cov, chi2, dof, use, seed=seed,
                      method=f"gp-{method}", info=info)


def likelihood_only(spec, theta, cov, prior_weight=1.0, min_data_share=0.05):
    """Divide a single-spectrum fit's prior out of its Laplace approximation.

    A MAP fit with the family's priors (``spec.prior_residuals``; here the Normal(0,
    ``h_prior``) prior on each Gauss–Hermite h_m) has posterior precision
    ``P = P_L + ω JᵀJ`` and mode ``m`` with ``P_L (m − m_L) + ω Jᵀ r(m) = 0``, where ``J``
    is the Jacobian of the prior residuals ``r`` and ``ω`` the prior's weight. This
    returns the likelihood's own Gaussian ``(m_L, P_L⁻¹)`` (exact for a prior linear in θ,
    as this one is, in the Laplace approximation), the data the 3D model's GP prior
    should see instead of estimates shrunk towards zero. Other families are returned
    unchanged: the Sanders–Evans shape priors identify (δ, κ) when σ_K is small, and
    without them their likelihood-only errors are unbounded; the two Gaussians' priors
    (width 0.7 in ln σ, 1000 km/s in V) are too weak to shrink the spaxel estimates
    noticeably; the histogram's prior ties its bins together.

    Parameters
    ----------
    spec : LosvdSpec
    theta : (n, k) modes; cov : (n, k, k) their posterior covariances (the LOSVD block).
    prior_weight : float or (n,)
        ω: 1, or 1/n for a fit of n averaged spectra whose covariance was scaled by n.
    min_data_share : float
        Spaxels where the data carry less than this share of the posterior precision in
        some direction (the prior dominates) keep their posterior ``(m, cov)`` unchanged:
        dividing the prior out there would leave an almost flat, ill-defined Gaussian.

    Returns
    -------
    theta_l (n, k), cov_l (n, k, k)
    """
    theta = np.asarray(theta, float)
    cov = np.asarray(cov, float)
    n, k = theta.shape
    if spec.family != "gh":
        return theta, cov  # only the h_m prior is replaced by the GP prior (see fit_cube_gp)
    jac_fn = jax.jit(jax.vmap(jax.jacfwd(spec.prior_residuals)))
    res_fn = jax.jit(jax.vmap(spec.prior_residuals))
    ok_in = np.all(np.isfinite(theta), axis=1) & np.all(np.isfinite(cov), axis=(1, 2))
    safe = np.where(ok_in[:, None], theta, np.asarray(spec.initial(0.0, 100.0), float)[None, :k])
    jac = np.asarray(jac_fn(jnp.asarray(safe)))  # (n, n_res, k)
    if jac.shape[1] == 0:
        return theta, cov
    res = np.asarray(res_fn(jnp.asarray(safe)))
    omega = np.broadcast_to(np.asarray(prior_weight, float), (n,))
    p0 = omega[:, None, None] * np.einsum("nri,nrj->nij", jac, jac)
    grad0 = omega[:, None] * np.einsum("nri,nr->ni", jac, res)
    theta_l, cov_l = theta.copy(), cov.copy()
    for i in np.flatnonzero(ok_in):
        # the data's share of the precision, in the posterior's whitened coordinates
        try:
            root = np.linalg.cholesky(cov[i])
        except np.linalg.LinAlgError:
            continue
        share = np.linalg.eigvalsh(np.eye(k) - root.T @ p0[i] @ root)
        if share.min() < min_data_share:
            continue
        p_l = np.linalg.inv(cov[i]) - p0[i]
        cov_l[i] = np.linalg.inv(p_l)
        cov_l[i] = 0.5 * (cov_l[i] + cov_l[i].T)
        theta_l[i] = theta[i] + cov_l[i] @ grad0[i]
    return theta_l, cov_l


def _smoothed_start(cube, templates, radius, settings):
    """Spaxel fits of the neighbour-averaged cube as the start for ``cube`` (errors of one spaxel)."""
    from kinjax.cube_fit import fit_cube_spaxels, select_spaxels

    if cube.velscale is None:
        cube = cube.log_rebin(rebin_lsf=True)
    # the spaxels the 3D fit will use
    use = select_spaxels(cube, snr_min=settings["snr_min"], mask_emission=settings["mask_emission"])[1]
    smooth, n_avg = cube.neighbour_mean(radius)
    fit = fit_cube_spaxels(smooth, templates, **settings)
    scale = np.where(use, n_avg, np.nan)
    return dataclasses.replace(fit, cube=cube, fitted=fit.fitted & use, cov=fit.cov * scale[:, None, None],
                               theta_err=fit.theta_err * np.sqrt(scale)[:, None],
                               info={**(fit.info or {}), "start_n_avg": np.where(use, n_avg, 1.0),
                                     "start_weights": _averaging_weights(cube, radius), "start_radius": radius})


def _averaging_weights(cube, radius):
    """(n_spaxels, n_spaxels) CSR: row i the weights with which the LOSVD parameters of the
    spaxels around i make those of their mean spectrum (:meth:`kinjax.cube.Cube.neighbour_mean`).

    The LOSVD of a sum of spectra is the flux-weighted mean of theirs, so the weights are
    the neighbours' mean fluxes over their good pixels, normalised per row (to first order
    in the parameters' spread, exact for a Gaussian's mean velocity)."""
    import scipy.sparse as sp

    good = cube.mask & cube.valid[:, None]
    with np.errstate(invalid="ignore", divide="ignore"):
        flux = np.abs(np.sum(np.where(good, cube.flux, 0.0), axis=1) / np.maximum(good.sum(axis=1), 1))
    ok = np.isfinite(flux) & (flux > 0)
    flux = np.where(ok, flux, np.median(flux[ok]) if ok.any() else 1.0)  # no zero rows
    near = cube.neighbours(radius) @ sp.diags(flux)
    rows = np.asarray(near.sum(axis=1)).ravel()
    return (sp.diags(np.where(rows > 0, 1.0 / np.where(rows > 0, rows, 1.0), 0.0)) @ near).tocsr()


def _hyper_inflation(geo, kernel, means, amps, scales, hyper_cov, f0, err0, data, dtype, n_draws, seed):
    """(n_fit, k) variance ratios (E[var] + Var[mean]) / var over hyperparameter draws.

    Each field's (ln A, ln ℓ) is drawn from ``N(best, hyper_cov)``; for every draw the
    linear-Gaussian posterior of the field given the spaxel estimates ``f0`` (n_fit, k) with
    errors ``err0`` is computed on the field nodes (mean fixed at its best value, whose
    own uncertainty the joint Laplace step already includes).
    """
    rng = np.random.default_rng(seed + 12345)
    n_fit, k = f0.shape
    n_nodes = geo["nodes"].size
    out = np.ones((n_fit, k))
    for j in range(k):
        lam = jnp.zeros(n_nodes, dtype).at[data].set(1.0 / err0[:, j] ** 2)
        target = jnp.full(n_nodes, means[j], dtype).at[data].set(f0[:, j])

        def posterior(log_a, log_l):
            prior = _prior(geo, kernel, means[j], jnp.exp(log_a), jnp.exp(log_l), dtype)
            c, var = _posterior(prior, lam, True)
            return means[j] + c @ (c.T @ (lam * (target - means[j]))), var

        best = np.array([np.log(float(amps[j])), np.log(float(scales[j]))])
        cov = np.asarray(hyper_cov[j])
        evals, evecs = np.linalg.eigh(0.5 * (cov + cov.T))
        root = evecs * np.sqrt(np.clip(evals, 0.0, 4.0))  # at most a factor e^2 either way
        draws = best + rng.standard_normal((n_draws, 2)) @ root.T
        mu0, var0 = posterior(*best)
        mus, variances = zip(*(posterior(a, l) for a, l in draws))
        mus, variances = np.asarray(mus)[:, np.asarray(data)], np.asarray(variances)[:, np.asarray(data)]
        total = variances.mean(0) + mus.var(0)
        out[:, j] = np.clip(total / np.asarray(var0)[np.asarray(data)], 1.0, None)
    return out


def _joint_laplace(priors, cov_theta, theta, spec, data, n_nodes, mean_bases=None):
    """Laplace covariance of all fields at once: inv(blockdiag_s H_s + blockdiag_f K_f⁻¹).

    ``cov_theta`` (n_fit, k, k) per-spaxel data covariance of the LOSVD parameters (σ, not
    ln σ); returns (n_fit, k, k) posterior covariances in the same parameters. With
    ``mean_bases`` (one (n_nodes, m) matrix B or None per field) each field's mean is
    uncertain with covariance B Bᵀ, marginalised: the prior covariance becomes K + B Bᵀ
    (by Woodbury; a constant mean of prior standard deviation s is B = s 1).
    """
    n_fit, k, _ = cov_theta.shape
    jac = _field_jac(spec, theta[:, :k])  # d theta / d field
    # a spaxel whose data covariance is not finite (a failed Laplace step) contributes
    # no data precision; the GP prior alone then sets its posterior covariance
    finite = np.all(np.isfinite(cov_theta), axis=(1, 2)) & np.all(np.isfinite(jac), axis=1)
    jac = np.where(finite[:, None], jac, 1.0)
    h = np.zeros_like(cov_theta)
    if finite.any():
        h[finite] = np.linalg.pinv(cov_theta[finite], hermitian=True)
    h = h * jac[:, :, None] * jac[:, None, :]
    prec = np.zeros((k * n_nodes, k * n_nodes))
    for f, prior in enumerate(priors):
        q, eig = _eigen(prior)
        kinv = (q / eig) @ q.T
        if mean_bases is not None and mean_bases[f] is not None:
            b = np.asarray(mean_bases[f], float)
            kb = kinv @ b
            kinv = kinv - kb @ np.linalg.solve(np.eye(b.shape[1]) + b.T @ kb, kb.T)
        prec[f * n_nodes:(f + 1) * n_nodes, f * n_nodes:(f + 1) * n_nodes] = kinv
    rows = np.arange(k)[:, None] * n_nodes + data[None, :]  # (k, n_fit)
    for a in range(k):
        for b in range(k):
            prec[rows[a], rows[b]] += h[:, a, b]
    cov = np.linalg.inv(prec)  # LAPACK via NumPy: dense, up to a few thousand rows
    out = cov[rows[:, None, :], rows[None, :, :]]  # (k, k, n_fit)
    out = np.moveaxis(out, -1, 0)
    return out * jac[:, :, None] * jac[:, None, :]


def _field_posterior_var(prior, lam):
    """(n,) diagonal of (K⁻¹ + diag(lam))⁻¹ for one field, dense in NumPy (O(n³), n² memory).

    Computed as L (I + Lᵀ Λ L)⁻¹ Lᵀ with L = Q S^½ the prior's square root (stable for
    nodes without data, ``lam = 0``).
    """
    from scipy.linalg import cho_factor, solve_triangular

    q, eig = _eigen(prior)
    root = q * np.sqrt(eig)
    a = (root.T * lam) @ root
    a[np.diag_indices_from(a)] += 1.0
    c, _ = cho_factor(a, lower=True, overwrite_a=True)
    return np.sum(solve_triangular(c, root.T, lower=True, overwrite_b=True) ** 2, axis=0)


def _eigen(prior):
    """(Q, eigenvalues) of a prior's covariance as dense NumPy arrays."""
    if isinstance(prior, GridGP):
        q = np.kron(np.asarray(prior.qy), np.asarray(prior.qx))
        return q, np.asarray(prior.eig).reshape(-1)
    return np.asarray(prior.q), np.asarray(prior.eig)


def _lbfgs(objective, u0, num_steps, progress, history, tol=1e-6):
    """Minimise ``objective`` with optax L-BFGS; stops when the decrease stalls."""
    import optax

    opt = optax.lbfgs()
    vg = optax.value_and_grad_from_state(objective)

    @jax.jit
    def step(u, state):
        value, grad = vg(u, state=state)
        updates, state = opt.update(grad, state, u, value=value, grad=grad, value_fn=objective)
        return optax.apply_updates(u, updates), state, value, jnp.max(jnp.abs(grad))

    u, state = u0, opt.init(u0)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=num_steps, desc="GP MAP")
    for it in range(num_steps):
        u_new, state, value, gmax = step(u, state)
        history.append(float(value))
        if bar is not None:
            bar.update(1)
        if not np.isfinite(value):
            break
        u = u_new
        # whitened coordinates: a gradient of 1e-3 moves the objective by ~1e-6
        if float(gmax) < 1e-3 or (it >= 5 and abs(history[-6] - history[-1]) <= tol * max(1.0, abs(history[-1]))):
            break
    if bar is not None:
        bar.close()
    return u


def _svi(total_chi2, geo, spec, kernel, ell0, amp_scales, means, amps, scales, mu, num_steps, seed,
         progress, guide, learning_rate, history):
    """SVI on :func:`cube_model`, started at the Gaussian posterior mean and the fitted hyperparameters."""
    import numpyro
    from numpyro.infer import SVI, Trace_ELBO, autoguide, init_to_value

    names = _field_names(spec)
    amp_scales = np.asarray(amp_scales)
    kwargs = dict(kind=kernel, amp_scales=amp_scales, ell0=ell0, mean_locs=np.asarray(means),
                  mean_scales=10 * amp_scales)
    values = {}
    for j, nm in enumerate(names):
        values[nm] = mu[:, j]
        values[f"{nm}_mean"], values[f"{nm}_amp"], values[f"{nm}_scale"] = means[j], amps[j], scales[j]

    def model():
        cube_model(total_chi2, geo["xy"], names, **kwargs)

    cls = {"normal": autoguide.AutoNormal, "lowrank": autoguide.AutoLowRankMultivariateNormal}.get(guide)
    if cls is None:
        raise KinjaxError(f"unknown guide {guide!r}: use 'normal' or 'lowrank'")
    g = cls(model, init_loc_fn=init_to_value(values=values))
    svi = SVI(model, g, numpyro.optim.Adam(learning_rate), Trace_ELBO())
    result = svi.run(jax.random.PRNGKey(seed), num_steps, progress_bar=progress)
    history.extend(np.asarray(result.losses).tolist())
    draws = g.sample_posterior(jax.random.PRNGKey(seed + 1), result.params, sample_shape=(200,))
    fields = jnp.stack([draws[nm].mean(0) for nm in names], 1)
    var = jnp.stack([draws[nm].var(0) for nm in names], 1)
    return fields, dict(var=var)
