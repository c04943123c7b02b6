"""What is in a study store and what was run on it (`scdist info`, `scdist status`).

Everything here is read from the store itself: the cells' obs, the groups present, the
completion markers and the run records, so it works for a store whatever machine wrote it.
"""
from __future__ import annotations

from typing import Any

from ..store import layout
from .runlog import list_runs
from .stage import STAGE_MARKER


def _groups(study) -> list[str]:
    """Data groups of a study: the standard ones present, plus results/<method>/<run>."""
    from ..store._fs import filesystem

    out = [g for g in (layout.CELLS, layout.PSEUDOBULK, layout.BULK, layout.TRUTH) if study.has(g)]
    # listed from the file system: results/ and results/<method>/ are often implicit groups
    # (no zarr.json of their own), which zarr's group listing does not show
    fs, root = filesystem(study.group_url(layout.RESULTS))
    try:
        methods = sorted(fs.ls(root, detail=False))
    except FileNotFoundError:
        methods = []
    for m in methods:
        try:
            runs = sorted(fs.ls(m, detail=False))
        except (FileNotFoundError, NotADirectoryError):
            continue
        for r in runs:
            if fs.exists(f"{r.rstrip('/')}/zarr.json"):
                method, run = m.rstrip("/").rsplit("/", 1)[-1], r.rstrip("/").rsplit("/", 1)[-1]
                out.append(f"{layout.RESULTS}/{method}/{run}")
    return out


def _markers(study, group: str) -> dict[str, Any]:
    from ..store.markers import done_set, read_marker

    url = study.group_url(group)
    ids = done_set(url)
    stage = read_marker(url, STAGE_MARKER) if STAGE_MARKER in ids else None
    return {"chunks_done": len([i for i in ids if not i.startswith("__")]),
            "stage_done": stage is not None,
            "stage": (stage or {}).get("meta", {}).get("stage"),
            "run_id": (stage or {}).get("meta", {}).get("run_id"),
            "seconds": (stage or {}).get("meta", {}).get("seconds"),
            "chunks_total": (stage or {}).get("meta", {}).get("chunks"),
            "time": (stage or {}).get("time")}


def store_info(store: str) -> dict[str, Any]:
    """Summary of a study: sizes, labels, groups, stages done, results present."""
    from ..store import open_study

    study = open_study(store, mode="r")
    info: dict[str, Any] = {"store": study.url, "schema_version": study.schema_version,
                            "created": study.attrs.get(layout.ATTR_CREATED),
                            "scdist_version": study.attrs.get(layout.ATTR_VERSION)}
    if study.has(layout.CELLS):
        obs = study.obs()
        info.update(
            n_cells=int(study.n_cells), n_genes=int(study.n_genes),
            n_donors=int(obs[layout.OBS_DONOR].nunique()),
            celltypes={str(k): int(v) for k, v in obs[layout.OBS_CELLTYPE].value_counts(sort=False).items()},
            n_batches=int(obs[layout.OBS_BATCH].nunique()) if layout.OBS_BATCH in obs else 1,
            donor_covariates=list(study.donor_covariates))
    groups = _groups(study)
    info["groups"] = groups
    info["stages_done"] = {}
    for g in groups:
        m = _markers(study, g)
        if m["stage_done"]:
            info["stages_done"][g] = {k: m[k] for k in ("stage", "run_id", "seconds", "time")}
    info["results"] = [g for g in groups if g.startswith(layout.RESULTS + "/")]
    if study.has(layout.PSEUDOBULK):
        pb = study.pseudobulk()
        info["pseudobulk"] = {"dims": {k: int(v) for k, v in pb.sizes.items()},
                              "variables": sorted(pb.data_vars),
                              "min_cells": pb.attrs.get("min_cells")}
    if study.has(layout.BULK):
        info["bulk_samples"] = int(study.bulk().sizes.get("bulk_sample", 0))
    return info


def render_info(info: dict[str, Any]) -> str:
    lines = [f"study: {info['store']} (schema {info['schema_version']}, created {info.get('created')})"]
    if "n_cells" in info:
        lines.append(f"  cells: {info['n_cells']:,}   genes: {info['n_genes']:,}   donors: {info['n_donors']}"
                     f"   batches: {info['n_batches']}")
        ct = ", ".join(f"{k} ({v:,})" for k, v in info["celltypes"].items())
        lines.append(f"  cell types ({len(info['celltypes'])}): {ct}")
        if info["donor_covariates"]:
            lines.append(f"  donor covariates: {', '.join(info['donor_covariates'])}")
    else:
        lines.append("  cells: none yet (run a simulate or ingest stage)")
    if "pseudobulk" in info:
        pb = info["pseudobulk"]
        dims = " x ".join(f"{k} {v}" for k, v in pb["dims"].items())
        lines.append(f"  pseudobulk: {dims}; variables: {', '.join(pb['variables'])}")
    if "bulk_samples" in info:
        lines.append(f"  bulk samples: {info['bulk_samples']}")
    lines.append("  stages done:" + ("" if info["stages_done"] else " none"))
    for g, m in info["stages_done"].items():
        lines.append(f"    {g:<28} by {m['stage']} (run {m['run_id']}, {m['seconds']}s, {m['time']})")
    lines.append("  results: " + (", ".join(info["results"]) or "none"))
    return "\n".join(lines)


def store_status(store: str) -> dict[str, Any]:
    """Runs recorded in the store, and per data group the chunks done / total."""
    from ..store import open_study

    study = open_study(store, mode="r")
    runs = list_runs(study.url)
    totals: dict[str, Any] = {}
    for r in runs:  # latest planned chunk count per output group
        for s in r.get("stages", []):
            if s.get("output_url") and s.get("chunks") is not None:
                totals[s["output_url"].rstrip("/")] = s["chunks"]
    from ..store.markers import done_set

    for r in runs:  # stages cut short: how far their chunks got (read from the markers now)
        for s in r.get("stages", []):
            if s.get("action") in ("running", "interrupted", "failed") and s.get("output_url"):
                s["chunks_done"] = sum(not c.startswith("__") for c in done_set(s["output_url"]))
    groups = []
    for g in _groups(study):
        m = _markers(study, g)
        total = m["chunks_total"] if m["chunks_total"] is not None else totals.get(study.group_url(g))
        groups.append({"group": g, **m, "chunks_total": total})
    return {"store": study.url, "runs": runs, "groups": groups}


def render_status(status: dict[str, Any]) -> str:
    lines = [f"store: {status['store']}", f"runs ({len(status['runs'])}):"]
    for r in status["runs"]:
        lines.append(f"  {r['run_id']}  {r['status']:<9} started {r['started']}  finished {r.get('finished') or '-'}"
                     f"  on {r.get('host')}")
        for s in r.get("stages", []):
            act = s.get("action") or "not reached"
            sec = f" {s['seconds']:.1f}s" if isinstance(s.get("seconds"), (int, float)) else ""
            err = f"  error: {s['error']}" if s.get("error") else ""
            prog = ""
            if "chunks_done" in s:
                prog = f" [{s['chunks_done']}/{'?' if s.get('chunks') is None else s['chunks']} chunks]"
            lines.append(f"    {s['stage']:<11} {act}{sec}{prog} (planned: {s.get('planned')}){err}")
    lines.append("groups:")
    for g in status["groups"]:
        total = "?" if g["chunks_total"] is None else g["chunks_total"]
        state = f"done by {g['stage']}" if g["stage_done"] else "in progress / interrupted" \
            if g["chunks_done"] else "no markers"
        if g["stage_done"]:
            chunks = "" if g["chunks_total"] is None else f"{total}/{total} chunks"
        else:
            chunks = f"{g['chunks_done']}/{total} chunks"
        lines.append(f"  {g['group']:<28} {state}  {chunks}".rstrip())
    return "\n".join(lines)
