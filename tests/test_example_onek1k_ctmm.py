"""examples/onek1k_ctmm.py on real OneK1K cells: ingest -> pseudobulk -> softImpute -> CTMM."""
from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest

from conftest import shared_file

REPO = Path(__file__).resolve().parents[1]


def _example():
    spec = importlib.util.spec_from_file_location("onek1k_ctmm",
                                                  REPO / "examples" / "onek1k_ctmm.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow
def test_onek1k_ctmm_example(tmp_path, dask_client):
    h5ad = shared_file("onek1k_scdesignpop", "onek1k_4celltypes_40donors.h5ad")
    out = _example().main(str(tmp_path / "study.zarr"), client=dask_client, data=h5ad)
    assert out["donors"] == 40 and out["genes_in_cube"] == 1000
    assert out["celltypes"] == ["bmem", "cd4nc", "monoc", "mononc"]
    assert out["covariates"] == ["sex", "age"]
    assert out["missing_donor_celltype_pairs"] > 0          # softImpute had work to do
    assert 20 <= out["genes_fitted"] < 1000                 # the expressed-everywhere filter
    assert out["genes_converged_free"] >= 0.9 * out["genes_fitted"]
    for key in ("frac_significant_free_vs_hom_jackknife_bonferroni",
                "frac_significant_free_vs_hom_lrt_bonferroni"):
        assert 0.0 <= out[key] <= 1.0
    # PBMC cell types differ in who varies: some genes must show cell type-specific variance
    assert out["frac_significant_free_vs_hom_lrt_bonferroni"] > 0.1
    # variances are fractions of the (unit) OP variance after standardisation
    assert 0 < out["median_specific_var_Vcc"] < 5 and math.isfinite(out["median_shared_var_hom2"])
