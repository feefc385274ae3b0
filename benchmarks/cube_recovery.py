"""Recovery of MEAN_V and DISPERSION maps from mock cubes: kinjax spaxel by spaxel, the
3D GP fit, and pPXF 8.2.6 spaxel by spaxel; and how the 3D MAP fit scales with spaxels.

Recovery: for both mock presets of `kinjax.mock` (``rotating_disc_with_bulge`` and
``counter_rotating_discs``) at central S/N 20, 50, 100 (per pixel at the brightest
spaxel, falling as sqrt(flux) outwards) on a ``GRID`` spaxel grid (0.5" spaxels, MUSE-like
4800-5400 Å at 1.25 Å, FWHM 2.65 Å), every spaxel is fitted with

(a) ``fit_cube_spaxels`` (MAP + Laplace errors, 4 GH moments, additive degree 4,
    kinjax's default Normal(0, 0.1) prior on h3, h4; ``mask_emission=False``: the mocks
    have no gas and pPXF fits every pixel too);
(b) ``fit_cube_gp(method="map", init=<(a)>)`` (GP priors on V, ln σ, h3, h4);
(c) pPXF 8.2.6 (``moments=4, degree=4``, its default ``bias``), one spaxel at a time,
    on the *same* log-rebinned spectra and the *same* templates: kinjax's
    ``prepare_templates(load_emiles(), cube.spectrum(i), velscale_ratio=2)`` (150
    E-MILES SSPs matched to the cube's resolution, sampled at velscale / 2; prepared
    with ``vmax=3000`` because pPXF wants templates covering the galaxy ±2900 km/s —
    the same grid and spectra as kinjax's, only longer), passed to
    pPXF with ``lam``/``lam_temp`` and ``velscale_ratio=2``; galaxy and noise divided by
    the spaxel's median flux; start (0, 100) km/s; formal errors not rescaled (the noise
    is exact).

MEAN_V and DISPERSION are the first moment and the square root of the second central
moment of the fitted LOSVD on a velocity grid (``vmax`` 2000 km/s, step velscale / 2),
negative lobes clipped (`kinjax.cube_fit.grid_moments`). For pPXF the GH LOSVD is
tabulated with the van der Marel & Franx polynomials from its (V, σ, h3, h4), and the
errors are the standard deviations of the moments over ``PPXF_DRAWS`` draws from a
Gaussian with pPXF's formal covariance of (V, σ, h3, h4) (capfit's ``cov``, captured
from its solver; h3/h4 clipped to ±0.3, σ ≥ 1 km/s) — kinjax does the same with its
Laplace covariance (64 draws). The coverage with pPXF's plain V / σ errors is recorded
too. Truth: the light-weighted moments of the mock's true LOSVD in each spaxel.

Scaling: the 3D MAP fit of ``rotating_disc_with_bulge(snr=50)`` with 5050-5300 Å (201
linear pixels) on a fixed 6" × 6" field sampled by 10², 20², 40² (and 80² if asked)
spaxels, each size in a fresh subprocess: wall time of the spaxel-by-spaxel start and of
``fit_cube_gp`` (compilation included; it recompiles on every call) and the process's
peak resident memory (``resource.getrusage(RUSAGE_SELF).ru_maxrss``, which counts JAX's
buffers, unlike tracemalloc) before and after the GP fit.

Run: ``python benchmarks/cube_recovery.py`` (about 30 min on 2 busy cores; ``--no-scaling``
then ``--scaling-only`` splits it in two, ``--with-6400`` adds the 80 × 80 size, ``--add-scaling N`` runs
the N × N size alone and merges it into the record: the 80 × 80 and 100 × 100 rows were run
that way, the latter in 35 min with a 5.7 GB peak); ``--markdown``
rewrites ``benchmarks/CUBE_RESULTS.md`` from the JSON; ``--quick`` is a smoke test
(results/cube_recovery_quick.json, not recorded).
"""

from __future__ import annotations

import functools
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import jax

jax.config.update("jax_enable_x64", True)

import numpy as np  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _common import RESULTS, machine, machine_line, table  # noqa: E402

GRID = (10, 10)
SNRS = (20, 50, 100)
#: noise realisations per central S/N: a 10 x 10 cube's coverage is a noisy statistic (the
#: 3D fit's errors are correlated over a few spaxels), so the target S/N gets three
SEEDS_PER_SNR = {20: 3, 50: 1, 100: 1}
PRESETS = ("rotating_disc_with_bulge", "counter_rotating_discs")
PPXF_DRAWS = 200
SCALING_SIDES = (10, 20, 40)
SCALING_WAVE = (5050.0, 5300.0)
SCALING_FIELD = 6.0  # arcsec
METHODS = ("kinjax spaxels", "kinjax 3D GP (MAP)", "pPXF spaxels")
#: extra method on the counter-rotating cubes at GAUSS2_SNR: two Gaussians, each with its own template mix,
#: in the 3D model, started from spaxel fits of the cube averaged over 3 x 3 spaxels (start_radius=1.5)
METHOD_G2 = "kinjax 3D GP, two Gaussians (MAP)"
GAUSS2_SNR = (20, 50, 100)
#: extra methods added by ``--add-se`` to the recorded cubes: the Sanders-Evans family (mixture kernel, its
#: default shape priors) spaxel by spaxel, and in the 3D model (GP priors on V, ln σ, ln σ_K, δ, κ)
METHODS_SE = ("kinjax spaxels, Sanders–Evans", "kinjax 3D GP, Sanders–Evans (MAP)")


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return ""


def maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


# ------------------------------------------------------------------------- pPXF
_CAPFIT = {}


def _patch_capfit():
    """Record capfit's covariance of the free kinematic parameters (pPXF keeps only the errors)."""
    import ppxf.ppxf as ppmod

    if getattr(ppmod.capfit, "_recording", False):
        return
    base = ppmod.capfit

    class Recording(base):
        _recording = True

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            _CAPFIT["cov"] = getattr(self, "cov", None)
            _CAPFIT["x_err"] = np.asarray(self.x_err)

    ppmod.capfit = Recording


def gh_pdf(v, vel, sig, h3, h4):
    """pPXF's Gauss-Hermite LOSVD (van der Marel & Franx 1993) at velocities ``v`` (km/s)."""
    y = (v - vel[..., None]) / sig[..., None]
    g = np.exp(-0.5 * y**2) / (np.sqrt(2 * np.pi) * sig[..., None])
    H3 = (2 * np.sqrt(2) * y**3 - 3 * np.sqrt(2) * y) / np.sqrt(6)
    H4 = (4 * y**4 - 12 * y**2 + 3) / np.sqrt(24)
    return g * (1 + h3[..., None] * H3 + h4[..., None] * H4)


def moments(theta, velocity):
    """(mean, dispersion) of GH LOSVDs ``theta`` (..., 4) on ``velocity``, negative lobes clipped."""
    from kinjax.cube_fit import grid_moments

    pdf = gh_pdf(velocity, theta[..., 0], theta[..., 1], theta[..., 2], theta[..., 3])
    m, d = grid_moments(pdf, velocity)
    return np.asarray(m), np.asarray(d)


def fit_ppxf(cube, tpl, velocity, seed=0):
    """pPXF spaxel by spaxel on the log-rebinned ``cube`` with prepared templates ``tpl``."""
    from ppxf.ppxf import ppxf

    _patch_capfit()
    rng = np.random.default_rng(seed)
    n = cube.n_spaxels
    out = {k: np.full(n, np.nan) for k in ("mean_v", "mean_v_err", "dispersion", "dispersion_err",
                                           "v", "v_err", "sigma", "sigma_err", "chi2")}
    n_full_cov = 0
    t0 = time.perf_counter()
    for i in range(n):
        if not cube.valid[i]:
            continue
        mask = cube.mask[i]
        scale = np.median(cube.flux[i][mask])
        gal, noise = cube.flux[i] / scale, cube.noise[i] / scale
        gal = np.where(mask, gal, 0.0)
        noise = np.where(mask, noise, 1.0)
        pp = ppxf(tpl.flux.T, gal, noise, cube.velscale, [0.0, 100.0], goodpixels=np.flatnonzero(mask),
                  moments=4, degree=4, lam=cube.wave, lam_temp=tpl.wave, velscale_ratio=2, quiet=True,
                  plot=False)
        sol = np.asarray(pp.sol, float)
        cov = _CAPFIT.get("cov")
        units = np.array([cube.velscale, cube.velscale, 1.0, 1.0])
        if cov is not None and np.shape(cov) == (4, 4):
            cov = np.asarray(cov) * units[:, None] * units[None, :]
            n_full_cov += 1
        else:  # a parameter at a bound is not free: independent errors
            cov = np.diag(np.asarray(pp.error, float) ** 2)
        evals, evecs = np.linalg.eigh(0.5 * (cov + cov.T))
        root = evecs * np.sqrt(np.clip(evals, 0, None))
        draws = sol + rng.standard_normal((PPXF_DRAWS, 4)) @ root.T
        draws[:, 1] = np.clip(draws[:, 1], 1.0, None)
        draws[:, 2:] = np.clip(draws[:, 2:], -0.3, 0.3)
        m, d = moments(sol[None], velocity)
        dm, dd = moments(draws, velocity)
        out["mean_v"][i], out["dispersion"][i] = m[0], d[0]
        out["mean_v_err"][i], out["dispersion_err"][i] = dm.std(), dd.std()
        out["v"][i], out["sigma"][i] = sol[:2]
        out["v_err"][i], out["sigma_err"][i] = np.asarray(pp.error, float)[:2]
        out["chi2"][i] = pp.chi2
    out["seconds"] = time.perf_counter() - t0
    out["n_full_cov"] = n_full_cov
    out["fitted"] = cube.valid.copy()
    return out


# ------------------------------------------------------------------------- metrics
def scores(mean_v, mean_v_err, disp, disp_err, fitted, truth_v, truth_d):
    ok = fitted & np.isfinite(mean_v) & np.isfinite(disp)
    out = {"n": int(ok.sum())}
    for key, fit, err, true in (("mean_v", mean_v, mean_v_err, truth_v), ("dispersion", disp, disp_err, truth_d)):
        r = fit[ok] - true[ok]
        e = err[ok]
        out[f"n_{key}_err_nan"] = int((~np.isfinite(e)).sum())  # such spaxels count as not covered
        out[key] = {
            "rmse": float(np.sqrt(np.mean(r**2))),
            "bias": float(np.mean(r)),
            "median_abs": float(np.median(np.abs(r))),
            "coverage": float(np.mean(np.abs(r) <= e)),
            "median_err": float(np.nanmedian(e)),
            "std_pull": float(np.nanstd(r / e)),
        }
    return out


def make_cube(preset, snr, shape, seed, **kw):
    import kinjax.mock as mock

    galaxy = getattr(mock, preset)(snr=float(snr), shape=shape, seed=seed, **kw)
    return mock.make_mock_cube(galaxy)


def recovery(shape, snrs, presets, save=None):
    from kinjax.cube_fit import fit_cube_spaxels
    from kinjax.cube_model import fit_cube_gp
    from kinjax.templates import load_emiles, prepare_templates

    library = load_emiles()
    runs = []
    tpl = None
    # S/N outer, preset inner: the S/N 20 cubes (the target) come first
    plan = [(s_i, snr, p_i, preset, rep) for s_i, snr in enumerate(snrs) for p_i, preset in enumerate(presets)
            for rep in range(SEEDS_PER_SNR.get(snr, 1))]
    for s_i, snr, p_i, preset, rep in plan:
        seed = 100 * p_i + s_i + 10 * rep
        t0 = time.perf_counter()
        mock = make_cube(preset, snr, shape, seed)
        cube = mock.cube.log_rebin(rebin_lsf=True)
        t_mock = time.perf_counter() - t0
        if tpl is None:
            # pPXF asks for templates covering the galaxy ±2900 km/s (it cuts them itself): vmax=3000
            # gives the same grid and spectra as kinjax's (vmax 2000), only longer
            tpl = prepare_templates(library, cube.spectrum(0), velscale_ratio=2, vmax=3000.0)
        tv, td = mock.mean_v, mock.dispersion
        run = {"preset": preset, "snr": snr, "seed": seed, "shape": list(shape), "n_spaxels": cube.n_spaxels,
               "n_pixels": int(cube.wave.size), "velscale": float(cube.velscale), "mock_s": t_mock,
               "uptime_start": uptime(), "load_start": [round(x, 2) for x in os.getloadavg()],
               "truth": {"mean_v_range": [float(tv.min()), float(tv.max())],
                         "dispersion_range": [float(td.min()), float(td.max())]},
               "spaxel_snr_range": [float(np.nanmin(cube.snr())), float(np.nanmax(cube.snr()))],
               "methods": {}}
        t0 = time.perf_counter()
        spax = fit_cube_spaxels(cube, library, progress=False, seed=seed, mask_emission=False)
        t_spax = time.perf_counter() - t0
        run["methods"][METHODS[0]] = {**scores(spax.mean_v, spax.mean_v_err, spax.dispersion, spax.dispersion_err,
                                               spax.fitted, tv, td),
                                      "seconds": t_spax, "spectra_per_s": spax.fitted.sum() / t_spax}
        t0 = time.perf_counter()
        try:
            gp = fit_cube_gp(cube, library, method="map", init=spax, progress=False, seed=seed, mask_emission=False)
        except Exception as exc:  # recorded, not hidden: the table says the 3D fit failed
            gp = None
            run["methods"][METHODS[1]] = {"error": f"{type(exc).__name__}: {exc}",
                                          "seconds": time.perf_counter() - t0}
        t_gp = time.perf_counter() - t0
        if gp is not None:
                run["methods"][METHODS[1]] = {**scores(gp.mean_v, gp.mean_v_err, gp.dispersion, gp.dispersion_err,
                                                   gp.fitted, tv, td),
                                          "seconds": t_gp, "gp_seconds": gp.info["seconds"],
                                          "hyper": gp.info["hyper"], "joint_laplace": gp.info["joint_laplace"],
                                          "lbfgs_steps": len(gp.info["objective"])}
        if preset == "counter_rotating_discs" and snr in GAUSS2_SNR:
            run["methods"][METHOD_G2] = gauss2_row(cube, library, seed, tv, td)
        pp = fit_ppxf(cube, tpl, spax.velocity, seed=seed)
        sc = scores(pp["mean_v"], pp["mean_v_err"], pp["dispersion"], pp["dispersion_err"], pp["fitted"], tv, td)
        plain = scores(pp["mean_v"], pp["v_err"], pp["dispersion"], pp["sigma_err"], pp["fitted"], tv, td)
        run["methods"][METHODS[2]] = {**sc, "seconds": pp["seconds"],
                                      "spectra_per_s": pp["fitted"].sum() / pp["seconds"],
                                      "n_full_cov": pp["n_full_cov"],
                                      "coverage_with_plain_V_sigma_errors": {
                                          "mean_v": plain["mean_v"]["coverage"],
                                          "dispersion": plain["dispersion"]["coverage"]},
                                      "median_chi2_dof": float(np.nanmedian(pp["chi2"]))}
        run["kinjax_median_chi2_dof"] = float(np.nanmedian(spax.reduced_chi2))
        run["load_end"] = [round(x, 2) for x in os.getloadavg()]
        run["uptime_end"] = uptime()
        runs.append(run)
        if save is not None:
            save(runs)
        m = run["methods"]
        print(f"{preset} S/N {snr}: " + "; ".join(
            f"{k}: V {v['mean_v']['rmse']:.1f} ({v['mean_v']['coverage']:.2f}) "
            f"σ {v['dispersion']['rmse']:.1f} ({v['dispersion']['coverage']:.2f}) {v['seconds']:.0f}s"
            for k, v in m.items() if "error" not in v), flush=True)
    return runs


def gauss2_row(cube, library, seed, tv, td):
    """The two-Gaussian 3D fit of one cube (start: spaxel fits of the 3 x 3-averaged cube), scored."""
    from kinjax.cube_model import fit_cube_gp

    t0 = time.perf_counter()
    g2 = fit_cube_gp(cube, library, losvd="gauss2", method="map", start_radius=1.5, progress=False, seed=seed,
                     mask_emission=False)
    return {**scores(g2.mean_v, g2.mean_v_err, g2.dispersion, g2.dispersion_err, g2.fitted, tv, td),
            "seconds": time.perf_counter() - t0, "gp_seconds": g2.info["seconds"], "hyper": g2.info["hyper"],
            "hyper_inflation": g2.info["hyper_inflation"], "lbfgs_steps": len(g2.info["objective"]),
            "load_start": [round(x, 2) for x in os.getloadavg()]}


def redo_gauss2(path):
    """Rerun the two-Gaussian rows on the recorded counter-rotating cubes at GAUSS2_SNR (merged into the JSON)."""
    from kinjax.templates import load_emiles

    out = json.loads(path.read_text())
    library = load_emiles()
    for r in out["recovery"]:
        if r["preset"] != "counter_rotating_discs" or r["snr"] not in GAUSS2_SNR:
            continue
        mock = make_cube(r["preset"], r["snr"], tuple(r["shape"]), r["seed"])
        r["methods"][METHOD_G2] = gauss2_row(mock.cube.log_rebin(rebin_lsf=True), library, r["seed"],
                                             mock.mean_v, mock.dispersion)
        out["gauss2_machine"] = machine()
        path.write_text(json.dumps(out, indent=2, default=float) + "\n")
        g = r["methods"][METHOD_G2]
        print(f"S/N {r['snr']} seed {r['seed']}: V {g['mean_v']['rmse']:.1f} ({g['mean_v']['coverage']:.2f}) "
              f"σ {g['dispersion']['rmse']:.1f} ({g['dispersion']['coverage']:.2f}) {g['seconds']:.0f}s", flush=True)
    write_markdown(out)


# ------------------------------------------------------------------------- scaling
def scaling_one(side, snr=50.0):
    """One size, in this (fresh) process: prints a JSON line."""
    from kinjax.cube_fit import fit_cube_spaxels
    from kinjax.cube_model import fit_cube_gp
    from kinjax.templates import load_emiles

    rss0 = maxrss_mb()
    library = load_emiles()
    t0 = time.perf_counter()
    mock = make_cube("rotating_disc_with_bulge", snr, (side, side), 7, wave_range=SCALING_WAVE,
                     pixel_scale=SCALING_FIELD / side)
    cube = mock.cube.log_rebin(rebin_lsf=True)
    t_mock = time.perf_counter() - t0
    rss_mock = maxrss_mb()
    t0 = time.perf_counter()
    spax = fit_cube_spaxels(cube, library, progress=False, mask_emission=False)
    t_spax = time.perf_counter() - t0
    rss_spax = maxrss_mb()
    t0 = time.perf_counter()
    gp = fit_cube_gp(cube, library, method="map", init=spax, progress=False, mask_emission=False)
    t_gp = time.perf_counter() - t0
    rss_gp = maxrss_mb()
    sc_s = scores(spax.mean_v, spax.mean_v_err, spax.dispersion, spax.dispersion_err, spax.fitted,
                  mock.mean_v, mock.dispersion)
    sc_g = scores(gp.mean_v, gp.mean_v_err, gp.dispersion, gp.dispersion_err, gp.fitted, mock.mean_v, mock.dispersion)
    print("RESULT " + json.dumps({
        "side": side, "n_spaxels": cube.n_spaxels, "n_pixels": int(cube.wave.size), "pixel_scale": SCALING_FIELD / side,
        "mock_s": t_mock, "spaxels_s": t_spax, "gp_map_s": t_gp, "gp_seconds": gp.info["seconds"],
        "lbfgs_steps": len(gp.info["objective"]), "dense": gp.info["dense"], "joint_laplace": gp.info["joint_laplace"],
        "maxrss_mb": {"after_imports": rss0, "after_mock": rss_mock, "after_spaxels": rss_spax, "after_gp": rss_gp},
        "rmse_spaxels": [sc_s["mean_v"]["rmse"], sc_s["dispersion"]["rmse"]],
        "rmse_gp": [sc_g["mean_v"]["rmse"], sc_g["dispersion"]["rmse"]],
        "load_end": [round(x, 2) for x in os.getloadavg()], "uptime_end": uptime(),
    }, default=float), flush=True)


def scaling(sides, timeout, save=None):
    rows = []
    for side in sides:
        t0 = time.perf_counter()
        try:
            proc = subprocess.run([sys.executable, __file__, "--scaling-one", str(side)], capture_output=True,
                                  text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            rows.append({"side": side, "n_spaxels": side * side, "error": f"timed out after {timeout} s"})
            print(f"scaling {side}²: timed out", flush=True)
            continue
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode or not line:
            rows.append({"side": side, "n_spaxels": side * side, "error": proc.stderr[-2000:]})
            print(f"scaling {side}²: failed\n{proc.stderr[-2000:]}", flush=True)
            continue
        r = json.loads(line[0][7:])
        r["wall_subprocess_s"] = time.perf_counter() - t0
        rows.append(r)
        if save is not None:
            save(rows)
        print(f"scaling {side}²: spaxels {r['spaxels_s']:.0f} s, GP MAP {r['gp_map_s']:.0f} s, "
              f"peak RSS {r['maxrss_mb']['after_gp']:.0f} MB", flush=True)
    return rows


# ------------------------------------------------------------------------- markdown
class _Labels:
    """Row labels: the galaxy's name, plus its noise seed where a galaxy/S/N has several cubes."""

    def __init__(self, names, runs):
        self.names = names
        self.count = {}
        for r in runs:
            self.count[(r["preset"], r["snr"])] = self.count.get((r["preset"], r["snr"]), 0) + 1

    def __getitem__(self, r):
        name = self.names[r["preset"]]
        return f"{name} (seed {r['seed']})" if self.count[(r["preset"], r["snr"])] > 1 else name


def markdown(out):
    runs = out["recovery"]
    parts = []
    names = {"rotating_disc_with_bulge": "disc + bulge", "counter_rotating_discs": "counter-rotating discs"}
    short = _Labels(names, runs)
    rows = []
    for r in runs:
        for name, m in r["methods"].items():
            if "error" in m:
                rows.append([short[r], r["snr"], name, "failed: " + m["error"][:60], *[""] * 7,
                             " / ".join(f"{x:.2f}" for x in r["load_start"])])
                continue
            rows.append([short[r], r["snr"], name,
                         f"{m['mean_v']['rmse']:.1f}", f"{m['mean_v']['coverage']:.2f}", f"{m['mean_v']['median_err']:.1f}",
                         f"{m['dispersion']['rmse']:.1f}", f"{m['dispersion']['coverage']:.2f}",
                         f"{m['dispersion']['median_err']:.1f}", f"{m['seconds']:.1f}",
                         f"{m['spectra_per_s']:.1f}" if "spectra_per_s" in m else "—",
                         " / ".join(f"{x:.2f}" for x in r["load_start"])])
    parts.append(table(["galaxy", "central S/N", "method", "RMSE MEAN_V", "coverage", "median err",
                        "RMSE DISPERSION", "coverage", "median err", "wall s", "spectra/s",
                        "load at start (1/5/15 min)"], rows))
    rows = []
    for r in runs:
        m = r["methods"]
        g, p, s = m[METHODS[1]], m[METHODS[2]], m[METHODS[0]]
        if "error" in g:
            rows.append([short[r], r["snr"], "—", "—", "—", "—", "—", "no (3D fit failed)"])
            continue
        rv = g["mean_v"]["rmse"] / p["mean_v"]["rmse"]
        rd = g["dispersion"]["rmse"] / p["dispersion"]["rmse"]
        cov_ok = all(0.6 <= g[k]["coverage"] <= 0.8 for k in ("mean_v", "dispersion"))
        rows.append([short[r], r["snr"], f"{rv:.2f}", f"{rd:.2f}",
                     f"{g['mean_v']['rmse'] / s['mean_v']['rmse']:.2f}",
                     f"{g['dispersion']['rmse'] / s['dispersion']['rmse']:.2f}",
                     f"{g['mean_v']['coverage']:.2f} / {g['dispersion']['coverage']:.2f}",
                     ("yes" if rv <= 0.5 and rd <= 0.5 and cov_ok else "no") if r["snr"] == 20 else "(S/N 20 only)"])
    parts.append(table(["galaxy", "central S/N", "3D/pPXF RMSE V", "3D/pPXF RMSE σ", "3D/kinjax-spaxels RMSE V",
                        "3D/kinjax-spaxels RMSE σ", "3D coverage V / σ", "target met (≤ 0.5 both, coverage 0.6–0.8)"],
                       rows))
    # pooled over the noise realisations of each galaxy and S/N
    rows = []
    for key in dict.fromkeys((r["preset"], r["snr"]) for r in runs):
        group = [r for r in runs if (r["preset"], r["snr"]) == key and "error" not in r["methods"][METHODS[1]]]
        if not group:
            continue
        rms = {m: [_pooled(group, m, q, "rmse") for q in ("mean_v", "dispersion")] for m in METHODS}
        cov = [_pooled(group, METHODS[1], q, "coverage") for q in ("mean_v", "dispersion")]
        rv, rd = rms[METHODS[1]][0] / rms[METHODS[2]][0], rms[METHODS[1]][1] / rms[METHODS[2]][1]
        ok = rv <= 0.5 and rd <= 0.5 and all(0.6 <= c <= 0.8 for c in cov)
        rows.append([names[key[0]], key[1], len(group),
                     " / ".join(f"{rms[m][0]:.1f}" for m in METHODS), " / ".join(f"{rms[m][1]:.1f}" for m in METHODS),
                     f"{rv:.2f} / {rd:.2f}", f"{cov[0]:.2f} / {cov[1]:.2f}",
                     ("yes" if ok else "no") if key[1] == 20 else "(S/N 20 only)"])
    parts.append(table(["galaxy", "central S/N", "cubes", "RMSE MEAN_V: spaxels / 3D / pPXF",
                        "RMSE DISPERSION: spaxels / 3D / pPXF", "3D/pPXF RMSE V / σ", "3D coverage V / σ",
                        "target met"], rows))
    rows = []
    for r in runs:
        p = r["methods"][METHODS[2]]
        rows.append([short[r], r["snr"], f"{p['coverage_with_plain_V_sigma_errors']['mean_v']:.2f}",
                     f"{p['coverage_with_plain_V_sigma_errors']['dispersion']:.2f}",
                     f"{p['n_full_cov']}/{p['n']}", f"{p['median_chi2_dof']:.3f}", f"{r['kinjax_median_chi2_dof']:.3f}",
                     f"{r['methods'][METHODS[1]].get('lbfgs_steps', '—')}"])
    parts.append(table(["galaxy", "central S/N", "pPXF coverage, plain V err", "pPXF coverage, plain σ err",
                        "pPXF spaxels with full 4×4 cov", "pPXF median χ²/DOF", "kinjax median χ²/DOF",
                        "GP L-BFGS steps"], rows))
    rows = []
    for r in out.get("scaling", []):
        if "error" in r:
            rows.append([r["n_spaxels"], "—", "—", "—", "—", "—", "—",
                         r["error"].splitlines()[-1][:80] if r["error"] else "failed"])
            continue
        rss = r["maxrss_mb"]
        rows.append([r["n_spaxels"], f"{r['spaxels_s']:.1f}", f"{r['gp_map_s']:.1f}",
                     f"{r['gp_seconds']['hyper']:.1f} / {r['gp_seconds']['optimise']:.1f} ({r['lbfgs_steps']} steps)",
                     f"{rss['after_spaxels']:.0f}", f"{rss['after_gp']:.0f}",
                     "{:.1f} / {:.1f} → {:.1f} / {:.1f}".format(*r["rmse_spaxels"], *r["rmse_gp"]),
                     f"dense={r['dense']}, joint Laplace={r['joint_laplace']}; load {r['load_end']}"])
    parts.append(table(["spaxels", "spaxel-by-spaxel MAP s", "3D MAP s (given the spaxel fit)",
                        "of which hyper / L-BFGS s", "peak RSS before GP (MB)", "peak RSS after GP (MB)",
                        "RMSE MEAN_V / DISPERSION km/s: spaxels → 3D", "notes"], rows))
    parts.append(_extra_table(runs, short, METHOD_G2, "two-Gaussian 3D"))
    parts.append(_extra_table(runs, short, METHODS_SE[1], "SE 3D", spaxels=METHODS_SE[0]))
    return parts


def _pooled(runs, method, key, stat):
    """One score of ``method`` pooled over ``runs``: RMSE as the root mean square, other stats as the mean."""
    vals = [r["methods"][method][key][stat] for r in runs]
    return float(np.sqrt(np.mean(np.square(vals)))) if stat == "rmse" else float(np.mean(vals))


def _extra_table(runs, short, method, label, spaxels=None):
    """Rows of one extra 3D method against pPXF (and its own spaxel fits), per cube."""
    rows = []
    for r in runs:
        g2 = r["methods"].get(method)
        if g2 is None:
            continue
        p = r["methods"][METHODS[2]]
        rv, rd = g2["mean_v"]["rmse"] / p["mean_v"]["rmse"], g2["dispersion"]["rmse"] / p["dispersion"]["rmse"]
        cov_ok = all(0.6 <= g2[k]["coverage"] <= 0.8 for k in ("mean_v", "dispersion"))
        sp = r["methods"].get(spaxels) if spaxels else None
        rows.append([short[r], r["snr"], f"{g2['mean_v']['rmse']:.1f} / {g2['dispersion']['rmse']:.1f}",
                     f"{g2['mean_v']['bias']:+.1f} / {g2['dispersion']['bias']:+.1f}",
                     f"{rv:.2f} / {rd:.2f}", f"{g2['mean_v']['coverage']:.2f} / {g2['dispersion']['coverage']:.2f}",
                     *([f"{sp['mean_v']['rmse']:.1f} / {sp['dispersion']['rmse']:.1f}",
                        f"{sp['mean_v']['coverage']:.2f} / {sp['dispersion']['coverage']:.2f}"] if spaxels else []),
                     f"{g2['seconds']:.0f}",
                     ("yes" if rv <= 0.5 and rd <= 0.5 and cov_ok else "no") if r["snr"] == 20 else "(S/N 20 only)"])
    # pooled over the S/N-20 cubes of each galaxy (RMSE: root mean square over cubes; coverage: mean)
    for preset in dict.fromkeys(r["preset"] for r in runs):
        sel = [r for r in runs if r["preset"] == preset and r["snr"] == 20 and method in r["methods"]]
        if len(sel) < 2 or spaxels:
            continue
        pooled = functools.partial(_pooled, sel)
        rv, rd = (pooled(method, k, "rmse") / pooled(METHODS[2], k, "rmse") for k in ("mean_v", "dispersion"))
        cv, cd = pooled(method, "mean_v", "coverage"), pooled(method, "dispersion", "coverage")
        rows.append([f"{short.names[preset]}, pooled ({len(sel)} cubes)", 20,
                     f"{pooled(method, 'mean_v', 'rmse'):.1f} / {pooled(method, 'dispersion', 'rmse'):.1f}",
                     f"{pooled(method, 'mean_v', 'bias'):+.1f} / {pooled(method, 'dispersion', 'bias'):+.1f}",
                     f"{rv:.2f} / {rd:.2f}", f"{cv:.2f} / {cd:.2f}", "—",
                     "yes" if rv <= 0.5 and rd <= 0.5 and 0.6 <= cv <= 0.8 and 0.6 <= cd <= 0.8 else "no"])
    head = ["galaxy", "central S/N", f"{label} RMSE V / σ", "bias V / σ", "3D/pPXF RMSE V / σ", "coverage V / σ",
            *(["its spaxel fits: RMSE V / σ", "coverage V / σ"] if spaxels else []),
            "wall s (3D stage)" if spaxels else "wall s (incl. its start)", "target met"]
    return table(head, rows) if rows else "(not run)"


def write_markdown(out):
    m0, m1 = out["machine_start"], out["machine_end"]
    t = markdown(out)
    runs = out["recovery"]
    shape = runs[0]["shape"]
    text = f"""# Cube recovery and scaling (kinjax vs pPXF 8.2.6)

Produced by `python benchmarks/cube_recovery.py` (results in `benchmarks/results/cube_recovery.json`;
`--markdown` rewrites this page from the JSON). Machine: {machine_line(m0)}; load at the end
{m1['load_1_5_15']}; total {out['total_s'] / 60:.1f} min. Wall times are indicative (the load average
at each cube's start is in the table).

## Recovery of MEAN_V and DISPERSION

Mocks: `kinjax.mock` presets on a {shape[0]} × {shape[1]} grid of 0.5" spaxels, 4800–5400 Å at 1.25 Å
(log-rebinned to {runs[0]['n_pixels']} pixels of {runs[0]['velscale']:.1f} km/s), FWHM 2.65 Å, central
S/N per pixel 20 / 50 / 100 falling as sqrt(flux) outwards (three noise seeds at S/N 20, one at 50
and 100). All spaxels
are fitted; RMSE (km/s) is over all {runs[0]['n_spaxels']} spaxels against the true light-weighted
moments; coverage is the fraction of spaxels with |fit − truth| ≤ the 1σ error (68 % if errors
are right). "spectra/s" includes compilation for kinjax on the first cube of the run (the
later cubes reuse it); the 3D fit's time is the GP stage only, given the spaxel fit (its L-BFGS
step is recompiled on every call, and that is included).

{t[0]}

Targets (issue: at central S/N 20 the 3D fit's RMSE at most half of pPXF's, with coverage
0.6–0.8), per cube:

{t[1]}

Pooled over the noise realisations of each galaxy and S/N (RMSE: root mean square over the cubes;
coverage: mean over the cubes):

{t[2]}

Counter-rotating discs with the two-Gaussian family (`fit_cube_gp(losvd="gauss2", start_radius=1.5)`: two
Gaussians, each with its own template mix and light fraction, GP priors on the blend's mean velocity
V = f1 V1 + (1 − f1) V2, the separation V2 − V1, ln σ1, ln σ2 and logit f1 (`kinjax.family.gauss2_mean_form`; rerun
with `--redo-gauss2`); the start is the spaxel-by-spaxel fit of the cube averaged over 3 × 3 spaxels; the 3D
objective and, since session 16, its errors carry the GP priors only, not the family's weak priors on single values;
since session 17 the GP kernel is Matérn-1/2, the family's default, and the hyperparameters are fitted to the start
as averages of the fields), on the same cubes:

{t[5]}

Sanders–Evans family (`--add-se`, run separately on the same cubes: `fit_cube_spaxels(losvd="se")`, then
`fit_cube_gp(losvd="se", init=...)` with GP priors on V, ln σ, ln σ_K, δ, κ; V and σ of this family are the
LOSVD's mean and dispersion exactly; the spaxel fits carry the family's weak shape priors, and so, since session 16,
does the 3D fit, beside its GP priors, in its objective and its errors alike):

{t[6]}

pPXF errors: MEAN_V / DISPERSION errors come from 200 draws from a Gaussian with pPXF's formal
covariance of (V, σ, h3, h4) (capfit's `cov`; diagonal only where a parameter sat at a bound),
propagated through the clipped GH LOSVD exactly as kinjax propagates its Laplace covariance. The
coverage one would get by simply quoting pPXF's V and σ errors for MEAN_V and DISPERSION:

{t[3]}

## Scaling of the 3D MAP fit

`rotating_disc_with_bulge(snr=50)` with a short range, 5050–5300 Å (201 linear pixels), on a
fixed 6" × 6" field sampled by n × n spaxels (the brightest spaxel always has S/N 50 and the others follow sqrt(flux);
a finer grid resolves the bulge's cusp, so most spaxels get a lower S/N as n grows),
each size in a fresh Python subprocess. Time: wall seconds of `fit_cube_spaxels` and of
`fit_cube_gp(method="map", init=...)` (compilation included). Memory: the process's peak resident
set size (`resource.getrusage(RUSAGE_SELF).ru_maxrss`, which includes JAX's buffers; tracemalloc
would miss them) after the spaxel fit and after the GP fit; the process holds ~{out['scaling'][0]['maxrss_mb']['after_imports'] if out.get('scaling') and 'maxrss_mb' in out['scaling'][0] else float('nan'):.0f} MB after importing JAX.

{t[4]}

## Notes

{out.get('notes', '')}
"""
    (HERE / "CUBE_RESULTS.md").write_text(text.rstrip() + "\n")
    return text


def add_se(path):
    """Sanders-Evans rows on the recorded cubes (same presets, S/N and seeds), merged into the JSON."""
    from kinjax.cube_fit import fit_cube_spaxels
    from kinjax.cube_model import fit_cube_gp
    from kinjax.templates import load_emiles

    out = json.loads(path.read_text())
    library = load_emiles()
    for r in out["recovery"]:
        mock = make_cube(r["preset"], r["snr"], tuple(r["shape"]), r["seed"])
        cube = mock.cube.log_rebin(rebin_lsf=True)
        tv, td = mock.mean_v, mock.dispersion
        t0 = time.perf_counter()
        spax = fit_cube_spaxels(cube, library, losvd="se", progress=False, seed=r["seed"], mask_emission=False)
        t_spax = time.perf_counter() - t0
        r["methods"][METHODS_SE[0]] = {**scores(spax.mean_v, spax.mean_v_err, spax.dispersion, spax.dispersion_err,
                                                spax.fitted, tv, td),
                                       "seconds": t_spax, "spectra_per_s": spax.fitted.sum() / t_spax,
                                       "load_start": [round(x, 2) for x in os.getloadavg()]}
        t0 = time.perf_counter()
        gp = fit_cube_gp(cube, library, losvd="se", method="map", init=spax, progress=False, seed=r["seed"],
                         mask_emission=False)
        r["methods"][METHODS_SE[1]] = {**scores(gp.mean_v, gp.mean_v_err, gp.dispersion, gp.dispersion_err,
                                                gp.fitted, tv, td),
                                       "seconds": time.perf_counter() - t0, "hyper": gp.info["hyper"],
                                       "lbfgs_steps": len(gp.info["objective"])}
        out["se_machine"] = machine()
        path.write_text(json.dumps(out, indent=2, default=float) + "\n")
        m = r["methods"]
        print(f"{r['preset']} S/N {r['snr']} seed {r['seed']}: " + "; ".join(
            f"{k}: V {m[k]['mean_v']['rmse']:.1f} ({m[k]['mean_v']['coverage']:.2f}) "
            f"σ {m[k]['dispersion']['rmse']:.1f} ({m[k]['dispersion']['coverage']:.2f}) {m[k]['seconds']:.0f}s"
            for k in (*METHODS_SE, METHODS[2])), flush=True)
    write_markdown(out)


def main():
    args = sys.argv[1:]
    if "--add-se" in args:
        add_se(RESULTS / "cube_recovery.json")
        return
    if "--redo-gauss2" in args:
        redo_gauss2(RESULTS / "cube_recovery.json")
        return
    if "--scaling-one" in args:
        scaling_one(int(args[args.index("--scaling-one") + 1]))
        return
    name = "cube_recovery_quick" if "--quick" in args else "cube_recovery"
    path = RESULTS / f"{name}.json"
    if "--merge" in args:  # recovery JSON + the scaling-only partial file -> final JSON and page
        out = json.loads(path.read_text())
        part = RESULTS / "cube_recovery_scaling.partial.json"
        if part.exists():
            out["scaling"] = json.loads(part.read_text())["scaling"]
        out.pop("partial", None)
        out["machine_end"] = machine()
        out["total_s"] = out.get("total_s") or sum(
            r["mock_s"] + sum(m["seconds"] for m in r["methods"].values()) for r in out["recovery"]) + sum(
            r.get("wall_subprocess_s", 0) for r in out.get("scaling", []))
        path.write_text(json.dumps(out, indent=2, default=float) + "\n")
        print(write_markdown(out))
        return
    if "--markdown" in args:
        print(write_markdown(json.loads(path.read_text())))
        return
    if "--add-scaling" in args:  # one more size, merged by side into the recorded JSON and page
        side = int(args[args.index("--add-scaling") + 1])
        rows = scaling((side,), 3600)
        out = json.loads(path.read_text())
        out["scaling"] = sorted([r for r in out.get("scaling", []) if r["side"] != side] + rows,
                                key=lambda r: r["side"])
        path.write_text(json.dumps(out, indent=2, default=float) + "\n")
        write_markdown(out)
        return
    t_start = time.perf_counter()
    out = {"machine_start": machine()}
    recorded = json.loads(path.read_text()) if path.exists() else {}  # before the partial saves overwrite it
    if "--quick" in args:
        out["recovery"] = recovery((4, 4), (20,), PRESETS)
        out["scaling"] = scaling((6,), 600)
    else:
        sides = SCALING_SIDES + ((80,) if "--with-6400" in args else ())
        RESULTS.mkdir(exist_ok=True)
        if "--scaling-only" in args:  # its own file, merged by --merge (so both can run at once)
            part = RESULTS / "cube_recovery_scaling.partial.json"
            save = lambda rows: part.write_text(json.dumps({"machine_start": out["machine_start"],  # noqa: E731
                                                             "scaling": rows}, indent=2, default=float))
            scaling(sides, 900, save)
            return
        save = lambda runs: path.write_text(json.dumps({**out, "recovery": runs, "partial": True},  # noqa: E731
                                                       indent=2, default=float) + "\n")
        out["recovery"] = recovery(GRID, SNRS, PRESETS, save)
        if "--no-scaling" in args:  # keep the recorded scaling rows (their own dates are in the notes)
            out["scaling"] = recorded.get("scaling", [])
        else:
            out["scaling"] = scaling(sides, 900)
    out["machine_end"] = machine()
    out["total_s"] = time.perf_counter() - t_start
    out["notes"] = recorded.get("notes", "")
    path.write_text(json.dumps(out, indent=2, default=float) + "\n")
    if "--quick" not in args:
        write_markdown(out)
    print(json.dumps({k: v for k, v in out.items() if k != "recovery"}, indent=1, default=float)[:3000])


if __name__ == "__main__":
    main()
