"""``scdist report STORE``: one self-contained HTML file of what was run on a study and found.

Everything is read from the store: run records and completion markers (run metadata),
``results/ctmm/*`` (variance components, QQ plots per test, top genes for variance and mean
differentiation), ``results/ldvae/*`` (loadings, latent factors), ``results/mrvi/*``
(sample-distance heatmaps with dendrograms per cell group, DE / DA summaries) and
``results/ursm/*`` (bulk proportions W, profiles A). Figures are PNGs embedded as base64, so
the file can be mailed or archived on its own. A section whose result lacks the variables a
figure needs says so instead of failing the report.
"""
from __future__ import annotations

import base64
import html
import logging
import os
import time
import warnings
from typing import Any

import numpy as np

from . import figures
from .figures import _labels

log = logging.getLogger("scdist")
MAX_CELLS_PLOTTED = 5000


def _img(png: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def _table(header: list[str], rows: list[list[Any]]) -> str:
    th = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"


def _fmt(x) -> str:
    if isinstance(x, (float, np.floating)):
        return f"{x:.3g}"
    return str(x)


def _open(url: str):
    import xarray as xr

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the marker folder is not a zarr node
        return xr.open_zarr(url, consolidated=False)


def _guard(title: str, fn, *args) -> str:
    try:
        return fn(*args)
    except Exception as exc:  # one broken result must not hide the others
        log.warning("report: section %s skipped: %s", title, exc)
        return f"<p class='note'>{html.escape(title)}: not shown ({html.escape(type(exc).__name__)}: " \
               f"{html.escape(str(exc))})</p>"


# ---------------------------------------------------------------- sections

def ctmm_section(url: str, name: str) -> str:
    ds = _open(url)
    out = [f"<h3>CTMM run <code>{html.escape(name)}</code></h3>",
           f"<p>{ds.sizes.get('gene', 0):,} genes, method {html.escape(str(ds.attrs.get('method')))}, "
           f"models {html.escape(str(ds.attrs.get('models')))}.</p>"]
    genes = _labels(ds["gene"].values)
    if "free" in list(map(str, ds["model"].values)):
        free = ds.sel(model="free")
        hom2 = np.asarray(free["hom2"].values, float)
        V = np.asarray(free["V"].values, float)  # gene, celltype, celltype2
        vdiag = np.diagonal(V, axis1=1, axis2=2)
        out.append(_img(figures.variance_components(hom2, vdiag, ds["celltype"].values), "variance components"))
    if "pvalue" in ds and ds.sizes.get("test", 0):
        pv = {str(t): np.asarray(ds["pvalue"].sel(test=t).values, float) for t in ds["test"].values}
        out.append(_img(figures.qq_pvalues(pv), "QQ plots"))
        for kind, match in (("variance differentiation (Free vs Hom)", "free_vs_hom"),
                            ("mean differentiation", "mean")):
            tests = [t for t in pv if t.startswith(match)]
            if not tests:
                out.append(f"<p class='note'>No {kind} test in this run.</p>")
                continue
            t = tests[0]
            order = np.argsort(np.nan_to_num(pv[t], nan=2.0))[:10]
            n_sig = int(np.sum(pv[t] < 0.05 / max(1, np.isfinite(pv[t]).sum())))
            out.append(f"<h4>Top genes: {kind} (<code>{t}</code>; {n_sig} Bonferroni-significant)</h4>")
            out.append(_table(["gene", "p-value"], [[genes[i], pv[t][i]] for i in order]))
    return "\n".join(out)


def ldvae_section(url: str, name: str, obs=None) -> str:
    ds = _open(url)
    out = [f"<h3>LDVAE run <code>{html.escape(name)}</code></h3>"]
    if "loadings" in ds:
        L = np.asarray(ds["loadings"].transpose("gene", ...).values, float)
        out.append(_img(figures.loadings_bars(L, ds["gene"].values), "LDVAE loadings"))
    if "z" in ds:
        out.append(_latent(ds["z"], obs, "z"))
    return "\n".join(out)


def _latent(z, obs, title: str) -> str:
    n = z.sizes["cell"]
    idx = np.unique(np.linspace(0, n - 1, min(n, MAX_CELLS_PLOTTED)).astype(int)) if n else np.arange(0)
    Z = np.asarray(z.isel(cell=idx).values, float)
    labels = None
    if obs is not None and len(obs) == n and "celltype" in obs:
        labels = np.asarray(obs["celltype"].values)[idx]
    return _img(figures.latent_scatter(Z, labels, title), f"latent {title}")


def mrvi_section(url: str, name: str, obs=None) -> str:
    from ..store._fs import filesystem

    out = [f"<h3>MrVI run <code>{html.escape(name)}</code></h3>"]
    fs, path = filesystem(url)
    if fs.exists(f"{path}/zarr.json"):
        ds = _open(url)
        for v in ("u", "z"):
            if v in ds:
                out.append(_latent(ds[v], obs, v))
    sub = {p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False)}
    if "distances" in sub:
        d = _open(f"{url}/distances")
        var = "distance" if "distance" in d else next(iter(d.data_vars))
        da = d[var]
        groups = da["group"].values if "group" in da.dims else [None]
        for g in list(groups)[:8]:
            m = da.sel(group=g) if g is not None else da
            out.append(_img(figures.distance_heatmap(np.asarray(m.values, float), m["sample"].values,
                                                     f"sample distances: {g if g is not None else 'all cells'}"),
                            f"distances {g}"))
    for kind in ("de", "da"):
        if kind in sub:
            out.append(f"<h4>{'Differential expression' if kind == 'de' else 'Differential abundance'}</h4>")
            out.append(_summary(_open(f"{url}/{kind}")))
    return "\n".join(out)


def _summary(ds) -> str:
    rows = []
    for k, v in ds.data_vars.items():
        x = np.asarray(v.values)
        row = [k, " x ".join(f"{d} {ds.sizes[d]}" for d in v.dims)]
        if x.dtype.kind == "f" and x.size:
            row += [np.nanmin(x), np.nanmedian(x), np.nanmax(x)]
            row.append(int(np.sum(x < 0.05)) if "p" in k.lower() else "")
        else:
            row += ["", "", "", ""]
        rows.append(row)
    return _table(["variable", "shape", "min", "median", "max", "# < 0.05 (p-values)"], rows)


def ursm_section(url: str, name: str) -> str:
    ds = _open(url)
    out = [f"<h3>URSM run <code>{html.escape(name)}</code></h3>"]
    if "W" in ds:
        W = np.asarray(ds["W"].transpose("bulk_sample", "celltype").values, float)
        out.append(_img(figures.proportions_bars(W, ds["bulk_sample"].values, ds["celltype"].values),
                        "URSM proportions"))
    if "A" in ds:
        A = np.asarray(ds["A"].transpose("gene", "celltype").values, float)
        out.append(_img(figures.profile_heatmap(A, ds["gene"].values, ds["celltype"].values), "URSM profiles"))
    return "\n".join(out)


SECTIONS = {"ctmm": ctmm_section, "ldvae": ldvae_section, "mrvi": mrvi_section, "ursm": ursm_section}


# ---------------------------------------------------------------- the page

CSS = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1100px;color:#222}
h1{font-size:1.5em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em}img{max-width:100%;margin:.5em 0}
table{border-collapse:collapse;margin:.5em 0;font-size:.85em}td,th{border:1px solid #ddd;padding:2px 8px}
th{background:#f3f3f3}.note{color:#777;font-style:italic}code{background:#f5f5f5;padding:0 3px}"""


def render(store: str) -> str:
    """The report of ``store`` as an HTML string."""
    from ..plan.storeinfo import _groups, store_info, store_status
    from ..store import open_study

    info = store_info(store)
    status = store_status(store)
    study = open_study(store, mode="r")
    obs = study.obs() if study.has("cells") else None
    parts = [f"<h1>scdist report: {html.escape(info['store'])}</h1>",
             f"<p>Generated {time.strftime('%Y-%m-%d %H:%M:%SZ', time.gmtime())}; schema "
             f"{info['schema_version']}, store created {html.escape(str(info.get('created')))}.</p>",
             "<h2>Study</h2>"]
    if "n_cells" in info:
        parts.append(_table(["cells", "genes", "donors", "batches", "cell types"],
                            [[f"{info['n_cells']:,}", f"{info['n_genes']:,}", info["n_donors"], info["n_batches"],
                              ", ".join(f"{k} ({v:,})" for k, v in info["celltypes"].items())]]))
    parts.append("<h2>Runs</h2>")
    rows = []
    for r in status["runs"]:
        for s in r.get("stages", []):
            rows.append([r["run_id"], r["status"], s["stage"], s.get("engine"), s.get("action") or "not reached",
                         "" if s.get("seconds") is None else f"{s['seconds']:.1f}s",
                         "" if s.get("chunks") is None else s["chunks"], s.get("error") or ""])
    parts.append(_table(["run", "status", "stage", "engine", "action", "time", "chunks", "error"], rows)
                 if rows else "<p class='note'>No run records.</p>")
    parts.append(_table(["group", "state", "chunks done / total"],
                        [[g["group"], f"done by {g['stage']}" if g["stage_done"] else "incomplete",
                          f"{g['chunks_done']}/{'?' if g['chunks_total'] is None else g['chunks_total']}"]
                         for g in status["groups"]]))
    results = [g for g in _groups(study) if g.startswith("results/")]
    parts.append("<h2>Results</h2>")
    if not results:
        parts.append("<p class='note'>No results yet (run a method stage).</p>")
    for g in results:
        _, method, run = g.split("/", 2)
        fn = SECTIONS.get(method)
        if fn is None:
            parts.append(f"<p class='note'>{html.escape(g)}: no report section for {html.escape(method)}.</p>")
            continue
        args = (study.group_url(g), run) + ((obs,) if method in ("ldvae", "mrvi") else ())
        parts.append(_guard(g, fn, *args))
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>scdist report</title>"
            f"<style>{CSS}</style></head><body>{''.join(parts)}</body></html>")


def write_report(store: str, out: str | os.PathLike | None = None) -> str:
    """Write the HTML report of ``store`` to ``out`` (default ``<store>.report.html`` beside
    the store) and return its path."""
    from ..store._fs import filesystem, is_url

    page = render(store)
    if out is None:
        out = (store.rstrip("/").rsplit("/", 1)[-1] if is_url(store) else store.rstrip("/")) + ".report.html"
    out = os.fspath(out)
    fs, path = filesystem(out)
    fs.pipe_file(path, page.encode())
    return out
