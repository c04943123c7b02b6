"""The real-data URSM example (examples/ursm_real_deconvolution.py) runs and deconvolves."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

from conftest import shared_file

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "ursm_real_deconvolution.py"


def test_real_data_example_recovers_proportions():
    path = shared_file("onek1k_scdesignpop", "onek1k_4celltypes_40donors.h5ad")
    spec = importlib.util.spec_from_file_location("ursm_example", EXAMPLE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    r = mod.run(path, n_genes=120, cells_per_type=40, em_iters=6, burnin=10, samples=20)
    assert r["n_bulk"] == 20 and r["W"].shape == (20, 4)
    assert np.allclose(r["W"].sum(1), 1)
    # four types, proportions between ~0.05 and ~0.7: a uniform guess is off by ~0.15 on average
    assert r["ursm_reads_mae"] < 0.06, r["ursm_reads_mae"]
    assert r["ursm_cells_corr"] > 0.9, r["ursm_cells_corr"]
