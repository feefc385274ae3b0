"""A rotation-curve mean function for velocity maps (the 3D model's optional mean for V).

A thin, inclined disc with an arctan rotation curve (Courteau 1997):

    V(x, y) = v_sys + v_amp · (2/π) arctan(R / r_t) · cos φ

where, for a disc centred at (x0, y0) whose receding major axis makes the angle ``pa``
(radians, counter-clockwise from the cube's +x axis) and whose minor-to-major axis ratio
is ``q = cos i``,

    x' = (x − x0) cos pa + (y − y0) sin pa          (along the major axis)
    y' = [−(x − x0) sin pa + (y − y0) cos pa] / q   (along the minor axis, deprojected)
    R = sqrt(x'² + y'²),  cos φ = x' / R.

``v_amp`` is the projected amplitude (v_c sin i): the inclination enters only through
the deprojected radius, which is all a velocity map constrains well. Positions in
arcsec, velocities in km/s. NumPy and SciPy only (it is fitted once, to spaxel
estimates, before the GP fit).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from scipy.special import expit

from kinjax.errors import KinjaxError

__all__ = ["RotationCurve", "RotationFit", "rotation_velocity", "fit_rotation_curve"]


class RotationCurve(NamedTuple):
    """Parameters of :func:`rotation_velocity` (km/s, arcsec, radians)."""

    v_sys: float
    v_amp: float
    r_t: float
    pa: float
    q: float
    x0: float
    y0: float


def rotation_velocity(p: RotationCurve, x, y) -> np.ndarray:
    """Line-of-sight velocity (km/s) of the disc ``p`` at positions ``x``, ``y`` (arcsec)."""
    dx, dy = np.asarray(x, float) - p.x0, np.asarray(y, float) - p.y0
    c, s = np.cos(p.pa), np.sin(p.pa)
    xp = dx * c + dy * s
    yp = (-dx * s + dy * c) / p.q
    r = np.hypot(xp, yp)
    cos_phi = np.divide(xp, r, out=np.zeros_like(r), where=r > 0)
    return p.v_sys + p.v_amp * (2 / np.pi) * np.arctan(r / p.r_t) * cos_phi


class RotationFit(NamedTuple):
    """A fitted :class:`RotationCurve` with the uncertainty of its parameters.

    ``u`` (7,) are the internal parameters the fit moves (v_sys, ln v_amp, ln r_t/scale,
    pa, logit of q, x0, y0) and ``cov`` (7, 7) their Gauss–Newton covariance from the
    data errors (pseudo-inverse: directions the data do not constrain get none).
    """

    curve: RotationCurve
    u: np.ndarray
    cov: np.ndarray
    scale: float

    def velocity(self, x, y) -> np.ndarray:
        """The fitted mean function at ``x``, ``y`` (arcsec), km/s."""
        return rotation_velocity(self.curve, x, y)

    def basis(self, x, y) -> np.ndarray:
        """(n, 7) matrix ``B`` with ``B Bᵀ`` the covariance of the mean function at the
        positions (first-order propagation of ``cov``), km/s."""
        jac = _jacobian(lambda u: rotation_velocity(_unpack(u, self.scale), x, y), self.u)
        evals, evecs = np.linalg.eigh(0.5 * (self.cov + self.cov.T))
        return jac @ (evecs * np.sqrt(np.clip(evals, 0.0, None)))


def _jacobian(f, u, h=1e-6):
    cols = []
    for i in range(u.size):
        d = np.zeros(u.size)
        d[i] = h * max(1.0, abs(u[i]))
        cols.append((f(u + d) - f(u - d)) / (2 * d[i]))
    return np.stack(cols, axis=-1)


def _unpack(u, scale):
    v_sys, log_amp, log_rt, pa, logit_q, x0, y0 = u
    q = 0.1 + 0.9 * expit(logit_q)  # 0.1 ≤ q ≤ 1 (inclinations up to 84°); expit: no overflow
    return RotationCurve(v_sys, np.exp(log_amp), scale * np.exp(log_rt), pa, q, x0, y0)


def fit_rotation_curve(x, y, v, err) -> RotationFit:
    """Weighted, outlier-robust least-squares fit of :func:`rotation_velocity` to a map.

    Parameters
    ----------
    x, y : ndarray, shape (n,)
        Positions (arcsec).
    v : ndarray, shape (n,)
        Velocities (km/s); non-finite entries are ignored.
    err : ndarray, shape (n,)
        Their 1σ errors (km/s).

    Returns
    -------
    RotationFit
        The best curve over starts at four position angles (soft-L1 loss on the
        normalised residuals, so a few catastrophic spaxels do not steer it) and the
        covariance of its parameters. The centre is free but kept within the field.
    """
    from scipy.optimize import least_squares

    x, y, v, err = (np.asarray(a, float).ravel() for a in (x, y, v, err))
    ok = np.isfinite(x) & np.isfinite(y) & np.isfinite(v) & np.isfinite(err) & (err > 0)
    if ok.sum() < 8:
        raise KinjaxError(f"a rotation curve needs at least 8 spaxels with finite velocities (got {ok.sum()})")
    x, y, v, err = x[ok], y[ok], v[ok], err[ok]
    extent = max(np.ptp(x), np.ptp(y), 1e-3)
    lo = [-np.inf, -np.inf, -np.inf, -np.inf, -np.inf, x.min(), y.min()]
    hi = [np.inf, np.inf, np.inf, np.inf, np.inf, x.max(), y.max()]
    scale = extent / 4
    v_sys0 = float(np.median(v))
    amp0 = max(float(np.percentile(np.abs(v - v_sys0), 90)), 1.0)
    cx, cy = float(np.clip(0.0, x.min(), x.max())), float(np.clip(0.0, y.min(), y.max()))

    def resid(u):
        return (rotation_velocity(_unpack(u, scale), x, y) - v) / err

    best = None
    for pa0 in np.deg2rad([0.0, 90.0, 180.0, 270.0]):
        u0 = [v_sys0, np.log(amp0), 0.0, pa0, 0.0, cx, cy]
        sol = least_squares(resid, u0, bounds=(lo, hi), loss="soft_l1", f_scale=2.0, x_scale="jac")
        if best is None or sol.cost < best.cost:
            best = sol
    p = _unpack(best.x, scale)
    jac = _jacobian(resid, best.x)
    cov = np.linalg.pinv(jac.T @ jac, hermitian=True)
    return RotationFit(p._replace(pa=float(np.mod(p.pa, 2 * np.pi))), best.x, cov, scale)
