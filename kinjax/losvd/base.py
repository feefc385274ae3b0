"""The abstract LOSVD: a density in velocity and its analytic Fourier transform.

Every family subclasses :class:`LOSVD` and writes two things, ``pdf(v)`` and
``ft(omega)``; the moments (mean, dispersion, skewness, excess kurtosis) are
computed once, here, from exact derivatives (JAX autodiff) of the characteristic
function at ω = 0.

Fourier convention (the project's): ``ft(ω) = ∫ pdf(v) exp(-iωv) dv`` with ω in
radians per km/s, the sign of ``numpy.fft.rfft``. Hence ``ft(0) = 1`` and the raw
moments are ``E[v^n] = i^n d^n ft/dω^n (0)``.
"""

from __future__ import annotations

import abc
from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from kinjax.errors import KinjaxError

__all__ = ["LOSVD", "losvd_on_grid", "velocity_grid"]


def _concrete(x):
    """``x`` as a NumPy array when its value is known, else ``None`` (traced)."""
    if isinstance(x, jax.core.Tracer):
        return None
    return np.asarray(x)


def _taylor(f, w, order):
    """``(f(w), f'(w), ..., f^(order)(w))`` of a scalar function of a real scalar,
    by nested forward-mode differentiation (exact, and cheap to compile)."""

    def fn(x):
        return (f(x),)

    for _ in range(order):

        def fn(x, prev=fn):
            primal, tangent = jax.jvp(prev, (x,), (jnp.ones_like(x),))
            return primal + (tangent[-1],)

    return fn(w)


class LOSVD(eqx.Module):
    """A line-of-sight velocity distribution (abstract).

    Subclasses are immutable pytrees whose array fields are the parameters, so
    that ``jax.vmap`` / ``jax.grad`` work through a function that builds one.

    Notes
    -----
    ``param_names`` names the entries of :meth:`to_vector`; families whose
    vector length depends on a static choice (the number of Gauss–Hermite
    moments, the number of histogram bins) override :meth:`parameter_names`.
    """

    param_names: ClassVar[tuple[str, ...]] = ()

    # ------------------------------------------------------------------ maths
    @abc.abstractmethod
    def pdf(self, v):
        """Density at velocities ``v`` (km/s, any shape), in 1/(km/s), same shape."""

    @abc.abstractmethod
    def ft(self, omega):
        """Complex ``∫ pdf(v) exp(-iωv) dv`` at ``omega`` (rad per km/s, any shape)."""

    # --------------------------------------------------------------- vectors
    @abc.abstractmethod
    def to_vector(self):
        """The parameters as a ``(n_params,)`` array, in ``parameter_names`` order."""

    @classmethod
    @abc.abstractmethod
    def from_vector(cls, theta, **static):
        """Build the LOSVD from a ``(n_params,)`` vector (inverse of ``to_vector``)."""

    @classmethod
    def parameter_names(cls, **static) -> tuple[str, ...]:
        """Names of the entries of the parameter vector."""
        return cls.param_names

    @classmethod
    @abc.abstractmethod
    def default_bounds(cls, **static):
        """``(lower, upper)``, two ``(n_params,)`` NumPy arrays of sensible bounds."""

    # ---------------------------------------------------------------- moments
    def _omega0(self):
        leaves = [x for x in jax.tree_util.tree_leaves(self) if hasattr(x, "dtype")]
        dtype = jnp.result_type(*leaves) if leaves else jnp.result_type(float)
        if not jnp.issubdtype(dtype, jnp.floating):
            dtype = jnp.result_type(float)
        return jnp.zeros((), dtype=dtype)

    def _central_moments(self, mean):
        """(μ2, μ3, μ4) about ``mean`` from the shifted characteristic function."""
        g = _taylor(lambda w: self.ft(w) * jnp.exp(1j * w * mean), self._omega0(), 4)
        # g^(n)(0) = (-i)^n μ_n, so μ2 = -Re g2, μ3 = Im g3, μ4 = Re g4.
        return -jnp.real(g[2]), jnp.imag(g[3]), jnp.real(g[4])

    def moments(self):
        """(mean, dispersion, skewness, excess kurtosis) from exact ft derivatives.

        Jitted (compiled once per family and shape); the properties below
        call it, and families override a property where a closed form exists.
        """
        return _moments(self)

    @property
    def mean(self):
        """Mean velocity (km/s), scalar."""
        return self.moments()[0]

    @property
    def dispersion(self):
        """Standard deviation of the velocity (km/s), scalar."""
        return self.moments()[1]

    @property
    def skewness(self):
        """Skewness μ3/μ2^(3/2) (dimensionless), scalar."""
        return self.moments()[2]

    @property
    def kurtosis(self):
        """Excess kurtosis μ4/μ2² − 3 (dimensionless; 0 for a Gaussian), scalar."""
        return self.moments()[3]


@eqx.filter_jit
def _moments(losvd):
    # ft'(0) = -i mean; then the central moments from the shifted transform.
    mean = -jnp.imag(_taylor(losvd.ft, losvd._omega0(), 1)[1])
    mu2, mu3, mu4 = losvd._central_moments(mean)
    return mean, jnp.sqrt(mu2), mu3 / mu2**1.5, mu4 / mu2**2 - 3.0


def velocity_grid(vmax, dv):
    """Symmetric uniform velocity grid of bin centres.

    Parameters
    ----------
    vmax : float
        Half-width (km/s); the last centre is the first multiple of ``dv`` at or
        beyond ``vmax`` (up to a 1e-9 relative tolerance).
    dv : float
        Step (km/s), > 0.

    Returns
    -------
    numpy.ndarray, shape (2 n + 1,)
        ``dv * arange(-n, n + 1)`` in km/s, with a centre at 0.
    """
    vmax, dv = float(vmax), float(dv)
    if not (dv > 0 and vmax > 0 and np.isfinite(vmax) and np.isfinite(dv)):
        raise KinjaxError(f"velocity_grid needs vmax > 0 and dv > 0 (got {vmax}, {dv})")
    n = int(np.ceil(vmax / dv * (1 - 1e-9)))
    return dv * np.arange(-n, n + 1, dtype=float)


def losvd_on_grid(losvd: LOSVD, vmax, dv):
    """Tabulate a LOSVD for plots and results.

    Parameters
    ----------
    losvd : LOSVD
    vmax, dv : float
        Half-width and step of the grid (km/s), see :func:`velocity_grid`.

    Returns
    -------
    velocity : jax.Array, shape (n,)
        km/s.
    pdf : jax.Array, shape (n,)
        Density in 1/(km/s).
    """
    velocity = jnp.asarray(velocity_grid(vmax, dv))
    return velocity, losvd.pdf(velocity)
