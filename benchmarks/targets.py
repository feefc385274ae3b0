"""The single-spectrum targets (issue 4) at a glance, read from the recorded results.

No fitting: ``markdown(results)`` turns ``benchmarks/results/{ngc4550,sdss,montecarlo,
montecarlo_nuts}.json`` into one table, target by target, with the recorded numbers and a
verdict computed from them with the thresholds below (so a rerun that misses a target
says so here without anyone editing prose). ``make_results.py`` puts the table at the top
of RESULTS.md; the sections below it hold the full tables and the discussion.
"""

from __future__ import annotations

import numpy as np

from _common import table
from montecarlo_nuts import _pool, _posterior_stats

#: 68 % intervals should cover this fraction of the mock truths
COVERAGE = (0.63, 0.73)
#: |bias| at most this fraction of the scatter
BIAS_RATIO = 0.2
#: NUTS: smallest bulk ESS of V, σ, h3, h4 and the seconds per spectrum after compilation
MIN_ESS, NUTS_SECONDS = 400.0, 10.0
#: NGC 4550: kinjax within this many pPXF formal errors of pPXF 8.2.6 (default bias)
WITHIN_ERRORS = 1.0
GH_NAMES = ("V", "sigma", "h3", "h4")  # keys of the recorded values
GH_LABELS = ("V", "σ", "h3", "h4")
PPXF = "pPXF 8.2.6 (default bias)"


def verdict(ok) -> str:
    return "met" if ok else "**not met**"


def _cov(c) -> str:
    """A coverage with two decimals, three where two would round a miss into the band."""
    text = f"{c:.3f}"
    return text[:-1] if text.endswith("0") else text


def _ms(seconds) -> str:
    return f"{1e3 * seconds:.0f} ms"


def _max_ratio(fit, ref):
    """Largest |kinjax − pPXF| / pPXF error over V, σ, h3, h4, and the parameter it is on."""
    r = {n: abs(fit["values"][n] - ref["values"][n]) / ref["errors"][n] for n in GH_NAMES}
    name = max(r, key=r.get)
    return r[name], dict(zip(GH_NAMES, GH_LABELS))[name]


def ngc4550_rows(out):
    fits = out["fits"]
    ref = fits[PPXF]
    rows = []
    for label, what in (("kinjax MAP (h_prior=0.1)", "MAP"), ("kinjax NUTS 150+400 (h_prior=0.1)", "NUTS medians")):
        ratio, name = _max_ratio(fits[label], ref)
        rows.append([f"NGC 4550 {what} within {WITHIN_ERRORS:g} pPXF error of pPXF 8.2.6 (V, σ, h3, h4)",
                     f"largest difference {ratio:.2f} error ({name})", verdict(ratio <= WITHIN_ERRORS)])
    pairs = (("kinjax MAP (h_prior=0.1)", PPXF, "default prior / default bias"),
             ("kinjax MAP (h_prior=None)", "pPXF 8.2.6 (bias=0)", "flat prior / bias = 0"))
    times = [(fits[k]["seconds_per_fit_full_fit_spectrum"], fits[p]["seconds_per_fit"], what) for k, p, what in pairs]
    compile_s = max(fits[k]["compile_s"] for k, _, _ in pairs)
    rows.append(["NGC 4550 MAP no slower than pPXF (after compilation; compilation reported)",
                 "; ".join(f"{_ms(k)} against {_ms(p)} ({what})" for k, p, what in times)
                 + f"; compilation ≤ {compile_s:.1f} s", verdict(all(k <= p for k, p, _ in times))])
    nuts = fits["kinjax NUTS 150+400 (h_prior=0.1)"]
    ess = min(nuts["ess_bulk"].values())
    seconds = nuts["seconds_reported_by_fit"]
    rows.append([f"NGC 4550 NUTS: ≥ {MIN_ESS:.0f} ESS of V, σ, h3, h4 in ≤ {NUTS_SECONDS:g} s",
                 f"min ESS {ess:.0f} in {seconds:.2f} s", verdict(ess >= MIN_ESS and seconds <= NUTS_SECONDS)])
    return rows


def sdss_rows(out):
    rows = []
    maps, nuts = [], []
    for stem, s in out["spectra"].items():
        f = s["fits"]
        name = stem.split("_")[0]
        maps.append((name, f["kinjax MAP (h_prior=0.1)"]["seconds"], f[PPXF]["seconds"],
                     f["kinjax MAP (h_prior=None)"]["seconds"], f["pPXF 8.2.6 (bias=0)"]["seconds"]))
        n = f["kinjax NUTS (h_prior=0.1)"]
        seeds = n["seeds"]
        nuts.append((name, float(np.median([r["seconds"] for r in seeds])), max(r["seconds"] for r in seeds),
                     min(r["min_ess"] for r in seeds), len(seeds)))
    rows.append(["SDSS spectra: MAP no slower than pPXF (default prior / default bias; flat prior / bias = 0)",
                 "; ".join(f"{n} {_ms(a)} against {_ms(b)}, {_ms(c)} against {_ms(d)}" for n, a, b, c, d in maps),
                 verdict(all(a <= b and c <= d for _, a, b, c, d in maps))])
    rows.append([f"SDSS spectra: NUTS ≥ {MIN_ESS:.0f} ESS in ≤ {NUTS_SECONDS:g} s (median over timed seeds)",
                 "; ".join(f"{n} {med:.1f} s (slowest {worst:.1f} s, min ESS {ess:.0f}, {k} seeds)"
                           for n, med, worst, ess, k in nuts),
                 verdict(all(med <= NUTS_SECONDS and ess >= MIN_ESS for _, med, _, ess, _ in nuts))])
    return rows


def _coverage_verdict(stats, names):
    """Verdict on one cell: which parameters meet the coverage and the bias targets."""
    cov = stats["coverage"]
    ratio = [abs(b) / s for b, s in zip(stats["bias"], stats["scatter"])]
    good_cov = [n for n, c in zip(names, cov) if COVERAGE[0] <= c <= COVERAGE[1]]
    good_bias = [n for n, r in zip(names, ratio) if r <= BIAS_RATIO]
    text = (f"coverage {' / '.join(_cov(c) for c in cov)}; |bias| / scatter "
            f"{' / '.join(f'{r:.2f}' for r in ratio)}")
    if len(good_cov) == len(names) and len(good_bias) == len(names):
        return text, "met"
    if not good_cov and not good_bias:
        return text, "**not met**"
    parts = []
    for what, good in (("coverage", good_cov), ("bias", good_bias)):
        if len(good) == len(names):
            parts.append(f"{what} met")
        elif good:
            parts.append(f"{what} met for {', '.join(good)} only")
        else:
            parts.append(f"{what} **not met**")
    return text, "; ".join(parts)


def montecarlo_rows(out):
    rows = []
    for family, label, names, what in (("gh", "kinjax MAP (h_prior=0.1)", GH_LABELS, "V / σ / h3 / h4"),
                                       ("se", "kinjax MAP (SE)", ("mean V", "dispersion"), "mean V / dispersion")):
        for cell in (c for c in out["cells"] if c["family"] == family):
            text, v = _coverage_verdict(cell[label], names)
            ppxf = cell["pPXF default bias"]["coverage"]
            rows.append([f"MAP Monte Carlo, {family.upper()} truths, S/N {cell['sn']} ({cell[label]['N']} mocks; "
                         f"{what}): coverage {COVERAGE[0]:.2f}–{COVERAGE[1]:.2f}, |bias| ≤ {BIAS_RATIO:g} × scatter",
                         f"{text} (pPXF default bias: coverage {' / '.join(_cov(c) for c in ppxf)})", v])
    return rows


def montecarlo_nuts_rows(out):
    rows = []
    groups = [("NUTS posteriors, GH truths like the MAP Monte Carlo's, S/N 30",
               [c for c in out["cells"] if c["sn"] == 30] + ([out["more_sn30"]] if "more_sn30" in out else []),
               GH_LABELS),
              ("NUTS posteriors, GH truths like the MAP Monte Carlo's, S/N 100",
               [c for c in out["cells"] if c["sn"] == 100], GH_LABELS),
              ("NUTS posteriors, GH truths like the MAP Monte Carlo's, S/N 10", out.get("sn10", []), GH_LABELS),
              ("NUTS posteriors, GH truths drawn from the prior, S/N 10 (calibration check)",
               [out[k] for k in ("prior_truths_sn10", "prior_truths_sn10_more") if k in out], GH_LABELS),
              ("NUTS posteriors, GH truths drawn from the prior, S/N 30 (calibration check)",
               [out["prior_truths"]] if "prior_truths" in out else [], GH_LABELS)]
    for sn in (30, 100):
        groups.append((f"NUTS posteriors, SE truths, S/N {sn}",
                       [c for c in out.get("se_cells", []) + out.get("se_cells_more", []) if c["sn"] == sn],
                       ("mean V", "dispersion")))
    for title, cells, names in groups:
        if not cells:
            continue
        stats = _posterior_stats(_pool(cells, ("truth", "lo", "median", "hi")))
        text, v = _coverage_verdict(stats, names)
        rows.append([f"{title} ({stats['N']} mocks; {' / '.join(names)})", text, v])
    return rows


def markdown(results) -> str:
    """The targets table from a dict of recorded results keyed by benchmark name."""
    rows = []
    for name, fn in (("ngc4550", ngc4550_rows), ("sdss", sdss_rows), ("montecarlo", montecarlo_rows),
                     ("montecarlo_nuts", montecarlo_nuts_rows)):
        if name in results:
            rows += fn(results[name])
    n200 = np.sqrt(0.68 * 0.32 / 200)
    return ("Each row is computed by `benchmarks/targets.py` from the recorded results below, with the "
            f"thresholds of the issue: coverage of the 68 % intervals {COVERAGE[0]:.2f}–{COVERAGE[1]:.2f} and "
            f"|bias| ≤ {BIAS_RATIO:g} × scatter for every parameter, NUTS with ≥ {MIN_ESS:.0f} bulk ESS of V, σ, h3, "
            f"h4 in ≤ {NUTS_SECONDS:g} s, NGC 4550 within {WITHIN_ERRORS:g} pPXF error. Timings hold for the "
            "machine of their record (see each section). A coverage from N mocks has a binomial standard error "
            f"of sqrt(0.68 × 0.32 / N), {n200:.3f} for N = 200, so a cell just outside the band can be chance; "
            "the sections below discuss every miss.\n\n"
            + table(["target", "recorded", "verdict"], rows))
