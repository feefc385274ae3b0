"""The standard single-spectrum test side by side: pPXF 8.2.6 and kinjax on NGC 4550.

pPXF is set up as in its SAURON kinematics example (REFERENCE §3, ``high_redshift=False``
mode): the spectrum log-rebinned as it is, normalised by its median, constant noise
0.0047, 150 E-MILES SSPs convolved to the SAURON FWHM (4.2 Å) and log-rebinned at half
the galaxy velscale, emission lines masked with ``determine_goodpixels``, 4 Gauss-Hermite
moments, additive degree 4, start (c ln 1.0015, 200 km/s); once with pPXF's default
kinematic penalty and once with ``bias=0``. Formal errors are scaled by sqrt(χ²/DOF).

kinjax: ``fit_spectrum(None, setup=setup_fit(ngc4550(), noise=0.0047, h_prior=...), method=...)``
with the default Normal(0, 0.1) prior on h3, h4 (``h_prior=0.1``) and flat (``h_prior=None``,
like pPXF's ``bias=0``). MAP (Levenberg-Marquardt, Laplace errors): compile, then
the two-start fitter in one program (``FitSetup.fitter``: the starts one after the other),
the two starts side by side in two threads (``FitSetup.map_fit``, what fit_spectrum runs),
the start scan, one LM run (these four with BLAS in one thread, as fit_spectrum runs them) and
the full fit_spectrum timed separately. NUTS: the first call on
a set-up compiles the sampler, a call with an unreachable ``min_ess`` compiles the program
that continues the chains (``_common.compile_continuation``), and the faster of the next two
calls (same set-up, other seeds) is the per-fit time; fit_spectrum's default 4 chains × (150 + 400) and a longer 4 × (500 + 500).
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
from _common import compile_continuation, machine, machine_line, median_time, table, write  # noqa: E402

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


#: NUTS settings timed: fit_spectrum's default (4 x (150 + 400)) and a longer one (4 chains each)
NUTS_SETTINGS = ((150, 400), (500, 500))


def kinjax_map(setup):
    """MAP on NGC 4550: compile, core (the two-start fitter) and full fit_spectrum timings.

    The fitter runs LM from the grid-scan start and from (0, 150) km/s; the scan alone and
    one LM run from the scan start are timed too.
    """
    from kinjax.fit import fit_spectrum, single_threaded_blas

    y, w = setup.y, setup.weights
    t0 = time.perf_counter()
    sol = jax.block_until_ready(setup.fitter(y, w))
    compile_map = time.perf_counter() - t0
    theta0 = jax.block_until_ready(setup.start_finder(y, w))
    jax.block_until_ready(setup.solver(y, w, theta0))

    def start_only():
        return jax.block_until_ready(setup.start_finder(y, w))

    def solver_only():
        return jax.block_until_ready(setup.solver(y, w, theta0))

    def map_core():
        return jax.block_until_ready(setup.fitter(y, w))

    def map_side_by_side():
        return jax.block_until_ready(setup.map_fit(y, w))

    map_side_by_side()  # compiles the pick of the better start
    # BLAS limited to one thread, as fit_spectrum runs them: its idle threads otherwise spin
    # against the two start threads (a scratch run: 83 ms side by side against 78 ms in turn)
    with single_threaded_blas():
        start_med, start_times = median_time(start_only, 21)
        solver_med, solver_times = median_time(solver_only, 21)
        core_med, core_times = median_time(map_core, 21)
        side_med, side_times = median_time(map_side_by_side, 21)
    res = fit_spectrum(None, setup=setup, method="map")  # warm up the band/draw code
    full_med, full_times = median_time(lambda: fit_spectrum(None, setup=setup, method="map"), 11)
    laplace = np.sqrt(np.diag(np.asarray(sol.cov)))
    r = {
        "values": dict(zip(NAMES, map(float, res.best))), "errors": dict(zip(NAMES, map(float, res.error))),
        "laplace_sqrt_diag_cov": dict(zip(NAMES, map(float, laplace))),
        "chi2_dof": float(res.chi2_dof), "dof": int(res.dof),
        "n_nonzero_templates": int(np.count_nonzero(res.weights[: setup.forward.n_templates])),
        "seconds_per_fit": core_med, "times_s": core_times,
        "side_by_side_s": side_med, "side_by_side_times_s": side_times,
        "start_finder_s": start_med, "start_finder_times_s": start_times,
        "solver_s": solver_med, "solver_times_s": solver_times,
        "seconds_per_fit_full_fit_spectrum": full_med, "times_full_s": full_times,
        "compile_s": compile_map, "n_iter": int(sol.n_iter), "load_1": round(os.getloadavg()[0], 2),
    }
    print("kinjax MAP", res.best, res.error, f"chi2/dof {res.chi2_dof:.3f}  core {core_med * 1e3:.1f} ms, side by side {side_med * 1e3:.1f} ms "
          f"(start {start_med * 1e3:.1f} + solver {solver_med * 1e3:.1f}), fit_spectrum {full_med * 1e3:.1f} ms, "
          f"compile {compile_map:.1f} s, {int(sol.n_iter)} iterations", flush=True)
    return r


def kinjax_nuts(setup, num_warmup, num_samples, num_chains=4):
    """NUTS: the first call on the set-up compiles, then the continuation program
    (:func:`compile_continuation`); the faster of the next two calls is the per-fit time."""
    from kinjax.fit import fit_spectrum

    nuts_kw = dict(num_warmup=num_warmup, num_samples=num_samples, num_chains=num_chains)
    kw = dict(setup=setup, method="nuts", progress=False, **nuts_kw)
    t0 = time.perf_counter()
    fit_spectrum(None, seed=0, **kw)
    first = time.perf_counter() - t0
    continuation = compile_continuation(setup, **nuts_kw)
    later = []
    for seed in (1, 2):  # two post-compile calls; the faster is the per-fit time (the machine is shared)
        t0 = time.perf_counter()
        res = fit_spectrum(None, seed=seed, **kw)
        later.append(time.perf_counter() - t0)
        if seed == 1:
            nuts = res
    second = min(later)
    d = nuts.diagnostics
    r = {
        "values": dict(zip(NAMES, map(float, nuts.best))), "errors": dict(zip(NAMES, map(float, nuts.error))),
        "chi2_dof": float(nuts.chi2_dof), "dof": int(nuts.dof),
        "n_nonzero_templates": int(np.count_nonzero(nuts.weights[: setup.forward.n_templates])),
        "wall_s_first_call_incl_compile": first, "wall_s_second_call": second, "wall_s_later_calls": later,
        "compile_s_estimate": first - second, "continuation_compile_call_s": continuation,
        "seconds_reported_by_fit": float(nuts.seconds),
        "ess_bulk": d["ess_bulk"], "r_hat": d["r_hat"], "divergences": d["divergences"],
        "mean_tree_steps": d.get("mean_tree_steps"),
        "num_warmup": num_warmup, "num_samples": d["num_samples"], "num_chains": d["num_chains"],
        "load_1": round(os.getloadavg()[0], 2),
    }
    print(f"kinjax NUTS {num_warmup}+{num_samples}", nuts.best, nuts.error,
          f"chi2/dof {nuts.chi2_dof:.3f}, wall {first:.1f}/{second:.1f} s", d, flush=True)
    return r


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

    # ---------------------------------------------------------------- kinjax
    from kinjax.datasets import ngc4550
    from kinjax.fit import setup_fit

    gal = ngc4550()
    for h_prior in (0.1, None):
        tag = f"h_prior={h_prior}"
        t0 = time.perf_counter()
        setup = setup_fit(gal, noise=0.0047, h_prior=h_prior)
        prep_s = time.perf_counter() - t0
        out["fits"][f"kinjax MAP ({tag})"] = kinjax_map(setup)
        for warmup, samples in NUTS_SETTINGS:
            if h_prior is None and (warmup, samples) != NUTS_SETTINGS[0]:
                continue  # flat prior: default setting only (enough to show its behaviour)
            out["fits"][f"kinjax NUTS {warmup}+{samples} ({tag})"] = kinjax_nuts(setup, warmup, samples)
        out.setdefault("setup_s", {})[tag] = prep_s

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

    def tm(t):
        return f"{1e3 * sorted(t)[len(t) // 2]:.1f} ms (min {1e3 * min(t):.1f})"

    rows2 = [["pPXF, default bias", tm(fits_["pPXF 8.2.6 (default bias)"]["times_s"]), "—", "—"],
             ["pPXF, bias=0", tm(ref["times_s"]), "—", "—"]]
    rows3 = []
    for label, f in fits_.items():
        if label.startswith("kinjax MAP"):
            tag = label[len("kinjax MAP "):]
            rows2 += [[f"kinjax MAP {tag}: two-start fitter, starts in turn (FitSetup.fitter)", tm(f["times_s"]),
                       f"{f['compile_s']:.1f} s", f["load_1"]]]
            if "side_by_side_times_s" in f:
                rows2.append([f"kinjax MAP {tag}: two starts side by side in two threads (FitSetup.map_fit)",
                              tm(f["side_by_side_times_s"]), "", ""])
            rows2 += [
                      [f"kinjax MAP {tag}: start_finder alone", tm(f["start_finder_times_s"]), "", ""],
                      [f"kinjax MAP {tag}: one LM run from the scan start", tm(f["solver_times_s"]), "", ""],
                      [f"kinjax MAP {tag}: full fit_spectrum (+ 1000 Laplace draws, LOSVD band)",
                       tm(f["times_full_s"]), "", ""]]
        elif label.startswith("kinjax NUTS"):
            rows2.append([f"{label}, after compilation", f"{f['wall_s_second_call']:.2f} s",
                          f"{f['compile_s_estimate']:.1f} s (1st call {f['wall_s_first_call_incl_compile']:.1f} s)",
                          f["load_1"]])
            ess = list(f["ess_bulk"].values())[:4]  # kinjax's names: v, sigma, h3, h4
            rhat = list(f["r_hat"].values())[:4]
            rows3.append([label, f"{f['num_chains']} × ({f['num_warmup']} + {f['num_samples']})",
                          " / ".join(f"{v:.0f}" for v in ess), f"{min(ess):.0f}",
                          " / ".join(f"{v:.3f}" for v in rhat), f["divergences"],
                          f"{f['wall_s_second_call']:.2f} s", f"{min(ess) / f['wall_s_second_call']:.0f}",
                          "yes" if min(ess) >= 400 and f["wall_s_second_call"] <= 10 else "no"])
    t2 = table(["fit", "time per fit after compilation: median (min)", "compile", "load (1 min)"], rows2)
    t3 = table(["NUTS", "chains × (warm-up + draws)", "bulk ESS (V/σ/h3/h4)", "min ESS", "R-hat (V/σ/h3/h4)",
                "divergences", "wall per fit", "min ESS per s", "≥ 400 ESS in ≤ 10 s"], rows3)
    two = any("wall_s_later_calls" in f for f in fits_.values())  # older records timed the 2nd call only
    which = ("faster of the 2nd and 3rd fit_spectrum calls on the same set-up (other seeds; ESS, R-hat and values "
             "are from the 2nd)" if two else "2nd fit_spectrum call on the same set-up (another seed)")
    if any("continuation_compile_call_s" in f for f in fits_.values()):
        which += (", after a call that compiled the program continuing the chains for min_ess (seed 0, "
                  "unreachable min_ess)")
    note = (f"MAP timings are medians of 21 repeats (full fit_spectrum 11, pPXF 7); NUTS per-fit time is the "
            f"{which}, the compile time is first call minus that. Machine: {machine_line(out['machine_start'])}; "
            f"load at end {out['machine_end']['load_1_5_15']}; total {out['total_s']:.0f} s.")
    return "\n\n".join([t1, t2, t3, note])


if __name__ == "__main__":
    main()
