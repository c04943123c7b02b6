"""The analyses a pipeline's ``mrvi`` stage can ask for after training, written to the store.

``run_analyses(model, study, run, {"distances": {...}, "de": {...}, ...})``: each key names one
analysis, its value holds that function's keyword arguments; every result is stored under
``results/mrvi/<run>/<key>``, and a result already complete (stage marker present) is skipped
on a rerun. Unknown keys fail before any work starts.
"""
from __future__ import annotations

from typing import Any

from ...errors import InputError
from ...store.markers import STAGE, is_done
from . import admissibility, cluster_cells, cluster_samples, differential_abundance, differential_expression
from .distances import sample_distances
from .results import result_url, write_result

ANALYSES = ("distances", "sample_clusters", "cell_clusters", "admissibility", "de", "da")


def run_analyses(model, study, run: str, analyses: dict[str, dict[str, Any]], *, client=None) -> dict[str, str]:
    """Run the requested analyses on ``study`` with a trained MrVI ``model``; returns name -> URL.

    Keys (in this order of execution): ``distances`` (:func:`sample_distances` kwargs),
    ``sample_clusters`` (:func:`cluster_samples` kwargs, needs ``distances``), ``cell_clusters``
    (:func:`cluster_cells`), ``admissibility``, ``de`` (:func:`differential_expression`, must
    give ``covariates``; reuses ``admissibility`` when run), ``da`` (:func:`differential_abundance`,
    must give ``sample_groups``). ``groupby: "cell_clusters"`` uses the stored cell clusters.
    """
    unknown = sorted(set(analyses) - set(ANALYSES))
    if unknown:
        raise InputError(f"unknown analyses {unknown}", field="analyses", fix=f"use keys among {list(ANALYSES)}")
    if "sample_clusters" in analyses and "distances" not in analyses:
        raise InputError("sample_clusters needs distances", field="analyses.sample_clusters",
                         fix="ask for distances too")
    for key, need in (("de", "covariates"), ("da", "sample_groups")):
        if key in analyses and need not in (analyses[key] or {}):
            raise InputError(f"{key} needs {need!r}", field=f"analyses.{key}.{need}", fix=f"give {need}")
    urls: dict[str, str] = {}
    done = {k: is_done(result_url(study, run, k), STAGE) for k in analyses}
    clusters = None

    def kw(key):
        args = dict(analyses[key] or {})
        if args.get("groupby") == "cell_clusters":
            if clusters is None:
                raise InputError("groupby 'cell_clusters' needs the cell_clusters analysis",
                                 field=f"analyses.{key}.groupby", fix="ask for cell_clusters too")
            args["groupby"] = clusters
        return args

    if "cell_clusters" in analyses:
        if done["cell_clusters"]:
            from .results import read_result
            cc = read_result(study, run, "cell_clusters")
        else:
            cc = cluster_cells(model, study, client=client, **kw("cell_clusters"))
            write_result(cc[["cluster"]], study, run, "cell_clusters")
        clusters = cc["cluster"].values
        urls["cell_clusters"] = result_url(study, run, "cell_clusters")
    if "distances" in analyses:
        if not done["distances"] or ("sample_clusters" in analyses and not done["sample_clusters"]):
            d = sample_distances(model, data=study, client=client, **kw("distances"))
            write_result(d, study, run, "distances")
            if "sample_clusters" in analyses:
                write_result(cluster_samples(d, **(analyses["sample_clusters"] or {})), study, run, "sample_clusters")
        for k in ("distances", "sample_clusters"):
            if k in analyses:
                urls[k] = result_url(study, run, k)
    adm = None
    if "admissibility" in analyses:
        if done["admissibility"] and not ("de" in analyses and not done["de"]):
            pass
        else:
            adm = admissibility(model, study, client=client, **kw("admissibility"))
            if not done["admissibility"]:
                write_result(adm, study, run, "admissibility")
        urls["admissibility"] = result_url(study, run, "admissibility")
    if "de" in analyses:
        if not done["de"]:
            args = kw("de")
            if adm is not None:
                args.setdefault("admissible", adm)
            write_result(differential_expression(model, data=study, client=client, **args), study, run, "de")
        urls["de"] = result_url(study, run, "de")
    if "da" in analyses:
        if not done["da"]:
            args = kw("da")
            write_result(differential_abundance(model, args.pop("sample_groups"), study, client=client, **args),
                         study, run, "da")
        urls["da"] = result_url(study, run, "da")
    return urls
