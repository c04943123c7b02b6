"""Errors scdist raises for bad input, specs and stores.

Every error names the offending field and says how to fix it, so a user can act on the
message without reading code. All inherit from :class:`ScdistError` (a ``ValueError``).
"""
from __future__ import annotations


class ScdistError(ValueError):
    """Base error: ``field`` is what is wrong, ``fix`` what to do about it."""

    def __init__(self, message: str, *, field: str | None = None, fix: str | None = None):
        self.field = field
        self.fix = fix
        parts = []
        if field:
            parts.append(f"[{field}]")
        parts.append(message)
        if fix:
            parts.append(f"Fix: {fix}")
        super().__init__(" ".join(parts))


class InputError(ScdistError):
    """Bad input data (counts, obs keys, gene names, donors...)."""


class SpecError(ScdistError):
    """Bad pipeline spec (unknown key, wrong type, missing stage dependency)."""


class SchemaError(ScdistError):
    """A study store written by an incompatible schema version, or not a study store."""


class StoreLockedError(ScdistError):
    """Another run holds the lock on the same store stage."""


class ClusterError(ScdistError):
    """A Dask scheduler or Ray head could not be reached."""
