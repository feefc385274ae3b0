"""Mixture of LOSVDs, e.g. two Gaussians for two counter-rotating discs.

pdf(v) = Σ_i f_i pdf_i(v), ft(ω) = Σ_i f_i ft_i(ω).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from kinjax.errors import KinjaxError
from kinjax.losvd.base import LOSVD, _concrete

__all__ = ["Mixture"]


class Mixture(LOSVD):
    """Weighted sum of LOSVD components.

    Parameters
    ----------
    components : tuple of LOSVD
        The components (length n_comp ≥ 1).
    fractions : array_like, shape (n_comp,)
        Non-negative fractions; divided by their sum (checked when concrete).
    """

    components: tuple
    fractions: jax.Array

    def __init__(self, components, fractions):
        components = tuple(components)
        if not components or not all(isinstance(c, LOSVD) for c in components):
            raise KinjaxError("Mixture components must be a non-empty sequence of LOSVD instances")
        fractions = jnp.asarray(fractions)
        if fractions.shape != (len(components),):
            raise KinjaxError(f"Mixture needs one fraction per component (got {fractions.shape} for {len(components)})")
        f = _concrete(fractions)
        if f is not None and not (np.all(f >= 0) and np.sum(f) > 0 and np.all(np.isfinite(f))):
            raise KinjaxError(f"Mixture fractions must be finite, non-negative and not all zero (got {f})")
        self.components = components
        self.fractions = fractions / jnp.sum(fractions)

    def pdf(self, v):
        return sum(f * c.pdf(v) for f, c in zip(self.fractions, self.components))

    def ft(self, omega):
        return sum(f * c.ft(omega) for f, c in zip(self.fractions, self.components))

    @property
    def mean(self):
        return sum(f * c.mean for f, c in zip(self.fractions, self.components))

    @property
    def dispersion(self):
        """sqrt(Σ f_i (σ_i² + μ_i²) − μ²) from the components' own moments (exact)."""
        second = sum(f * (c.dispersion**2 + c.mean**2) for f, c in zip(self.fractions, self.components))
        return jnp.sqrt(jnp.clip(second - self.mean**2, 0.0, None))

    def to_vector(self):
        """Component vectors one after the other, then the n_comp fractions."""
        return jnp.concatenate([c.to_vector() for c in self.components] + [self.fractions])

    @staticmethod
    def _sizes(families, statics):
        statics = statics or [{}] * len(families)
        return statics, [len(fam.parameter_names(**st)) for fam, st in zip(families, statics)]

    @classmethod
    def from_vector(cls, theta, families, statics=None):
        """Inverse of :meth:`to_vector`.

        Parameters
        ----------
        theta : array, shape (Σ n_params_i + n_comp,)
        families : tuple of LOSVD subclasses, one per component.
        statics : sequence of dict, optional
            Static keyword arguments of each family's ``from_vector`` (e.g.
            ``{"kernel": "laplace"}``); also used for its ``parameter_names``.
        """
        statics, sizes = cls._sizes(families, statics)
        comps, start = [], 0
        for fam, st, n in zip(families, statics, sizes):
            comps.append(fam.from_vector(theta[start : start + n], **st))
            start += n
        return cls(comps, theta[start : start + len(families)])

    @classmethod
    def parameter_names(cls, families, statics=None):
        """``"c{i}.{name}"`` for component i's parameters, then ``"f{i}"``."""
        statics, _ = cls._sizes(families, statics)
        names = [f"c{i}.{n}" for i, (fam, st) in enumerate(zip(families, statics)) for n in fam.parameter_names(**st)]
        return tuple(names) + tuple(f"f{i}" for i in range(len(families)))

    @classmethod
    def default_bounds(cls, families, statics=None):
        """The components' own bounds, then [0, 1] for each fraction."""
        statics, _ = cls._sizes(families, statics)
        bounds = [fam.default_bounds(**st) for fam, st in zip(families, statics)]
        lower = np.concatenate([b[0] for b in bounds] + [np.zeros(len(families))])
        upper = np.concatenate([b[1] for b in bounds] + [np.ones(len(families))])
        return lower, upper
