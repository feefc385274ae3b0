"""Single vs double precision: the same fits with JAX's 64-bit types on and off.

Run: ``python benchmarks/precision.py [N]`` (N × N mock cube, default 8). Each precision runs
in its own Python process (``jax_enable_x64`` must be set before anything is traced):

- NGC 4550 MAP (150 E-MILES templates, 4 GH moments, degree 4, noise 0.0047): values, Laplace
  errors, χ²/DOF, time per fit after compilation (median of 5) and the first call;
- a mock cube (``rotating_disc_with_bulge``, central S/N 20, seed 0, N × N spaxels, all 150
  E-MILES templates): spaxel-by-spaxel MAP and the 3D GP MAP, with MEAN_V and DISPERSION
  per spaxel.

Float32 is what most GPUs run fastest. The delicate step is the template weights' NNLS,
which kinjax solves by QR in single precision (``kinjax.linear.nnls_qr``). Results go to
``benchmarks/results/precision.json``; the table compares float32 with float64 in units of
the float64 errors.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _common import machine, machine_line, median_time, table, write  # noqa: E402

NAMES = ("v", "sigma", "h3", "h4")


def one(precision: str, n: int) -> dict:
    """Run every fit in this process at ``precision`` ("float32" or "float64")."""
    import jax

    jax.config.update("jax_enable_x64", precision == "float64")
    import numpy as np

    import kinjax.mock as mock
    from kinjax.cube_fit import fit_cube_spaxels
    from kinjax.cube_model import fit_cube_gp
    from kinjax.datasets import ngc4550
    from kinjax.fit import fit_spectrum, setup_fit
    from kinjax.templates import load_emiles

    out = {"precision": precision, "machine": machine()}
    setup = setup_fit(ngc4550(), noise=0.0047)
    t0 = time.perf_counter()
    fit = lambda: fit_spectrum(None, setup=setup, method="map", progress=False)  # noqa: E731
    s = fit().summary()
    first = time.perf_counter() - t0
    med, _ = median_time(fit, 5)
    out["ngc4550"] = {**{k: s[k] for k in NAMES}, **{f"{k}_err": s[f"{k}_err"] for k in NAMES},
                      "chi2_dof": s["chi2_dof"], "seconds": med, "first_s": first}

    galaxy = mock.rotating_disc_with_bulge(snr=20.0, shape=(n, n), seed=0)
    m = mock.make_mock_cube(galaxy)
    cube, library = m.cube.log_rebin(), load_emiles()
    t0 = time.perf_counter()
    spax = fit_cube_spaxels(cube, library, progress=False, mask_emission=False)
    t_spax = time.perf_counter() - t0
    t0 = time.perf_counter()
    gp = fit_cube_gp(cube, library, method="map", init=spax, progress=False, mask_emission=False)
    t_gp = time.perf_counter() - t0
    out["cube"] = {"n": n, "truth": {"mean_v": np.ravel(m.mean_v).tolist(), "dispersion": np.ravel(m.dispersion).tolist()},
                   "seconds": {"spaxels": t_spax, "gp": t_gp}}
    for name, f in (("spaxels", spax), ("gp", gp)):
        out["cube"][name] = {k: np.asarray(getattr(f, k), float).tolist()
                             for k in ("mean_v", "mean_v_err", "dispersion", "dispersion_err")}
    return out


def main():
    args = sys.argv[1:]
    if args and args[0] == "--one":
        print(json.dumps(one(args[1], int(args[2]))))
        return
    n = int(args[0]) if args else 8
    t0 = time.perf_counter()
    runs = {}
    for precision in ("float64", "float32"):
        proc = subprocess.run([sys.executable, __file__, "--one", precision, str(n)], capture_output=True,
                              text=True, check=True)
        runs[precision] = json.loads(proc.stdout.strip().splitlines()[-1])
    write("precision", {"runs": runs, "total_s": time.perf_counter() - t0})
    print(markdown({"runs": runs}))


def markdown(results) -> str:
    import numpy as np

    r64, r32 = results["runs"]["float64"], results["runs"]["float32"]
    a, b = r64["ngc4550"], r32["ngc4550"]
    rows = [[p, f"{a[k]:.4g} ± {a[k + '_err']:.3g}", f"{b[k]:.4g} ± {b[k + '_err']:.3g}",
             f"{abs(b[k] - a[k]) / a[k + '_err']:.4f}", f"{b[k + '_err'] / a[k + '_err']:.3f}"]
            for p, k in zip(("V", "σ", "h3", "h4"), NAMES)]
    rows.append(["χ²/DOF", f"{a['chi2_dof']:.4f}", f"{b['chi2_dof']:.4f}", "", ""])
    rows.append(["time per fit (first call)", f"{a['seconds'] * 1e3:.0f} ms ({a['first_s']:.1f} s)",
                 f"{b['seconds'] * 1e3:.0f} ms ({b['first_s']:.1f} s)", "", ""])
    parts = ["**NGC 4550, MAP**", "",
             table(["", "float64", "float32", "abs Δ / float64 error", "error ratio 32/64"], rows), ""]
    c64, c32 = r64["cube"], r32["cube"]
    truth = c64["truth"]
    rows = []
    for method in ("spaxels", "gp"):
        for k, label in (("mean_v", "MEAN_V"), ("dispersion", "DISPERSION")):
            x, y = np.array(c64[method][k]), np.array(c32[method][k])
            e = np.array(c64[method][f"{k}_err"])
            pull = np.abs(y - x) / e
            rmse = lambda z: float(np.sqrt(np.nanmean((z - np.array(truth[k])) ** 2)))  # noqa: E731
            ratio = np.nanmedian(np.array(c32[method][f"{k}_err"]) / e)
            rows.append([{"spaxels": "spaxel by spaxel", "gp": "3D GP MAP"}[method], label,
                         f"{rmse(x):.2f} / {rmse(y):.2f}", f"{np.nanmedian(pull):.4f} / {np.nanmax(pull):.4f}",
                         f"{ratio:.3f}", f"{c64['seconds'][method]:.1f} / {c32['seconds'][method]:.1f}"])
    n = c64["n"]
    parts += [f"**Mock cube** (`rotating_disc_with_bulge`, central S/N 20, seed 0, {n} × {n} spaxels, 150 E-MILES "
              "templates)", "",
              table(["fit", "map", "RMSE vs truth km/s (64 / 32)", "abs Δ / float64 error: median / max",
                     "error ratio 32/64 (median)", "wall s (64 / 32, compilation included)"], rows), "",
              f"float64: {machine_line(r64['machine'])}", "", f"float32: {machine_line(r32['machine'])}"]
    return "\n".join(parts)


if __name__ == "__main__":
    main()
