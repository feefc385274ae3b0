"""The result of a single-spectrum fit, and its storage as arviz InferenceData (netCDF)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields

import numpy as np

__all__ = ["FitResult"]


@dataclass(frozen=True)
class FitResult:
    """Kinematics of one spectrum.

    Attributes
    ----------
    method : "map" or "nuts"
    family : "gh", "se" or "hist"
    names : names of the LOSVD parameters (then ``mult1..`` for multiplicative terms)
    best : (n_params,) MAP values ("map") or posterior medians ("nuts")
    samples : (n_chains, n_draws, n_params) posterior draws ("nuts") or draws from the
        Laplace approximation ("map", one chain)
    mean_v, dispersion : (n_chains, n_draws) first moment and square root of the
        second central moment of the LOSVD of each draw (km/s)
    mean_v_best, dispersion_best : those of the best LOSVD (km/s)
    velocity : (n_v,) km/s; losvd_median, losvd_lo, losvd_hi : (n_v,) the LOSVD
        (1/(km/s)) with its 16-84 % band over the draws
    wave : (n_pix,) Å; flux, noise, best_fit : (n_pix,); mask : (n_pix,) bool
    weights : (n_linear,) template weights then additive polynomial coefficients
    chi2_dof : χ² per degree of freedom at ``best``; dof : degrees of freedom
    seconds : wall-clock time of the fit (s, after preparation)
    diagnostics : dict (NUTS: ``r_hat``, ``ess_bulk``, ``divergences``, ``num_samples`` per chain of which
        ``extra_samples`` were added for ``min_ess``; MAP: ``n_iter``)
    """

    method: str
    family: str
    names: tuple
    best: np.ndarray
    samples: np.ndarray
    mean_v: np.ndarray
    dispersion: np.ndarray
    mean_v_best: float
    dispersion_best: float
    velocity: np.ndarray
    losvd_median: np.ndarray
    losvd_lo: np.ndarray
    losvd_hi: np.ndarray
    wave: np.ndarray
    flux: np.ndarray
    noise: np.ndarray
    mask: np.ndarray
    best_fit: np.ndarray
    weights: np.ndarray
    chi2_dof: float
    dof: int
    seconds: float
    diagnostics: dict = field(default_factory=dict)

    # ------------------------------------------------------------ summaries
    @property
    def error(self) -> np.ndarray:
        """1σ errors (n_params,): Laplace for MAP, half the 16-84 % width for NUTS."""
        if self.method == "map":
            return np.std(self.samples.reshape(-1, len(self.names)), axis=0)
        lo, hi = np.percentile(self.samples.reshape(-1, len(self.names)), [15.865, 84.135], axis=0)
        return 0.5 * (hi - lo)

    def interval(self, q=(15.865, 84.135)) -> np.ndarray:
        """(2, n_params) percentiles of the draws."""
        return np.percentile(self.samples.reshape(-1, len(self.names)), q, axis=0)

    def _moment_error(self, draws):
        # a Gauss-Hermite draw with strong negative wings can have a negative second
        # moment (dispersion NaN): such draws are left out of the spread
        d = np.asarray(draws).ravel()
        d = d[np.isfinite(d)]
        if d.size < 2:
            return float("nan")
        if self.method == "map":
            return float(np.std(d))
        lo, hi = np.percentile(d, [15.865, 84.135])
        return float(0.5 * (hi - lo))

    def summary(self) -> dict:
        """The JSON-ready summary (``kinjax fit --out``)."""
        out = {"method": self.method, "losvd_family": self.family}
        err = self.error
        for name, value, e in zip(self.names, self.best, err):
            out[name] = float(value)
            out[f"{name}_err"] = float(e)
        mean_v = self.mean_v_best if self.method == "map" else float(np.median(self.mean_v))
        disp = self.dispersion_best if self.method == "map" else float(np.nanmedian(self.dispersion))
        out.update(
            mean_v=float(mean_v),
            mean_v_err=self._moment_error(self.mean_v),
            dispersion=float(disp),
            dispersion_err=self._moment_error(self.dispersion),
            chi2_dof=float(self.chi2_dof),
            dof=int(self.dof),
            seconds=float(self.seconds),
            diagnostics=_jsonable(self.diagnostics),
            losvd={
                "velocity": self.velocity.tolist(),
                "median": self.losvd_median.tolist(),
                "lo": self.losvd_lo.tolist(),
                "hi": self.losvd_hi.tolist(),
            },
        )
        return out

    # -------------------------------------------------------------- storage
    def to_inference_data(self):
        """arviz InferenceData: posterior draws, observed spectrum, fit products."""
        import arviz as az
        import xarray as xr

        n_chain, n_draw, _ = self.samples.shape
        post = {name: (("chain", "draw"), self.samples[..., i]) for i, name in enumerate(self.names)}
        post["mean_v"] = (("chain", "draw"), self.mean_v)
        post["dispersion"] = (("chain", "draw"), self.dispersion)
        posterior = xr.Dataset(post, coords={"chain": np.arange(n_chain), "draw": np.arange(n_draw)})
        observed = xr.Dataset({"flux": (("pixel",), self.flux)})
        constant = xr.Dataset(
            {
                "wave": (("pixel",), self.wave),
                "noise": (("pixel",), self.noise),
                "mask": (("pixel",), self.mask.astype(np.int8)),
                "best_fit": (("pixel",), self.best_fit),
                "velocity": (("velocity_bin",), self.velocity),
                "losvd_median": (("velocity_bin",), self.losvd_median),
                "losvd_lo": (("velocity_bin",), self.losvd_lo),
                "losvd_hi": (("velocity_bin",), self.losvd_hi),
                "weights": (("linear",), self.weights),
                "best": (("parameter",), self.best),
            },
            coords={"parameter": list(self.names)},
        )
        scalars = {
            "method": self.method,
            "family": self.family,
            "mean_v_best": float(self.mean_v_best),
            "dispersion_best": float(self.dispersion_best),
            "chi2_dof": float(self.chi2_dof),
            "dof": int(self.dof),
            "seconds": float(self.seconds),
            "diagnostics": json.dumps(_jsonable(self.diagnostics)),
        }
        return az.InferenceData(
            posterior=posterior.assign_attrs(scalars),
            observed_data=observed,
            constant_data=constant,
        )

    def save(self, path) -> None:
        """Write to a netCDF file (arviz InferenceData layout)."""
        self.to_inference_data().to_netcdf(str(path))

    @classmethod
    def load(cls, path) -> "FitResult":
        """Read a result written by :meth:`save`."""
        import arviz as az

        idata = az.from_netcdf(str(path))
        post, const = idata.posterior, idata.constant_data
        names = tuple(str(n) for n in const["parameter"].values)
        attrs = post.attrs
        samples = np.stack([post[n].values for n in names], axis=-1)
        return cls(
            method=str(attrs["method"]),
            family=str(attrs["family"]),
            names=names,
            best=const["best"].values,
            samples=samples,
            mean_v=post["mean_v"].values,
            dispersion=post["dispersion"].values,
            mean_v_best=float(attrs["mean_v_best"]),
            dispersion_best=float(attrs["dispersion_best"]),
            velocity=const["velocity"].values,
            losvd_median=const["losvd_median"].values,
            losvd_lo=const["losvd_lo"].values,
            losvd_hi=const["losvd_hi"].values,
            wave=const["wave"].values,
            flux=idata.observed_data["flux"].values,
            noise=const["noise"].values,
            mask=const["mask"].values.astype(bool),
            best_fit=const["best_fit"].values,
            weights=const["weights"].values,
            chi2_dof=float(attrs["chi2_dof"]),
            dof=int(attrs["dof"]),
            seconds=float(attrs["seconds"]),
            diagnostics=json.loads(attrs["diagnostics"]),
        )

    def equals(self, other: "FitResult") -> bool:
        """True when every field is identical (used to check storage round trips)."""
        for f in fields(self):
            a, b = getattr(self, f.name), getattr(other, f.name)
            if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
                if not np.array_equal(np.asarray(a), np.asarray(b)):
                    return False
            elif a != b:
                return False
        return True


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [_jsonable(v) for v in np.asarray(value).tolist()] if np.ndim(value) else _jsonable(np.asarray(value).item())
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if np.isfinite(value) else None
    return value
