"""Turn storage and data failures raised deep inside a stage into errors a user can act on.

A stage's kernels raise whatever the storage layer raises: ``OSError`` with ``ENOSPC`` when
the disk is full, ``EROFS``/``EACCES`` for a read-only store, a codec's ``RuntimeError``
when a chunk's bytes are damaged. The runner passes them through :func:`translate`, which
returns a :class:`~scdist.errors.ScdistError` naming the field (the store, or the group a
stage was reading) and the fix, or ``None`` for failures it does not recognise (those are
raised unchanged, with their traceback).
"""
from __future__ import annotations

import errno

from ..errors import InputError, SchemaError, ScdistError

_NO_SPACE = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC), errno.EFBIG}
_READ_ONLY = {errno.EROFS, errno.EACCES, errno.EPERM}
# what numcodecs / zarr codecs say when a chunk's bytes cannot be decoded
_DECODE_WORDS = ("decompression error", "decompress", "invalid input data", "corrupt",
                 "incorrect header check", "checksum", "unexpected end of data")


def _chain(exc: BaseException):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def translate(exc: BaseException, store: str, *, stage: str | None = None,
              inputs: tuple[str, ...] = ()) -> ScdistError | None:
    """A user-facing error for ``exc`` raised while running ``stage`` on ``store``, or None."""
    where = f"stage {stage}" if stage else "the run"
    for e in _chain(exc):
        if isinstance(e, ScdistError):
            return None  # already says what is wrong
        if isinstance(e, OSError) and e.errno in _NO_SPACE:
            return InputError(
                f"{where} ran out of disk space writing {getattr(e, 'filename', None) or store} ({e.strerror})",
                field="store",
                fix="free space (or move the store to a larger volume) and run the same spec again: "
                    "finished chunks are kept and only missing ones are recomputed")
        if isinstance(e, OSError) and e.errno in _READ_ONLY:
            return InputError(
                f"{where} cannot write to the store at {store}: {e.strerror} "
                f"({getattr(e, 'filename', None) or store})",
                field="store",
                fix="make the store (and its parent folder, which holds <store>.lock) writable, "
                    "or set `store` / --store to a writable location")
        msg = str(e).lower()
        if isinstance(e, (RuntimeError, ValueError)) and any(w in msg for w in _DECODE_WORDS):
            groups = ", ".join(inputs) or "its inputs"
            first = inputs[0] if inputs else "<group>"
            return SchemaError(
                f"{where} could not decode a chunk while reading {groups} of {store}: the store is "
                f"damaged ({type(e).__name__}: {e})",
                field=f"store:{groups}",
                fix=f"recompute the damaged group: delete {store.rstrip('/')}/{first}/_scdist_done "
                    "and run the spec that produced it again (or restore the store from a copy)")
    return None
