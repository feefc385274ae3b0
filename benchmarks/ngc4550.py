"""The standard single-spectrum test side by side: pPXF 8.2.6 and kinjax on NGC 4550.

pPXF is set up as in its SAURON kinematics example (REFERENCE §3, ``high_redshift=False``
mode): the spectrum log-rebinned as it is, normalised by its median, constant noise
0.0047, 150 E-MILES SSPs convolved to the SAURON FWHM (4.2 Å) and log-rebinned at half
the galaxy velscale, emission lines masked with ``determine_goodpixels``, 4 Gauss-Hermite
moments, additive degree 4, start (c ln 1.0015, 200 km/s); once with pPXF's default
kinematic penalty and once with ``bias=0``. Formal errors are scaled by sqrt(χ²/DOF).

kinjax: ``fit_spectrum(None, setup=setup_fit(ngc4550(), noise=0.0047), method=...)``,
MAP (Levenberg-Marquardt, Laplace errors) and NUTS (default 4 chains × 500 + 500).
Run in float64 (``jax_enable_x64``, the CLI's choice).

Run: ``python benchmarks/ngc4550.py`` (a few minutes, most of it NUTS).
"""

from __future__ import annotations

import glob
import os
import sys
import time
from pathlib import Path

import jax

jax.config.update("jax_enable_x64", True)

import numpy as np  # noqa: E402
from astropy.io import fits  # noqa: E402
from scipy import ndimage  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, machine_line, median_time, table, write  # noqa: E402

C_KMS = 299792.458
NAMES = ("V", "sigma", "h3", "h4")


def ppxf_setup():
    """pPXF inputs for NGC 4550, built from ppxf's own files and utilities."""
    import ppxf.ppxf_util as util

    pdir = Path(util.__file__).resolve().parent
    with fits.open(pdir / "spectra" / "NGC4550_SAURON.fits") as hdul:
        flux_lin = np.asarray(hdul[0].data, float)
        hdr = hdul[0].header
    lam_range_gal = hdr["CRVAL1"] + np.array([0.0, hdr["CDELT1"] * (hdr["NAXIS1"] - 1)])
    galaxy, ln_lam_gal, velscale = util.log_rebin(lam_range_gal, flux_lin)
    galaxy = galaxy / np.median(galaxy)
    noise = np.full_like(galaxy, 0.0047)

    files = sorted(glob.glob(str(pdir / "miles_models" / "Eun1.30*.fits")))
    fwhm_gal, fwhm_tpl, ratio = 4.2, 2.51, 2
    with fits.open(files[0]) as hdul:
        h2 = hdul[0].header
    lam_t = h2["CRVAL1"] + h2["CDELT1"] * np.arange(h2["NAXIS1"])
    keep = (lam_t > lam_range_gal[0] / 1.02) & (lam_t < lam_range_gal[1] * 1.02)
    lam_range_tpl = [lam_t[keep].min(), lam_t[keep].max()]
    sigma_pix = np.sqrt(fwhm_gal**2 - fwhm_tpl**2) / 2.355 / h2["CDELT1"]
    cols = []
    for f in files:
        with fits.open(f) as hdul:
            ssp = ndimage.gaussian_filter1d(np.asarray(hdul[0].data, float)[keep], sigma_pix)
        new, ln_lam_tpl = util.log_rebin(lam_range_tpl, ssp, velscale=velscale / ratio)[:2]
        cols.append(new / np.median(new[new > 0]))
    templates = np.column_stack(cols)
    z0 = 0.0015
    goodpixels = util.determine_goodpixels(ln_lam_gal, lam_range_tpl, z0)
    return dict(templates=templates, galaxy=galaxy, noise=noise, velscale=velscale,
                start=[C_KMS * np.log(1 + z0), 200.0], goodpixels=goodpixels,
                lam=np.exp(ln_lam_gal), lam_temp=np.exp(ln_lam_tpl), velscale_ratio=ratio,
                n_templates=len(files))


def run_ppxf(p, bias=None):
    from ppxf.ppxf import ppxf

    kw = dict(goodpixels=p["goodpixels"], moments=4, degree=4, lam=p["lam"], lam_temp=p["lam_temp"],
              velscale_ratio=p["velscale_ratio"], quiet=True, plot=False)
    if bias is not None:
        kw["bias"] = bias
    return ppxf(p["templates"], p["galaxy"], p["noise"], p["velscale"], p["start"], **kw)


def main():
    t_start = time.perf_counter()
    out = {"machine_start": machine(), "fits": {}}

    # ---------------------------------------------------------------- pPXF
    p = ppxf_setup()
    for label, bias in (("pPXF 8.2.6 (default bias)", None), ("pPXF 8.2.6 (bias=0)", 0.0)):
        pp = run_ppxf(p, bias)
        med, times = median_time(lambda: run_ppxf(p, bias), 7)
        err = pp.error * np.sqrt(pp.chi2)
        out["fits"][label] = {
            "values": dict(zip(NAMES, map(float, pp.sol))), "errors": dict(zip(NAMES, map(float, err))),
            "chi2_dof": float(pp.chi2), "dof": int(pp.dof),
            "n_nonzero_templates": int(np.count_nonzero(pp.weights)),
            "seconds_per_fit": med, "times_s": times, "bias": pp.bias if bias is None else bias,
        }
        print(label, pp.sol, err, f"chi2/dof {pp.chi2:.3f}  {med:.3f} s/fit", flush=True)

    # ---------------------------------------------------------------- kinjax MAP
    from kinjax.datasets import ngc4550
    from kinjax.fit import fit_spectrum, setup_fit

    t0 = time.perf_counter()
    setup = setup_fit(ngc4550(), noise=0.0047)
    prep_s = time.perf_counter() - t0
    y, w = setup.y, setup.weights
    t0 = time.perf_counter()
    theta0 = jax.block_until_ready(setup.start_finder(y, w))
    sol = jax.block_until_ready(setup.solver(y, w, theta0))
    compile_map = time.perf_counter() - t0

    def map_core():
        th = setup.start_finder(y, w)
        return jax.block_until_ready(setup.solver(y, w, th))

    core_med, core_times = median_time(map_core, 9)
    res = fit_spectrum(None, setup=setup, method="map")  # warm up the band/draw code
    full_med, full_times = median_time(lambda: fit_spectrum(None, setup=setup, method="map"), 7)
    res = fit_spectrum(None, setup=setup, method="map")
    laplace = np.sqrt(np.diag(np.asarray(sol.cov)))
    out["fits"]["kinjax MAP"] = {
        "values": dict(zip(NAMES, map(float, res.best))), "errors": dict(zip(NAMES, map(float, res.error))),
        "laplace_sqrt_diag_cov": dict(zip(NAMES, map(float, laplace))),
        "chi2_dof": float(res.chi2_dof), "dof": int(res.dof),
        "n_nonzero_templates": int(np.count_nonzero(res.weights[: setup.forward.n_templates])),
        "seconds_per_fit": core_med, "times_s": core_times,
        "seconds_per_fit_full_fit_spectrum": full_med, "times_full_s": full_times,
        "compile_s": compile_map, "setup_s": prep_s, "n_iter": int(sol.n_iter),
    }
    print("kinjax MAP", res.best, res.error, f"chi2/dof {res.chi2_dof:.3f}  core {core_med * 1e3:.1f} ms, "
          f"fit_spectrum {full_med * 1e3:.1f} ms, compile {compile_map:.1f} s", flush=True)

    # ---------------------------------------------------------------- kinjax NUTS
    t0 = time.perf_counter()
    nuts = fit_spectrum(None, setup=setup, method="nuts", progress=False)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    nuts = fit_spectrum(None, setup=setup, method="nuts", progress=False, seed=1)
    second = time.perf_counter() - t0
    d = nuts.diagnostics
    out["fits"]["kinjax NUTS"] = {
        "values": dict(zip(NAMES, map(float, nuts.best))), "errors": dict(zip(NAMES, map(float, nuts.error))),
        "chi2_dof": float(nuts.chi2_dof), "dof": int(nuts.dof),
        "n_nonzero_templates": int(np.count_nonzero(nuts.weights[: setup.forward.n_templates])),
        "wall_s_first_call_incl_compile": first, "wall_s_second_call": second,
        "seconds_reported_by_fit": float(nuts.seconds),
        "ess_bulk": d["ess_bulk"], "r_hat": d["r_hat"], "divergences": d["divergences"],
        "num_warmup": 500, "num_samples": d["num_samples"], "num_chains": d["num_chains"],
    }
    print("kinjax NUTS", nuts.best, nuts.error, f"chi2/dof {nuts.chi2_dof:.3f}, wall {first:.1f}/{second:.1f} s",
          d, flush=True)

    out["machine_end"] = machine()
    out["total_s"] = time.perf_counter() - t_start
    write("ngc4550", out)
    print()
    print(markdown(out))


def markdown(out):
    fits_ = out["fits"]
    ref = fits_["pPXF 8.2.6 (bias=0)"]
    fmt = {"V": "{:.1f} ± {:.1f}", "sigma": "{:.1f} ± {:.1f}", "h3": "{:.3f} ± {:.3f}", "h4": "{:.3f} ± {:.3f}"}
    rows = []
    for label, f in fits_.items():
        cells = [fmt[n].format(f["values"][n], f["errors"][n]) for n in NAMES]
        delta = " / ".join(f"{abs(f['values'][n] - ref['values'][n]) / ref['errors'][n]:.2f}" for n in NAMES)
        rows.append([label, *cells, f"{f['chi2_dof']:.3f} ({f['dof']})", f["n_nonzero_templates"], delta])
    t1 = table(["fit", "V (km/s)", "σ (km/s)", "h3", "h4", "χ²/DOF (DOF)", "templates > 0",
                "abs Δ / pPXF(bias=0) error (V/σ/h3/h4)"], rows)
    m = fits_["kinjax MAP"]
    n = fits_["kinjax NUTS"]
    def tm(f, key="times_s"):
        t = f[key]
        return f"{1e3 * sorted(t)[len(t) // 2]:.0f} ms (min {1e3 * min(t):.0f})"

    rows2 = [
        ["pPXF, default bias", tm(fits_["pPXF 8.2.6 (default bias)"]), "—"],
        ["pPXF, bias=0", tm(ref), "—"],
        ["kinjax MAP: start_finder + solver", tm(m), f"{m['compile_s']:.1f} s"],
        ["kinjax MAP: full fit_spectrum (incl. 1000 Laplace draws, LOSVD band)", tm(m, "times_full_s"), "—"],
        ["kinjax NUTS (4 chains × (500 + 500)), second call", f"{n['wall_s_second_call']:.1f} s",
         f"first call {n['wall_s_first_call_incl_compile']:.1f} s"],
    ]
    t2 = table(["fit", "time per fit after compilation: median (min)", "compile"], rows2)
    ess = " / ".join(f"{v:.0f}" for v in n["ess_bulk"].values())  # kinjax's names: v, sigma, h3, h4
    rhat = " / ".join(f"{v:.3f}" for v in n["r_hat"].values())
    t3 = table(["NUTS", "value"], [["bulk ESS (V/σ/h3/h4)", ess], ["R-hat (V/σ/h3/h4)", rhat],
                                   ["divergences", n["divergences"]],
                                   ["ESS per second, V (second call)", f"{list(n['ess_bulk'].values())[0] / n['wall_s_second_call']:.1f}"]])
    note = (f"Timings are medians of ≥ 7 repeats (pPXF 7, MAP 9 and 7). Machine: {machine_line(out['machine_start'])}; "
            f"load at end {out['machine_end']['load_1_5_15']}.")
    return "\n\n".join([t1, t2, t3, note])


if __name__ == "__main__":
    main()
