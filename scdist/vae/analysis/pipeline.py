"""The analyses a pipeline's ``mrvi`` stage can ask for after training, written to the store.

``run_analyses(model, study, run, {"distances": {...}, "de": {...}, ...})``: each key names one
analysis, its value holds that function's keyword arguments; every result is stored under
``results/mrvi/<run>/<key>``. Each result's stage marker records a fingerprint of its parameters,
of the analyses it builds on and of the model (``tag``): a rerun skips the results whose
fingerprint still matches and recomputes the others. Unknown keys fail before any work starts.
"""
from __future__ import annotations

import hashlib
import json
from typing import Any

import numpy as np

from ...errors import InputError
from ...store.markers import STAGE, read_marker
from . import admissibility, cluster_cells, cluster_samples, differential_abundance, differential_expression
from .distances import sample_distances
from .results import read_result, result_url, write_result

ANALYSES = ("distances", "sample_clusters", "cell_clusters", "admissibility", "de", "da")


def _depends_on(key: str, analyses: dict) -> list[str]:
    deps = []
    if key == "sample_clusters":
        deps.append("distances")
    if key == "de" and "admissibility" in analyses:
        deps.append("admissibility")
    if (analyses[key] or {}).get("groupby") == "cell_clusters":
        deps.append("cell_clusters")
    return deps


def _jsonable(o):
    if isinstance(o, np.ndarray):  # per-cell labels / positions: hash the values, not their repr
        return hashlib.sha256(np.ascontiguousarray(o).tobytes() + str(o.dtype).encode()).hexdigest()
    return str(o)


def fingerprint(key: str, analyses: dict, tag: str = "") -> str:
    """Hash of an analysis' parameters, those of the analyses it reads, and ``tag`` (the model)."""
    def spec(k):
        return {"params": analyses[k] or {}, "deps": {d: spec(d) for d in _depends_on(k, analyses)}}
    text = json.dumps({"tag": tag, "key": key, "spec": spec(key)}, sort_keys=True, default=_jsonable)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def check_analyses(analyses: dict[str, dict[str, Any]]) -> None:
    """Errors for unknown keys and missing prerequisites (no work, no store access)."""
    unknown = sorted(set(analyses) - set(ANALYSES))
    if unknown:
        raise InputError(f"unknown analyses {unknown}", field="analyses", fix=f"use keys among {list(ANALYSES)}")
    if "sample_clusters" in analyses and "distances" not in analyses:
        raise InputError("sample_clusters needs distances", field="analyses.sample_clusters",
                         fix="ask for distances too")
    for key, need in (("de", "covariates"), ("da", "sample_groups")):
        if key in analyses and need not in (analyses[key] or {}):
            raise InputError(f"{key} needs {need!r}", field=f"analyses.{key}.{need}", fix=f"give {need}")
    for key, args in analyses.items():
        if (args or {}).get("groupby") == "cell_clusters" and "cell_clusters" not in analyses:
            raise InputError("groupby 'cell_clusters' needs the cell_clusters analysis",
                             field=f"analyses.{key}.groupby", fix="ask for cell_clusters too")


def run_analyses(model, study, run: str, analyses: dict[str, dict[str, Any]], *, client=None,
                 tag: str = "", progress=None) -> dict[str, str]:
    """Run the requested analyses on ``study`` with a trained MrVI ``model``; returns name -> URL.

    Keys (in this order of execution): ``cell_clusters`` (:func:`cluster_cells`),
    ``distances`` (:func:`sample_distances` kwargs), ``sample_clusters`` (:func:`cluster_samples`
    kwargs, needs ``distances``), ``admissibility``, ``de`` (:func:`differential_expression`, must
    give ``covariates``; reuses ``admissibility`` when asked for), ``da``
    (:func:`differential_abundance`, must give ``sample_groups``). ``groupby: "cell_clusters"``
    uses the cell clusters of this run. ``tag`` identifies the model (e.g. a hash of its training
    config): results computed with another tag are recomputed. ``progress``: a callable
    ``progress(name)`` called as each analysis' result is in the store (computed or reused).
    """
    check_analyses(analyses)
    fps = {k: fingerprint(k, analyses, tag) for k in analyses}

    def done(k):
        meta = (read_marker(result_url(study, run, k), STAGE) or {}).get("meta", {})
        return meta.get("fingerprint") == fps[k]

    def settle(k):
        urls[k] = result_url(study, run, k)
        if progress is not None:
            progress(k)

    def store(result, k):
        return write_result(result, study, run, k, meta={"fingerprint": fps[k], "params": analyses[k] or {}})

    clusters = None

    def kw(key):
        args = dict(analyses[key] or {})
        if args.get("groupby") == "cell_clusters":
            args["groupby"] = clusters
        return args

    urls: dict[str, str] = {}
    if "cell_clusters" in analyses:
        if done("cell_clusters"):
            cc = read_result(study, run, "cell_clusters")
        else:
            cc = cluster_cells(model, study, client=client, **kw("cell_clusters"))[["cluster"]]
            store(cc, "cell_clusters")
        clusters = np.asarray(cc["cluster"].values)
        settle("cell_clusters")
    if "distances" in analyses:
        if done("distances"):
            d = None
        else:
            d = sample_distances(model, data=study, client=client, **kw("distances"))
            store(d, "distances")
        settle("distances")
        if "sample_clusters" in analyses:
            if not done("sample_clusters"):
                if d is None:
                    d = read_result(study, run, "distances")["distance"].load()
                store(cluster_samples(d, **(analyses["sample_clusters"] or {})), "sample_clusters")
            settle("sample_clusters")
    adm = None
    if "admissibility" in analyses:
        if not done("admissibility"):
            adm = admissibility(model, study, client=client, **kw("admissibility"))
            store(adm, "admissibility")
        elif "de" in analyses and not done("de"):
            adm = read_result(study, run, "admissibility").load()
        settle("admissibility")
    if "de" in analyses:
        if not done("de"):
            args = kw("de")
            if adm is not None:
                args.setdefault("admissible", adm)
            store(differential_expression(model, data=study, client=client, **args), "de")
        settle("de")
    if "da" in analyses:
        if not done("da"):
            args = kw("da")
            store(differential_abundance(model, args.pop("sample_groups"), study, client=client, **args), "da")
        settle("da")
    return urls
