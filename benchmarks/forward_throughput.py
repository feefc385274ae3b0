"""Forward-model and gradient throughput (spectra per second) on NGC 4550's grid.

Batches of 1, 100 and 1000 spectra, each with its own random Gauss-Hermite LOSVD
(V, σ, h3, h4) and template weights, evaluated by ``jax.jit(jax.vmap(model))``; the
gradient is ``jax.grad`` of a scalar χ² with respect to the four LOSVD parameters,
vmapped over the batch. Templates: the 150 E-MILES SSPs prepared for NGC 4550
(velscale_ratio 2), and their 20 leading principal components; and, for a like-for-like
comparison with the bare-JAX prototype (20 templates × 2048 pixels), 20 E-MILES principal
components on a synthetic 2048-pixel log grid (60 km/s, velscale_ratio 1). float32 and float64.
Compile time (first call) is reported separately from the steady-state time (median of
several repeats).

Run: ``python benchmarks/forward_throughput.py`` (about 2-4 minutes on 2 cores).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import jax

jax.config.update("jax_enable_x64", True)  # so that float64 is available; dtypes are chosen explicitly

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, machine_line, median_time, table, write  # noqa: E402

from kinjax.datasets import ngc4550  # noqa: E402
from kinjax.fit import setup_fit  # noqa: E402
from kinjax.forward import make_forward_model  # noqa: E402
from kinjax.losvd import GaussHermite  # noqa: E402
from kinjax.constants import C_KMS  # noqa: E402
from kinjax.spectrum import Spectrum  # noqa: E402
from kinjax.templates import load_emiles, pca_templates, prepare_templates  # noqa: E402

BATCHES = (1, 100, 1000)


def repeats_for(batch):
    return {1: 50, 100: 10, 1000: 5}[batch]


def bench(fm, dtype, batch, rng):
    n_t = fm.n_templates
    theta = np.column_stack([
        rng.uniform(-300, 300, batch), rng.uniform(60, 250, batch),
        rng.uniform(-0.1, 0.1, batch), rng.uniform(-0.1, 0.1, batch),
    ]).astype(dtype)
    weights = rng.uniform(0, 1, (batch, n_t)).astype(dtype) / n_t
    add = np.zeros((batch, fm.degree + 1), dtype)
    theta, weights, add = (jnp.asarray(a) for a in (theta, weights, add))

    def model(th, w, a):
        return fm(GaussHermite(th[0], th[1], th[2:]), w, a)

    y = jax.vmap(model)(theta, weights, add) * 1.01  # data slightly off the model
    inv_noise = jnp.asarray(100.0, dtype)

    def chi2(th, w, a, d):
        return jnp.sum(((model(th, w, a) - d) * inv_noise) ** 2)

    fwd = jax.jit(jax.vmap(model))
    grad = jax.jit(jax.vmap(jax.grad(chi2), in_axes=(0, 0, 0, 0)))
    out = {}
    for name, fn, args in (("forward", fwd, (theta, weights, add)), ("gradient", grad, (theta, weights, add, y))):
        lowered_t0 = time.perf_counter()
        compiled = fn.lower(*args).compile()
        compile_s = time.perf_counter() - lowered_t0
        res = compiled(*args)
        jax.block_until_ready(res)
        assert np.all(np.isfinite(np.asarray(res))), f"non-finite {name}"
        med, times = median_time(lambda: jax.block_until_ready(compiled(*args)), repeats_for(batch))
        out[name] = {"compile_s": compile_s, "median_s": med, "times_s": times,
                     "spectra_per_s": batch / med, "repeats": len(times)}
    return out


def prototype_grid(n_pix=2048, velscale=60.0):
    """A grid the size of the bare-JAX prototype's: 2048 log pixels from 4000 Å at 60 km/s,
    20 PCA components of E-MILES prepared at the same velscale (velscale_ratio 1)."""
    wave = 4000.0 * np.exp(np.arange(n_pix) * velscale / C_KMS)
    spec = Spectrum(wave, np.ones(n_pix), np.full(n_pix, 0.01), None, fwhm=2.8, velscale=velscale)
    tpl = prepare_templates(load_emiles(), spec, velscale_ratio=1, vmax=2000.0)
    return spec, pca_templates(tpl, 20)


def main():
    t_start = time.perf_counter()
    rng = np.random.default_rng(1)
    setup = setup_fit(ngc4550(), noise=0.0047)
    full = setup.templates
    pca = pca_templates(full, 20)
    sets = {"E-MILES 150": full, "PCA 20": pca}
    proto_spec, proto_tpl = prototype_grid()
    results = {"machine_start": machine(), "runs": []}
    cases = [(name, tpl, setup.spectrum) for name, tpl in sets.items()]
    cases.append(("PCA 20, 2048-px grid", proto_tpl, proto_spec))
    for set_name, tpl, spectrum in cases:
        for dtype in (np.float32, np.float64):
            fm = make_forward_model(tpl, spectrum, degree=4, dtype=dtype)
            for batch in BATCHES:
                r = bench(fm, dtype, batch, rng)
                row = {"templates": set_name, "n_templates": fm.n_templates, "n_pix": fm.n_pix,
                       "n_template_pix": int(tpl.n_pix), "n_fft": fm.n_pad,
                       "dtype": np.dtype(dtype).name, "batch": batch, **r, "load_1": round(__import__("os").getloadavg()[0], 2)}
                results["runs"].append(row)
                print(f"{set_name:12s} {np.dtype(dtype).name} batch {batch:5d}: "
                      f"fwd {r['forward']['spectra_per_s']:10.0f}/s  grad {r['gradient']['spectra_per_s']:10.0f}/s  "
                      f"(compile {r['forward']['compile_s']:.2f}/{r['gradient']['compile_s']:.2f} s)", flush=True)
    results["machine_end"] = machine()
    results["total_s"] = time.perf_counter() - t_start
    write("forward_throughput", results)
    print()
    print(markdown(results))


def markdown(results):
    rows = []
    for r in results["runs"]:
        f, g = r["forward"], r["gradient"]
        rows.append([r["templates"], r["dtype"], r["batch"], f"{f['spectra_per_s']:,.0f}", f"{g['spectra_per_s']:,.0f}",
                     f"{1e3 * f['median_s']:.2f}", f"{1e3 * g['median_s']:.2f}",
                     f"{f['compile_s']:.2f} / {g['compile_s']:.2f}", r["load_1"]])
    head = ["templates", "dtype", "batch", "forward spectra/s", "gradient spectra/s", "forward ms/batch",
            "gradient ms/batch", "compile s (fwd / grad)", "load"]
    grids = {}
    for r in results["runs"]:
        grids.setdefault(r["templates"], f"{r['templates']}: {r['n_pix']} galaxy pixels, {r['n_template_pix']} "
                                         f"template pixels, FFT length {r['n_fft']}")
    note = (f"Grids: {'; '.join(grids.values())} (NGC 4550 at velscale_ratio 2; the 2048-px grid at "
            f"velscale_ratio 1, 60 km/s, the size of the bare prototype's). Machine: {machine_line(results['machine_start'])}; "
            f"load at end {results['machine_end']['load_1_5_15']}; total {results['total_s']:.0f} s.")
    return table(head, rows) + "\n\n" + note


if __name__ == "__main__":
    main()
