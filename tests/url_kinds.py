"""The three kinds of store location tests run against: a plain path, a file:// URL, fsspec memory://."""
from __future__ import annotations

import uuid

KINDS = ("path", "file", "memory")


def url_of_kind(kind: str, tmp_path, name: str) -> str:
    if kind == "path":
        return str(tmp_path / name)
    if kind == "file":
        return f"file://{tmp_path}/{name}"
    return f"memory://{uuid.uuid4().hex}/{name}"
