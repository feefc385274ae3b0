"""Non-parametric histogram LOSVD on a uniform velocity grid (as BAYES-LOSVD).

pdf(v) = w_j / Δv inside bin j (zero outside the grid);
ft(ω)  = Σ_j w_j sinc(ωΔv/2) exp(−iωv_j), with sinc(t) = sin(t)/t.
"""

from __future__ import annotations

from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from kinjax.errors import KinjaxError
from kinjax.losvd.base import LOSVD, _concrete, velocity_grid

__all__ = ["Histogram", "velocity_grid"]


class Histogram(LOSVD):
    """Histogram LOSVD.

    Parameters
    ----------
    centres : array_like, shape (n_bins,)
        Bin centres (km/s), uniformly spaced and increasing, n_bins ≥ 2 (see
        :func:`velocity_grid`).
    weights : array_like, shape (n_bins,)
        Non-negative probabilities of the bins. They are divided by their sum, so
        any non-negative vector with a positive sum is accepted (checked when the
        values are concrete). For fitting, use :meth:`from_logits`.
    """

    centres: jax.Array
    weights: jax.Array
    param_names: ClassVar[tuple[str, ...]] = ()

    def __init__(self, centres, weights):
        self.centres = jnp.asarray(centres)
        weights = jnp.asarray(weights)
        c, w = _concrete(self.centres), _concrete(weights)
        if self.centres.ndim != 1 or self.centres.shape[0] < 2 or weights.shape != self.centres.shape:
            raise KinjaxError(
                f"Histogram needs 1-D centres and weights of one length >= 2 "
                f"(got {self.centres.shape} and {weights.shape})"
            )
        if c is not None:
            step = np.diff(c)
            if not (np.all(step > 0) and np.allclose(step, step[0], rtol=1e-6, atol=0)):
                raise KinjaxError("Histogram centres must be increasing and uniformly spaced (use velocity_grid)")
        if w is not None and not (np.all(w >= 0) and np.sum(w) > 0 and np.all(np.isfinite(w))):
            raise KinjaxError("Histogram weights must be finite, non-negative and not all zero")
        self.weights = weights / jnp.sum(weights)

    @classmethod
    def from_logits(cls, centres, logits):
        """Histogram with ``weights = softmax(logits)``; ``logits`` shape (n_bins,)."""
        return cls(centres, jax.nn.softmax(jnp.asarray(logits)))

    @property
    def dv(self):
        """Bin width Δv (km/s), scalar."""
        return self.centres[1] - self.centres[0]

    def pdf(self, v):
        v = jnp.asarray(v)
        dv = self.dv
        n = self.centres.shape[0]
        index = jnp.floor((v - (self.centres[0] - 0.5 * dv)) / dv).astype(int)
        inside = (index >= 0) & (index < n)
        return jnp.where(inside, self.weights[jnp.clip(index, 0, n - 1)], 0.0) / dv

    def ft(self, omega):
        omega = jnp.asarray(omega)
        box = jnp.sinc(omega * self.dv / (2 * jnp.pi))  # sin(ωΔv/2)/(ωΔv/2)
        phases = jnp.exp(-1j * omega[..., None] * self.centres)
        return box * jnp.sum(self.weights * phases, axis=-1)

    @property
    def mean(self):
        return jnp.sum(self.weights * self.centres)

    def to_vector(self):
        return self.weights

    @classmethod
    def from_vector(cls, theta, centres):
        """``theta`` = the weights, shape (n_bins,); ``centres`` (km/s) is static."""
        return cls(centres, theta)

    @classmethod
    def parameter_names(cls, n_bins):
        return tuple(f"w{j}" for j in range(n_bins))

    @classmethod
    def default_bounds(cls, n_bins):
        """Each weight in [0, 1]."""
        return np.zeros(n_bins), np.ones(n_bins)
