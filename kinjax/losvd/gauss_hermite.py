"""Gaussian and Gauss–Hermite LOSVDs (van der Marel & Franx 1993; pPXF convention).

With y = (v − V)/σ and the normalised Hermite polynomials
h̃_m(y) = H_m(y)/sqrt(2^m m!),

    L(v) = exp(−y²/2) / (σ sqrt(2π)) · [1 + Σ_{m≥3} h_m h̃_m(y)] / N
    L̂(ω) = exp(−iωV − ω²σ²/2) · [1 + Σ_{m≥3} (−i)^m h_m h̃_m(ωσ)] / N

with N = 1 + (√6/4) h4 + (√5/4) h6 + … = the raw series' integral. kinjax divides
by N so that ``ft(0) = 1`` and the pdf integrates to one; this changes none of
the h_m (pPXF leaves the series unnormalised and its template weights absorb N,
so kinjax weights differ from pPXF's by the factor N). Positive h3 puts a tail at
positive velocities. The series is not a density in general: it goes negative
in the wings for large |h_m| (e.g. h4 = 0.3).
"""

from __future__ import annotations

import math
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from kinjax.errors import KinjaxError
from kinjax.losvd.base import LOSVD, _concrete

__all__ = ["Gaussian", "GaussHermite", "hermite_normalised"]

_SQRT_2PI = float(np.sqrt(2 * np.pi))

#: Default bounds (documented in ``default_bounds``).
V_BOUNDS = (-2000.0, 2000.0)  # km/s
SIGMA_BOUNDS = (5.0, 1000.0)  # km/s
H_BOUNDS = (-0.3, 0.3)


def hermite_normalised(y, degree):
    """Normalised Hermite polynomials h̃_0 … h̃_degree at ``y``.

    Stable three-term recurrence (Python-float constants, so float32 stays float32)
    h̃_{m+1} = (√2 y h̃_m − √m h̃_{m−1}) / √(m+1), h̃_0 = 1, h̃_1 = √2 y.

    Parameters
    ----------
    y : array_like, any shape
    degree : int
        Highest degree (static).

    Returns
    -------
    list of jax.Array
        ``degree + 1`` arrays of the shape of ``y``.
    """
    y = jnp.asarray(y)
    out = [jnp.ones_like(y)]
    if degree >= 1:
        out.append(math.sqrt(2.0) * y)
    for m in range(1, degree):
        out.append((math.sqrt(2.0) * y * out[m] - math.sqrt(m) * out[m - 1]) / math.sqrt(m + 1.0))
    return out


def _check_sigma(sigma):
    s = _concrete(sigma)
    if s is not None and not (np.all(np.isfinite(s)) and np.all(s > 0)):
        raise KinjaxError(f"LOSVD sigma must be finite and > 0 km/s (got {s})")


class Gaussian(LOSVD):
    """Gaussian LOSVD.

    Parameters
    ----------
    v : float
        Mean velocity V (km/s).
    sigma : float
        Dispersion σ (km/s), > 0.
    """

    v: jax.Array
    sigma: jax.Array
    param_names: ClassVar[tuple[str, ...]] = ("v", "sigma")

    def __init__(self, v, sigma):
        self.v = jnp.asarray(v)
        self.sigma = jnp.asarray(sigma)
        _check_sigma(self.sigma)

    def pdf(self, v):
        y = (jnp.asarray(v) - self.v) / self.sigma
        return jnp.exp(-0.5 * y**2) / (self.sigma * _SQRT_2PI)

    def ft(self, omega):
        omega = jnp.asarray(omega)
        return jnp.exp(-1j * omega * self.v - 0.5 * (omega * self.sigma) ** 2)

    @property
    def mean(self):
        return self.v

    @property
    def dispersion(self):
        return self.sigma

    @property
    def skewness(self):
        return jnp.zeros_like(self.sigma)

    @property
    def kurtosis(self):
        return jnp.zeros_like(self.sigma)

    def to_vector(self):
        return jnp.stack([self.v, self.sigma])

    @classmethod
    def from_vector(cls, theta):
        """``theta = [V, σ]`` (km/s), shape (2,)."""
        return cls(theta[0], theta[1])

    @classmethod
    def default_bounds(cls):
        """V ∈ [−2000, 2000] km/s, σ ∈ [5, 1000] km/s."""
        return np.array([V_BOUNDS[0], SIGMA_BOUNDS[0]]), np.array([V_BOUNDS[1], SIGMA_BOUNDS[1]])


class GaussHermite(LOSVD):
    """Gauss–Hermite LOSVD, normalised to unit integral (see module docstring).

    Parameters
    ----------
    v : float
        V (km/s): the centre of the Gaussian, not the mean once h3 ≠ 0.
    sigma : float
        σ (km/s), > 0: the width of the Gaussian, not the dispersion once h ≠ 0.
    h : array_like, shape (n_h,)
        ``[h3, h4, …]``, any length ≥ 0 (static). pPXF's ``moments = 2 + n_h``.
    """

    v: jax.Array
    sigma: jax.Array
    h: jax.Array
    param_names: ClassVar[tuple[str, ...]] = ("v", "sigma", "h3", "h4")

    def __init__(self, v, sigma, h=()):
        self.v = jnp.asarray(v)
        self.sigma = jnp.asarray(sigma)
        self.h = jnp.asarray(h)
        if not jnp.issubdtype(self.h.dtype, jnp.floating):
            self.h = self.h.astype(jnp.result_type(float))
        if self.h.ndim != 1:
            raise KinjaxError(f"GaussHermite h must be 1-D [h3, h4, ...] (got shape {self.h.shape})")
        _check_sigma(self.sigma)

    @property
    def norm(self):
        """N = 1 + (√6/4) h4 + (√5/4) h6 + …, the raw series' integral (scalar)."""
        return jnp.real(self._raw_ft(jnp.zeros((), self.sigma.dtype)))

    def _series(self, y, phases):
        """1 + Σ phase_m h_m h̃_m(y), m = 3 … 2 + n_h."""
        n_h = self.h.shape[0]
        if n_h == 0:
            return jnp.ones_like(y)
        herm = hermite_normalised(y, 2 + n_h)
        total = jnp.ones_like(y)
        for j in range(n_h):
            m = 3 + j
            total = total + phases[m % 4] * self.h[j] * herm[m]
        return total

    def _raw_ft(self, omega):
        k = jnp.asarray(omega) * self.sigma
        series = self._series(k, (1.0, -1j, -1.0, 1j))  # (−i)^m
        return jnp.exp(-1j * omega * self.v - 0.5 * k**2) * series

    def pdf(self, v):
        y = (jnp.asarray(v) - self.v) / self.sigma
        series = self._series(y, (1.0, 1.0, 1.0, 1.0))
        return jnp.exp(-0.5 * y**2) / (self.sigma * _SQRT_2PI) * series / self.norm

    def ft(self, omega):
        return self._raw_ft(omega) / self.norm

    def to_vector(self):
        return jnp.concatenate([jnp.stack([self.v, self.sigma]), self.h])

    @classmethod
    def from_vector(cls, theta):
        """``theta = [V, σ, h3, h4, …]`` (km/s, km/s, dimensionless), shape (2 + n_h,)."""
        return cls(theta[0], theta[1], theta[2:])

    @classmethod
    def parameter_names(cls, moments=4):
        """``("v", "sigma", "h3", …)`` for pPXF's ``moments`` (≥ 2) entries."""
        if moments < 2:
            raise KinjaxError(f"GaussHermite needs moments >= 2 (got {moments})")
        return ("v", "sigma") + tuple(f"h{m}" for m in range(3, moments + 1))

    @classmethod
    def default_bounds(cls, moments=4):
        """V ∈ [−2000, 2000] km/s, σ ∈ [5, 1000] km/s, each h_m ∈ [−0.3, 0.3]."""
        n_h = len(cls.parameter_names(moments)) - 2
        lower = np.array([V_BOUNDS[0], SIGMA_BOUNDS[0]] + [H_BOUNDS[0]] * n_h)
        upper = np.array([V_BOUNDS[1], SIGMA_BOUNDS[1]] + [H_BOUNDS[1]] * n_h)
        return lower, upper
