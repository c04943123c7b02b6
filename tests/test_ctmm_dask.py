"""CTMM on Dask: same numbers as in-process, results written to the study, reruns resume."""
from __future__ import annotations

import numpy as np
import pytest
import xarray as xr

import scdist.ctmm as ctmm

KW = dict(models=("hom", "free"), tests=("lrt", "wald"), covariates=["cov0"],
          random_effects=None)


def _sim():
    return ctmm.simulate_ctp(60, 24, 3, hom2=0.2, V=[0.0, 0.1, 0.3], n_covariates=1,
                             n_batches=3, missing_frac=0.05, seed=21)


def _study(path, sim, chunk=20):
    from scdist.store import create_study
    from scdist.store.markers import STAGE, mark_done

    study = create_study(path)
    pb = sim.drop_vars([v for v in sim.data_vars if v.startswith("true_")])
    pb.chunk({"gene": chunk}).to_zarr(study.group_url("pseudobulk"), mode="w", consolidated=False,
                                      zarr_format=3)
    mark_done(study.group_url("pseudobulk"), STAGE)
    return study


def _same(a: xr.Dataset, b: xr.Dataset):
    for v in ("hom2", "V", "beta", "gamma", "loglik", "pvalue", "op_hom2", "op_pvalue"):
        np.testing.assert_allclose(a[v].values, b[v].values, rtol=1e-7, atol=1e-9, err_msg=v)
    assert (a.converged.values == b.converged.values).all()


def test_in_memory_on_dask_equals_in_process(dask_client):
    sim = _sim()
    local = ctmm.fit(sim, **KW, gene_block=25)
    remote = ctmm.fit(sim, **KW, gene_block=25, client=dask_client)
    assert list(remote.gene.values) == list(sim.gene.values)
    _same(local, remote)


def test_study_fit_writes_results_and_rerun_skips_done_blocks(dask_client, tmp_store):
    from scdist.store.markers import done_set, clear_markers
    from scdist.store.results import open_result
    import zarr

    sim = _sim()
    study = _study(tmp_store, sim)
    local = ctmm.fit(sim, **KW, gene_block=20)
    res = ctmm.fit(study, **KW, client=dask_client, run="r1")
    _same(local, res)
    url = study.result_url("ctmm", "r1")
    assert done_set(url) >= {"genes_0_20", "genes_20_40", "genes_40_60", "__stage__"}
    stored = open_result(url)
    assert stored.attrs["method"] == "reml" and stored.sizes["gene"] == 60

    # block 0-20 is done (marker kept) but tampered with; block 20-40 lost its marker
    g = zarr.open_group(url, mode="r+")
    g["hom2"][0, 0] = 123.0
    g["hom2"][0, 25] = -7.0
    clear_markers(url, ["genes_20_40"])
    again = ctmm.fit(study, **KW, client=dask_client, run="r1")
    assert float(again.hom2[0, 0]) == 123.0                  # skipped: its marker says done
    assert float(again.hom2[0, 25]) == pytest.approx(float(local.hom2[0, 25]))  # recomputed
    assert "genes_20_40" in done_set(url)


def test_other_settings_need_overwrite(dask_client, tmp_store):
    from scdist.errors import InputError

    sim = _sim()
    study = _study(tmp_store, sim)
    ctmm.fit(study, models=("hom", "free"), tests=("lrt",), client=dask_client, run="r")
    with pytest.raises(InputError, match=r"\[run\]"):
        ctmm.fit(study, models=("hom", "free"), tests=("wald",), client=dask_client, run="r")
    res = ctmm.fit(study, models=("hom", "free"), tests=("wald",), client=dask_client, run="r",
                   overwrite=True)
    assert list(res.test.values) == ["free_vs_hom_wald"]


def test_cli_verb_runs_the_stage(dask_client, tmp_store):
    from typer.testing import CliRunner

    from scdist.cli import app
    from scdist.store.results import open_result

    sim = _sim()
    study = _study(tmp_store, sim)
    addr = dask_client.scheduler.address
    out = CliRunner().invoke(app, ["ctmm", tmp_store, "--models", "hom", "--models", "free",
                                   "--tests", "lrt", "--run", "cli", "--dask-address", addr])
    assert out.exit_code == 0, out.output
    res = open_result(study.result_url("ctmm", "cli")).load()
    local = ctmm.fit(sim, models=("hom", "free"), tests=("lrt",))
    np.testing.assert_allclose(res.pvalue.values, local.pvalue.values, rtol=1e-7)


def test_study_fit_with_imputation_scatters_blocks(dask_client, tmp_store):
    """missing='impute' on a study: imputed blocks reach the workers by scatter (not inside
    the task graph) and give the same numbers as the in-process imputed fit."""
    pytest.importorskip("scdist.ctmm.impute")
    sim = _sim()
    study = _study(tmp_store, sim)
    kw = dict(models=("hom", "free"), tests=("lrt",), missing="impute", op=False)
    local = ctmm.fit(sim, **kw)
    res = ctmm.fit(study, **kw, client=dask_client, run="imp")
    assert res.attrs["missing"] == "impute"
    for v in ("hom2", "V", "loglik", "pvalue"):
        np.testing.assert_allclose(local[v].values, res[v].values, rtol=1e-7, atol=1e-9, err_msg=v)


def test_block_task_reads_its_block_without_submitting_cluster_tasks(dask_client, tmp_store):
    """A block task loads its genes with the local synchronous scheduler: inside a worker,
    dask's default scheduler is the cluster, and a plain load() submitted the block's reads as
    new tasks, then seceded and waited behind other blocks (HE's scaling, see the README)."""
    from distributed import get_task_stream

    from scdist.ctmm.api import make_config
    from scdist.ctmm.distributed import _block_task

    sim = _sim()
    study = _study(tmp_store, sim)
    ctmm.fit(study, **KW, client=dask_client, run="bt")           # template + results
    cfg = make_config(sim, models=KW["models"], method="reml", tests=KW["tests"],
                      covariates=KW["covariates"], random_effects=None, op=None, n_restarts=10,
                      seed=0, jk_rule="regular")
    with get_task_stream(client=dask_client) as ts:
        fut = dask_client.submit(_block_task, (20, 40), store_url=study.url,
                                 result_url=study.result_url("ctmm", "bt"), cfg=cfg, pure=False)
        n_conv = fut.result(timeout=120)
    assert 0 < n_conv <= 2 * 20
    prefixes = {rec["key"][0] if isinstance(rec["key"], tuple) else rec["key"]
                for rec in ts.data}
    assert prefixes and all(str(k).startswith("_block_task") for k in prefixes), prefixes
