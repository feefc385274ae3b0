"""Monte Carlo calibration of kinjax's NUTS posteriors (Gauss-Hermite truths).

The Laplace errors of the MAP fits under-cover V and σ at S/N 30 (``montecarlo.py``).
This run asks whether the full posterior does better, on Gauss-Hermite mocks drawn like
``montecarlo.py``'s (its seed and drawing order with ``n_per_sn`` mocks per S/N, i.e. the mocks
of ``montecarlo.py n_per_sn``: V ~ U(-300, 300) km/s, σ ~ U(60, 250) km/s,
h3, h4 ~ U(-0.1, 0.1), random mixtures of 3 E-MILES SSPs on the NGC 4550 grid, S/N 10,
30, 100) are sampled with ``fit_spectrum``'s NUTS scheme and default setting: MAP (the
two-start fitter), then ``kinjax.fit.sample_posterior`` with fit_spectrum's default
setting (4 chains x (150 + 400) since session 21; 4 x (300 + 250) before) of the whitened
posterior with the linear parameters profiled and the default Normal(0, 0.1) prior on h3,
h4 (compiled once per number of template slots, reused for every mock). The chains have
a fixed length here (``min_ess=None``): the records measure that setting, whose ESS they
report; fit_spectrum's default ``min_ess=400`` only adds draws to posteriors whose ESS
falls short. Reported per S/N: bias of the posterior medians, their scatter, the
coverage of the central 68 % credible intervals (16th-84th percentiles), and for
comparison the coverage of the MAP's Laplace intervals on the same mocks; plus the median
min-ESS, max R-hat, divergences and time per spectrum.

``--prior-truths`` (with ``n``, e.g. 40) instead adds one S/N-30 cell whose h3, h4 are drawn
from the fit's own Normal(0, 0.1) prior, a check of calibration against the prior.

Run: ``python benchmarks/montecarlo_nuts.py [n_per_sn] [--with-sn10]`` (default 50 per S/N at
S/N 30 and 100: 100 posteriors, about 2 min on 2 cores since session 21; S/N 10 is skipped unless asked).
``--sn10 [--from S]`` fits ``n`` of the S/N-10 mocks of the MAP Monte Carlo's record instead
(about 1 s per posterior here since session 21, 12 s in session 18; see :func:`sn10_cells`); ``--prior-truths --sn10``
fits ``n`` S/N-10 mocks whose parameters are drawn from the fit's own prior
(:func:`prior_truths_sn10`).
"""

from __future__ import annotations

import inspect
import os
import sys
import time
from pathlib import Path

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, machine_line, table, write  # noqa: E402
from montecarlo import GH_NAMES, SE_NAMES, SNS, draw_truths, make_mocks, stats, stats_cells  # noqa: E402

from kinjax.datasets import ngc4550  # noqa: E402
from kinjax.fit import fit_spectrum, sample_posterior, setup_fit, single_threaded_blas  # noqa: E402

#: fit_spectrum's default NUTS setting (4 x (150 + 400) since session 21; the records before
#: that, whose tables say so, used 4 x (300 + 250))
NUM_WARMUP, NUM_SAMPLES, NUM_CHAINS = (inspect.signature(fit_spectrum).parameters[k].default
                                       for k in ("num_warmup", "num_samples", "num_chains"))


def fit_cell(setup, ys, w, truths, sn, key_base, names=GH_NAMES):
    """NUTS posteriors (and the MAP's Laplace intervals) for one set of mocks; a result cell.

    ``names``: the parameters scored, the first ``len(names)`` of θ (V, σ, h3, h4 for
    Gauss-Hermite; mean V and dispersion for Sanders-Evans).
    """
    import arviz as az

    k = len(names)

    n = len(ys)
    med, lo, hi, laplace, ess, rhat, div, times, at_bound = [], [], [], [], [], [], [], [], []
    for i, y in enumerate(ys):
        y = jnp.asarray(y)
        t0 = time.perf_counter()
        with single_threaded_blas():  # as fit_spectrum runs
            sol = setup.fitter(y, w)
            draws, diag = sample_posterior(setup, sol, y, w, num_warmup=NUM_WARMUP, num_samples=NUM_SAMPLES,
                                           num_chains=NUM_CHAINS, seed=key_base + i, min_ess=None)
        times.append(time.perf_counter() - t0)
        flat = draws.reshape(-1, draws.shape[-1])[:, :k]
        q = np.percentile(flat, [15.865, 50.0, 84.135], axis=0)
        lo.append(q[0]), med.append(q[1]), hi.append(q[2])
        laplace.append([np.asarray(sol.theta)[:k], np.sqrt(np.diag(np.asarray(sol.cov)))[:k]])
        at_bound.append(list(setup.spec.on_bounds(np.asarray(sol.theta))))
        ds = az.convert_to_dataset({nm: draws[..., j] for j, nm in enumerate(names)})
        ess.append(min(float(az.ess(ds)[nm]) for nm in names))
        rhat.append(max(float(az.rhat(ds)[nm]) for nm in names))
        div.append(int(diag["divergences"]))
    med, lo, hi = np.array(med), np.array(lo), np.array(hi)
    inside = (truths[:, :k] >= lo) & (truths[:, :k] <= hi)
    post = stats(med, 0.5 * (hi - lo), truths[:, :k])
    post["coverage"] = inside.mean(0).tolist()  # the actual 16-84 % interval, not median ± half-width
    lap_theta, lap_err = np.array([a for a, _ in laplace]), np.array([b for _, b in laplace])
    cell = {"sn": sn, "N": n, "posterior": post, "laplace": stats(lap_theta, lap_err, truths[:, :k]),
            "min_ess_median": float(np.median(ess)), "min_ess_min": float(np.min(ess)),
            "rhat_max": float(np.max(rhat)), "divergences_total": int(np.sum(div)),
            "mocks_with_divergences": int(np.sum(np.array(div) > 0)),
            "seconds_median": float(np.median(times[1:] if len(times) > 1 else times)),
            "first_s": float(times[0]), "load_1": round(os.getloadavg()[0], 2),
            # per mock, for diagnosing where intervals miss: truth, 16/50/84 %, divergences
            "per_mock": {"truth": truths[:, :k].tolist(), "lo": lo.tolist(), "median": med.tolist(),
                         "hi": hi.tolist(), "divergences": div, "min_ess": ess, "max_rhat": rhat,
                         "seconds": times, "laplace_theta": lap_theta.tolist(), "laplace_err": lap_err.tolist(),
                         "map_at_bound": at_bound}}
    return cell


def prior_truths_sn10(n, more=False):
    """S/N 10, every kinematic parameter drawn from the fit's own prior (``--prior-truths --sn10``).

    σ ~ U(5, 1000) km/s (the family's bounds, the uniform prior), h3, h4 ~ Normal(0, 0.1)
    truncated to ±0.3 (by redrawing), V ~ U(−300, 300) km/s (the prior is U(−2000, 2000);
    at these velocities the bounds are far from every posterior, so the likelihood is
    translation invariant and drawing V from a narrower range changes nothing). If the model
    and the sampler are right, the 68 % intervals cover 68 % of such truths whatever the
    S/N; the issue's mocks (σ 60–250 km/s, h ~ U(−0.1, 0.1)) are not drawn from this
    prior, which is what their S/N-10 cell measures. Stored as ``prior_truths_sn10``;
    with ``more`` (``--more``), ``n`` further mocks from another seed, stored as
    ``prior_truths_sn10_more`` and pooled with the first in the page.
    """
    import json

    path = Path(__file__).resolve().parent / "results" / "montecarlo_nuts.json"
    out = json.loads(path.read_text())
    rng = np.random.default_rng(2028 if more else 2027)
    h = rng.normal(0.0, 0.1, (4 * n, 2))
    h = h[np.all(np.abs(h) <= 0.3, axis=1)][:n]
    truths = np.column_stack([rng.uniform(-300, 300, n), rng.uniform(5, 1000, n), h])
    setup = setup_fit(ngc4550(), noise=0.0047, h_prior=0.1)
    fm = setup.forward
    ys, sigma = make_mocks(fm, truths, "gh", 10, rng)
    w = jnp.asarray(np.where(np.asarray(setup.spectrum.mask), 1.0 / sigma, 0.0))
    t0 = time.perf_counter()
    cell = fit_cell(setup, ys, w, truths, 10, 67000 if more else 66000)
    cell["machine"] = machine()
    cell["total_s"] = time.perf_counter() - t0
    out["prior_truths_sn10_more" if more else "prior_truths_sn10"] = cell
    write("montecarlo_nuts", out)
    print("prior truths S/N 10: posterior coverage", np.round(cell["posterior"]["coverage"], 2),
          "laplace", np.round(cell["laplace"]["coverage"], 2), flush=True)


def prior_truths(n, sn=30, h_from_prior=True):
    """Calibration against the prior: h3, h4 drawn from the fit's own Normal(0, 0.1) prior.

    A posterior is calibrated *on average over its prior*: if the truths are drawn from
    it, the 68 % intervals must cover 68 % of them. The issue's mocks draw h3, h4 from
    U(-0.1, 0.1) instead. Same V and σ distributions, new seed; result added to the
    recorded JSON as ``prior_truths`` (the other cells are kept).

    With ``h_from_prior=False`` (``--more``): ``n`` more mocks drawn exactly like the
    issue's (h ~ U(-0.1, 0.1)) from a new seed, stored as ``more_sn30``, to shrink the
    binomial error of the S/N-30 coverage (±0.066 from 50 mocks).
    """
    import json

    path = Path(__file__).resolve().parent / "results" / "montecarlo_nuts.json"
    out = json.loads(path.read_text())
    rng = np.random.default_rng(2025 if h_from_prior else 2026)
    truths = draw_truths(rng, n, "gh")
    if h_from_prior:
        truths[:, 2:4] = np.clip(rng.normal(0.0, 0.1, (n, 2)), -0.29, 0.29)
    setup = setup_fit(ngc4550(), noise=0.0047, h_prior=0.1)
    fm = setup.forward
    ys, sigma = make_mocks(fm, truths, "gh", sn, rng)
    w = jnp.asarray(np.where(np.asarray(setup.spectrum.mask), 1.0 / sigma, 0.0))
    t0 = time.perf_counter()
    name = "prior_truths" if h_from_prior else "more_sn30"
    cell = fit_cell(setup, ys, w, truths, sn, 77000 if h_from_prior else 88000)
    cell["machine"] = machine()
    cell["total_s"] = time.perf_counter() - t0
    out[name] = cell
    write("montecarlo_nuts", out)
    print(name, "S/N", sn, "posterior coverage", np.round(cell["posterior"]["coverage"], 2),
          "laplace", np.round(cell["laplace"]["coverage"], 2), flush=True)


def se_cells(n_fit=50, n_gh=200, n_se=100, start=0):
    """NUTS posteriors for montecarlo.py's Sanders-Evans mocks (S/N 30 and 100).

    Replays the random draws of ``montecarlo.py 200 100`` (the recorded Monte Carlo: its
    Gauss-Hermite cells come first), so the mocks are that record's SE mocks, and fits the
    first ``n_fit`` of them per S/N with the SE family's MAP and then NUTS (the default setting,
    the linear parameters profiled, the family's default priors, one compiled program for
    every mock), scoring the mean V and dispersion (θ[0], θ[1] of the SE family; the MAP's
    Laplace intervals on the same mocks come along). Result added to the recorded JSON as
    ``se_cells`` (the other cells are kept).

    History: until session 10 the whitening took the MAP's Laplace covariance as it was;
    the SE MAP usually sits at σ_K's lower bound (0.01), where that covariance gave the
    sampler coordinate of σ_K a standard deviation of ~640 against a posterior one of
    ~0.6, trees ran to depth 9 and one posterior took about 2 minutes, so nothing was
    recorded. :func:`kinjax.fit.nuts_inputs` now caps each coordinate's sd at 1.

    ``start`` (``--from S``): fit mocks ``S … S + n_fit − 1`` instead, with the per-mock keys a
    single run over all of them would use, stored as ``se_cells_more`` and pooled with
    ``se_cells`` in the page (to shrink the binomial errors of a 50-mock cell).
    """
    import json

    path = Path(__file__).resolve().parent / "results" / "montecarlo_nuts.json"
    out = json.loads(path.read_text())
    rng = np.random.default_rng(2024)
    gh = setup_fit(ngc4550(), noise=0.0047, h_prior=0.1)
    setup = setup_fit(ngc4550(), noise=0.0047, losvd="se")
    mask = np.asarray(setup.spectrum.mask)
    for sn in SNS:  # replay the GH cells' draws
        make_mocks(gh.forward, draw_truths(rng, n_gh, "gh"), "gh", sn, rng)
    cells, t0 = [], time.perf_counter()
    for sn in SNS:
        truths = draw_truths(rng, n_se, "se")
        ys, sigma = make_mocks(gh.forward, truths, "se", sn, rng)
        if sn == 10:
            continue
        w = jnp.asarray(np.where(mask, 1.0 / sigma, 0.0))
        pick = slice(start, start + n_fit)
        cell = fit_cell(setup, ys[pick], w, truths[pick], sn, 5000 * sn + start, names=SE_NAMES)
        cell["machine"] = machine()
        cell["first_mock"] = start
        cells.append(cell)
        out["se_cells_more" if start else "se_cells"] = cells
        out["se_more_total_s" if start else "se_total_s"] = time.perf_counter() - t0
        write("montecarlo_nuts", out)
        print("SE S/N", sn, "posterior coverage", np.round(cell["posterior"]["coverage"], 2),
              "laplace", np.round(cell["laplace"]["coverage"], 2),
              f"ESS {cell['min_ess_median']:.0f}, {cell['seconds_median']:.1f} s/fit", flush=True)


def sn10_cells(n_fit=50, start=0, n_gh=200):
    """NUTS posteriors for the S/N-10 Gauss-Hermite mocks of the recorded MAP Monte Carlo.

    Replays the draws of ``montecarlo.py 200 100`` (its S/N-10 Gauss-Hermite cell comes
    first), so these are the mocks on which every MAP and pPXF fit failed the coverage
    target (Laplace V coverage 0.55), and fits mocks ``start … start + n_fit − 1`` with the
    default NUTS scheme (per-mock keys independent of the chunking). Each run is stored as
    one chunk of ``sn10`` in the recorded JSON (chunks with the same ``first_mock`` are
    replaced, the others kept), and the page pools the chunks.

    Why in chunks: at S/N 10 a posterior took 8-40 s here in session 18 (broad, skewed,
    sometimes two modes), so 200 of them were about an hour; since session 21 about 1-9 s.
    """
    import json

    path = Path(__file__).resolve().parent / "results" / "montecarlo_nuts.json"
    out = json.loads(path.read_text())
    rng = np.random.default_rng(2024)
    setup = setup_fit(ngc4550(), noise=0.0047, h_prior=0.1)
    fm = setup.forward
    truths = draw_truths(rng, n_gh, "gh")
    ys, sigma = make_mocks(fm, truths, "gh", 10, rng)
    w = jnp.asarray(np.where(np.asarray(setup.spectrum.mask), 1.0 / sigma, 0.0))
    pick = slice(start, start + n_fit)
    t0 = time.perf_counter()
    cell = fit_cell(setup, ys[pick], w, truths[pick], 10, 10000 + start)
    cell["machine"] = machine()
    cell["first_mock"] = start
    cell["total_s"] = time.perf_counter() - t0
    chunks = [c for c in out.get("sn10", []) if c["first_mock"] != start]
    out["sn10"] = sorted([*chunks, cell], key=lambda c: c["first_mock"])
    write("montecarlo_nuts", out)
    print("S/N 10 mocks", start, "-", start + n_fit - 1, "posterior coverage", np.round(cell["posterior"]["coverage"], 2),
          "laplace", np.round(cell["laplace"]["coverage"], 2),
          f"ESS {cell['min_ess_median']:.0f}, {cell['seconds_median']:.1f} s/fit", flush=True)


def main():
    argv = sys.argv[1:]
    args = [a for i, a in enumerate(argv) if not a.startswith("--") and (i == 0 or argv[i - 1] != "--from")]
    n = int(args[0]) if args else 50
    start = int(sys.argv[sys.argv.index("--from") + 1]) if "--from" in sys.argv else 0
    if "--prior-truths" in sys.argv:
        prior_truths_sn10(n, more="--more" in sys.argv) if "--sn10" in sys.argv else prior_truths(n)
        return
    if "--sn10" in sys.argv:
        sn10_cells(n, start=start)
        return
    if "--more" in sys.argv:
        prior_truths(n, h_from_prior=False)
        return
    if "--se" in sys.argv:
        se_cells(int(args[0]) if args else 50, start=start)
        return
    # S/N 10 is skipped by default (its record is --sn10, on the MAP record's mocks); its
    # mocks are still drawn, so that the others match montecarlo.py's
    fit_sns = (10, 30, 100) if "--with-sn10" in sys.argv else (30, 100)
    t_start = time.perf_counter()
    rng = np.random.default_rng(2024)  # montecarlo.py's seed: its GH cells come first, in this order
    setup = setup_fit(ngc4550(), noise=0.0047, h_prior=0.1)
    fm = setup.forward
    mask = np.asarray(setup.spectrum.mask)
    out = {"machine_start": machine(), "n_per_sn": n, "setting": f"{NUM_CHAINS} x ({NUM_WARMUP} + {NUM_SAMPLES})",
           "cells": []}
    path = Path(__file__).resolve().parent / "results" / "montecarlo_nuts.json"
    if path.exists():  # keep the --prior-truths cell, which is run separately
        import json

        old = json.loads(path.read_text())
        for key in ("prior_truths", "more_sn30", "se_cells", "se_total_s"):
            if key in old:
                out[key] = old[key]
    for sn in SNS:
        truths = draw_truths(rng, n, "gh")
        ys, sigma = make_mocks(fm, truths, "gh", sn, rng)
        w = jnp.asarray(np.where(mask, 1.0 / sigma, 0.0))
        if sn not in fit_sns:
            continue
        cell = fit_cell(setup, ys, w, truths, sn, 1000 * sn)
        out["cells"].append(cell)
        out["machine_end"] = machine()
        out["total_s"] = time.perf_counter() - t_start
        write("montecarlo_nuts", out)
        print(sn, "posterior coverage", np.round(cell["posterior"]["coverage"], 2), "laplace", np.round(cell["laplace"]["coverage"], 2),
              f"ESS {cell['min_ess_median']:.0f}, {cell['seconds_median']:.1f} s/fit", flush=True)
    print(markdown(out))


def _estimate_table(cells, names):
    """Posterior and Laplace rows (bias, scatter, coverage, verdict) of result cells, as a table."""
    rows = [[c["sn"], label, *stats_cells(st)] for c in cells for label, st in
            (("NUTS posterior (median, 16-84 %)", c["posterior"]), ("MAP + Laplace, same mocks", c["laplace"]))]
    what = " / ".join(names)
    return table(["S/N", "estimate", "N", f"bias ({what})", f"scatter ({what})", "abs bias / scatter",
                  "68 % coverage", "targets"], rows)


def _pool(cells, keys=("truth", "lo", "median", "hi", "laplace_theta", "laplace_err")):
    """The per-mock arrays ``keys`` of several result cells, concatenated."""
    return {key: np.concatenate([np.asarray(c["per_mock"][key], float) for c in cells]) for key in keys}


def _posterior_stats(pm, pick=slice(None)):
    """Bias, scatter and coverage of the 16-84 % intervals in pooled arrays (``pick``: a subset)."""
    post = stats(pm["median"][pick], 0.5 * (pm["hi"] - pm["lo"])[pick], pm["truth"][pick])
    post["coverage"] = ((pm["truth"] >= pm["lo"]) & (pm["truth"] <= pm["hi"]))[pick].mean(0).tolist()
    return post


def _pooled_prior_sn10(first, more):
    """Rows of the S/N-10 prior-truth cells pooled (posterior and Laplace)."""
    pm = _pool((first, more))
    rows = [[10, "NUTS posterior, pooled", *stats_cells(_posterior_stats(pm))],
            [10, "MAP + Laplace, pooled", *stats_cells(stats(pm["laplace_theta"], pm["laplace_err"], pm["truth"]))],
            [10, "NUTS posterior, second seed only", *stats_cells(more["posterior"])]]
    what = " / ".join(GH_NAMES)
    t = table(["S/N", "estimate", "N", f"bias ({what})", f"scatter ({what})", "abs bias / scatter",
               "68 % coverage", "targets"], rows)
    return (f"**S/N 10, more truths drawn from the prior** (`--prior-truths --sn10 --more`: {more['N']} mocks from "
            f"another seed, pooled with the cell above): min-ESS median {more['min_ess_median']:.0f} (min "
            f"{more['min_ess_min']:.0f}), max R-hat {more['rhat_max']:.3f}, {more['divergences_total']} divergences, "
            f"{more['seconds_median']:.1f} s per spectrum; {machine_line(more['machine'])}; total "
            f"{more['total_s'] / 60:.1f} min.\n\n{t}")


def _sn10_markdown(chunks):
    """The S/N-10 section: posterior and Laplace rows pooled over the chunks, split by
    whether the MAP sat on a bound (``FitResult.diagnostics["at_bound"]``, the warning)."""
    pm = _pool(chunks)
    bound = np.array([bool(b) for c in chunks for b in c["per_mock"]["map_at_bound"]])
    rows = []
    for label, pick in (("all", np.ones(bound.size, bool)), ("MAP on a bound", bound), ("MAP inside", ~bound)):
        if not pick.any():
            continue
        rows.append([10, f"NUTS posterior, {label}", *stats_cells(_posterior_stats(pm, pick))])
        rows.append([10, f"MAP + Laplace, {label}",
                     *stats_cells(stats(pm["laplace_theta"][pick], pm["laplace_err"][pick], pm["truth"][pick]))])
    what = " / ".join(GH_NAMES)
    t = table(["S/N", "estimate (mocks)", "N", f"bias ({what})", f"scatter ({what})", "abs bias / scatter",
               "68 % coverage", "targets"], rows)
    first, last = chunks[0]["first_mock"], chunks[-1]["first_mock"] + chunks[-1]["N"]
    diag = "; ".join(f"mocks {c['first_mock'] + 1}–{c['first_mock'] + c['N']}: min-ESS median {c['min_ess_median']:.0f} "
                     f"(min {c['min_ess_min']:.0f}), max R-hat {c['rhat_max']:.3f}, {c['divergences_total']} divergences "
                     f"in {c['mocks_with_divergences']} mocks, {c['seconds_median']:.1f} s per spectrum (MAP + NUTS), "
                     f"total {c['total_s'] / 60:.1f} min, {machine_line(c['machine'])}" for c in chunks)
    return (f"**S/N 10** (`--sn10`: mocks {first + 1}–{last} of the S/N-10 Gauss–Hermite cell of `montecarlo.py 200 100`, "
            f"the MAP Monte Carlo's record, fitted with the default NUTS scheme; \"on a bound\": the MAP's "
            f"`diagnostics['at_bound']` is not empty, which `fit_spectrum` warns about): {diag}.\n\n{t}")


def markdown(out):
    t1 = _estimate_table(out["cells"], GH_NAMES)
    rows = [[c["sn"], f"{c['min_ess_median']:.0f} (min {c['min_ess_min']:.0f})", f"{c['rhat_max']:.3f}",
             f"{c['divergences_total']} in {c['mocks_with_divergences']} mocks", f"{c['seconds_median']:.1f} s",
             c["load_1"]] for c in out["cells"]]
    t2 = table(["S/N", "median min-ESS over V, σ, h3, h4", "max R-hat", "divergences",
                "time per spectrum (MAP + NUTS)", "load (1 min)"], rows)
    text = (f"{t1}\n\nSampler diagnostics ({out['setting']}, h_prior = 0.1):\n\n{t2}\n\n"
            f"Machine: {machine_line(out['machine_start'])}; total {out['total_s'] / 60:.1f} min.")
    for key, title in (("prior_truths", "**Truths drawn from the prior** (h3, h4 ~ Normal(0, 0.1) clipped to ±0.29; "
                                         "V, σ as above; `--prior-truths`)"),
                       ("more_sn30", "**More S/N-30 mocks** (`--more`: drawn like the issue's, new seed)"),
                       ("prior_truths_sn10", "**S/N 10, truths drawn from the prior** (σ ~ U(5, 1000) km/s, h3, h4 ~ "
                                             "Normal(0, 0.1) truncated to ±0.3, V ~ U(−300, 300) km/s; "
                                             "`--prior-truths --sn10`)")):
        c = out.get(key)
        if c:
            text += (f"\n\n{title}: min-ESS median {c['min_ess_median']:.0f} (min {c['min_ess_min']:.0f}), max R-hat "
                     f"{c['rhat_max']:.3f}, {c['divergences_total']} divergences, {c['seconds_median']:.1f} s per "
                     f"spectrum; {machine_line(c['machine'])}; total {c['total_s'] / 60:.1f} min.\n\n"
                     f"{_estimate_table([c], GH_NAMES)}")
    first, more = out.get("prior_truths_sn10"), out.get("prior_truths_sn10_more")
    if first and more:  # python benchmarks/montecarlo_nuts.py 50 --prior-truths --sn10 --more
        text += "\n\n" + _pooled_prior_sn10(first, more)
    chunks = out.get("sn10")
    if chunks:  # python benchmarks/montecarlo_nuts.py 50 --sn10 [--from S]
        text += "\n\n" + _sn10_markdown(chunks)
    cells = out.get("se_cells")
    if cells:  # python benchmarks/montecarlo_nuts.py --se
        t4 = _estimate_table(cells, SE_NAMES)
        diag = "; ".join(f"S/N {c['sn']}: min-ESS median {c['min_ess_median']:.0f} (min {c['min_ess_min']:.0f}), "
                         f"max R-hat {c['rhat_max']:.3f}, {c['divergences_total']} divergences in "
                         f"{c['mocks_with_divergences']} mocks, {c['seconds_median']:.1f} s per spectrum" for c in cells)
        text += (f"\n\n**Sanders–Evans truths** (`--se {cells[0]['N']}`: the first {cells[0]['N']} SE mocks per S/N of "
                 f"`montecarlo.py 200 100`, fitted with "
                 f"the SE family, mean V and dispersion scored): {diag}; {machine_line(cells[0]['machine'])}; "
                 f"total {out['se_total_s'] / 60:.1f} min.\n\n{t4}")
    more = out.get("se_cells_more")
    if cells and more:  # python benchmarks/montecarlo_nuts.py 50 --se --from 50
        rows = []
        for a in cells:
            b = next((c for c in more if c["sn"] == a["sn"]), None)
            if b is None:
                continue
            pm = _pool((a, b), ("truth", "lo", "median", "hi"))
            rows.append([a["sn"], "NUTS posterior, pooled", *stats_cells(_posterior_stats(pm))])
            rows.append([b["sn"], f"NUTS posterior, mocks {b['first_mock'] + 1}–{b['first_mock'] + b['N']} only",
                         *stats_cells(b["posterior"])])
        diag = "; ".join(f"S/N {c['sn']}: min-ESS median {c['min_ess_median']:.0f} (min {c['min_ess_min']:.0f}), "
                         f"max R-hat {c['rhat_max']:.3f}, {c['divergences_total']} divergences, "
                         f"{c['seconds_median']:.1f} s per spectrum" for c in more)
        what = " / ".join(SE_NAMES)
        t5 = table(["S/N", "estimate", "N", f"bias ({what})", f"scatter ({what})", "abs bias / scatter",
                    "68 % coverage", "targets"], rows)
        text += (f"\n\n**More Sanders–Evans truths** (`--se {more[0]['N']} --from {more[0]['first_mock']}`: the next "
                 f"{more[0]['N']} SE mocks per S/N of the same record, same per-mock keys as one run over all; pooled "
                 f"with the cell above): {diag}; {machine_line(more[0]['machine'])}; total "
                 f"{out['se_more_total_s'] / 60:.1f} min.\n\n{t5}")
    return text


if __name__ == "__main__":
    main()
