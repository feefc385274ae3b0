"""The recorded benchmark page is what its generator makes of the recorded results.

benchmarks/RESULTS.md (included in the book's validation page) is produced from
benchmarks/results/*.json and benchmarks/notes.json by benchmarks/make_results.py; a hand
edit of the page, or a result file changed without regenerating it, fails here. The
targets table at its top gives verdicts computed from those numbers (benchmarks/targets.py).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def benchmark_modules():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import make_results
        import targets

        yield make_results, targets
    finally:
        sys.path.remove(str(BENCHMARKS))


def test_results_page_is_generated_from_the_recorded_results(benchmark_modules):
    make_results, _ = benchmark_modules
    assert (BENCHMARKS / "RESULTS.md").read_text() == make_results.render(), (
        "benchmarks/RESULTS.md differs from what make_results.py makes of benchmarks/results/*.json; "
        "run python benchmarks/make_results.py")


def test_target_verdicts_follow_the_thresholds(benchmark_modules):
    _, targets = benchmark_modules
    names = ("V", "sigma")

    def cell(coverage, bias):
        return {"coverage": coverage, "bias": bias, "scatter": [10.0, 10.0]}

    assert targets._coverage_verdict(cell([0.63, 0.73], [2.0, -2.0]), names)[1] == "met"
    # just outside the band (N = 75: 55 / 75 = 0.733) is a miss, and is printed so
    text, verdict = targets._coverage_verdict(cell([0.68, 55 / 75], [0.0, 0.0]), names)
    assert verdict == "coverage met for V only; bias met" and "0.733" in text
    assert targets._coverage_verdict(cell([0.62, 0.80], [2.1, 3.0]), names)[1] == "**not met**"
    assert targets._coverage_verdict(cell([0.68, 0.68], [2.1, 0.0]), names)[1] == "coverage met; bias met for sigma only"
