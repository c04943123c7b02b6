"""Locations inside a study store: URL normalisation, joining, and the fsspec filesystem.

A location is either a local path (absolute, ``file://`` stripped) or an fsspec URL such as
``memory://study.zarr`` or ``s3://bucket/study.zarr``. Local paths go to zarr's LocalStore
(which creates directories as needed); URLs go to zarr's FsspecStore through the same calls.
"""
from __future__ import annotations

import os
from typing import Any

import fsspec


def is_url(location: str) -> bool:
    """True for ``proto://...`` locations other than ``file://``."""
    return "://" in location and not location.startswith("file://")


def normalize(location: str | os.PathLike) -> str:
    """Absolute local path (``file://`` stripped) or the URL without a trailing slash."""
    s = os.fspath(location)
    if s.startswith("file://"):
        s = s[len("file://"):]
    if is_url(s):
        return s.rstrip("/")
    return os.path.abspath(os.path.expanduser(s))


def join(base: str, *parts: str) -> str:
    """``base/part1/part2`` for paths and URLs alike (no empty parts)."""
    out = normalize(base) if not is_url(base) else base.rstrip("/")
    for p in parts:
        p = str(p).strip("/")
        if p:
            out = f"{out}/{p}"
    return out


def filesystem(location: str, storage_options: dict[str, Any] | None = None):
    """``(fs, path)`` for a location: the fsspec filesystem and the path within it."""
    loc = normalize(location)
    if not is_url(loc):
        return fsspec.filesystem("file", auto_mkdir=True), loc
    return fsspec.core.url_to_fs(loc, **(storage_options or {}))


def put_atomic(fs, path: str, payload: bytes, tmp_path: str) -> None:
    """Write ``payload`` to ``path`` so that a reader sees the old file or the whole new one.

    Local disks: write ``tmp_path`` (same directory) and rename it over ``path``. Other
    filesystems (object stores, memory://): one PUT, which they make visible whole.
    """
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    if protocol in ("file", "local"):
        fs.pipe_file(tmp_path, payload)
        fs.mv(tmp_path, path)
    else:
        fs.pipe_file(path, payload)


def zarr_kwargs(location: str, storage_options: dict[str, Any] | None) -> dict[str, Any]:
    """Keyword arguments for zarr/xarray calls: ``storage_options`` only for URLs."""
    if is_url(normalize(location)) and storage_options:
        return {"storage_options": dict(storage_options)}
    return {}
