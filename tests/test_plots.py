"""kinjax.plots: every figure function runs on a small FitResult and draws what it says.

The FitResult is built directly from synthetic arrays (a Gaussian LOSVD, a toy spectrum
with three masked runs), so these tests need no templates and no fitting.
"""

import sys

import numpy as np
import pytest

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import Polygon, Rectangle  # noqa: E402

from kinjax import plots  # noqa: E402
from kinjax.result import FitResult  # noqa: E402

N_PIX = 200
# bad-pixel runs: at the start, in the middle (two), and none at the end
BAD_RUNS = [(0, 5), (60, 75), (120, 121)]


@pytest.fixture(scope="session")
def result():
    rng = np.random.default_rng(1)
    wave = np.linspace(4800.0, 5300.0, N_PIX)
    mask = np.ones(N_PIX, bool)
    for a, b in BAD_RUNS:
        mask[a:b] = False
    model = 1.0 - 0.3 * np.exp(-0.5 * ((wave - 5175.0) / 4.0) ** 2)
    flux = model + rng.normal(0.0, 0.01, N_PIX)
    names = ("V", "sigma", "h3", "h4")
    best = np.array([436.0, 113.0, 0.03, 0.07])
    samples = best + rng.normal(size=(2, 50, 4)) * np.array([2.4, 5.2, 0.018, 0.032])
    v = np.linspace(-400.0, 1300.0, 171)
    sig = samples[..., 1].reshape(-1, 1)
    pdfs = np.exp(-0.5 * ((v - samples[..., 0].reshape(-1, 1)) / sig) ** 2) / (np.sqrt(2 * np.pi) * sig)
    lo, med, hi = np.percentile(pdfs, [15.865, 50, 84.135], axis=0)
    return FitResult(
        method="nuts", family="gh", names=names, best=best, samples=samples,
        mean_v=samples[..., 0], dispersion=samples[..., 1], mean_v_best=436.0, dispersion_best=113.0,
        velocity=v, losvd_median=med, losvd_lo=lo, losvd_hi=hi, wave=wave, flux=flux,
        noise=np.full(N_PIX, 0.01), mask=mask, best_fit=model, weights=np.ones(3), chi2_dof=1.0,
        dof=N_PIX - 10, seconds=0.1, diagnostics={},
    )


@pytest.fixture(autouse=True)
def _close():
    yield
    plt.close("all")


def _spans(ax):
    """Shaded masked regions: the axvspan patches (Rectangle since matplotlib 3.9, else Polygon)."""
    return [p for p in ax.patches if isinstance(p, (Rectangle, Polygon)) and p.get_facecolor()[:3] == pytest.approx((0.85,) * 3)]


def test_masked_runs_counts_contiguous_bad_pixels(result):
    runs = plots.masked_runs(result.wave, result.mask)
    assert len(runs) == len(BAD_RUNS)
    dw = result.wave[1] - result.wave[0]
    for (lo, hi), (a, b) in zip(runs, BAD_RUNS):
        assert lo == pytest.approx(result.wave[a] - dw / 2)
        assert hi == pytest.approx(result.wave[b - 1] + dw / 2)
    assert plots.masked_runs(result.wave, np.ones(N_PIX, bool)) == []
    assert len(plots.masked_runs(result.wave, np.zeros(N_PIX, bool))) == 1


def test_plot_fit_two_panels_with_one_span_per_masked_run(result):
    fig = plots.plot_fit(result)
    assert isinstance(fig, matplotlib.figure.Figure)
    assert len(fig.axes) == 2
    for ax in fig.axes:
        assert len(_spans(ax)) == len(BAD_RUNS)
    assert fig.axes[1].get_xlabel() == "wavelength (Å)"


def test_plot_fit_on_given_axes(result):
    fig, ax = plt.subplots()
    out = plots.plot_fit(result, ax=ax)
    assert out is fig and len(fig.axes) == 1
    assert len(_spans(ax)) == len(BAD_RUNS)
    # data, model, residuals, zero line of the residuals
    assert len(ax.lines) == 4


def test_plot_losvd_band_and_truth(result):
    fig = plots.plot_losvd(result, truth=(result.velocity, result.losvd_median))
    assert isinstance(fig, matplotlib.figure.Figure) and len(fig.axes) == 1
    ax = fig.axes[0]
    assert len(ax.lines) == 2 and len(ax.collections) == 1
    # overlay a second result on the same axes; a callable truth
    plots.plot_losvd(result, ax=ax, truth=lambda v: np.zeros_like(v), label="again")
    assert len(fig.axes) == 1 and len(ax.lines) == 4 and len(ax.collections) == 2


def test_plot_corner_grid(result):
    fig = plots.plot_corner(result)
    assert isinstance(fig, matplotlib.figure.Figure)
    assert len(fig.axes) == 16
    fig = plots.plot_corner(result, names=["V", "sigma"])
    assert len(fig.axes) == 4
    with pytest.raises(ValueError, match="not a parameter"):
        plots.plot_corner(result, names=["nope"])


def test_plot_corner_without_corner_package(result, monkeypatch):
    monkeypatch.setitem(sys.modules, "corner", None)  # makes `import corner` raise ImportError
    fig = plots.plot_corner(result, names=["V", "sigma", "h3"])
    assert len(fig.axes) == 9


def test_plot_maps_grid_and_symmetric_scales():
    rng = np.random.default_rng(0)
    maps = {
        "V": 400.0 + 100.0 * rng.normal(size=(6, 7)),
        "sigma": 100.0 + rng.random((6, 7)),
        "h3": rng.normal(size=(6, 7)) * 0.05,
        "residuals": rng.normal(size=(6, 7)),
    }
    maps["sigma"][0, 0] = np.nan
    fig = plots.plot_maps(maps)
    assert isinstance(fig, matplotlib.figure.Figure)
    images = [ax for ax in fig.axes if ax.images]
    assert len(images) == 4
    # one colourbar axes per map, unused grid cells removed (2 rows x 3 cols -> 4 + 4)
    assert len(fig.axes) == 8
    by_title = {ax.get_title(): ax.images[0] for ax in images}
    lo, hi = by_title["V"].get_clim()
    assert 0.5 * (lo + hi) == pytest.approx(np.median(maps["V"]))
    lo, hi = by_title["residuals"].get_clim()
    assert lo == pytest.approx(-hi)
    lo, hi = by_title["sigma"].get_clim()
    assert lo >= 100.0 and hi <= 101.0
    with pytest.raises(ValueError):
        plots.plot_maps({"V": np.zeros(5)})
