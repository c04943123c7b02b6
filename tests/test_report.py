"""`scdist report STORE`: a self-contained HTML file with PNG figures for every result kind.

CTMM results come from a real (small) pipeline run; LDVAE, MrVI and URSM results are written
in their stores' layouts (dims and variable names as their stages write them) with known
content, so each section is exercised without training models here. The page is checked
for embedded, decodable PNGs, no external resources, the run metadata and the top genes, and
(when Debian's chromium is installed, see benchmarks/report_screenshot.sh) rendered headless
to a screenshot.
"""
from __future__ import annotations

import base64
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

import scdist
from scdist.report import write_report

CHROMIUM = "/usr/bin/chromium"


def _write(ds: xr.Dataset, url: str):
    for k in list(ds.coords):
        if ds[k].dtype.kind in "UO":
            ds = ds.assign_coords({k: ds[k].values.astype(object)})
    ds.to_zarr(url, mode="w", consolidated=False)


@pytest.fixture(scope="module")
def store(tmp_path_factory, dask_client):
    d = tmp_path_factory.mktemp("report")
    store = str(d / "study.zarr")
    scdist.run({"store": store, "stages": {
        "simulate": {"n_donors": 12, "n_celltypes": 3, "n_cells": 1500, "n_genes": 30, "chunk_cells": 500,
                     "seed": 1},
        "pseudobulk": {"min_cells": 3},
        "ctmm": {"tests": ["lrt", "wald"], "n_restarts": 0}}}, client=dask_client, rich=False)
    rng = np.random.default_rng(0)
    genes = [f"g{j}" for j in range(30)]
    cts = ["ct0", "ct1", "ct2"]
    loadings = rng.normal(size=(30, 4))
    loadings[7, 2] = 25.0  # the top gene of factor 2 must show up
    _write(xr.Dataset({"loadings": (("gene", "latent"), loadings),
                       "z": (("cell", "latent"), rng.normal(size=(1500, 4)))},
                      coords={"gene": genes, "latent": np.arange(4)}), f"{store}/results/ldvae/default")
    S = 6
    D = np.abs(rng.normal(size=(2, S, S)))
    _write(xr.Dataset({"u": (("cell", "latent_u"), rng.normal(size=(1500, 3)))}),
           f"{store}/results/mrvi/default")
    _write(xr.Dataset({"distance": (("group", "sample", "sample_b"), D + D.transpose(0, 2, 1))},
                      coords={"group": ["ct0", "ct1"], "sample": [f"s{i}" for i in range(S)],
                              "sample_b": [f"s{i}" for i in range(S)]}),
           f"{store}/results/mrvi/default/distances")
    _write(xr.Dataset({"pvalue": (("cell", "covariate"), rng.uniform(size=(1500, 2)))}),
           f"{store}/results/mrvi/default/de")
    W = rng.dirichlet(np.ones(3), size=5)
    _write(xr.Dataset({"W": (("bulk_sample", "celltype"), W), "A": (("gene", "celltype"), rng.gamma(2, size=(30, 3)))},
                      coords={"bulk_sample": [f"b{i}" for i in range(5)], "celltype": cts, "gene": genes}),
           f"{store}/results/ursm/default")
    return store


def _pngs(page: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)]


@pytest.mark.slow
def test_report_has_every_section_with_embedded_pngs(store, tmp_path):
    out = write_report(store, tmp_path / "report.html")
    page = Path(out).read_text()
    pngs = _pngs(page)
    # ctmm: variance components + QQ; ldvae: loadings + latent; mrvi: latent + 2 heatmaps; ursm: W + A
    assert len(pngs) >= 9
    assert all(p.startswith(b"\x89PNG\r\n\x1a\n") and len(p) > 1000 for p in pngs)
    assert not re.search(r'(src|href)="(https?:)?//', page)  # nothing fetched from elsewhere
    for heading in ("CTMM run", "LDVAE run", "MrVI run", "URSM run", "Runs", "Differential expression",
                    "Top genes: variance differentiation"):
        assert heading in page, heading
    assert "not shown" not in page  # no section failed
    # the run metadata: the pipeline's run id and its three stages
    from scdist.plan.runlog import list_runs

    run = list_runs(store)[-1]
    assert run["run_id"] in page and page.count(run["run_id"]) >= 3
    # top genes table of the variance test lists the gene with the smallest p-value first
    res = xr.open_zarr(f"{store}/results/ctmm/default", consolidated=False)
    p = res["pvalue"].sel(test="free_vs_hom_lrt").values
    best = str(res["gene"].values[int(np.nanargmin(p))])
    section = page.split("Top genes: variance differentiation")[1]
    assert re.search(r"<td>([^<]+)</td>", section).group(1) == best


@pytest.mark.slow
def test_report_cli_default_path(store):
    from test_quickstart import run_cli

    proc = run_cli(["report", store], cwd=Path(store).parent)
    assert Path(store + ".report.html").exists() and "report:" in proc.stdout


@pytest.mark.slow
@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="chromium not installed (benchmarks/report_screenshot.sh)")
def test_report_renders_in_headless_chromium(store, tmp_path):
    out = write_report(store, tmp_path / "report.html")
    shot = tmp_path / "shot.png"
    subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", f"--screenshot={shot}",
                    "--window-size=1200,3000", f"file://{out}"], capture_output=True, timeout=120)
    assert shot.exists() and shot.stat().st_size > 20_000
    # a rendered page with figures is not a blank screenshot
    import matplotlib.image as mpimg

    img = mpimg.imread(shot)
    assert img[..., :3].std() > 0.05
