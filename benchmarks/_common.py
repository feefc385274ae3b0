"""Shared helpers of the benchmark scripts: machine description, timing, JSON output."""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict:
    """nproc, CPU model, load, versions and date, recorded with every result."""
    import jax
    import jaxlib

    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "nproc": os.cpu_count(),
        "cpu": model,
        "load_1_5_15": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "backend": jax.default_backend(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def median_time(fn, repeats: int = 5) -> tuple[float, list[float]]:
    """Median wall time of ``fn()`` over ``repeats`` calls (and all the times)."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def write(name: str, data: dict) -> Path:
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(data, indent=2, default=float) + "\n")
    return path


def table(header: list[str], rows: list[list]) -> str:
    """A plain markdown table."""
    out = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def machine_line(m: dict) -> str:
    return (f"{m['nproc']} cores ({m['cpu']}), jax/jaxlib {m['jax']}/{m['jaxlib']} ({m['backend']}), "
            f"{m['date']}, load average {m['load_1_5_15']}")


def compile_continuation(setup, **nuts_kw) -> float:
    """Compile the NUTS continuation program of ``fit_spectrum`` before NUTS is timed; returns seconds.

    With ``min_ess`` the chains go on in blocks when the ESS is short, and the program
    that continues them compiles on the first call that needs it. Timing calls "after
    compilation" would otherwise charge that compilation to whichever seed first needs
    more draws (NGC 3073: 11.5 s for a posterior whose like took 7.0 s). One call with an
    unreachable ``min_ess`` (seed 0, its draws unused) runs every block and compiles it.
    """
    import warnings

    import numpy as np

    from kinjax.fit import fit_spectrum

    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the unreachable target warns, as it should
        fit_spectrum(None, setup=setup, method="nuts", seed=0, progress=False, min_ess=np.inf, **nuts_kw)
    return time.perf_counter() - t0
