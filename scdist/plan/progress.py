"""Progress reporting: rich bars on an interactive terminal, plain log lines otherwise.

Plain mode (not a TTY, or ``CI`` set) logs a stage's chunk progress at most every ~10% so CI
logs stay short. Both modes expose the same object: ``update(n=1)`` and ``close()``.
"""
from __future__ import annotations

import logging
import os
import sys
import time

log = logging.getLogger("scdist")


def interactive() -> bool:
    """Rich progress bars only on a real terminal outside CI."""
    ci = os.environ.get("CI", "").lower() not in ("", "0", "false", "no")
    return not ci and sys.stderr.isatty()


class LogProgress:
    """Progress as log lines: one at the start, one per ~10% of the chunks, one at the end."""

    def __init__(self, label: str, total: int | None, logger: logging.Logger = log):
        self.label, self.total, self.n, self.log = label, total, 0, logger
        self._t0 = time.monotonic()
        self._next = self._step()
        self._closed = False
        self.log.info("%s: started (%s chunks)", label, "?" if total is None else total)

    def _step(self) -> int:
        return max(1, (self.total or 10) // 10)

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.n >= self._next and (self.total is None or self.n < self.total):
            self.log.info("%s: %d/%s chunks (%.1fs)", self.label, self.n,
                          "?" if self.total is None else self.total, time.monotonic() - self._t0)
            self._next = self.n + self._step()

    def close(self, failed: bool = False) -> None:
        if not self._closed:
            self._closed = True
            self.log.info("%s: %d/%s chunks %s after %.1fs", self.label, self.n,
                          "?" if self.total is None else self.total, "FAILED" if failed else "done",
                          time.monotonic() - self._t0)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc):
        self.close(failed=exc_type is not None)


class RichProgress:
    """One task of a shared ``rich.progress.Progress`` display."""

    def __init__(self, progress, label: str, total: int | None):
        self._p = progress
        self._task = progress.add_task(label, total=total)

    def update(self, n: int = 1) -> None:
        self._p.advance(self._task, n)

    def close(self) -> None:
        self._p.stop_task(self._task)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class ProgressFactory:
    """Creates per-stage progress objects; one rich display for the whole run."""

    def __init__(self, rich: bool | None = None, logger: logging.Logger = log):
        self.rich = interactive() if rich is None else rich
        self.log = logger
        self._display = None

    def __call__(self, label: str, total: int | None):
        if not self.rich:
            return LogProgress(label, total, self.log)
        if self._display is None:
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                       TimeElapsedColumn)

            self._display = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                     TimeElapsedColumn(), transient=False)
            self._display.start()
        return RichProgress(self._display, label, total)

    def close(self) -> None:
        if self._display is not None:
            self._display.stop()
            self._display = None


class JsonFormatter(logging.Formatter):
    """One JSON object per line (``SCDIST_LOG_FORMAT=json``), for log collectors."""

    def format(self, record: logging.LogRecord) -> str:
        import json

        doc = {"time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"), "level": record.levelname,
               "logger": record.name, "message": record.getMessage()}
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return json.dumps(doc)


def configure_logging(level: int = logging.INFO) -> None:
    """Log lines to stderr, once per process: JSON lines with ``SCDIST_LOG_FORMAT=json``,
    a rich handler on a terminal, plain lines otherwise."""
    if log.handlers:
        return
    if os.environ.get("SCDIST_LOG_FORMAT", "").lower() == "json":
        handler: logging.Handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(JsonFormatter())
    elif interactive():
        from rich.logging import RichHandler

        handler = RichHandler(show_path=False, markup=False)
        handler.setFormatter(logging.Formatter("%(message)s"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s",
                                               "%Y-%m-%dT%H:%M:%S"))
    log.addHandler(handler)
    log.setLevel(level)
    log.propagate = False
