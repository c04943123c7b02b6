"""Completion markers: one small JSON object per finished chunk, written after its data.

A marker for chunk ``cid`` of the group at ``group_url`` lives at
``<group_url>/_scdist_done/<cid>`` (``cid`` percent-encoded so any string is a valid key).
Each chunk owns its own key, so concurrent writers never touch the same object; a rerun
asks :func:`done_set` and skips those chunks. The stage-level marker id is
:data:`STAGE` (``"__stage__"``). Works on local paths, ``file://``, ``memory://`` and object
stores (anything fsspec opens).
"""
from __future__ import annotations

import json
import time
import urllib.parse
from typing import Any, Iterable

from . import _fs
from .layout import MARKER_DIR

STAGE = "__stage__"


def _key(chunk_id: str) -> str:
    if not isinstance(chunk_id, str) or not chunk_id or chunk_id == _GROUP_FILE:
        raise ValueError(f"chunk_id must be a non-empty string other than {_GROUP_FILE!r}, "
                         f"got {chunk_id!r}")
    return urllib.parse.quote(chunk_id, safe="-_.,=+")


# The marker folder deliberately has no zarr.json: zarr then skips it when listing a group
# (with a ZarrUserWarning, which scdist's readers silence), so anndata.read_zarr still reads
# a marked cells/ group. As a Zarr child group it would be passed to AnnData() and fail.
_GROUP_FILE = "zarr.json"
_TMP_MARK = "@tmp-"  # '@' is always percent-encoded in keys, so no chunk id can contain this
NOT_ZARR_WARNING = f"Object at {MARKER_DIR} is not recognized"


def _marker_dir(group_url: str, storage_options: dict | None):
    fs, path = _fs.filesystem(group_url, storage_options)
    return fs, f"{path.rstrip('/')}/{MARKER_DIR}"


def mark_done(group_url: str, chunk_id: str, meta: dict[str, Any] | None = None, *,
              storage_options: dict | None = None) -> None:
    """Record that ``chunk_id`` of ``group_url`` is complete. Call only after its data is written.

    ``meta`` (JSON-serialisable; other values are stored as ``str``) is kept in the marker,
    e.g. the rows written or a checksum. Writing the same marker twice is harmless.
    """
    fs, d = _marker_dir(group_url, storage_options)
    body = {"chunk_id": chunk_id, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "meta": meta or {}}
    payload = json.dumps(body, default=str).encode()
    target = f"{d}/{_key(chunk_id)}"
    _fs.put_atomic(fs, target, payload, f"{target}{_TMP_MARK}{time.monotonic_ns()}")


def is_done(group_url: str, chunk_id: str, *, storage_options: dict | None = None) -> bool:
    """Whether ``chunk_id`` of ``group_url`` has a completion marker."""
    fs, d = _marker_dir(group_url, storage_options)
    return fs.exists(f"{d}/{_key(chunk_id)}")


def done_set(group_url: str, *, storage_options: dict | None = None) -> set[str]:
    """Ids of all chunks of ``group_url`` marked complete (empty if none)."""
    fs, d = _marker_dir(group_url, storage_options)
    try:
        names = fs.ls(d, detail=False)
    except FileNotFoundError:
        return set()
    out = set()
    for n in names:
        base = n.rstrip("/").rsplit("/", 1)[-1]
        if _TMP_MARK in base or base == _GROUP_FILE:
            continue
        out.add(urllib.parse.unquote(base))
    return out


def read_marker(group_url: str, chunk_id: str, *, storage_options: dict | None = None) -> dict | None:
    """The marker's JSON body (``chunk_id``, ``time``, ``meta``), or None if not done."""
    fs, d = _marker_dir(group_url, storage_options)
    try:
        return json.loads(fs.cat_file(f"{d}/{_key(chunk_id)}"))
    except FileNotFoundError:
        return None


def clear_markers(group_url: str, chunk_ids: Iterable[str] | None = None, *,
                  storage_options: dict | None = None) -> None:
    """Remove the given markers, or all markers of ``group_url`` when ``chunk_ids`` is None."""
    fs, d = _marker_dir(group_url, storage_options)
    if chunk_ids is None:
        if fs.exists(d):
            fs.rm(d, recursive=True)
        return
    for cid in chunk_ids:
        p = f"{d}/{_key(cid)}"
        if fs.exists(p):
            fs.rm(p)
