"""Machine description and result-file naming shared by the benchmark scripts."""

from __future__ import annotations

import datetime as _dt
import os
import platform
import re
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def _cpu_model() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
        m = re.search(r"model name\s*:\s*(.+)", text)
        return m.group(1).strip() if m else platform.processor()
    except OSError:
        return platform.processor()


def machine_info() -> dict:
    """Device, CPU, core count, library versions and the date of the run."""
    import jax

    dev = jax.devices()[0]
    return {
        "date": _dt.date.today().isoformat(),
        "backend": jax.default_backend(),
        "device": getattr(dev, "device_kind", str(dev)),
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "jax": jax.__version__,
    }


def machine_label(info: dict | None = None) -> str:
    info = info or machine_info()
    dev = info["device"] if info["backend"] != "cpu" else f"cpu{info['cores']}"
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", dev).strip("-").lower()


def result_path(name: str) -> Path:
    """``bench/results/<name>-<date>-<machine>.json``."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    info = machine_info()
    return RESULTS / f"{name}-{info['date']}-{machine_label(info)}.json"


def call_times(fn, *args, iters: int, warmups: int = 1) -> list[float]:
    """Wall seconds of ``iters`` calls of the jitted ``fn(*args)`` (each blocked on), after ``warmups``
    untimed calls (the first compiles)."""
    import time

    import jax

    for _ in range(warmups):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return times
