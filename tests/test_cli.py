"""The `scdist` command: help, errors naming the field, ingest -> info/status, plan output."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from typer.testing import CliRunner

from scdist.cli import app

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def test_help_lists_verbs_and_explains_them():
    out = invoke("--help").output
    for verb in ("run", "plan", "simulate", "ingest", "info", "status"):
        assert verb in out
    methods = REPO / "scdist" / "cli_methods"
    for plugin in ("report", "submit"):  # plugin verbs exist exactly when their module does
        listed = re.search(rf"^\W*{plugin}\s", out, flags=re.M) is not None
        assert listed == (methods / f"{plugin}.py").exists()
    for verb in ("run", "plan", "simulate", "ingest", "info", "status"):
        sub = invoke(verb, "--help")
        assert sub.exit_code == 0 and "Usage" in sub.output


def test_simulate_verb_options_come_from_the_stage_config():
    out = invoke("simulate", "--help").output
    for flag in ("--n-donors", "--n-cells", "--n-genes", "--n-celltypes", "--seed", "--bulk-samples"):
        assert flag in out


def test_bad_spec_exits_2_naming_the_key(tmp_path):
    spec = tmp_path / "bad.yaml"
    spec.write_text("store: x.zarr\nstages:\n  pseudobulk: {min_cels: 3}\n")
    res = runner.invoke(app, ["plan", str(spec)])
    assert res.exit_code == 2
    assert "stages.pseudobulk.min_cels" in res.output and "min_cells" in res.output
    res = runner.invoke(app, ["run", str(tmp_path / "missing.yaml")])
    assert res.exit_code == 2 and "does not exist" in res.output


def test_plan_on_unmet_requirement_names_the_stage(tmp_path):
    spec = tmp_path / "p.yaml"
    spec.write_text(f"store: {tmp_path / 'empty.zarr'}\nstages:\n  pseudobulk: {{}}\n")
    res = runner.invoke(app, ["plan", str(spec)])
    assert res.exit_code == 2
    assert "[stages.pseudobulk]" in res.output and "'cells'" in res.output
    assert "simulate or ingest" in res.output


def test_plan_prints_the_graph_without_work(tmp_path):
    store = tmp_path / "q.zarr"
    res = invoke("plan", REPO / "examples" / "quickstart.yaml", "--store", store)
    assert res.exit_code == 0
    out = res.output
    assert "not created yet" in out
    assert "1. simulate" in out and "2. pseudobulk" in out
    assert "engine=dask" in out and "chunks=4" in out and "cells <- simulate" in out
    assert "embedded LocalCluster (2 workers x 1 threads)" in out
    assert not store.exists()
    js = invoke("plan", REPO / "examples" / "quickstart.yaml", "--store", store, "--json")
    import json

    data = json.loads(js.output)
    assert [s["stage"] for s in data["stages"]] == ["simulate", "pseudobulk", "ctmm", "ursm",
                                                    "ldvae", "mrvi"]
    assert {s["status"] for s in data["stages"]} == {"pending"}


@pytest.fixture
def h5ad(tmp_path):
    import anndata as ad

    rng = np.random.default_rng(3)
    n, g = 500, 30
    obs = pd.DataFrame({"indiv": rng.choice(["a", "b", "c", "d", "e"], n),
                        "ct": rng.choice(["T", "B", "NK"], n)}, index=[f"c{i}" for i in range(n)])
    obs["age"] = obs["indiv"].map({"a": 31.0, "b": 42.0, "c": 53.0, "d": 64.0, "e": 25.0})
    a = ad.AnnData(sp.csr_matrix(rng.poisson(1.5, (n, g)).astype(np.float32)), obs=obs,
                   var=pd.DataFrame(index=[f"g{i}" for i in range(g)]))
    path = tmp_path / "small.h5ad"
    a.write_h5ad(path)
    return path


def test_ingest_then_info_and_status(tmp_path, h5ad):
    store = tmp_path / "ing.zarr"
    args = ("ingest", store, "--path", h5ad, "--donor-key", "indiv", "--celltype-key", "ct",
            "--covariates", "age", "--chunk-cells", "200")
    res = invoke(*args)
    assert res.exit_code == 0, res.output
    assert "ingest done" in res.output
    assert "already done" in invoke(*args).output  # same options: no work

    info = invoke("info", store).output
    assert "cells: 500" in info and "genes: 30" in info and "donors: 5" in info
    assert "cell types (3)" in info and "donor covariates: age" in info
    assert "by ingest" in info and "results: none" in info

    status = invoke("status", store).output
    assert "runs (2)" in status and "ingest      ran" in status and "ingest      skipped" in status
    assert "cells" in status and "done by ingest" in status


def test_ingest_bad_key_fails_before_writing(tmp_path, h5ad):
    store = tmp_path / "bad.zarr"
    res = runner.invoke(app, ["ingest", str(store), "--path", str(h5ad), "--donor-key", "donor",
                              "--celltype-key", "ct"])
    assert res.exit_code == 2
    assert "donor" in res.output and "Fix:" in res.output
    assert not store.exists()


def test_info_on_a_non_store_names_the_problem(tmp_path):
    res = runner.invoke(app, ["info", str(tmp_path / "nothing.zarr")])
    assert res.exit_code == 2 and "[store]" in res.output


def test_import_is_cheap_and_planning_loads_no_torch_or_ray():
    code = ("import sys, scdist; assert callable(scdist.plan); "
            f"g = scdist.plan({str(REPO / 'examples' / 'quickstart.yaml')!r}, store='/nonexistent/q.zarr'); "
            "assert [n.name for n in g] == ['simulate', 'pseudobulk', 'ctmm', 'ursm', 'ldvae', 'mrvi']; "
            "bad = [m for m in ('torch', 'ray') if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_simulate_refuses_to_replace_real_cells(tmp_path, h5ad):
    store = tmp_path / "real.zarr"
    assert invoke("ingest", store, "--path", h5ad, "--donor-key", "indiv",
                  "--celltype-key", "ct").exit_code == 0
    before = invoke("info", store, "--json").output
    res = runner.invoke(app, ["simulate", str(store), "--n-donors", "4", "--n-cells", "100"])
    assert res.exit_code == 2 and "not simulated" in res.output and "[store]" in res.output
    assert invoke("info", store, "--json").output == before  # untouched


def test_unknown_design_knob_is_named(tmp_path):
    res = runner.invoke(app, ["simulate", str(tmp_path / "s.zarr"), "--set", "design={hom_range: [0.1, 0.2]}"])
    assert res.exit_code == 2
    assert "stages.simulate.design.hom_range" in res.output and "hom2_range" in res.output
    assert not (tmp_path / "s.zarr").exists()


def test_json_logs_for_log_collectors(tmp_path, h5ad):
    import json
    import os

    exe = Path(sys.executable).with_name("scdist")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "scdist.cli"]
    proc = subprocess.run(cmd + ["ingest", str(tmp_path / "j.zarr"), "--path", str(h5ad),
                                 "--donor-key", "indiv", "--celltype-key", "ct"],
                          env={**os.environ, "SCDIST_LOG_FORMAT": "json", "CI": "true"},
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    docs = [json.loads(line) for line in proc.stderr.splitlines() if line.startswith("{")]
    assert docs and all({"time", "level", "logger", "message"} <= set(d) for d in docs)
    assert any("stage ingest: done" in d["message"] for d in docs)
