"""Bad input, tried systematically (issue 6, item 5).

One store is built once (ingest -> pseudobulk -> ctmm, all through ``scdist.run``). Each case
then tries one kind of bad input against it (or against a copy, for the cases that damage or
move the store) and checks three things:

1. it fails with the expected :class:`scdist.errors.ScdistError` subclass whose ``field``
   names what is wrong and whose message carries a ``Fix:``;
2. every file of the existing store except run records (``_scdist_runs/``, which log the
   failed attempt) and ``__started__`` markers (which record what was last attempted) is
   byte-for-byte what it was, and no group appeared;
3. the original spec still plans as fully done (nothing would be recomputed).

``python tests/test_bad_input.py`` prints the README table (docs/readme/resilience.md) from
the same cases, with the message each one really gives.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import pytest

import scdist
from scdist.errors import ClusterError, InputError, SchemaError, ScdistError, SpecError, StoreLockedError

pytestmark = pytest.mark.resilience

N_DONORS, N_CT, N_GENES, CELLS_PER = 12, 3, 24, 100


# ---------------------------------------------------------------- data and the base store

def _adata(*, x=None, donors=None, celltypes=None, genes=None, seed=0):
    import anndata as ad
    import scipy.sparse as sp

    n = N_DONORS * CELLS_PER
    rng = np.random.default_rng(seed)
    donors = np.repeat([f"D{i:02d}" for i in range(N_DONORS)], CELLS_PER) if donors is None else donors
    celltypes = np.tile([f"ct{c}" for c in range(N_CT)], n // N_CT) if celltypes is None else celltypes
    x = rng.poisson(3.0, (n, N_GENES)).astype(np.int32) if x is None else x
    genes = [f"G{j:03d}" for j in range(N_GENES)] if genes is None else genes
    obs = pd.DataFrame({"ind": pd.Categorical(donors), "ct": pd.Categorical(celltypes)},
                       index=[f"c{i}" for i in range(n)])
    return ad.AnnData(sp.csr_matrix(x), obs=obs, var=pd.DataFrame(index=list(genes)))


def _write(adata, path) -> str:
    adata.write_h5ad(path)
    return str(path)


@dataclass
class Base:
    dir: Path
    store: str
    spec: dict
    h5ad: str
    client: object

    def run(self, spec, **kw):
        return scdist.run(spec, client=kw.pop("client", self.client), rich=False, **kw)

    def ingest_spec(self, path, store=None, **kw):
        cfg = {"path": str(path), "donor_key": "ind", "celltype_key": "ct", "chunk_cells": 400, **kw}
        return {"store": store or self.store, "stages": {"ingest": cfg}}

    def stage_spec(self, stage, cfg, store=None, **top):
        return {"store": store or self.store, **top, "stages": {stage: cfg}}

    def copy(self, name) -> str:
        dst = self.dir / name
        shutil.rmtree(dst, ignore_errors=True)
        shutil.copytree(self.store, dst)
        return str(dst)


@pytest.fixture(scope="module")
def base(tmp_path_factory, dask_client):
    return build_base(tmp_path_factory.mktemp("bad_input"), dask_client)


def build_base(d: Path, dask_client) -> Base:
    h5 = _write(_adata(), d / "good.h5ad")
    store = str(d / "study.zarr")
    spec = {"store": store, "stages": {
        "ingest": {"path": h5, "donor_key": "ind", "celltype_key": "ct", "chunk_cells": 400},
        "pseudobulk": {"min_cells": 3, "gene_chunk": 8},
        "ctmm": {"tests": ["lrt", "wald"], "n_restarts": 0}}}
    b = Base(dir=d, store=store, spec=spec, h5ad=h5, client=dask_client)
    res = b.run(spec)
    assert res.ran == ["ingest", "pseudobulk", "ctmm"]
    shutil.copytree(store, d / "pristine.zarr")  # to restore after a case that damaged it
    return b


def fingerprint(store: str) -> dict[str, str]:
    """sha256 of every file of the store but run records and ``__started__`` markers."""
    out = {}
    for root, _, files in os.walk(store):
        for f in files:
            p = os.path.join(root, f)
            rel = os.path.relpath(p, store)
            if rel.startswith("_scdist_runs") or f == "__started__":
                continue
            out[rel] = hashlib.sha256(Path(p).read_bytes()).hexdigest()
    return out


# ---------------------------------------------------------------- mounts (root only)

@contextlib.contextmanager
def _mount(*args):
    target = args[-1]
    try:
        subprocess.run(["mount", *args], check=True, capture_output=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as exc:
        pytest.skip(f"cannot mount here ({exc}); needs root or CAP_SYS_ADMIN")
    try:
        yield
    finally:
        subprocess.run(["umount", "-l", target], capture_output=True, timeout=30)


@contextlib.contextmanager
def read_only_copy(base: Base):
    """The store (copied) under a read-only bind mount, parent folder included."""
    src = base.dir / "ro_src"
    shutil.rmtree(src, ignore_errors=True)
    src.mkdir()
    shutil.copytree(base.store, src / "study.zarr")
    ro = base.dir / "ro"
    ro.mkdir(exist_ok=True)
    with _mount("--bind", str(src), str(ro)):
        subprocess.run(["mount", "-o", "remount,bind,ro", str(ro)], check=True, timeout=30)
        yield str(ro / "study.zarr")


@contextlib.contextmanager
def full_disk_copy(base: Base):
    """The store (copied) on a small tmpfs filled up but for a few KiB."""
    mnt = base.dir / "tiny"
    mnt.mkdir(exist_ok=True)
    with _mount("-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)):
        store = mnt / "study.zarr"
        shutil.copytree(base.store, store)
        free = shutil.disk_usage(mnt).free
        with open(mnt / "filler", "wb") as f:
            with contextlib.suppress(OSError):
                f.write(b"\0" * max(0, free - 8192))
        yield str(store)


# ---------------------------------------------------------------- the cases

@dataclass
class Case:
    id: str
    what: str
    error: type
    field: str  # substring of the error's field
    action: Callable[[Base], None]
    # the store the case must leave intact (default: the base store)
    target: Callable[[Base], contextlib.AbstractContextManager] | None = None


def _counts(fn):
    def action(b: Base):
        x = np.random.default_rng(1).poisson(3.0, (N_DONORS * CELLS_PER, N_GENES)).astype(np.float64)
        fn(x)
        b.run(b.ingest_spec(_write(_adata(x=x), b.dir / "bad.h5ad")))
    return action


def _set(i, j, v):
    def f(x):
        x[i, j] = v
    return f


def _ingest_with(**adata_kw):
    def action(b: Base):
        b.run(b.ingest_spec(_write(_adata(**adata_kw), b.dir / "bad.h5ad")))
    return action


def _no_bulk_overlap(b: Base):
    bulk = pd.DataFrame(np.ones((5, 3), dtype=int), index=[f"ENSG{i:05d}" for i in range(5)],
                        columns=["s1", "s2", "s3"])
    bulk.to_csv(b.dir / "bulk.csv")
    b.run(b.ingest_spec(b.h5ad, bulk=str(b.dir / "bulk.csv")))


def _donor_without_cells(b: Base):
    # a donor listed (as a category) in obs but with no cells
    a = _adata()
    a.obs["ind"] = a.obs["ind"].cat.add_categories(["D99"])
    b.run(b.ingest_spec(_write(a, b.dir / "bad.h5ad")))


def _one_celltype(b: Base):
    from scdist.store import open_study

    cube = open_study(b.store, mode="r").pseudobulk().isel(celltype=[0]).load()
    scdist.ctmm.fit(cube, models=["hom", "free"], tests=["lrt"], n_restarts=0)


def _schema_version(b: Base):
    import zarr

    store = b.copy("old_schema.zarr")
    zarr.open_group(store, mode="r+").attrs["scdist_schema_version"] = 99
    b.run(b.stage_spec("ctmm", {"run": "x"}, store=store))


def _not_a_study(b: Base):
    import zarr

    other = str(b.dir / "plain.zarr")
    zarr.open_group(other, mode="w").attrs["hello"] = "world"
    b.run(b.stage_spec("pseudobulk", {}, store=other))


def _dask_unreachable(b: Base):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    b.run(b.stage_spec("ctmm", {"run": "x", "tests": ["lrt"]}, dask={"address": f"tcp://127.0.0.1:{port}"}),
          client=None)


def _ray_unreachable(b: Base):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    b.run(b.stage_spec("ursm", {"run": "x", "engine": "ray", "use_bulk": False},
                       ray={"address": f"127.0.0.1:{port}"}))


def _read_only(b: Base):
    with read_only_copy(b) as store:
        before = fingerprint(store)
        try:
            b.run(b.stage_spec("ctmm", {"run": "x", "tests": ["lrt"]}, store=store))
        finally:
            assert fingerprint(store) == before


def _ctmm_keeps(b: Base, store: str):
    """Run a ctmm stage on ``store``; whatever it raises, every file that was there is unchanged."""
    before = fingerprint(store)
    try:
        b.run(b.stage_spec("ctmm", {"run": "x", "tests": ["lrt"], "n_restarts": 0}, store=store))
    finally:
        after = fingerprint(store)
        assert {k: after.get(k) for k in before} == before


def _full_disk(b: Base):
    with full_disk_copy(b) as store:
        _ctmm_keeps(b, store)


def _corrupted_chunk(b: Base):
    store = b.copy("corrupt.zarr")
    chunk = Path(store) / "pseudobulk" / "mean" / "c" / "0" / "0" / "0"
    chunk.write_bytes(np.random.default_rng(0).bytes(chunk.stat().st_size))
    _ctmm_keeps(b, store)


def _locked(b: Base):
    from scdist.plan.lock import lock_url

    Path(lock_url(b.store)).write_text(json.dumps(
        {"run_id": "other-run", "host": socket.gethostname(), "pid": os.getpid(), "since": "now"}))
    try:
        b.run(b.stage_spec("ctmm", {"run": "x", "tests": ["lrt"]}))
    finally:
        os.remove(lock_url(b.store))


def _yaml_syntax(b: Base):
    p = b.dir / "broken.yaml"
    p.write_text(f"store: {b.store}\nstages:\n  ctmm: {{run: x\n")
    b.run(str(p))


CASES = [
    Case("obs-key-missing", "`donor_key` names no obs column", InputError, "obs['donor_id']",
         lambda b: b.run(b.ingest_spec(b.h5ad, donor_key="donor_id"))),
    Case("counts-non-integer", "normalised (non-integer) values in X", InputError, "X",
         _counts(_set(5, 3, 0.5))),
    Case("counts-negative", "a negative count", InputError, "X", _counts(_set(7, 2, -1.0))),
    Case("counts-nan", "NaN in X", InputError, "X", _counts(_set(9, 1, np.nan))),
    Case("counts-inf", "+Inf in X", InputError, "X", _counts(_set(11, 0, np.inf))),
    Case("donor-no-cells", "a donor category with no cells", InputError, "obs['ind']",
         _donor_without_cells),
    Case("single-donor", "all cells from one donor", InputError, "obs['ind']",
         _ingest_with(donors=np.repeat("D00", N_DONORS * CELLS_PER))),
    Case("one-celltype", "CTMM on a cube with one cell type", InputError, "celltype", _one_celltype),
    Case("duplicate-genes", "duplicate gene names", InputError, "var_names",
         _ingest_with(genes=[f"G{j:03d}" for j in range(N_GENES - 1)] + ["G000"])),
    Case("bulk-no-shared-genes", "bulk and cells share no gene", InputError, "bulk genes",
         _no_bulk_overlap),
    Case("missing-input-file", "ingest path does not exist", InputError, "stages.ingest.path",
         lambda b: b.run(b.ingest_spec(b.dir / "nope.h5ad"))),
    Case("spec-unknown-key", "unknown top-level spec key", SpecError, "stagez",
         lambda b: b.run({"store": b.store, "stagez": {}, "stages": {"ctmm": {}}})),
    Case("spec-unknown-stage-key", "unknown key in a stage config", SpecError, "stages.ctmm.modles",
         lambda b: b.run(b.stage_spec("ctmm", {"modles": ["hom"]}))),
    Case("spec-wrong-type", "wrong type for a spec value", SpecError, "dask.n_workers",
         lambda b: b.run({"store": b.store, "dask": {"n_workers": "two"}, "stages": {"ctmm": {}}})),
    Case("spec-unknown-stage", "unknown stage name", SpecError, "stages",
         lambda b: b.run(b.stage_spec("ctmmm", {}))),
    Case("spec-yaml-syntax", "spec file is not valid YAML", SpecError, "spec", _yaml_syntax),
    Case("spec-missing-requirement", "a stage whose input nobody produces", SpecError, "stages.ursm",
         lambda b: b.run(b.stage_spec("ursm", {"use_cells": False, "markers": {"ct0": ["G000"]}}))),
    Case("ctmm-unknown-covariate", "CTMM covariate the study does not have", InputError, "covariates",
         lambda b: b.run(b.stage_spec("ctmm", {"covariates": ["age"]}))),
    Case("ctmm-test-needs-model", "LRT asked without the Free model", InputError, "models",
         lambda b: b.run(b.stage_spec("ctmm", {"models": ["hom"], "tests": ["lrt"]}))),
    Case("store-schema-version", "store written by another schema version", SchemaError,
         "scdist_schema_version", _schema_version),
    Case("store-not-a-study", "a Zarr group that is not a study", SchemaError, "scdist_schema_version",
         _not_a_study),
    Case("store-locked", "another live run holds the store", StoreLockedError, "store", _locked),
    Case("dask-unreachable", "Dask scheduler address nobody listens on", ClusterError, "dask.address",
         _dask_unreachable),
    Case("ray-unreachable", "Ray head address nobody listens on", ClusterError, "ray.address",
         _ray_unreachable),
    Case("store-read-only", "store on a read-only volume", InputError, "store", _read_only),
    Case("disk-full", "disk fills up during a stage", InputError, "store", _full_disk),
    Case("corrupted-chunk", "a damaged chunk in pseudobulk/", SchemaError, "pseudobulk", _corrupted_chunk),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_fails_early_and_leaves_results_intact(base, case):
    from scdist.plan.graph import DONE

    before = fingerprint(base.store)
    try:
        with pytest.raises(ScdistError) as info:
            case.action(base)
        err = info.value
        assert isinstance(err, case.error), f"{type(err).__name__}: {err}"
        assert err.field and case.field in err.field, f"field {err.field!r}: {err}"
        assert err.fix and "Fix:" in str(err)
        assert fingerprint(base.store) == before
        assert [n.status for n in scdist.plan(base.spec)] == [DONE, DONE, DONE]
        assert not os.path.exists(base.store + ".lock")
    finally:
        if fingerprint(base.store) != before:  # keep the other cases meaningful
            shutil.rmtree(base.store)
            shutil.copytree(base.dir / "pristine.zarr", base.store)


def test_table_has_at_least_twenty_cases():
    assert len({c.id for c in CASES}) == len(CASES) >= 20


def test_cli_prints_field_and_fix_with_exit_status_2(base, tmp_path):
    """The CLI turns the same errors into one line and exit status 2 (no traceback)."""
    spec = tmp_path / "bad.yaml"
    spec.write_text(f"store: {base.store}\nstages:\n  ctmm: {{modles: [hom]}}\n")
    exe = Path(sys.executable).with_name("scdist")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "scdist.cli"]
    proc = subprocess.run(cmd + ["run", str(spec)], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "CI": "true"}, stdin=subprocess.DEVNULL)
    assert proc.returncode == 2, proc.stderr
    assert "[stages.ctmm.modles]" in proc.stderr and "Fix:" in proc.stderr
    assert "Traceback" not in proc.stderr


def _table() -> str:  # pragma: no cover - run by hand to refresh the README table
    from distributed import Client, LocalCluster
    import tempfile

    rows = ["| # | bad input | error | field | message (abridged) |", "|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as d, LocalCluster(n_workers=2, threads_per_worker=1,
                                                          dashboard_address=None) as lc, Client(lc) as c:
        b = build_base(Path(d), c)
        for i, case in enumerate(CASES, 1):
            try:
                case.action(b)
                msg, kind, field = "(no error!)", "-", "-"
            except pytest.skip.Exception as exc:
                msg, kind, field = f"skipped: {exc}", "-", "-"
            except ScdistError as exc:
                msg, kind, field = str(exc), type(exc).__name__, exc.field
            msg = " ".join(msg.replace("|", "\\|").replace(str(d), "…").split())
            if len(msg) > 260:
                msg = msg[:257] + "..."
            rows.append(f"| {i} | {case.what} | `{kind}` | `{field}` | {msg} |")
    return "\n".join(rows)


if __name__ == "__main__":  # pragma: no cover
    print(_table())
