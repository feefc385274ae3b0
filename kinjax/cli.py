"""The ``kinjax`` command.

One small function per subcommand (``_cmd_<name>(args) -> int``), registered in
`_build_parser`; `main` runs it inside a single handler that turns bad input into a
one-line ``kinjax: error: ...`` on stderr and exit status 2, never a traceback.

    kinjax info FILE|ngc4550|emiles    JSON summary of a cube, a spectrum or the templates
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from kinjax.errors import KinjaxError

__all__ = ["main"]

#: Exit status for bad input (as argparse uses for bad options).
EXIT_ERROR = 2
#: Names that ``kinjax info`` understands besides file paths.
BUILTIN_NAMES = ("ngc4550", "emiles")


# ---------------------------------------------------------------------- helpers
def _jsonable(value):
    """NumPy scalars/arrays → Python; NaN/inf → None (JSON has no NaN)."""
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if np.isfinite(value) else None
    return value


def _fwhm_summary(fwhm):
    """A scalar FWHM (Å), the median of a per-pixel one, or None when unknown."""
    if fwhm is None:
        return None
    return float(np.median(fwhm))


def _median_snr(flux, noise, mask):
    good = mask & np.isfinite(flux) & (noise > 0)
    return float(np.median(flux[good] / noise[good])) if good.any() else None


def _cube_info(path, args) -> dict:
    from astropy.io import fits

    from kinjax.cube import detect_format, read_cube

    fmt = args.format
    if fmt is None:
        with fits.open(path) as hdul:
            fmt = detect_format(hdul)
    if fmt == "spectrum":
        return _spectrum_info(path, args)
    cube = read_cube(path, fmt, fwhm=args.fwhm, require_fwhm=False)
    shape = [cube.n_wave, *cube.grid_shape] if cube.grid_shape else [cube.n_wave, cube.n_spaxels]
    snr = cube.snr()
    return {
        "kind": "cube",
        "file": str(path),
        "format": cube.format,
        "name": cube.name,
        "shape": shape,
        "wave_min": cube.wave[0],
        "wave_max": cube.wave[-1],
        "n_spaxels": cube.n_spaxels,
        "n_valid_spaxels": int(cube.valid.sum()),
        "velscale": cube.velscale,
        "fwhm": _fwhm_summary(cube.fwhm),
        "median_snr": float(np.nanmedian(snr)) if np.isfinite(snr).any() else None,
    }


def _spectrum_summary(spec, **extra) -> dict:
    return {
        "kind": "spectrum",
        "name": spec.name,
        "n_wave": int(spec.wave.size),
        "wave_min": spec.wave[0],
        "wave_max": spec.wave[-1],
        "velscale": spec.velscale,
        "fwhm": _fwhm_summary(spec.fwhm),
        "n_good": int(np.sum(spec.mask)),
        "median_snr": _median_snr(spec.flux, spec.noise, spec.mask),
        "redshift": spec.redshift,
        **extra,
    }


def _spectrum_info(path, args) -> dict:
    """Summary of a 1D FITS spectrum; a missing noise or FWHM is reported as null."""
    from kinjax.spectrum import read_spectrum

    # `info` describes what is there: fall back to placeholders for what the file lacks
    attempts = [dict(fwhm=args.fwhm), dict(fwhm=args.fwhm or 1.0), dict(fwhm=args.fwhm or 1.0, noise=1.0)]
    for i, kwargs in enumerate(attempts):
        try:
            spec = read_spectrum(path, **kwargs)
            break
        except KinjaxError:
            if i == len(attempts) - 1:
                raise
    info = _spectrum_summary(spec, file=str(path))
    if i >= 1 and args.fwhm is None:
        info["fwhm"] = None
    if i == 2:
        info["median_snr"] = None
    return info


def _unique(values):
    """Sorted unique values (rounded to 6 decimals), or None when not known."""
    return None if values is None else sorted({round(float(v), 6) for v in np.ravel(values)})


def _templates_info(templates) -> dict:
    return {
        "kind": "templates",
        "n_templates": int(np.shape(templates.flux)[0]),
        "n_pix": int(np.shape(templates.flux)[-1]),
        "ages": _unique(templates.age),
        "metallicities": _unique(templates.metal),
        "wave_min": float(np.min(templates.wave)),
        "wave_max": float(np.max(templates.wave)),
        "velscale": templates.velscale,
        # the finest and the coarsest resolution (E-MILES: 2.51 Å in the optical, 23.6 Å at 5 µm)
        "fwhm": float(np.min(templates.fwhm)),
        "fwhm_max": float(np.max(templates.fwhm)),
    }


# ---------------------------------------------------------------------- subcommands
def _cmd_info(args) -> int:
    """Print a JSON summary of a cube, a 1D spectrum or a bundled data set."""
    target = args.target
    path = Path(target)
    if not path.exists() and target.lower() in BUILTIN_NAMES:
        if target.lower() == "ngc4550":
            from kinjax.datasets import ngc4550

            info = _spectrum_summary(ngc4550(), source="ppxf package: NGC4550_SAURON.fits")
        else:
            from kinjax.templates import load_emiles

            info = _templates_info(load_emiles())
    elif not path.exists():
        raise FileNotFoundError(2, "No such file", target)
    else:
        info = _cube_info(path, args)
    print(json.dumps(_jsonable(info), indent=2))
    return 0


def _write_atomically(path: Path, text: str) -> None:
    """Write via a temporary file and rename, so no partial output is ever left."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(text)
        tmp.replace(path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _cmd_fit(args) -> int:
    import jax

    jax.config.update("jax_enable_x64", not args.float32)  # double precision unless --float32
    from kinjax.datasets import ngc4550
    from kinjax.fit import fit_spectrum, setup_fit
    from kinjax.spectrum import read_spectrum

    out = Path(args.out)
    if not out.parent.exists():
        raise KinjaxError(f"{out}: the output directory does not exist")
    if args.noise is not None and not (np.isfinite(args.noise) and args.noise > 0):
        raise KinjaxError(f"--noise must be a positive number (got {args.noise})")
    if args.target == "ngc4550":
        spectrum = ngc4550()
        if args.fwhm is not None or args.redshift is not None:
            import dataclasses

            spectrum = dataclasses.replace(
                spectrum,
                fwhm=args.fwhm if args.fwhm is not None else spectrum.fwhm,
                redshift=args.redshift if args.redshift is not None else spectrum.redshift,
            )
        noise = args.noise if args.noise is not None else 0.0047
    else:
        spectrum = read_spectrum(
            args.target, fwhm=args.fwhm, redshift=args.redshift or 0.0,
            noise=args.noise,
        )
        noise = args.noise
    if args.wave_range is not None:
        spectrum = spectrum.crop(*args.wave_range)
    setup = setup_fit(spectrum, losvd=args.losvd, moments=args.moments, degree=args.degree, mdegree=args.mdegree,
                      noise=noise, mask_emission=not args.no_mask_emission, n_pca=args.pca, rebin_lsf=args.rebin_lsf)
    result = fit_spectrum(setup.spectrum, setup=setup, method=args.method, seed=args.seed,
                          progress=sys.stderr.isatty() or args.method == "nuts", num_samples=args.num_samples,
                          min_ess=args.min_ess or None)
    summary = result.summary()
    summary["spectrum"] = args.target
    summary["redshift"] = float(spectrum.redshift)
    if setup.spectrum.fwhm is not None:  # the LSF the templates were matched to (after --rebin-lsf)
        summary["fwhm"] = float(np.median(np.atleast_1d(np.asarray(setup.spectrum.fwhm, float))))
    summary["precision"] = "float32" if args.float32 else "float64"
    _write_atomically(out, json.dumps(_jsonable(summary), indent=2))
    if args.save:
        result.save(args.save)
    brief = {k: summary[k] for k in result.names if k in summary}
    print(json.dumps({"out": str(out), **{k: round(v, 4) for k, v in brief.items()},
                      "chi2_dof": round(summary["chi2_dof"], 4)}))
    return 0


def _cmd_fit_cube(args) -> int:
    import jax

    jax.config.update("jax_enable_x64", not args.float32)
    from kinjax.cube import read_cube
    from kinjax.cube_fit import fit_cube_spaxels
    from kinjax.templates import load_emiles

    out = Path(args.out)
    if not out.parent.exists():
        raise KinjaxError(f"{out}: the output directory does not exist")
    if args.spatial == "none" and args.method == "svi":
        raise KinjaxError("--method svi needs --spatial gp (spaxel-by-spaxel fits use map or nuts)")
    if args.spatial == "none" and args.start_radius is not None:
        raise KinjaxError("--start-radius applies to --spatial gp (the 3D fit's start)")
    if args.spatial == "none" and args.kernel is not None:
        raise KinjaxError("--kernel applies to --spatial gp (the GP prior's kernel)")
    if args.spatial == "none" and args.v_mean != "constant":
        raise KinjaxError("--v-mean applies to --spatial gp (the GP's mean function)")
    if args.spatial == "gp" and args.method == "nuts":
        raise KinjaxError("--spatial gp supports --method map or svi (NUTS over a whole cube is not offered)")
    devices = _devices(args.devices)
    cube = read_cube(args.target, args.format, fwhm=args.fwhm, redshift=args.redshift)
    if args.wave_range is not None:
        cube = cube.crop(*args.wave_range)
    if cube.velscale is None:
        cube = cube.log_rebin(rebin_lsf=not args.nominal_fwhm)
    templates = load_emiles()
    common = dict(losvd=args.losvd, moments=args.moments, degree=args.degree, mdegree=args.mdegree,
                  snr_min=args.snr_min, seed=args.seed, progress=True, mask_emission=not args.no_mask_emission)
    if args.spatial == "gp":
        from kinjax.cube_model import fit_cube_gp

        result = fit_cube_gp(cube, templates, method=args.method, v_mean=args.v_mean, start_radius=args.start_radius,
                             kernel=args.kernel, devices=devices, **common)
    elif args.method == "nuts":
        from kinjax.cube_fit import fit_cube_spaxels_nuts

        result = fit_cube_spaxels_nuts(cube, templates, devices=devices, **common)
    else:
        result = fit_cube_spaxels(cube, templates, devices=devices, **common)
    result.write_maps(out)
    print(json.dumps({"out": str(out), "n_fitted": int(np.sum(result.fitted)),
                      "n_spaxels": int(result.n_spaxels), "spatial": args.spatial, "method": args.method}))
    return 0


def _positive_int(text):
    """argparse type: an integer ≥ 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _devices(text):
    """--devices: None (one device), 'all' or a count, for kinjax.sharding.spectra_mesh."""
    if text is None or text == "all":
        return text
    try:
        return int(text)
    except ValueError:
        raise KinjaxError(f"--devices {text!r}: give a number of devices or 'all'") from None


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kinjax", description="Stellar kinematics of galaxy spectra and IFU cubes with JAX."
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")

    info = subparsers.add_parser(
        "info", help="summarise a FITS cube or spectrum, or the bundled 'ngc4550' / 'emiles' data",
        description="Print a JSON summary of FILE (a MUSE, MaNGA or ATLAS3D cube, or a 1D "
                    "spectrum), or of the bundled example spectrum 'ngc4550' or the 'emiles' templates.",
    )
    info.add_argument("target", metavar="FILE", help="FITS file, or 'ngc4550' or 'emiles'")
    info.add_argument("--format", choices=["muse", "manga", "atlas3d"], default=None,
                      help="cube layout (default: detected from the file)")
    info.add_argument("--fwhm", type=float, default=None, help="instrumental FWHM in Å")
    info.set_defaults(func=_cmd_info)

    fit = subparsers.add_parser(
        "fit", help="fit the kinematics of one spectrum (FITS file or 'ngc4550')",
        description="Fit the LOSVD of one spectrum and write a JSON summary. Velocities in km/s "
                    "relative to --redshift (V = c ln(1+z)); emission lines are masked.",
    )
    fit.add_argument("target", metavar="SPECTRUM",
                     help="1D FITS spectrum (an image with a linear or log wavelength axis, an SDSS spec-*.fits "
                          "or an ESO-style WAVE/FLUX/ERR table), or 'ngc4550'")
    fit.add_argument("--redshift", type=float, default=None, help="systemic redshift z (default 0)")
    fit.add_argument("--fwhm", type=float, default=None, help="instrumental FWHM in Å")
    fit.add_argument("--noise", type=float, default=None, help="constant 1σ noise per log-rebinned pixel")
    fit.add_argument("--losvd", choices=["gh", "se", "hist", "gauss2"], default="gh",
                     help="LOSVD family (default gh; gauss2: two Gaussians, e.g. counter-rotating discs)")
    fit.add_argument("--moments", type=int, default=4, help="Gauss–Hermite moments (default 4)")
    fit.add_argument("--degree", type=int, default=4, help="additive Legendre degree (default 4; -1 none)")
    fit.add_argument("--mdegree", type=int, default=0, help="multiplicative Legendre degree (default 0)")
    fit.add_argument("--method", choices=["map", "nuts"], default="map", help="map (default) or nuts")
    fit.add_argument("--pca", type=int, default=None, metavar="N",
                     help="compress the templates to N principal components (unconstrained weights)")
    fit.add_argument("--seed", type=int, default=0, help="random seed")
    fit.add_argument("--num-samples", type=_positive_int, default=400, metavar="N",
                     help="NUTS draws per chain after a warm-up of 150, 4 chains (default 400)")
    fit.add_argument("--min-ess", type=float, default=400.0, metavar="N",
                     help="NUTS: continue the chains, up to --num-samples more draws each, until the smallest bulk "
                          "ESS of the kinematic parameters (V, sigma, h3, ... for gh) reaches N (default 400; "
                          "0: no more draws)")
    fit.add_argument("--no-mask-emission", action="store_true", help="do not mask emission lines")
    fit.add_argument("--rebin-lsf", action="store_true",
                     help="add the linear pixel's boxcar to --fwhm when log-rebinning (see kinjax.rebin; "
                          "default: --fwhm as given, pPXF's convention)")
    fit.add_argument("--wave-range", type=float, nargs=2, default=None, metavar=("LO", "HI"),
                     help="fit only LO-HI Å (observed frame; default: the whole spectrum)")
    fit.add_argument("--float32", action="store_true",
                     help="single precision (faster on most GPUs; default double)")
    fit.add_argument("--save", default=None, metavar="RESULT.nc", help="also save the full result (netCDF)")
    fit.add_argument("--out", required=True, metavar="RESULT.json", help="JSON summary to write")
    fit.set_defaults(func=_cmd_fit)

    fc = subparsers.add_parser(
        "fit-cube", help="fit the kinematics of every spaxel of an IFU cube, optionally with GP priors",
        description="Fit a MUSE, MaNGA or ATLAS3D cube spaxel by spaxel (--spatial none) or jointly with "
                    "Gaussian-process priors on the kinematic maps (--spatial gp); write MAPS.fits.",
    )
    fc.add_argument("target", metavar="CUBE", help="FITS cube")
    fc.add_argument("--format", choices=["muse", "manga", "atlas3d"], default=None,
                    help="cube layout (default: detected from the file)")
    fc.add_argument("--redshift", type=float, default=0.0, help="systemic redshift z (default 0)")
    fc.add_argument("--fwhm", type=float, default=None,
                    help="instrumental FWHM in Å (may be omitted when the file carries it, e.g. MaNGA)")
    fc.add_argument("--losvd", choices=["gh", "se", "hist", "gauss2"], default="gh",
                    help="LOSVD family (default gh; gauss2: two Gaussians, e.g. counter-rotating discs)")
    fc.add_argument("--moments", type=int, default=4, help="Gauss–Hermite moments (default 4)")
    fc.add_argument("--degree", type=int, default=4, help="additive Legendre degree (default 4)")
    fc.add_argument("--mdegree", type=int, default=0, help="multiplicative Legendre degree (default 0)")
    fc.add_argument("--spatial", choices=["none", "gp"], default="none", help="spatial prior (default none)")
    fc.add_argument("--method", choices=["map", "nuts", "svi"], default="map", help="inference (default map)")
    fc.add_argument("--snr-min", type=float, default=None, help="skip spaxels with median S/N below this")
    fc.add_argument("--seed", type=int, default=0, help="random seed")
    fc.add_argument("--no-mask-emission", action="store_true", help="do not mask emission lines")
    fc.add_argument("--nominal-fwhm", action="store_true",
                    help="use --fwhm as the LSF of the log-rebinned cube (pPXF's convention); by default the "
                         "linear pixel's boxcar is added, which log-rebinning convolves in (see kinjax.rebin)")
    fc.add_argument("--wave-range", type=float, nargs=2, default=None, metavar=("LO", "HI"),
                    help="fit only LO-HI Å (observed frame), e.g. 4750 5500 for MUSE (default: the whole cube)")
    fc.add_argument("--v-mean", choices=["constant", "rotation"], default="constant",
                    help="mean function of the V map under --spatial gp: constant (default) or an "
                         "arctan rotation curve of an inclined disc fitted to the spaxel velocities")
    fc.add_argument("--kernel", choices=["matern32", "matern12", "expsquared"], default=None,
                    help="--spatial gp: the GP prior's kernel (default matern12 for --losvd gauss2, "
                         "matern32 otherwise; see fit_cube_gp)")
    fc.add_argument("--start-radius", type=float, default=None, metavar="R",
                    help="--spatial gp: start from spaxel fits of the cube averaged within R spaxels "
                         "(default 1.5 for --losvd gauss2, 0 = the cube itself otherwise; see fit_cube_gp)")
    fc.add_argument("--float32", action="store_true",
                     help="single precision (faster on most GPUs; default double)")
    fc.add_argument("--devices", default=None, metavar="N|all",
                    help="split the spectra over N devices, or all that JAX sees (e.g. several GPUs; default one)")
    fc.add_argument("--out", required=True, metavar="MAPS.fits", help="output maps")
    fc.set_defaults(func=_cmd_fit_cube)
    return parser


def _one_line(exc) -> str:
    if isinstance(exc, FileNotFoundError):
        name = exc.filename or str(exc)
        return f"{name}: no such file (give the path to a FITS file, or one of: {', '.join(BUILTIN_NAMES)})"
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


def _read_errors() -> tuple:
    """Exceptions that mean 'bad input file' rather than a bug."""
    errors = [KinjaxError, OSError]
    try:
        from astropy.io.fits.verify import VerifyError

        errors.append(VerifyError)
    except ImportError:  # pragma: no cover
        pass
    return tuple(errors)


def main(argv=None) -> int:
    """Run the ``kinjax`` command line; returns the exit status (0 ok, 2 bad input)."""
    parser = _build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse has printed usage and its own one-line message
        return int(exc.code or 0)
    if getattr(args, "func", None) is None:
        parser.print_help(sys.stderr)
        return EXIT_ERROR
    try:
        return int(args.func(args))
    except _read_errors() as exc:
        message = _one_line(exc)
        target = getattr(args, "target", None)
        if target and target not in message:  # e.g. astropy's "No SIMPLE card found..."
            message = f"{target}: {message}"
        print(f"kinjax: error: {message}", file=sys.stderr)
        return EXIT_ERROR
