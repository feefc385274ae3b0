"""kinjax: stellar kinematics of galaxy spectra and IFU cubes with JAX."""

from kinjax.constants import C_KMS
from kinjax.errors import KinjaxError

__version__ = "0.1.0"

__all__ = ["C_KMS", "KinjaxError", "__version__"]
