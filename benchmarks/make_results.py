"""Regenerate benchmarks/RESULTS.md from benchmarks/results/*.json (no fitting).

Run: ``python benchmarks/make_results.py``. The commentary in ``NOTES`` is written by
hand when the benchmarks are rerun; the tables come from the JSON files.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import targets  # noqa: E402

SECTIONS = (
    ("forward_throughput", "Forward-model throughput"),
    ("ngc4550", "NGC 4550: pPXF 8.2.6 and kinjax side by side"),
    ("sdss", "Three SDSS spectra: pPXF 8.2.6 and kinjax side by side"),
    ("montecarlo", "Monte Carlo on mock spectra"),
    ("montecarlo_nuts", "Monte Carlo: calibration of the NUTS posteriors"),
    ("precision", "Single vs double precision"),
    ("sharding", "Cube fits split over several devices"),
)


def render() -> str:
    """RESULTS.md's text from the recorded results and the notes."""
    notes = json.loads((HERE / "notes.json").read_text()) if (HERE / "notes.json").exists() else {}
    parts = ["# Recorded benchmark results", "",
             "Produced by the scripts in `benchmarks/` (`python benchmarks/<name>.py`, results in "
             "`benchmarks/results/<name>.json`; this page by `python benchmarks/make_results.py`). "
             "The machine is shared: every table records the load average (1, 5, 15 min) while it ran, "
             "and timings are medians of repeats.", ""]
    if "machine" in notes:
        parts += [notes["machine"], ""]
    recorded = {name: json.loads((HERE / "results" / f"{name}.json").read_text()) for name, _ in SECTIONS
                if (HERE / "results" / f"{name}.json").exists()}
    parts += ["## Single-spectrum targets at a glance", "", targets.markdown(recorded), ""]
    for name, title in SECTIONS:
        path = HERE / "results" / f"{name}.json"
        parts += [f"## {title}", ""]
        if not path.exists():
            parts += ["Not recorded yet.", ""]
            continue
        module = __import__(name)
        if name in notes:
            parts += [notes[name], ""]
        parts += [module.markdown(recorded[name]), ""]
    return "\n".join(parts).rstrip() + "\n"


def main():
    text = render()
    (HERE / "RESULTS.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
