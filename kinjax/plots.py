"""Figures for fit results: spectrum and residuals, LOSVD band, corner plot, cube maps.

matplotlib is imported inside each function, so ``import kinjax`` never needs it; the
``corner`` package is optional (a plain matplotlib pair plot is drawn without it).
Every function returns the `matplotlib.figure.Figure` it drew on.
"""

from __future__ import annotations

import numpy as np

__all__ = ["masked_runs", "plot_fit", "plot_losvd", "plot_corner", "plot_maps"]

#: Map names drawn with a colour scale symmetric about zero (case-insensitive prefixes).
SYMMETRIC_MAPS = ("v", "mean_v", "residual", "residuals", "h3", "h5")


def masked_runs(wave, mask):
    """Wavelength spans of the contiguous runs of masked (bad) pixels.

    Parameters
    ----------
    wave : array_like, shape (n_pix,)
        Pixel-centre wavelengths in Å, increasing.
    mask : array_like of bool, shape (n_pix,)
        True = good pixel.

    Returns
    -------
    list of (float, float)
        ``(λ_start, λ_end)`` in Å of each run of bad pixels, extended by half a pixel on
        each side so adjacent spans tile the axis.
    """
    wave = np.asarray(wave, dtype=float)
    bad = ~np.asarray(mask, dtype=bool)
    if wave.shape != bad.shape:
        raise ValueError(f"wave {wave.shape} and mask {bad.shape} differ in shape")
    if not bad.any():
        return []
    edges = np.diff(np.r_[0, bad.astype(np.int8), 0])
    starts, stops = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1) - 1
    if wave.size > 1:
        half = 0.5 * np.diff(wave)
        left = wave - np.r_[half[0], half]
        right = wave + np.r_[half, half[-1]]
    else:
        left = right = wave
    return [(float(left[a]), float(right[b])) for a, b in zip(starts, stops)]


def plot_fit(result, ax=None, *, residual_offset=None, title=None):
    """Observed spectrum, best-fitting model and residuals, with masked regions shaded.

    Parameters
    ----------
    result : FitResult
        Uses ``wave`` (Å), ``flux``, ``best_fit``, ``mask`` (True = good), ``noise``.
    ax : matplotlib Axes, optional
        Draw everything on this one axes, the residuals shifted down by
        ``residual_offset``. Default: a new figure with two axes sharing the
        wavelength axis (spectrum above, residuals below).
    residual_offset : float, optional
        Flux-unit shift of the residuals when ``ax`` is given; default the minimum of
        the model minus 5 times the median absolute residual of the good pixels.
    title : str, optional

    Returns
    -------
    matplotlib.figure.Figure
        Its ``axes`` are ``[spectrum, residuals]`` (or ``[ax]``). Each masked run is one
        ``axvspan`` patch (per axes) labelled ``"masked"`` on its first occurrence.
    """
    import matplotlib.pyplot as plt

    wave, flux, model = np.asarray(result.wave), np.asarray(result.flux), np.asarray(result.best_fit)
    mask = np.asarray(result.mask, dtype=bool)
    resid = flux - model
    spans = masked_runs(wave, mask)
    good_resid = resid[mask] if mask.any() else resid

    if ax is None:
        fig, (ax_s, ax_r) = plt.subplots(
            2, 1, sharex=True, figsize=(9, 5), gridspec_kw={"height_ratios": [3, 1], "hspace": 0.05}
        )
    else:
        fig, ax_s, ax_r = ax.figure, ax, ax
        if residual_offset is None:
            mad = np.median(np.abs(good_resid - np.median(good_resid))) if good_resid.size else 0.0
            residual_offset = float(np.min(model) - 5.0 * max(mad, 1e-3 * np.ptp(model)))

    ax_s.plot(wave, flux, color="k", lw=0.8, label="data")
    ax_s.plot(wave, model, color="C3", lw=1.0, label="model")
    offset = 0.0 if ax is None else residual_offset
    ax_r.plot(wave, resid + offset, ".", color="C2", ms=2.5, label="residuals")
    ax_r.axhline(offset, color="0.4", lw=0.6)
    noise = np.broadcast_to(np.asarray(result.noise, dtype=float), wave.shape)
    if ax is None and np.all(np.isfinite(noise)):
        ax_r.fill_between(wave, -noise, noise, color="C2", alpha=0.15, lw=0, label="±1σ noise")
    for a in ({id(ax_s): ax_s, id(ax_r): ax_r}).values():
        for i, (lo, hi) in enumerate(spans):
            a.axvspan(lo, hi, color="0.85", zorder=0, label="masked" if i == 0 else None)
    ax_s.set_ylabel("flux")
    if ax is None:
        ax_r.set_ylabel("data − model")
        if good_resid.size:
            lim = 1.2 * np.max(np.abs(good_resid))
            ax_r.set_ylim(-lim, lim)
    ax_r.set_xlabel("wavelength (Å)")
    ax_r.set_xlim(wave[0], wave[-1])
    ax_s.legend(loc="best", fontsize="small")
    if title is not None:
        ax_s.set_title(title)
    return fig


def plot_losvd(result, ax=None, truth=None, *, label=None, color=None):
    """Median LOSVD with its 16–84 % band.

    Parameters
    ----------
    result : FitResult
        Uses ``velocity`` (n_v,) km/s and ``losvd_median``, ``losvd_lo``, ``losvd_hi``
        (n_v,) in 1/(km/s).
    ax : matplotlib Axes, optional
        Default: a new figure. Call again with the same ``ax`` to overlay fits.
    truth : (velocity, pdf) or callable, optional
        A reference curve: two (m,) arrays (km/s, 1/(km/s)), or a function of velocity
        (km/s) evaluated on ``result.velocity``. Drawn dashed, labelled "truth".
    label : str, optional
        Legend label; default ``"<family> <method>"``.
    color : optional matplotlib colour.

    Returns
    -------
    matplotlib.figure.Figure
    """
    import matplotlib.pyplot as plt

    if ax is None:
        fig, ax = plt.subplots(figsize=(6, 4))
    fig = ax.figure
    v = np.asarray(result.velocity)
    label = label if label is not None else f"{result.family.upper()} {result.method.upper()}"
    (line,) = ax.plot(v, result.losvd_median, color=color, lw=1.5, label=label)
    ax.fill_between(v, result.losvd_lo, result.losvd_hi, color=line.get_color(), alpha=0.25, lw=0,
                    label=f"{label} 16–84 %")
    if truth is not None:
        if callable(truth):
            tv, tp = v, np.asarray(truth(v))
        else:
            tv, tp = (np.asarray(t) for t in truth)
        ax.plot(tv, tp, "k--", lw=1.0, label="truth")
    ax.set_xlabel("line-of-sight velocity (km/s)")
    ax.set_ylabel("LOSVD (1/(km/s))")
    ax.legend(loc="best", fontsize="small")
    return fig


def _kinematic_indices(result, names):
    all_names = list(result.names)
    if names is None:
        names = [n for n in all_names if not n.startswith("mult")]
        if result.family == "hist" or len(names) > 8:
            names = names[:8]
    idx = []
    for n in names:
        if n not in all_names:
            raise ValueError(f"{n!r} is not a parameter of this fit (names: {all_names})")
        idx.append(all_names.index(n))
    return list(names), idx


def plot_corner(result, names=None, *, truths=None, fig=None, **kwargs):
    """Corner plot of the posterior (or Laplace) draws of the kinematic parameters.

    Parameters
    ----------
    result : FitResult
        Uses ``samples`` (n_chains, n_draws, n_params) and ``names``.
    names : list of str, optional
        Parameters to show; default every LOSVD parameter (not the ``mult*``
        multiplicative terms; the first 8 for histograms).
    truths : (n_shown,) array, optional
        Reference values drawn as lines.
    fig : matplotlib Figure, optional
        Passed on to ``corner.corner``.
    **kwargs
        Passed on to ``corner.corner``.

    Returns
    -------
    matplotlib.figure.Figure
        With n_shown × n_shown axes (``corner`` if installed, else a matplotlib pair
        plot: histograms on the diagonal, scatter below, blank above).
    """
    names, idx = _kinematic_indices(result, names)
    draws = np.asarray(result.samples).reshape(-1, len(result.names))[:, idx]
    try:
        import corner
    except ImportError:
        corner = None
    if corner is not None:
        opts = dict(labels=names, quantiles=[0.15865, 0.5, 0.84135], show_titles=True,
                    title_fmt=".3g", truths=truths)
        opts.update(kwargs)
        if fig is not None:
            opts["fig"] = fig
        return corner.corner(draws, **opts)
    return _pair_plot(draws, names, truths, fig)


def _pair_plot(draws, names, truths=None, fig=None):
    import matplotlib.pyplot as plt

    k = len(names)
    if fig is None:
        fig = plt.figure(figsize=(2.2 * k, 2.2 * k))
    axes = fig.subplots(k, k, squeeze=False)
    for i in range(k):
        for j in range(k):
            a = axes[i, j]
            if j > i:
                a.set_axis_off()
                continue
            if i == j:
                a.hist(draws[:, i], bins=30, color="C0", histtype="step")
                a.set_yticks([])
            else:
                a.plot(draws[:, j], draws[:, i], ".", ms=1.5, alpha=0.4, color="C0")
            if truths is not None:
                a.axvline(truths[j], color="C3", lw=0.8)
                if i != j:
                    a.axhline(truths[i], color="C3", lw=0.8)
            if i == k - 1:
                a.set_xlabel(names[j])
            if j == 0 and i > 0:
                a.set_ylabel(names[i])
    return fig


def _is_symmetric(name):
    key = str(name).strip().lower()
    return any(key == s or key.startswith(s + "_") or key.startswith(s + " ") for s in SYMMETRIC_MAPS) or \
        "resid" in key


def plot_maps(maps, *, ncols=None, extent=None, cmap="viridis", symmetric_cmap="RdBu_r",
              symmetric=None, centre=None, percentile=(1.0, 99.0), units=None, panel_size=3.2):
    """A grid of images with one colourbar each (maps of a cube fit).

    Parameters
    ----------
    maps : dict of str → (n_y, n_x) array
        Panel title → image (NaN = no data). Row 0 is drawn at the bottom.
    ncols : int, optional
        Panels per row; default up to 3.
    extent : (x_min, x_max, y_min, y_max), optional
        Image extent (e.g. arcsec); default pixel indices.
    cmap, symmetric_cmap : str
        Colour maps for ordinary and symmetric panels.
    symmetric : iterable of str, optional
        Names drawn with a colour scale symmetric about ``centre``; default names that are
        "V", "MEAN_V", "h3", "h5" (case-insensitive, optionally with a suffix after "_")
        or contain "resid".
    centre : float or dict, optional
        Centre of the symmetric scales; default the median of each map (a velocity map's
        systemic velocity), 0 for residual maps.
    percentile : (float, float)
        Colour limits of ordinary panels, and the half-range of symmetric ones, from
        these percentiles of the finite pixels (robust to outliers).
    units : dict of str → str, optional
        Colourbar labels.
    panel_size : float
        Width of one panel in inches.

    Returns
    -------
    matplotlib.figure.Figure
        ``len(maps)`` image axes plus one colourbar axes each; unused grid cells removed.
    """
    import matplotlib.pyplot as plt

    if not maps:
        raise ValueError("plot_maps needs at least one map")
    names = list(maps)
    n = len(names)
    ncols = min(n, 3) if ncols is None else int(ncols)
    nrows = -(-n // ncols)
    sym_names = set(symmetric) if symmetric is not None else {m for m in names if _is_symmetric(m)}
    units = units or {}
    fig, axes = plt.subplots(nrows, ncols, figsize=(panel_size * ncols, 0.85 * panel_size * nrows),
                             squeeze=False, constrained_layout=True)
    for k, ax in enumerate(axes.ravel()):
        if k >= n:
            fig.delaxes(ax)
            continue
        name = names[k]
        image = np.asarray(maps[name], dtype=float)
        if image.ndim != 2:
            raise ValueError(f"map {name!r} has shape {image.shape}; expected (n_y, n_x)")
        finite = image[np.isfinite(image)]
        if name in sym_names:
            if isinstance(centre, dict):
                c = centre.get(name)
            else:
                c = centre
            if c is None:
                c = 0.0 if "resid" in name.lower() or not finite.size else float(np.median(finite))
            half = float(np.percentile(np.abs(finite - c), percentile[1])) if finite.size else 1.0
            half = half if half > 0 else 1.0
            vmin, vmax, cm = c - half, c + half, symmetric_cmap
        else:
            vmin, vmax = (np.percentile(finite, percentile) if finite.size else (0.0, 1.0))
            cm = cmap
        im = ax.imshow(image, origin="lower", extent=extent, vmin=vmin, vmax=vmax, cmap=cm,
                       interpolation="nearest", aspect="equal")
        ax.set_title(name)
        cb = fig.colorbar(im, ax=ax, shrink=0.9)
        if name in units:
            cb.set_label(units[name])
    return fig
