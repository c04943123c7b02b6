"""Measurement helpers shared by mrvi_analysis_bench.py (scdist's venv) and mrvi_scvi_worker.py
(scvi-tools' venv): plain Python only, so both interpreters import it from this folder.

Importing it pins OpenMP to one thread (the analyses are compared on one CPU thread).
"""
from __future__ import annotations

import os
import time
from typing import Callable

os.environ.setdefault("OMP_NUM_THREADS", "1")


def peak_rss_gib() -> float:
    """This process's peak RSS (VmHWM; getrusage's ru_maxrss would include the parent's peak
    at fork time, which survives exec on Linux)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20
    return float("nan")


def reset_peak_rss() -> None:
    """Reset VmHWM to the current RSS (Linux clear_refs "5"): the peak that follows is the
    analysis's own, not the model training's before it."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def timed(fn: Callable[[], object]) -> tuple[float, float]:
    """(CPU seconds, wall seconds) of ``fn()``."""
    t0, w0 = time.process_time(), time.perf_counter()
    fn()
    return time.process_time() - t0, time.perf_counter() - w0


def timed_repeats(fn: Callable[[], object], repeats: int) -> tuple[float, float, list[float]]:
    """Median CPU and wall seconds of ``repeats`` calls of ``fn()``, and all CPU times."""
    runs = [timed(fn) for _ in range(max(1, int(repeats)))]
    cpu = sorted(r[0] for r in runs)
    wall = sorted(r[1] for r in runs)
    return cpu[len(cpu) // 2], wall[len(wall) // 2], [r[0] for r in runs]


def record(impl: str, what: str, n_cells: int, n_samples: int, cpu_s: float, wall_s: float,
           cpu_s_all: list[float] | None = None) -> dict:
    """One benchmark row, the same fields for both implementations (``cpu_s``: median of repeats)."""
    return {"impl": impl, "what": what, "n_cells": int(n_cells), "n_samples": int(n_samples), "cpu_s": cpu_s,
            "wall_s": wall_s, "cells_per_cpu_s": n_cells / cpu_s, "cpu_s_all": cpu_s_all or [cpu_s],
            "peak_rss_gib": peak_rss_gib(), "load_avg_1min": os.getloadavg()[0]}
