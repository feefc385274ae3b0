"""Example data shipped inside the installed ``ppxf`` package (not copied here).

pPXF's licence forbids redistributing its files, so kinjax only locates them in
the user's installation (``pip install ppxf==8.2.6``). Nothing here imports
pPXF's code: the package directory is found with ``importlib.util.find_spec``.
"""

from __future__ import annotations

import importlib.util
from dataclasses import replace
from pathlib import Path

import numpy as np

from kinjax.errors import KinjaxError

__all__ = ["ppxf_data_directory", "emiles_directory", "ngc4550"]

#: pPXF's SAURON example: constant 1σ noise relative to the median-normalised flux.
NGC4550_NOISE = 0.0047
#: SAURON instrumental FWHM in Å.
SAURON_FWHM = 4.2


def ppxf_data_directory() -> Path:
    """Directory of the installed ``ppxf`` package (holds ``spectra/``, ``miles_models/``).

    Raises
    ------
    KinjaxError
        If ppxf is not installed.
    """
    spec = importlib.util.find_spec("ppxf")
    if spec is None or not spec.submodule_search_locations:
        raise KinjaxError(
            "the ppxf package is not installed; run `pip install ppxf==8.2.6` for the "
            "example data and E-MILES templates"
        )
    return Path(list(spec.submodule_search_locations)[0])


def emiles_directory() -> Path:
    """Directory with the 150 E-MILES SSP FITS files shipped in ppxf 8.2.6.

    Raises
    ------
    KinjaxError
        If ppxf is missing or is a version (≥ 9) that no longer ships the templates.
    """
    path = ppxf_data_directory() / "miles_models"
    if not any(path.glob("Eun1.30Z*T*_iPp0.00_baseFe_linear_FWHM_variable.fits")):
        raise KinjaxError(
            f"no E-MILES templates in {path}; ppxf >= 9 no longer ships them: run "
            "`pip install ppxf==8.2.6` or pass directory= to load_emiles"
        )
    return path


def ngc4550(normalise=True):
    """The SAURON spectrum of NGC 4550 used in pPXF's kinematics example.

    Parameters
    ----------
    normalise : bool
        Divide flux (and noise) by the median flux.

    Returns
    -------
    Spectrum
        415 pixels, linear λ from 4824.6 Å in steps of 1.1 Å (observed frame),
        constant noise 0.0047 × median flux, FWHM 4.2 Å, ``redshift=0``,
        ``name="NGC4550"``. The galaxy's velocity is about 436 km/s (z ≈ 0.0015).
    """
    from kinjax.spectrum import read_spectrum

    path = ppxf_data_directory() / "spectra" / "NGC4550_SAURON.fits"
    if not path.exists():
        raise KinjaxError(f"{path} is missing; reinstall with `pip install ppxf==8.2.6`")
    raw = read_spectrum(path, noise=1.0, fwhm=SAURON_FWHM, name="NGC4550")
    scale = float(np.median(raw.flux))
    flux = raw.flux / scale if normalise else raw.flux
    noise = NGC4550_NOISE if normalise else NGC4550_NOISE * scale
    return replace(raw, flux=flux, noise=noise)
