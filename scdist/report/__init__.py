"""The HTML report of a study store (``scdist report STORE``): figures and tables of what was
run and found, PNGs embedded so the file stands alone. See :func:`write_report`."""
from __future__ import annotations

__all__ = ["write_report", "render"]


def write_report(store, out=None):
    from .build import write_report as _w

    return _w(store, out)


def render(store):
    from .build import render as _r

    return _r(store)
