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
