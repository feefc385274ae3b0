"""Sanders & Evans (2020, arXiv:2009.07858) LOSVD: a Gaussian convolved with a kernel.

v = V + σ' (z + k − μ_K), z ~ N(0, 1), k ~ K, σ' = σ / sqrt(1 + σ_K²), μ_K = σ_K δ.

K is a two-sided kernel made of two half-kernels of widths a₋ (k < 0) and a₊
(k ≥ 0), each carrying probability ½, with mean μ_K and variance σ_K². So the
LOSVD has mean exactly V and dispersion exactly σ, and is a true (non-negative)
density. Its cumulants of order n ≥ 3 are σ'^n κ_n(K). For a half-kernel family
with constants (α, β, γ)

    Δ = σ_K δ / α,  a = sqrt((σ_K² − γ Δ²)/β),  a₋ = a − Δ,  a₊ = a + Δ,

valid for abs(δ) < δ_max = α / sqrt(β + γ). Positive δ makes the positive half
wider: positive skew.

Kernels (static ``kernel`` field):

- ``"uniform"`` (α, β, γ) = (1/2, 1/3, 1/12), δ_max = 0.7746: negative excess
  kurtosis, in (−1.2, 0) at δ = 0.
- ``"laplace"`` (α, β, γ) = (1, 2, 1), δ_max = 0.5774: positive excess kurtosis,
  in (0, 3) at δ = 0.
- ``"mixture"`` (default): weight (1 − κ)/2 on the uniform kernel and (1 + κ)/2
  on the Laplace kernel, κ ∈ [−1, 1], both with the same (σ_K, δ) and thus the
  same mean and variance; κ spans negative to positive kurtosis. The mixture of
  kernels is kinjax's (and the seed prototype's) choice, not the paper's. It
  needs abs(δ) < 0.5774 unless κ = −1 exactly (pure uniform).

The paper's own code and text define only the uniform and Laplace kernels as far
as kinjax could establish; no "cosine" kernel is offered.
"""

from __future__ import annotations

from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import erfc, erfcx

from kinjax.errors import KinjaxError
from kinjax.losvd.base import LOSVD, _concrete
from kinjax.losvd.gauss_hermite import SIGMA_BOUNDS, V_BOUNDS

__all__ = ["SandersEvans", "constrain_delta", "delta_max", "unconstrain_delta"]

# Half-kernel constants (alpha, beta, gamma): mean, second moment and variance of
# the unit one-sided kernel.
_UNIFORM = (0.5, 1.0 / 3.0, 1.0 / 12.0)
_LAPLACE = (1.0, 2.0, 1.0)
_KERNELS = ("mixture", "uniform", "laplace")
_SQRT2 = float(np.sqrt(2.0))

#: Default bounds of σ_K (dimensionless, in units of σ').
SIGMA_K_BOUNDS = (0.01, 10.0)


def _delta_max_abg(abg):
    alpha, beta, gamma = abg
    return alpha / np.sqrt(beta + gamma)


def delta_max(kernel="mixture"):
    """Largest abs(δ) allowed by ``kernel``: 0.7746 (uniform), 0.5774 (laplace, mixture).

    The mixture with κ = −1 exactly is the uniform kernel and allows 0.7746; this
    function returns the bound valid for every κ.
    """
    _check_kernel(kernel)
    return float(_delta_max_abg(_UNIFORM if kernel == "uniform" else _LAPLACE))


def constrain_delta(u, kernel="mixture"):
    """δ = δ_max · tanh(u): maps an unconstrained real ``u`` into the valid range."""
    return delta_max(kernel) * jnp.tanh(u)


def unconstrain_delta(delta, kernel="mixture"):
    """Inverse of :func:`constrain_delta`: u = artanh(δ / δ_max)."""
    return jnp.arctanh(jnp.asarray(delta) / delta_max(kernel))


def _check_kernel(kernel):
    if kernel not in _KERNELS:
        raise KinjaxError(f"SandersEvans kernel must be one of {_KERNELS} (got {kernel!r})")


def _half_widths(sigma_k, delta, abg):
    """(a₋, a₊) of the kernel, dimensionless; kept > 0 so that nothing is NaN."""
    alpha, beta, gamma = abg
    big = sigma_k * delta / alpha
    a2 = (sigma_k**2 - gamma * big**2) / beta
    a = jnp.sqrt(jnp.maximum(a2, 1e-30 * sigma_k**2 + 1e-300))
    floor = 1e-7 * a
    return jnp.maximum(a - big, floor), jnp.maximum(a + big, floor)


def _gauss_interval(lo, hi):
    """P(lo < z < hi) for z ~ N(0, 1), without cancellation in either tail."""
    upper = 0.5 * (erfc(lo / _SQRT2) - erfc(hi / _SQRT2))  # both > 0
    lower = 0.5 * (erfc(-hi / _SQRT2) - erfc(-lo / _SQRT2))  # both < 0
    return jnp.where(lo > 0, upper, lower)


def _uniform_pdf(x, am, ap):
    """N(0,1) ⊗ uniform kernel at dimensionless x."""
    return _gauss_interval(x - ap, x) / (2 * ap) + _gauss_interval(x, x + am) / (2 * am)


def _exp_tail(x, a):
    """½ · N(0,1) ⊗ one-sided exponential (scale a, on k ≥ 0), stable for all x, a."""
    t = (1.0 / a - x) / _SQRT2
    t_pos = jnp.maximum(t, 0.0)
    via_erfcx = jnp.exp(-0.5 * x**2) * erfcx(t_pos) / (4 * a)
    expo = jnp.minimum(0.5 / a**2 - x / a, 0.0)
    via_exp = jnp.exp(expo) * erfc(jnp.minimum(t, 0.0)) / (4 * a)
    return jnp.where(t >= 0, via_erfcx, via_exp)


def _laplace_pdf(x, am, ap):
    """N(0,1) ⊗ Laplace kernel at dimensionless x."""
    return _exp_tail(x, ap) + _exp_tail(-x, am)


def _sinc(t):
    """sin(t)/t."""
    return jnp.sinc(t / jnp.pi)


def _uniform_ft(u, am, ap):
    return 0.5 * (jnp.exp(0.5j * u * am) * _sinc(0.5 * u * am) + jnp.exp(-0.5j * u * ap) * _sinc(0.5 * u * ap))


def _laplace_ft(u, am, ap):
    return 0.5 / (1 - 1j * am * u) + 0.5 / (1 + 1j * ap * u)


class SandersEvans(LOSVD):
    """Sanders & Evans (2020) LOSVD (see module docstring).

    Parameters
    ----------
    v : float
        Mean velocity V (km/s), exactly the mean.
    sigma : float
        Dispersion σ (km/s), > 0, exactly the standard deviation.
    sigma_k : float
        Kernel width σ_K (dimensionless, > 0): the kernel's share of the variance
        is σ_K²/(1 + σ_K²); σ_K → 0 gives a Gaussian.
    delta : float
        Skewness parameter δ, abs(δ) < δ_max (see :func:`delta_max`); δ > 0 gives
        positive skew.
    kappa : float, optional
        Kernel mixing weight κ ∈ [−1, 1] (−1 uniform … +1 Laplace) for
        ``kernel="mixture"``; ignored (stored as ∓1) for the pure kernels.
    kernel : {"mixture", "uniform", "laplace"}
        Static choice of kernel.
    """

    v: jax.Array
    sigma: jax.Array
    sigma_k: jax.Array
    delta: jax.Array
    kappa: jax.Array
    kernel: str = eqx.field(static=True)
    param_names: ClassVar[tuple[str, ...]] = ("v", "sigma", "sigma_k", "delta", "kappa")

    def __init__(self, v, sigma, sigma_k, delta, kappa=0.0, kernel="mixture"):
        _check_kernel(kernel)
        self.kernel = kernel
        self.v = jnp.asarray(v)
        self.sigma = jnp.asarray(sigma)
        self.sigma_k = jnp.asarray(sigma_k)
        self.delta = jnp.asarray(delta)
        if kernel == "mixture":
            self.kappa = jnp.asarray(kappa)
        else:
            self.kappa = jnp.asarray(-1.0 if kernel == "uniform" else 1.0, dtype=self.sigma.dtype)
        self._validate()

    def _validate(self):
        sigma, sigma_k, delta, kappa = (_concrete(x) for x in (self.sigma, self.sigma_k, self.delta, self.kappa))
        if sigma is not None and not (np.all(np.isfinite(sigma)) and np.all(sigma > 0)):
            raise KinjaxError(f"SandersEvans sigma must be finite and > 0 km/s (got {sigma})")
        if sigma_k is not None and not (np.all(np.isfinite(sigma_k)) and np.all(sigma_k > 0)):
            raise KinjaxError(f"SandersEvans sigma_k must be finite and > 0 (got {sigma_k})")
        if kappa is not None and not np.all(np.abs(kappa) <= 1):
            raise KinjaxError(f"SandersEvans kappa must lie in [-1, 1] (got {kappa})")
        if delta is not None and kappa is not None:
            dmax = np.where(kappa == -1, _delta_max_abg(_UNIFORM), _delta_max_abg(_LAPLACE))
            if not np.all(np.abs(delta) < dmax):
                raise KinjaxError(
                    f"SandersEvans |delta| must be < {float(np.min(dmax)):.4f} for kernel "
                    f"{self.kernel!r} and kappa {kappa} (got {delta}); use constrain_delta when fitting"
                )

    # ---------------------------------------------------------------- pieces
    @property
    def sigma_prime(self):
        """σ' = σ / sqrt(1 + σ_K²) (km/s), the width of the Gaussian part."""
        return self.sigma / jnp.sqrt(1 + self.sigma_k**2)

    def _weights(self):
        return 0.5 * (1 - self.kappa), 0.5 * (1 + self.kappa)

    def _kernel_pdf_ft(self, x, fn_uniform, fn_laplace):
        """Mix the uniform and Laplace pieces with the kernel's weights."""
        w_u, w_l = self._weights()
        out = 0.0
        if self.kernel in ("mixture", "uniform"):
            am, ap = _half_widths(self.sigma_k, self.delta, _UNIFORM)
            out = out + w_u * fn_uniform(x, am, ap)
        if self.kernel in ("mixture", "laplace"):
            # With κ = −1 the Laplace weight is 0 and δ may exceed its δ_max:
            # _half_widths keeps the widths finite so that 0 · piece stays 0.
            am, ap = _half_widths(self.sigma_k, self.delta, _LAPLACE)
            out = out + w_l * fn_laplace(x, am, ap)
        return out

    # ------------------------------------------------------------------ maths
    def pdf(self, v):
        sp = self.sigma_prime
        x = (jnp.asarray(v) - self.v) / sp + self.sigma_k * self.delta
        return self._kernel_pdf_ft(x, _uniform_pdf, _laplace_pdf) / sp

    def ft(self, omega):
        omega = jnp.asarray(omega)
        sp = self.sigma_prime
        u = omega * sp
        shift = jnp.exp(-1j * omega * self.v + 1j * u * self.sigma_k * self.delta - 0.5 * u**2)
        return shift * self._kernel_pdf_ft(u, _uniform_ft, _laplace_ft)

    @property
    def mean(self):
        return self.v

    @property
    def dispersion(self):
        return self.sigma

    # ---------------------------------------------------------------- vectors
    def to_vector(self):
        names = self.parameter_names(self.kernel)
        return jnp.stack([getattr(self, n) for n in names])

    @classmethod
    def from_vector(cls, theta, kernel="mixture"):
        """``theta = [V, σ, σ_K, δ(, κ)]``; κ only for ``kernel="mixture"``."""
        if kernel == "mixture":
            return cls(theta[0], theta[1], theta[2], theta[3], theta[4], kernel=kernel)
        return cls(theta[0], theta[1], theta[2], theta[3], kernel=kernel)

    @classmethod
    def parameter_names(cls, kernel="mixture"):
        _check_kernel(kernel)
        return cls.param_names if kernel == "mixture" else cls.param_names[:4]

    @classmethod
    def default_bounds(cls, kernel="mixture"):
        """V ∈ [−2000, 2000] km/s, σ ∈ [5, 1000] km/s, σ_K ∈ [0.01, 10],
        δ ∈ [−δ_max, δ_max] (open at the ends; see :func:`delta_max`), κ ∈ [−1, 1]."""
        dmax = delta_max(kernel)
        lower = [V_BOUNDS[0], SIGMA_BOUNDS[0], SIGMA_K_BOUNDS[0], -dmax, -1.0]
        upper = [V_BOUNDS[1], SIGMA_BOUNDS[1], SIGMA_K_BOUNDS[1], dmax, 1.0]
        n = len(cls.parameter_names(kernel))
        return np.array(lower[:n]), np.array(upper[:n])
