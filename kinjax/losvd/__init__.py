"""LOSVD families: each an immutable pytree with ``pdf(v)``, ``ft(omega)`` and moments.

Velocities in km/s; ω in radians per km/s; ``ft(ω) = ∫ pdf(v) exp(-iωv) dv``.
"""

from kinjax.losvd.base import LOSVD, losvd_on_grid, velocity_grid
from kinjax.losvd.gauss_hermite import Gaussian, GaussHermite, hermite_normalised
from kinjax.losvd.histogram import Histogram
from kinjax.losvd.mixture import Mixture
from kinjax.losvd.sanders_evans import SandersEvans, constrain_delta, delta_max, unconstrain_delta

__all__ = [
    "LOSVD",
    "Gaussian",
    "GaussHermite",
    "SandersEvans",
    "Histogram",
    "Mixture",
    "losvd_on_grid",
    "velocity_grid",
    "hermite_normalised",
    "delta_max",
    "constrain_delta",
    "unconstrain_delta",
]
