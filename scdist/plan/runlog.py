"""Run records: one small JSON document per run at ``<store>/_scdist_runs/<run_id>.json``.

A record says what a run was asked to do and what happened to each stage (skipped, ran,
failed, with timings and the error). ``scdist status`` lists them next to the completion
markers. Each run writes only its own key, so concurrent runs never touch the same object.
Records are written only once the store exists (the simulate/ingest stage creates it).
"""
from __future__ import annotations

import json
import os
import socket
import time
from typing import Any

RUNS_DIR = "_scdist_runs"


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _fs(store: str):
    from ..store._fs import filesystem

    fs, path = filesystem(store)
    return fs, path.rstrip("/")


class RunRecord:
    """The record of one run, written through on every change."""

    def __init__(self, store: str, run_id: str, spec_source: str | None, plan: list[dict]):
        self.store = store
        self.doc: dict[str, Any] = {
            "run_id": run_id, "status": "running", "started": _now(), "finished": None,
            # orders runs that start within the same second (``started`` has 1 s resolution)
            "started_ns": time.time_ns(),
            "host": socket.gethostname(), "pid": os.getpid(), "spec": spec_source,
            "stages": [{"stage": p["stage"], "engine": p["engine"], "planned": p["status"],
                        "chunks": p["chunks"], "output_url": p["output_url"], "action": None,
                        "seconds": None, "error": None} for p in plan],
        }

    def _stage(self, name: str) -> dict:
        return next(s for s in self.doc["stages"] if s["stage"] == name)

    def stage(self, name: str, **fields) -> None:
        self._stage(name).update(fields)
        self.write()

    def finish(self, status: str, error: str | None = None) -> None:
        self.doc.update(status=status, finished=_now(), error=error)
        self.write()

    def store_exists(self) -> bool:
        from .graph import group_exists

        return group_exists(self.store)

    def write(self) -> None:
        fs, root = _fs(self.store)
        if not self.store_exists():
            return  # the store does not exist yet: written once a stage has created it
        fs.pipe_file(f"{root}/{RUNS_DIR}/{self.doc['run_id']}.json",
                     json.dumps(self.doc, indent=1, default=str).encode())


def _driver_gone(rec: dict) -> bool:
    """A 'running' record whose driver process (on this host) no longer exists."""
    if rec.get("status") != "running" or rec.get("host") != socket.gethostname():
        return False
    try:
        os.kill(int(rec.get("pid", -1)), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, ValueError, OverflowError):
        return False
    return False


def list_runs(store: str) -> list[dict]:
    """All run records of a store, oldest first.

    A record still saying ``running`` whose driver is known to be gone (same host, no such
    process) is reported as ``interrupted``: the driver was killed before it could finish.
    """
    fs, root = _fs(store)
    try:
        names = sorted(fs.ls(f"{root}/{RUNS_DIR}", detail=False))
    except FileNotFoundError:
        return []
    out = []
    for n in names:
        if n.endswith(".json"):
            try:
                rec = json.loads(fs.cat_file(n))
            except (ValueError, FileNotFoundError):
                continue  # a record being replaced right now
            if _driver_gone(rec):
                rec["status"] = "interrupted"
                for st in rec.get("stages", []):
                    if st.get("action") == "running":
                        st["action"] = "interrupted"
            out.append(rec)
    # records written before ``started_ns`` existed fall back to their id within a second
    return sorted(out, key=lambda r: (r.get("started", ""), r.get("started_ns", 0), r.get("run_id", "")))
