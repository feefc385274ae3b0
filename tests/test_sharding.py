"""Splitting batches of spectra over devices: the same fits, each device its own block.

The test process has one CPU device (JAX is started by then), so the several-device
checks run in a subprocess that emulates two with
``XLA_FLAGS=--xla_force_host_platform_device_count=2``.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kinjax.cli import main
from kinjax.errors import KinjaxError
from kinjax.sharding import spectra_mesh

TESTS = Path(__file__).parent

# Runs with two emulated CPU devices; prints one JSON line.
WORKER = r"""
import json, sys
import jax
jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp
import numpy as np
sys.path.insert(0, TESTS)
from test_cube_fit import make_test_cube
from kinjax.cube_fit import fit_cube_spaxels
from kinjax.cube_model import fit_cube_gp
from kinjax.sharding import AXIS, shard_batch, spectra_mesh

out = {"devices": len(jax.devices())}
mesh = spectra_mesh("all")
# which device handled each row: 5 rows are padded to 6, three per device
rows = jnp.arange(5.0)[:, None]
owner = jax.jit(shard_batch(lambda r: (jnp.zeros(r.shape[0]) + jax.lax.axis_index(AXIS), 2 * r), mesh))(rows)
out["owner"] = np.asarray(owner[0]).tolist()
out["doubled"] = np.asarray(owner[1][:, 0]).tolist()

cube, truth, tpl = make_test_cube(shape=(5, 5))
kw = dict(vmax=1000.0, progress=False)
one = fit_cube_spaxels(cube, tpl, chunk_size=7, **kw)
two = fit_cube_spaxels(cube, tpl, chunk_size=7, devices=2, **kw)
out["spaxel_theta"] = float(np.nanmax(np.abs(one.theta - two.theta)))
out["spaxel_cov"] = float(np.nanmax(np.abs(one.cov - two.cov) / np.abs(one.cov).max()))
gp_one = fit_cube_gp(cube, tpl, init=one, hyper_draws=4, **kw)
gp_two = fit_cube_gp(cube, tpl, init=one, hyper_draws=4, devices="all", **kw)
out["gp_pull"] = float(np.max(np.abs(gp_one.theta - gp_two.theta) / gp_one.theta_err))
out["gp_err"] = float(np.max(np.abs(gp_two.theta_err / gp_one.theta_err - 1)))
out["gp_steps"] = [len(gp_one.info["objective"]), len(gp_two.info["objective"])]
out["gp_objective"] = [gp_one.info["objective"][-1], gp_two.info["objective"][-1]]

# NUTS per spaxel, mapped in chunks: the same draws whatever the chunking and the devices
from kinjax.cube_fit import fit_cube_spaxels_nuts
small, small_truth, _ = make_test_cube(shape=(2, 3), snr=30.0)
nuts_kw = dict(vmax=1000.0, progress=False, num_warmup=150, num_samples=100, seed=4)
n_one = fit_cube_spaxels_nuts(small, tpl, chunk_size=6, **nuts_kw)
n_chunks = fit_cube_spaxels_nuts(small, tpl, chunk_size=2, **nuts_kw)
n_two = fit_cube_spaxels_nuts(small, tpl, chunk_size=2, devices=2, **nuts_kw)
out["nuts_chunk_diff"] = float(np.max(np.abs(n_one.theta - n_chunks.theta)))
out["nuts_device_shift"] = float(np.max(np.abs(n_one.theta - n_two.theta) / n_one.theta_err))
out["nuts_pull"] = np.abs((n_one.theta[:, :2] - small_truth[:, :2]) / n_one.theta_err[:, :2]).max(0).tolist()
out["nuts_rhat"] = float(np.max(n_one.info["r_hat_max"]))
print(json.dumps(out))
"""


def test_mesh_for_one_device_and_bad_requests():
    assert spectra_mesh(None) is None
    assert spectra_mesh(1) is None
    assert spectra_mesh("all") is None  # this process sees one CPU device
    for bad in (0, 2, "some", []):
        with pytest.raises(KinjaxError, match="devices"):
            spectra_mesh(bad)


def test_fit_cube_devices_reaches_the_fit(tmp_path, capsys):
    """``--devices 2`` with one device: the fit refuses with the count JAX sees, writes nothing;
    ``--devices two`` is refused before any work."""
    from kinjax.mock import make_mock_cube, rotating_disc_with_bulge

    path = tmp_path / "mock.fits"
    make_mock_cube(rotating_disc_with_bulge(snr=60, shape=(2, 2))).write(path)
    out = tmp_path / "maps.fits"
    assert main(["fit-cube", str(path), "--fwhm", "2.65", "--devices", "2", "--out", str(out)]) == 2
    assert "1 device" in capsys.readouterr().err
    assert main(["fit-cube", str(path), "--fwhm", "2.65", "--devices", "two", "--out", str(out)]) == 2
    assert "--devices" in capsys.readouterr().err
    assert not out.exists()


def test_two_devices_give_the_one_device_fits():
    """Spaxel fits split over two devices are the one-device fits exactly (the same program
    per spectrum); the 3D MAP, whose χ² sum and gradient are split, reaches the same
    optimum (summation order only); NUTS spaxel fits in other chunks on other devices give
    the same draws. Each device takes one contiguous block of rows."""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", f"TESTS = {str(TESTS)!r}\n" + WORKER], env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["devices"] == 2
    assert res["owner"] == [0, 0, 0, 1, 1] and res["doubled"] == [0, 2, 4, 6, 8]
    assert res["spaxel_theta"] == 0.0 and res["spaxel_cov"] < 1e-12
    assert res["gp_pull"] < 1e-6 and res["gp_err"] < 1e-6, res
    assert res["gp_steps"][0] == res["gp_steps"][1]
    assert res["gp_objective"][1] == pytest.approx(res["gp_objective"][0], rel=1e-10)
    # NUTS: each spaxel's chains depend on its own key only, bit for bit (chunks of 6 or 2);
    # split over two devices the programs are compiled apart and round differently, which
    # the chains amplify, so the medians agree to Monte Carlo noise (measured: 0.14 errors)
    assert res["nuts_chunk_diff"] == 0.0, res["nuts_chunk_diff"]
    assert res["nuts_device_shift"] < 0.5, res["nuts_device_shift"]
    assert max(res["nuts_pull"]) < 4 and res["nuts_rhat"] < 1.1, res
