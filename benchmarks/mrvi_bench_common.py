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


def timed(fn: Callable[[], object]) -> tuple[float, float]:
    """(CPU seconds, wall seconds) of ``fn()``."""
    t0, w0 = time.process_time(), time.perf_counter()
    fn()
    return time.process_time() - t0, time.perf_counter() - w0


def record(impl: str, what: str, n_cells: int, n_samples: int, cpu_s: float, wall_s: float) -> dict:
    """One benchmark row, the same fields for both implementations."""
    return {"impl": impl, "what": what, "n_cells": int(n_cells), "n_samples": int(n_samples), "cpu_s": cpu_s,
            "wall_s": wall_s, "cells_per_cpu_s": n_cells / cpu_s, "peak_rss_gib": peak_rss_gib()}
