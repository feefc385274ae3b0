"""`kinjax fit-cube` on a tiny mock cube written in the MUSE layout: maps, truth, errors."""

import json
import subprocess
import sys

import numpy as np
import pytest
from astropy.io import fits

from kinjax.cli import main


@pytest.fixture(scope="module")
def mock_file(tmp_path_factory):
    from kinjax.mock import make_mock_cube, rotating_disc_with_bulge

    path = tmp_path_factory.mktemp("cube") / "mock.fits"
    make_mock_cube(rotating_disc_with_bulge(snr=60, shape=(3, 3))).write(path)
    return path


def _truth(path):
    return fits.getdata(str(path).replace(".fits", "_truth.fits"), "MEAN_V")


@pytest.mark.parametrize("method", ["map", "nuts"])
def test_fit_cube_spaxels_recovers_mean_velocity(mock_file, tmp_path, capsys, method):
    out = tmp_path / "maps.fits"
    assert main(["fit-cube", str(mock_file), "--fwhm", "2.65", "--spatial", "none", "--method", method,
                 "--out", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["n_fitted"] == 9
    with fits.open(out) as h:
        names = [x.name for x in h]
        for ext in ["V", "V_ERR", "SIGMA", "SIGMA_ERR", "H3", "H3_ERR", "H4", "H4_ERR", "MEAN_V", "DISPERSION", "LOSVD"]:
            assert ext in names
        mean_v, err = h["MEAN_V"].data, h["MEAN_V_ERR"].data
        assert mean_v.shape == (3, 3) and h["LOSVD"].data.shape[1:] == (3, 3)
        assert h["LOSVD"].header["CUNIT3"].strip().lower() == "km/s"
    pull = (mean_v - _truth(mock_file)) / err
    assert np.all(np.isfinite(pull)) and np.all(np.abs(pull) < 5), pull


def test_fit_cube_rebinned_lsf(mock_file, tmp_path, capsys):
    """By default the cube's LSF after log-rebinning includes the 1.25 Å pixel's boxcar
    (FWHM 2.65 -> 2.784 Å, in the header); ``--nominal-fwhm`` keeps 2.65 Å, and on the same
    spectra every dispersion comes out higher with it."""
    disp = {}
    for flag in ([], ["--nominal-fwhm"]):
        out = tmp_path / f"maps{len(flag)}.fits"
        assert main(["fit-cube", str(mock_file), "--fwhm", "2.65", "--spatial", "none", *flag, "--out", str(out)]) == 0
        with fits.open(out) as h:
            disp[bool(flag)] = h["DISPERSION"].data
            fwhm = h[0].header["FWHM"]
        assert fwhm == pytest.approx(2.65 if flag else np.sqrt(2.65**2 + 8 * np.log(2) * 1.25**2 / 12), rel=1e-6)
    assert np.all(disp[True] > disp[False]), disp


def test_fit_cube_refuses_bad_combination(mock_file, tmp_path):
    out = tmp_path / "maps.fits"
    proc = subprocess.run([sys.executable, "-m", "kinjax", "fit-cube", str(mock_file), "--fwhm", "2.65",
                           "--spatial", "none", "--method", "svi", "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "svi" in proc.stderr
    assert not out.exists()


@pytest.mark.parametrize("flag", [["--v-mean", "rotation"], ["--kernel", "matern12"]])
def test_fit_cube_gp_options_need_gp(mock_file, tmp_path, capsys, flag):
    out = tmp_path / "maps.fits"
    assert main(["fit-cube", str(mock_file), "--fwhm", "2.65", *flag, "--out", str(out)]) == 2
    assert "--spatial gp" in capsys.readouterr().err
    assert not out.exists()


def test_fit_cube_everything_below_snr_min(mock_file, tmp_path, capsys):
    out = tmp_path / "maps.fits"
    assert main(["fit-cube", str(mock_file), "--fwhm", "2.65", "--snr-min", "1e6", "--out", str(out)]) == 2
    assert "S/N" in capsys.readouterr().err
    assert not out.exists()


def test_fit_cube_two_gaussians_writes_component_maps(tmp_path, capsys):
    """``--losvd gauss2`` on counter-rotating discs: component maps, labels aligned, mean recovered."""
    from kinjax.mock import counter_rotating_discs, make_mock_cube

    path = tmp_path / "cr.fits"
    make_mock_cube(counter_rotating_discs(snr=80, shape=(3, 3), seed=3)).write(path)
    out = tmp_path / "maps.fits"
    assert main(["fit-cube", str(path), "--fwhm", "2.65", "--losvd", "gauss2", "--spatial", "none",
                 "--out", str(out)]) == 0
    with fits.open(out) as h:
        names = [x.name for x in h]
        for ext in ["V1", "V1_ERR", "SIGMA1", "V2", "SIGMA2", "F1", "MEAN_V", "DISPERSION", "LOSVD"]:
            assert ext in names
        mean_v, err, f1 = h["MEAN_V"].data, h["MEAN_V_ERR"].data, h["F1"].data
    assert np.all((f1 >= 0) & (f1 <= 1))
    pull = (mean_v - _truth(path)) / err
    assert np.all(np.isfinite(pull)) and np.all(np.abs(pull) < 5), pull


def test_fit_cube_wave_range(mock_file, tmp_path, capsys):
    """``--wave-range`` fits only that part of the cube (recorded in the header) and still recovers V."""
    out = tmp_path / "maps.fits"
    assert main(["fit-cube", str(mock_file), "--fwhm", "2.65", "--wave-range", "4950", "5300",
                 "--out", str(out)]) == 0
    with fits.open(out) as h:
        lo, hi = h[0].header["WAVEMIN"], h[0].header["WAVEMAX"]
        mean_v, err = h["MEAN_V"].data, h["MEAN_V_ERR"].data
    assert 4948 < lo < 4953 and 5297 < hi < 5301, (lo, hi)  # log-rebinned centres; the mock covers 4800-5400 Å
    pull = (mean_v - _truth(mock_file)) / err
    assert np.all(np.isfinite(pull)) and np.all(np.abs(pull) < 5), pull
    # a range outside the data: one clear line, nothing written
    bad = tmp_path / "bad.fits"
    assert main(["fit-cube", str(mock_file), "--fwhm", "2.65", "--wave-range", "6000", "7000",
                 "--out", str(bad)]) == 2
    err_text = capsys.readouterr().err
    assert "4800" in err_text and "pixels in 6000-7000" in err_text, err_text
    assert not bad.exists()
