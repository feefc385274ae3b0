"""How a LOSVD family is fitted: parameter names, bounds, starting point, priors.

A :class:`LosvdSpec` turns a flat parameter vector ``theta`` into a LOSVD pytree
(``spec.build(theta)``) and says where ``theta`` may go. The fitting drivers and the
numpyro models only ever talk to a spec, so every family is fitted by the same code.

Default bounds (also the support of the flat priors of the numpyro models):

=============  ==========================================================
Gauss–Hermite  V ∈ [−2000, 2000] km/s, σ ∈ [5, 1000] km/s, h_m ∈ [−0.3, 0.3],
               and a Normal(0, ``h_prior`` = 0.1) prior on each h_m
Sanders–Evans  V, σ as above, σ_K ∈ [0.01, 10], δ ∈ (−δ_max, δ_max), κ ∈ [−1, 1],
               and weak priors on the shape: σ_K ~ HalfNormal(1), δ ~ Normal(0, 0.3),
               κ ~ Normal(0, 1) (``se_prior``)
Histogram      logits ∈ [−30, 30] on a uniform grid of bins of width ``dv``
Two Gaussians  V1, V2 ∈ [−2000, 2000] km/s, σ1, σ2 ∈ [5, 1000] km/s, the first
               component's light fraction f1 ∈ [0, 1]; weak priors
               V_i ~ Normal(0, 1000 km/s), ln σ_i ~ Normal(ln 100, 0.7),
               f1 ~ Normal(0.5, 0.5)
=============  ==========================================================

The two-Gaussian family (``"gauss2"``) is a LOSVD made of two Gaussians, each with its
own template mix (pPXF's two-component fit, both from the same library): the
double-peaked LOSVDs of counter-rotating discs, which the four-moment Gauss–Hermite
series cannot represent, and whose discs usually differ in age. ``f1`` is the light
fraction of the first component: the forward model convolves component ``c``'s templates
with ``f_c L_c`` and the linear solve keeps the two mixes at equal light
(:meth:`kinjax.forward.ForwardModel.linear_system`). Its weak priors keep a component
whose light fraction goes to zero from wandering off (the posterior stays proper and
the Laplace covariance finite); the labels are exchangeable (swapping the components
and f1 ↔ 1 − f1 gives the same LOSVD), so read its mean velocity and dispersion (which
do not depend on the labelling) rather than V1 or V2 alone. The 3D model fits the same
family in its *mean form* (V, ΔV, σ1, σ2, f1), V the blend's mean velocity and ΔV = V2 − V1
(:func:`gauss2_mean_form`).

Why a prior on h_m: with flat priors the posterior of (σ, h4) has a long tail towards
small σ and large h4 (the two trade off in the line wings), which NUTS explores to the
bounds. Observed LOSVDs rarely have ``abs(h_m) > 0.15``; Normal(0, 0.1) removes the
unphysical tail while moving a well-measured h_m by a fraction of its error. The MAP
fit uses the same prior (it is the posterior mode); ``h_prior=None`` gives flat priors
(the equivalent of pPXF with ``bias=0``).

Why priors on the Sanders–Evans shape: the data fix the core of the LOSVD, not its wings,
and with flat priors the fits of noisy spectra put the light in the wings — at S/N 30
most MAP fits ran to σ_K = 10 (the bound: a Laplace-shaped LOSVD whose second moment is
set by unconstrained wings), and the dispersion came out biased high by 0.4 of its scatter
(benchmarks/RESULTS.md). σ_K is the kernel's share of the width (excess kurtosis up to
3 (σ_K²/(1+σ_K²))² for the Laplace kernel), so HalfNormal(1) plays the part of the
Normal(0, 0.1) prior on h4; δ and κ get priors of similar reach so that they stay
identified when σ_K is small. ``se_prior=None`` gives flat priors.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import jax
import jax.numpy as jnp
import numpy as np

from kinjax.errors import KinjaxError
from kinjax.losvd import Gaussian, GaussHermite, Histogram, Mixture, SandersEvans, velocity_grid

__all__ = ["LosvdSpec", "losvd_spec", "gauss2_mean_form", "gauss2_to_mean_form", "gauss2_from_mean_form",
           "log_where", "exp_where", "HIST_EDGE_LOGMASS"]

#: Histogram prior: (mean, sd) of the natural log of the probability in each of the two
#: outermost bins: the LOSVD is expected to vanish at ±vmax (e^-12 = 6e-6, ±3 e-folds).
HIST_EDGE_LOGMASS = (-12.0, 3.0)


def log_where(x, mask):
    """ln x where ``mask``, x elsewhere (elementwise; NumPy or JAX arrays).

    The inner ``where`` keeps the unused branch finite, so reverse-mode gradients stay
    finite too (``jnp.where(mask, jnp.log(x), x)`` alone gives NaN gradients at x ≤ 0).
    """
    xp = jnp if isinstance(x, jax.Array) or isinstance(mask, jax.Array) else np
    return xp.where(mask, xp.log(xp.where(mask, x, 1.0)), x)


def exp_where(u, mask):
    """Inverse of :func:`log_where`: exp u where ``mask``, u elsewhere.

    Used by every reparameterisation of the scale parameters (the samplers' coordinates,
    the Levenberg–Marquardt iterate, the GP fields). The inner ``where`` matters: exp of
    a velocity of 720 km/s is inf in float64, and inf × 0 is a NaN gradient.
    """
    xp = jnp if isinstance(u, jax.Array) or isinstance(mask, jax.Array) else np
    return xp.where(mask, xp.exp(xp.where(mask, u, 0.0)), u)


@dataclass(frozen=True)
class LosvdSpec:
    """A LOSVD family set up for fitting.

    Attributes
    ----------
    family : {"gh", "se", "hist"}
    names : tuple of str
        Names of the entries of ``theta``.
    lower, upper : (n_params,) arrays
        Bounds of ``theta`` (the support of the flat priors).
    options : dict
        Static options of the family (``moments``; ``kernel``; ``centres``).
    smoothness : float
        Histogram only: prior scale of the third difference of neighbouring logits (a
        random-walk prior of order three; BAYES-LOSVD offers orders one and two).
    h_prior : float or None
        Gauss–Hermite only: standard deviation of the Normal prior on each h_m.
    se_prior : tuple of float or None
        Sanders–Evans only: prior scales of (σ_K, δ, κ) (half-normal on σ_K, Normal
        with zero mean on δ and κ); None: flat.
    """

    family: str
    names: tuple[str, ...]
    lower: np.ndarray
    upper: np.ndarray
    options: dict = field(default_factory=dict)
    smoothness: float = 0.2
    h_prior: float | None = None
    se_prior: tuple | None = None

    @property
    def n_params(self) -> int:
        return len(self.names)

    def build(self, theta):
        """The LOSVD for the parameter vector ``theta`` (n_params,)."""
        if self.family == "gh":
            return GaussHermite.from_vector(theta)
        if self.family == "se":
            return SandersEvans.from_vector(theta, kernel=self.options["kernel"])
        if self.family == "gauss2":
            theta = self.components_form(theta)
            f = theta[4]
            return Mixture((Gaussian(theta[0], theta[1]), Gaussian(theta[2], theta[3])), jnp.stack([f, 1.0 - f]))
        return Histogram.from_logits(jnp.asarray(self.options["centres"]), theta)

    def initial(self, v0=0.0, sigma0=150.0) -> np.ndarray:
        """A starting vector: Gaussian at (v0, sigma0), symmetric, mesokurtic."""
        if self.family == "hist":
            c = np.asarray(self.options["centres"])
            return -0.5 * ((c - v0) / sigma0) ** 2
        theta = np.zeros(self.n_params)
        theta[0], theta[1] = v0, sigma0
        if self.family == "gauss2":  # two equal halves either side of v0
            theta[:] = v0 + 0.5 * sigma0, 0.7 * sigma0, v0 - 0.5 * sigma0, 0.7 * sigma0, 0.5
            if self.mean_form:
                theta = np.asarray(gauss2_to_mean_form(theta))
        if self.family == "se":
            theta[2] = 0.5  # sigma_k
        return np.clip(theta, self.lower, self.upper)

    def prior_residuals(self, theta):
        """Residuals whose half sum of squares is −log prior (beyond the bounds).

        Gauss–Hermite: h_m / h_prior (none with ``h_prior=None``); Sanders–Evans:
        (σ_K, δ, κ) / se_prior (κ only for the mixture kernel; none with
        ``se_prior=None``); histogram: a random walk on the third differences of the
        logits (scale ``smoothness``), the log mass of the two edge bins about
        Normal(−12, 3) (:data:`HIST_EDGE_LOGMASS`), and a weak anchor on the mean logit
        (softmax ignores it).
        """
        if self.family == "gh" and self.h_prior is not None:
            return jnp.asarray(theta)[2:] / self.h_prior
        if self.family == "se" and self.se_prior is not None:
            shape = jnp.asarray(theta)[2:]
            return shape / jnp.asarray(self.se_prior[:shape.shape[0]], shape.dtype)
        if self.family == "gauss2" and self.options.get("value_priors", True):
            theta = self.components_form(jnp.asarray(theta))
            return jnp.stack([theta[0] / 1000.0, theta[2] / 1000.0, (jnp.log(theta[1]) - np.log(100.0)) / 0.7,
                              (jnp.log(theta[3]) - np.log(100.0)) / 0.7, (theta[4] - 0.5) / 0.5])
        if self.family != "hist":
            return jnp.zeros(0, dtype=jnp.asarray(theta).dtype)
        theta = jnp.asarray(theta)
        # third differences: quadratic logits (a Gaussian LOSVD) cost nothing, so the prior
        # smooths departures from a Gaussian without widening it; the two edge bins' log
        # mass is anchored near e^-12 (the LOSVD vanishes at ±vmax). A first-difference
        # walk let the wings keep a floor that no data could remove: on a GH-truth test
        # cube at S/N 50 the dispersion came out +154 km/s high, now +14 km/s.
        smooth = jnp.diff(theta, n=3) / self.smoothness
        edges = (theta[jnp.array([0, -1])] - jax.scipy.special.logsumexp(theta) - HIST_EDGE_LOGMASS[0])
        return jnp.concatenate([smooth, edges / HIST_EDGE_LOGMASS[1], jnp.mean(theta)[None] / 10.0])

    def without_value_priors(self) -> "LosvdSpec":
        """The spec without the priors that the 3D model's GP priors replace: the
        Gauss–Hermite h_m prior and the two Gaussians' weak priors.

        Kept beside a GP (which has its own mean and amplitude per field), they would act
        once per spaxel on each field's mean: on a counter-rotating mock at S/N 20 the
        two-Gaussian ln σ prior, centred on 100 km/s, pulled the 3D dispersion up by
        13 km/s. The Sanders–Evans shape priors stay, because without them the data leave
        (δ, κ) unidentified when σ_K is small, and so do the histogram's, which tie
        neighbouring velocity bins of one LOSVD together.
        """
        if self.family == "gauss2":
            return replace(self, options={**self.options, "value_priors": False})
        return replace(self, h_prior=None)

    def identified(self, theta):
        """``theta`` (..., n_params) with the directions the LOSVD ignores removed.

        Histogram: the logits centred on their mean. The softmax ignores the mean, so
        its posterior is the weak Normal(0, 10) anchor alone, independent of the rest; a
        sampler explores such a direction slowly (NGC 4550: bulk ESS 24, R-hat 1.14 for
        the mean logit, while every bin probability had ESS ≥ 216 and R-hat ≤ 1.023),
        and it would set the diagnostics and errors of every raw logit. Other families:
        ``theta`` unchanged.
        """
        if self.family != "hist":
            return theta
        xp = jnp if isinstance(theta, jax.Array) else np
        return theta - xp.mean(theta, axis=-1, keepdims=True)

    def on_bounds(self, theta, rtol: float = 1e-3) -> tuple[str, ...]:
        """Names of the kinematic parameters that ``theta`` (n_params,) puts on a bound.

        "On a bound": within ``rtol`` of the interval's width (for σ, of the width in
        ln σ) of its lower or upper end, where a Laplace covariance, which assumes an
        interior optimum, is not valid. Checked: every Gauss–Hermite and two-Gaussian
        parameter, the Sanders–Evans V and σ (its shape parameters are left out: a
        noisy spectrum's MAP routinely sits at σ_K's lower bound, the Gaussian-like
        kernel), no histogram logit.
        """
        if self.family == "hist":
            return ()
        theta = np.asarray(theta, float)[: self.n_params]
        lo, hi = np.asarray(self.lower, float), np.asarray(self.upper, float)
        logs = self.log_scale & (lo > 0)
        t, lo, hi = (np.where(logs, np.log(np.where(logs, a, 1.0)), a) for a in (theta, lo, hi))
        tol = rtol * (hi - lo)
        hit = (t <= lo + tol) | (t >= hi - tol)
        if self.family == "se":
            hit[2:] = False
        return tuple(n for n, h in zip(self.names, hit) if h)

    @property
    def n_components(self) -> int:
        """Kinematic components, each with its own template mix (two Gaussians: 2)."""
        return 2 if self.family == "gauss2" else 1

    @property
    def log_scale(self) -> np.ndarray:
        """(n_params,) bool: parameters that are scales (σ; Sanders–Evans σ_K).

        The samplers move these in log space (see :meth:`constrain`): the posterior of a
        dispersion near or below the pixel size has a long tail towards zero that is
        straight in ln σ and curved in σ.
        """
        mask = np.zeros(self.n_params, bool)
        if self.family in ("gh", "se", "gauss2"):
            mask[1] = True
        if self.family in ("se", "gauss2"):
            mask[2 if self.family == "se" else 3] = True
        if self.mean_form:  # (v, dv, σ1, σ2, f1)
            mask[1:4] = False, True, True
        return mask

    @property
    def mean_form(self) -> bool:
        """Two Gaussians parameterised as (V, ΔV, σ1, σ2, f1) (:func:`gauss2_mean_form`)."""
        return self.family == "gauss2" and self.options.get("form") == "mean"

    def components_spec(self) -> "LosvdSpec":
        """The spec in the family's standard parameters (inverse of :func:`gauss2_mean_form`)."""
        if not self.mean_form:
            return self
        lo, hi = np.asarray(self.lower, float), np.asarray(self.upper, float)
        pick = [0, 2, 0, 3, 4]
        options = {k: v for k, v in self.options.items() if k != "form"}
        return LosvdSpec("gauss2", ("v1", "sigma1", "v2", "sigma2", "f1"), lo[pick], hi[pick], options,
                         self.smoothness, self.h_prior, self.se_prior)

    def components_form(self, theta):
        """``theta`` (..., n_params) in the family's standard parameters (identity except
        for the two Gaussians' mean form, whose (V, ΔV, σ1, σ2, f1) become (V1, σ1, V2, σ2, f1))."""
        return gauss2_from_mean_form(theta) if self.mean_form else theta

    def label_swap(self) -> tuple[np.ndarray, np.ndarray] | None:
        """The linear map ``theta -> M @ theta + c`` that relabels the components.

        Two-Gaussian family only: returns ``(M, c)`` swapping (V1, σ1) with (V2, σ2) and
        f1 with 1 − f1 (the same LOSVD); None for families without exchangeable labels.
        """
        if self.family != "gauss2":
            return None
        m = np.zeros((5, 5))
        if self.mean_form:  # V stays, ΔV changes sign, σ1 <-> σ2
            m[0, 0], m[1, 1], m[2, 3], m[3, 2] = 1.0, -1.0, 1.0, 1.0
        else:
            m[0, 2] = m[1, 3] = m[2, 0] = m[3, 1] = 1.0
        m[4, 4] = -1.0
        c = np.zeros(5)
        c[4] = 1.0
        return m, c

    @property
    def fraction(self) -> np.ndarray:
        """(n_params,) bool: parameters that are fractions in [0, 1] (two-Gaussian f1)."""
        mask = np.zeros(self.n_params, bool)
        if self.family == "gauss2":
            mask[4] = True
        return mask

    def _interval(self, dtype):
        log = jnp.asarray(self.log_scale)
        a = log_where(np.asarray(self.lower, float), self.log_scale)
        b = log_where(np.asarray(self.upper, float), self.log_scale)
        return log, jnp.asarray(a, dtype), jnp.asarray(b, dtype)

    def constrain(self, s):
        """Map unconstrained coordinates ``s`` (..., n_params) into the bounds.

        ``theta = lower + (upper - lower) * sigmoid(s)``, done on ln θ for the
        :attr:`log_scale` parameters. Returns ``(theta, log_jac)`` with ``log_jac`` (...,)
        the log absolute Jacobian determinant ``log |dθ/ds|``: adding it to a log density
        in θ gives the density in ``s``, so a prior that is uniform in θ stays uniform in
        θ. The density falls smoothly to zero at the bounds, so a sampler meets no walls.
        """
        s = jnp.asarray(s)
        log, a, b = self._interval(s.dtype)
        t = a + (b - a) * jax.nn.sigmoid(s)
        theta = exp_where(t, log)
        log_jac = jnp.log(b - a) + jax.nn.log_sigmoid(s) + jax.nn.log_sigmoid(-s) + jnp.where(log, t, 0.0)
        return theta, jnp.sum(log_jac, axis=-1)

    def unconstrain(self, theta, eps: float = 1e-6):
        """Inverse of :meth:`constrain` (values on or beyond a bound are moved ``eps`` of
        the interval inside it)."""
        theta = jnp.asarray(theta)
        log, a, b = self._interval(theta.dtype)
        t = log_where(jnp.where(log, jnp.maximum(theta, jnp.finfo(theta.dtype).tiny), theta), log)
        p = jnp.clip((t - a) / (b - a), eps, 1.0 - eps)
        return jnp.log(p) - jnp.log1p(-p)


def losvd_spec(
    family: str = "gh",
    *,
    moments: int = 4,
    kernel: str = "mixture",
    vmax: float = 1000.0,
    dv: float | None = None,
    velscale: float | None = None,
    smoothness: float = 0.2,
    h_prior: float | None = 0.1,
    se_prior: tuple | None = (1.0, 0.3, 1.0),
) -> LosvdSpec:
    """Set up a LOSVD family for fitting.

    Parameters
    ----------
    family : {"gh", "se", "hist", "gauss2"}
        Gauss–Hermite, Sanders & Evans (2020), a non-parametric histogram, or two
        Gaussians (counter-rotating components of one population).
    moments : int
        Gauss–Hermite: pPXF's ``moments`` (2 = Gaussian, 4 = up to h4, ...).
    kernel : {"mixture", "uniform", "laplace"}
        Sanders–Evans kernel.
    vmax, dv : float
        Histogram: half-width and bin width of the velocity grid (km/s); ``dv``
        defaults to the galaxy ``velscale``.
    smoothness : float
        Histogram: scale of the random-walk prior on the third differences of
        neighbouring logits (see :meth:`LosvdSpec.prior_residuals`).
    h_prior : float or None
        Gauss–Hermite: scale of the Normal prior on each h_m (None: flat).
    se_prior : tuple of float or None
        Sanders–Evans: prior scales of (σ_K, δ, κ) (None: flat).
    """
    if family == "gh":
        names = GaussHermite.parameter_names(moments)
        lower, upper = GaussHermite.default_bounds(moments)
        return LosvdSpec("gh", names, lower, upper, {"moments": moments}, h_prior=h_prior)
    if family == "se":
        names = SandersEvans.parameter_names(kernel)
        lower, upper = SandersEvans.default_bounds(kernel)
        # the delta interval is open: keep strictly inside
        lower, upper = lower.copy(), upper.copy()
        lower[3] *= 0.999
        upper[3] *= 0.999
        prior = None if se_prior is None else tuple(float(x) for x in se_prior)
        return LosvdSpec("se", names, lower, upper, {"kernel": kernel}, se_prior=prior)
    if family == "gauss2":
        names = ("v1", "sigma1", "v2", "sigma2", "f1")
        (v_lo, s_lo), (v_hi, s_hi) = GaussHermite.default_bounds(2)
        lower = np.array([v_lo, s_lo, v_lo, s_lo, 0.0])
        upper = np.array([v_hi, s_hi, v_hi, s_hi, 1.0])
        return LosvdSpec("gauss2", names, lower, upper, {})
    if family == "hist":
        step = dv if dv is not None else velscale
        if step is None:
            raise KinjaxError("a histogram LOSVD needs dv (km/s) or the galaxy velscale")
        centres = velocity_grid(vmax, step)
        names = tuple(f"logit{i}" for i in range(centres.size))
        lower, upper = np.full(centres.size, -30.0), np.full(centres.size, 30.0)
        return LosvdSpec("hist", names, lower, upper, {"centres": centres}, smoothness)
    raise KinjaxError(f"unknown LOSVD family {family!r}: use 'gh', 'se', 'hist' or 'gauss2'")


def gauss2_to_mean_form(theta):
    """Two-Gaussian parameters (..., 5 [+ extra]) (V1, σ1, V2, σ2, f1) -> (V, ΔV, σ1, σ2, f1).

    ``V = f1 V1 + (1 − f1) V2`` is the LOSVD's mean velocity and ``ΔV = V2 − V1`` the
    separation of the components; entries after the fifth are passed through.
    """
    xp = jnp if isinstance(theta, jax.Array) else np
    theta = xp.asarray(theta)
    v1, s1, v2, s2, f = (theta[..., i] for i in range(5))
    head = xp.stack([f * v1 + (1 - f) * v2, v2 - v1, s1, s2, f], axis=-1)
    return xp.concatenate([head, theta[..., 5:]], axis=-1)


def gauss2_from_mean_form(theta):
    """Inverse of :func:`gauss2_to_mean_form`: V1 = V − (1 − f1) ΔV, V2 = V + f1 ΔV."""
    xp = jnp if isinstance(theta, jax.Array) else np
    theta = xp.asarray(theta)
    v, dv, s1, s2, f = (theta[..., i] for i in range(5))
    head = xp.stack([v - (1 - f) * dv, s1, v + f * dv, s2, f], axis=-1)
    return xp.concatenate([head, theta[..., 5:]], axis=-1)


def gauss2_mean_form(spec: LosvdSpec) -> LosvdSpec:
    """The two-Gaussian ``spec`` with parameters (V, ΔV, σ1, σ2, f1) instead of (V1, σ1, V2, σ2, f1).

    The same LOSVDs, priors and likelihood (the map has unit Jacobian determinant); used by
    the 3D model, whose GP priors then act on the mean-velocity field itself. In a
    counter-rotating galaxy that field is small and smooth while V1, V2 and f1 each vary
    a lot, and a mean velocity assembled from separately smoothed V1, V2 and f1 fields
    inherits the errors of all three. Bounds: V as V1; ΔV within ± the width of V1's
    interval; σ and f1 as before.
    """
    if spec.family != "gauss2":
        raise KinjaxError(f"the mean form is for the two-Gaussian family, not {spec.family!r}")
    if spec.mean_form:
        return spec
    lo, hi = np.asarray(spec.lower, float), np.asarray(spec.upper, float)
    width = hi[0] - lo[0]
    lower = np.array([lo[0], -width, lo[1], lo[3], lo[4]])
    upper = np.array([hi[0], width, hi[1], hi[3], hi[4]])
    return LosvdSpec("gauss2", ("v", "dv", "sigma1", "sigma2", "f1"), lower, upper, {**spec.options, "form": "mean"},
                     spec.smoothness, spec.h_prior, spec.se_prior)
