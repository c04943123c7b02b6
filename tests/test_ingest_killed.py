"""A SIGKILLed ingest leaves the existing cells intact; its leftovers are removable."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np

from scdist.store import ingest_h5ad, open_study
from scdist.store.testing import write_synthetic_h5ad

from test_store_cells import snapshot

KEYS = dict(donor_key="individual", celltype_key="cell_type", batch_key="lane",
            covariates=["age", "sex"])
CHILD = """
import sys
from scdist.store import ingest_h5ad
ingest_h5ad(sys.argv[1], sys.argv[2], donor_key="individual", celltype_key="cell_type",
            batch_key="lane", covariates=["age", "sex"], chunk_cells=500, overwrite=True)
"""


def test_killed_ingest_leaves_existing_cells_intact(tmp_path):
    small, big = tmp_path / "small.h5ad", tmp_path / "big.h5ad"
    write_synthetic_h5ad(small, 300, 200, n_donors=4, seed=1)
    write_synthetic_h5ad(big, 60_000, 2000, n_donors=10, density=0.1, seed=2)
    url = str(tmp_path / "s.zarr")
    st = ingest_h5ad(url, small, **KEYS)
    ref = st.read_counts(0, st.n_cells)
    before = snapshot(url)
    proc = subprocess.Popen([sys.executable, "-c", CHILD, url, str(big)])
    tmp = tmp_path / "s.zarr" / "_scdist_tmp"
    deadline = time.time() + 120
    while time.time() < deadline and not (tmp.exists() and any(tmp.rglob("X/data/c/*"))):
        assert proc.poll() is None, "the ingest finished before it could be killed"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    after = open_study(url)
    assert (after.n_cells, after.n_genes) == (300, 200)
    assert (after.read_counts(0, 300) != ref).nnz == 0
    left = {k: v for k, v in snapshot(url).items() if "_scdist_tmp" not in k}
    assert left == before  # only the temporary group was added
    removed = after.clean_tmp()
    assert len(removed) == 1 and removed[0].startswith("cells-")
    assert snapshot(url) == before
    assert np.array_equal(after.read_counts(0, 300).toarray(), ref.toarray())
