"""Tests for the `kinjax info` command (kinjax.cli)."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from kinjax.cli import main

N_WAVE, N_Y, N_X = 120, 5, 6
REPO = Path(__file__).resolve().parents[1]  # `python -m kinjax` works from here uninstalled


def write_muse(path):
    """A MUSE-like cube: CRVAL3 = 4750 Å at CRPIX3 = 2, CD3_3 = 1.25 Å, one NaN spaxel."""
    wave = 4750.0 + (np.arange(N_WAVE) + 1 - 2.0) * 1.25
    data = np.ones((N_WAVE, N_Y, N_X)) * (1.0 + 0.1 * np.arange(N_X))
    data[:, 0, 0] = np.nan
    stat = np.full(data.shape, 0.01)
    hdr = fits.Header(dict(CRVAL3=4750.0, CD3_3=1.25, CRPIX3=2.0, CTYPE3="AWAV", CUNIT3="Angstrom"))
    fits.HDUList([fits.PrimaryHDU(),
                  fits.ImageHDU(data.astype(np.float32), header=hdr, name="DATA"),
                  fits.ImageHDU(stat.astype(np.float32), header=hdr, name="STAT")]).writeto(path)
    return wave


def run_info(capsys, *args):
    code = main(["info", *map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err


def test_info_muse_cube(tmp_path, capsys):
    path = tmp_path / "muse.fits"
    wave = write_muse(path)
    code, out, err = run_info(capsys, path)
    assert code == 0 and err == ""
    info = json.loads(out)
    assert info["kind"] == "cube" and info["format"] == "muse"
    assert info["shape"] == [N_WAVE, N_Y, N_X]
    assert info["wave_min"] == pytest.approx(wave[0]) == pytest.approx(4748.75)
    assert info["wave_max"] == pytest.approx(wave[-1])
    assert info["n_spaxels"] == N_Y * N_X and info["n_valid_spaxels"] == N_Y * N_X - 1
    assert info["fwhm"] is None and info["velscale"] is None
    # S/N per spaxel = (1 + 0.1 ix) / 0.1; median over the 29 valid spaxels
    sn = np.repeat((1.0 + 0.1 * np.arange(N_X)) / 0.1, N_Y)[1:]
    assert info["median_snr"] == pytest.approx(np.median(sn), rel=1e-5)
    code, out, _ = run_info(capsys, path, "--fwhm", "2.65")
    assert json.loads(out)["fwhm"] == 2.65


def test_info_e3d_shape(tmp_path, capsys):
    path = tmp_path / "e3d.fits"
    cols = [fits.Column(name="DATA_SPE", format="50E", array=np.ones((4, 50))),
            fits.Column(name="STAT_SPE", format="50E", array=np.full((4, 50), 0.04)),
            fits.Column(name="XPOS", format="E", array=np.arange(4.0)),
            fits.Column(name="YPOS", format="E", array=np.zeros(4))]
    table = fits.BinTableHDU.from_columns(cols)
    table.header.update(CRVALS=4800.0, CDELTS=1.1)
    fits.HDUList([fits.PrimaryHDU(), table]).writeto(path)
    code, out, _ = run_info(capsys, path)
    info = json.loads(out)
    assert code == 0 and info["format"] == "atlas3d" and info["shape"] == [50, 4]
    assert info["wave_max"] == pytest.approx(4800.0 + 49 * 1.1)
    assert info["fwhm"] == 4.2 and info["median_snr"] == pytest.approx(5.0)


def test_info_1d_spectrum_file(tmp_path, capsys):
    path = tmp_path / "spec.fits"
    fits.PrimaryHDU(np.ones(80), header=fits.Header(dict(CRVAL1=5000.0, CDELT1=2.0))).writeto(path)
    code, out, err = run_info(capsys, path)
    info = json.loads(out)
    assert code == 0 and info["kind"] == "spectrum" and info["n_wave"] == 80
    assert info["wave_max"] == pytest.approx(5158.0)
    assert info["fwhm"] is None and info["median_snr"] is None  # the file has neither


def test_info_ngc4550(capsys):
    code, out, _ = run_info(capsys, "ngc4550")
    info = json.loads(out)
    assert code == 0 and info["kind"] == "spectrum" and info["n_wave"] == 415
    assert info["wave_min"] == pytest.approx(4824.6)
    assert info["wave_max"] == pytest.approx(4824.6 + 414 * 1.1)
    assert info["fwhm"] == pytest.approx(4.2)


def test_info_emiles(capsys):
    code, out, _ = run_info(capsys, "emiles")
    info = json.loads(out)
    assert code == 0 and info["kind"] == "templates" and info["n_templates"] == 150
    assert len(info["ages"]) == 25 and len(info["metallicities"]) == 6
    assert info["metallicities"] == [-1.71, -1.31, -0.71, -0.4, 0.0, 0.22]
    assert info["wave_min"] == pytest.approx(1680.2) and info["fwhm"] == pytest.approx(2.51)
    assert info["fwhm_max"] == pytest.approx(23.57, abs=0.01)  # sigma = 60 km/s at 50000 Å


def test_info_bare_image_is_a_one_line_error(tmp_path, capsys):
    path = tmp_path / "image.fits"
    fits.PrimaryHDU(np.ones((3, 3))).writeto(path)
    code, out, err = run_info(capsys, path)
    assert code == 2 and out == ""
    assert err.startswith("kinjax: error: ") and err.count("\n") == 1
    assert "unrecognised FITS layout" in err and "image.fits" in err


def test_info_missing_and_corrupt_files(tmp_path, capsys):
    code, _, err = run_info(capsys, tmp_path / "nope.fits")
    assert code == 2 and "nope.fits: no such file" in err and err.count("\n") == 1
    junk = tmp_path / "junk.fits"
    junk.write_text("not a FITS file\n")
    code, _, err = run_info(capsys, junk)
    assert code == 2 and err.startswith("kinjax: error: ") and err.count("\n") == 1


def test_python_m_kinjax_exit_codes(tmp_path):
    good = tmp_path / "muse.fits"
    write_muse(good)
    bad = tmp_path / "image.fits"
    fits.PrimaryHDU(np.ones((3, 3))).writeto(bad)
    run = lambda *a: subprocess.run([sys.executable, "-m", "kinjax", *a], capture_output=True,  # noqa: E731
                                    text=True, timeout=120, cwd=REPO)
    ok = run("info", str(good))
    assert ok.returncode == 0 and json.loads(ok.stdout)["shape"] == [N_WAVE, N_Y, N_X]
    for args in (("info", str(bad)), ("info", str(tmp_path / "missing.fits"))):
        res = run(*args)
        assert res.returncode == 2 and "Traceback" not in res.stderr
        assert res.stderr.startswith("kinjax: error: ") and res.stdout == ""
