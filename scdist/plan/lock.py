"""A run's claim on a study store, so two runs never write the same store at once.

The lock is a small JSON file *beside* the store (``<store>.lock``; inside it, a stage that
recreates the store would delete it). It is taken only by a run that has work to do (a run
finding everything done only reads) and removed when the run ends, however it ends.

A second run fails fast with :class:`~scdist.errors.StoreLockedError` naming the holder.
A lock left by a driver that died on this host (no such process any more) is taken over;
one from another host cannot be checked, so the message says how to remove it. On local
disks the lock is created atomically (``O_EXCL``); on object stores the check-then-write
has a small race window (object stores offer no portable exclusive create).
"""
from __future__ import annotations

import json
import os
import socket
import time

from ..errors import StoreLockedError


def lock_url(store: str) -> str:
    return store.rstrip("/") + ".lock"


def _alive_here(holder: dict) -> bool | None:
    """True/False for a holder on this host; None when it cannot be checked."""
    if holder.get("host") != socket.gethostname():
        return None
    try:
        os.kill(int(holder["pid"]), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, KeyError, ValueError, OverflowError):
        return True
    return True


class StoreLock:
    """Context manager holding ``<store>.lock`` for ``run_id``."""

    def __init__(self, store: str, run_id: str):
        from ..store._fs import filesystem, is_url

        self.store, self.run_id = store, run_id
        self.url = lock_url(store)
        self.fs, self.path = filesystem(self.url)
        self.local = not is_url(self.url)
        self.held = False

    def _body(self) -> bytes:
        return json.dumps({"run_id": self.run_id, "host": socket.gethostname(), "pid": os.getpid(),
                           "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}).encode()

    def _holder(self) -> dict | None:
        try:
            return json.loads(self.fs.cat_file(self.path))
        except FileNotFoundError:
            return None
        except ValueError:
            return {}  # being written right now, or damaged

    def _try_create(self) -> bool:
        if self.local:
            os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as f:
                f.write(self._body())
            return True
        if self.fs.exists(self.path):
            return False
        self.fs.pipe_file(self.path, self._body())
        return True

    def acquire(self) -> None:
        for _ in range(2):
            if self._try_create():
                self.held = True
                return
            holder = self._holder()
            if holder is None:
                continue  # released between our attempt and the read
            if holder and _alive_here(holder) is False:
                self.fs.rm(self.path)  # its driver is gone: take over
                continue
            break
        holder = self._holder() or {}
        raise StoreLockedError(
            f"run {holder.get('run_id', '?')} (host {holder.get('host', '?')}, pid {holder.get('pid', '?')}, "
            f"since {holder.get('since', '?')}) is writing this store",
            field="store",
            fix=f"wait for it to finish (`scdist status`), use another store, or delete {self.url} "
                "if that run is no longer alive")

    def release(self) -> None:
        if self.held:
            holder = self._holder()
            if holder is not None and holder.get("run_id") == self.run_id:
                self.fs.rm(self.path)
            self.held = False

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()
