"""Cube fits split over several devices (``devices=``), against one device and pPXF.

One process with ``N`` JAX devices (on a CPU, ``XLA_FLAGS=--xla_force_host_platform_device_count=N``
makes one per core; on a multi-GPU machine the GPUs): the same mock cube is fitted with
``devices=None`` (one device) and ``devices=N``, and the fits are compared number for
number. pPXF 8.2.6 fits the same spectra with the same templates, one at a time, for
scale (as in ``cube_recovery.py``).

- spaxel-by-spaxel MAP: ``rotating_disc_with_bulge(snr=50)`` on a 10 x 10 grid (100
  spectra of 481 pixels, 150 E-MILES templates), each setting run twice, the second call
  timed (compiled);
- the 3D GP MAP on those spaxel fits (it recompiles on every call: compilation included);
- NUTS spaxel by spaxel (4 x 4 spaxels of the same galaxy, 2 chains x (150 + 400), the default),
  second call timed.

Run: ``python benchmarks/sharding.py [N]`` (N defaults to the number of cores; about
10 min on 2 cores). Results in ``benchmarks/results/sharding.json``; the table goes into
RESULTS.md through ``make_results.py``.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

N_DEV = int(sys.argv[1]) if __name__ == "__main__" and len(sys.argv) > 1 else os.cpu_count()
if "jax" not in sys.modules:  # the device count is fixed when JAX starts
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + f" --xla_force_host_platform_device_count={N_DEV}").strip()

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)

import numpy as np  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _common import machine, machine_line, table, write  # noqa: E402


def _timed(fn):
    fn()  # compile
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def run():
    from cube_recovery import fit_ppxf, make_cube
    from kinjax.cube_fit import fit_cube_spaxels, fit_cube_spaxels_nuts
    from kinjax.cube_model import fit_cube_gp
    from kinjax.losvd import velocity_grid
    from kinjax.templates import load_emiles, prepare_templates

    library = load_emiles()
    cube = make_cube("rotating_disc_with_bulge", 50, (10, 10), 0).cube.log_rebin(rebin_lsf=True)
    small = make_cube("rotating_disc_with_bulge", 50, (4, 4), 0).cube.log_rebin(rebin_lsf=True)
    common = dict(progress=False, mask_emission=False)
    out = {"machine": machine(), "n_devices": len(jax.devices()), "devices": str(jax.devices()),
           "n_spaxels": cube.n_spaxels, "n_pixels": int(cube.wave.size), "rows": []}
    fits = {}
    for devices in (None, N_DEV):
        label = "1 device" if devices is None else f"{N_DEV} devices"
        spax, t_spax = _timed(lambda: fit_cube_spaxels(cube, library, devices=devices, **common))
        t0 = time.perf_counter()
        gp = fit_cube_gp(cube, library, init=fits.get("spax", spax), devices=devices, **common)
        t_gp = time.perf_counter() - t0
        nuts, t_nuts = _timed(lambda: fit_cube_spaxels_nuts(small, library, devices=devices, num_chains=2,
                                                            **common))
        fits[devices] = (spax, gp, nuts)
        fits.setdefault("spax", spax)  # both 3D fits start from the one-device spaxel fits
        out["rows"].append({"label": label, "spaxel_map_s": t_spax, "spaxel_map_per_s": spax.fitted.sum() / t_spax,
                            "gp_map_s": t_gp, "gp_steps": len(gp.info["objective"]),
                            "nuts_s": t_nuts, "nuts_per_spaxel_s": t_nuts / small.n_spaxels})
    (s1, g1, n1), (s2, g2, n2) = fits[None], fits[N_DEV]
    out["spaxel_max_abs_diff"] = float(np.nanmax(np.abs(s1.theta - s2.theta)))
    out["gp_max_pull_diff"] = float(np.nanmax(np.abs(g1.theta - g2.theta) / g1.theta_err))
    out["nuts_max_median_shift"] = float(np.nanmax(np.abs(n1.theta - n2.theta) / n1.theta_err))
    out["nuts_r_hat_max"] = float(np.nanmax(np.r_[n1.info["r_hat_max"], n2.info["r_hat_max"]]))
    tpl = prepare_templates(library, cube.spectrum(0), velscale_ratio=2, vmax=3000.0)
    pp = fit_ppxf(cube, tpl, velocity_grid(2000.0, cube.velscale / 2))
    out["ppxf_s"] = pp["seconds"]
    out["ppxf_per_s"] = float(np.sum(pp["fitted"]) / pp["seconds"])
    out["machine_end"] = machine()
    return out


def markdown(out):
    rows = [[r["label"], f"{r['spaxel_map_s']:.1f}", f"{r['spaxel_map_per_s']:.1f}", f"{r['gp_map_s']:.1f}",
             r["gp_steps"], f"{r['nuts_s']:.1f}", f"{r['nuts_per_spaxel_s']:.2f}"] for r in out["rows"]]
    rows.append(["pPXF 8.2.6 (one process)", f"{out['ppxf_s']:.1f}", f"{out['ppxf_per_s']:.1f}", "—", "—", "—", "—"])
    head = ["run", f"spaxel MAP s ({out['n_spaxels']} spectra)", "spectra/s", "3D GP MAP s (incl. compile)",
            "L-BFGS steps", "NUTS s (16 spaxels)", "NUTS s per spaxel"]
    agree = (f"Agreement of the {out['n_devices']}-device fits with the one-device fits: spaxel MAP largest |Δθ| "
             f"{out['spaxel_max_abs_diff']:.2g}; 3D GP MAP largest |Δθ| / error {out['gp_max_pull_diff']:.2g}; "
             f"NUTS posterior medians largest |Δ| / error {out['nuts_max_median_shift']:.2f} (R-hat ≤ "
             f"{out['nuts_r_hat_max']:.3f}). Devices: {out['devices']}. Machine: {machine_line(out['machine'])}; "
             f"load at end {out['machine_end']['load_1_5_15']}.")
    return table(head, rows) + "\n\n" + agree


def main():
    out = run()
    write("sharding", out)
    print(markdown(out))


if __name__ == "__main__":
    main()
