"""kinjax: stellar kinematics of galaxy spectra and IFU cubes with JAX.

The public API is listed in ``__all__``; submodules are imported lazily on first use,
so ``import kinjax`` is fast and changes no JAX configuration.
"""

from __future__ import annotations

import importlib

from kinjax.constants import C_KMS
from kinjax.errors import KinjaxError

__version__ = "0.1.0"

# public name -> submodule that defines it
_LAZY = {
    # data
    "log_rebin": "kinjax.rebin",
    "Spectrum": "kinjax.spectrum",
    "read_spectrum": "kinjax.spectrum",
    "emission_line_mask": "kinjax.spectrum",
    "Templates": "kinjax.templates",
    "load_emiles": "kinjax.templates",
    "load_templates": "kinjax.templates",
    "prepare_templates": "kinjax.templates",
    "pca_templates": "kinjax.templates",
    "ngc4550": "kinjax.datasets",
    "Cube": "kinjax.cube",
    "read_cube": "kinjax.cube",
    # LOSVDs and the forward model
    "GaussHermite": "kinjax.losvd",
    "Gaussian": "kinjax.losvd",
    "SandersEvans": "kinjax.losvd",
    "Histogram": "kinjax.losvd",
    "Mixture": "kinjax.losvd",
    "ForwardModel": "kinjax.forward",
    "make_forward_model": "kinjax.forward",
    "losvd_spec": "kinjax.family",
    # fitting
    "setup_fit": "kinjax.fit",
    "fit_spectrum": "kinjax.fit",
    "FitResult": "kinjax.result",
    "fit_cube_spaxels": "kinjax.cube_fit",
    "fit_cube_gp": "kinjax.cube_model",
    "CubeFit": "kinjax.cube_fit",
    "spectra_mesh": "kinjax.sharding",
    # mocks
    "make_mock_cube": "kinjax.mock",
    "MockGalaxy": "kinjax.mock",
    "MockCube": "kinjax.mock",
    "Disc": "kinjax.mock",
    "Bulge": "kinjax.mock",
    "read_mock_truth": "kinjax.mock",
    "rotating_disc_with_bulge": "kinjax.mock",
    "counter_rotating_discs": "kinjax.mock",
}

__all__ = ["C_KMS", "KinjaxError", "__version__", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    if name in ("losvd", "plots", "cube", "fit", "mock", "forward", "templates", "spectrum", "cube_fit", "cube_model"):
        return importlib.import_module(f"kinjax.{name}")
    raise AttributeError(f"module 'kinjax' has no attribute {name!r}")


def __dir__():
    return sorted(__all__)
