"""Physical constants and fixed conventions (see the book's Conventions page)."""

__all__ = ["C_KMS"]

#: Speed of light in km/s. Velocities are V = C_KMS * ln(1 + z).
C_KMS = 299792.458
