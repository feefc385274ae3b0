"""Tests for kinjax.datasets (data found inside the installed ppxf package)."""

import importlib.util

import numpy as np
import pytest

from kinjax import datasets
from kinjax.errors import KinjaxError

pytest.importorskip("ppxf")


def test_ngc4550():
    s = datasets.ngc4550()
    assert s.n_pix == 415 and s.name == "NGC4550" and not s.is_log
    np.testing.assert_allclose(s.wave[[0, -1]], [4824.6, 4824.6 + 414 * 1.1])
    assert np.median(s.flux) == pytest.approx(1.0, abs=1e-12)
    assert np.all(s.noise == 0.0047) and s.fwhm == 4.2 and s.redshift == 0.0
    raw = datasets.ngc4550(normalise=False)
    scale = np.median(raw.flux)
    np.testing.assert_allclose(raw.flux / scale, s.flux, rtol=1e-12)
    np.testing.assert_allclose(raw.noise, 0.0047 * scale, rtol=1e-12)
    # the same numbers as in the FITS file
    from astropy.io import fits

    with fits.open(datasets.ppxf_data_directory() / "spectra" / "NGC4550_SAURON.fits") as h:
        np.testing.assert_allclose(raw.flux, h[0].data.astype(float), rtol=1e-7)


def test_directories():
    d = datasets.emiles_directory()
    assert len(list(d.glob("Eun1.30Z*.fits"))) == 150


def test_missing_ppxf(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "ppxf" else real(name, *a))
    with pytest.raises(KinjaxError, match="pip install ppxf==8.2.6"):
        datasets.ppxf_data_directory()
    with pytest.raises(KinjaxError):
        datasets.ngc4550()
