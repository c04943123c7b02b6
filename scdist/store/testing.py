"""Synthetic AnnData files for tests and benchmarks, written block by block (bounded memory).

Not a simulator of biology (see :mod:`scdist.simulate` for that): just realistic *shapes*
— sparse integer counts, donors with constant donor-level covariates, cell types, batches —
to exercise ingest at sizes larger than memory.
"""
from __future__ import annotations

import os

import numpy as np
import pandas as pd


def write_synthetic_h5ad(path: str | os.PathLike, n_cells: int, n_genes: int, *,
                         n_donors: int = 20, n_celltypes: int = 4, density: float = 0.1,
                         block_cells: int = 10_000, seed: int = 0,
                         compression: str | None = None) -> dict:
    """Write an .h5ad with CSR int32 counts streamed in blocks of ``block_cells`` rows.

    obs columns: ``individual`` (donor), ``cell_type``, ``lane`` (batch), ``age`` and
    ``sex`` (donor-level). ``compression``: h5py filter for X (e.g. ``"gzip"``, as most
    published .h5ad files). Memory is bounded by one block. Returns ``{"nnz", "bytes_x"}``.
    """
    import h5py
    from anndata.io import write_elem

    rng = np.random.default_rng(seed)
    donor = np.sort(rng.integers(0, n_donors, n_cells))
    age = rng.integers(20, 80, n_donors)
    obs = pd.DataFrame({
        "individual": pd.Categorical.from_codes(donor, [f"D{i:04d}" for i in range(n_donors)]),
        "cell_type": pd.Categorical.from_codes(rng.integers(0, n_celltypes, n_cells),
                                               [f"ct{i}" for i in range(n_celltypes)]),
        "lane": pd.Categorical.from_codes(donor % 2, ["L0", "L1"]),
        "age": age[donor],
        "sex": pd.Categorical.from_codes(donor % 2, ["F", "M"]),
    }, index=pd.Index([f"c{i}" for i in range(n_cells)]))
    var = pd.DataFrame(index=pd.Index([f"G{j:05d}" for j in range(n_genes)]))
    nnz = 0
    with h5py.File(path, "w") as f:
        f.attrs["encoding-type"] = "anndata"
        f.attrs["encoding-version"] = "0.1.0"
        x = f.create_group("X")
        x.attrs["encoding-type"] = "csr_matrix"
        x.attrs["encoding-version"] = "0.1.0"
        x.attrs["shape"] = np.array([n_cells, n_genes])
        data = x.create_dataset("data", shape=(0,), maxshape=(None,), dtype="int32",
                                chunks=(1 << 18,), compression=compression)
        indices = x.create_dataset("indices", shape=(0,), maxshape=(None,), dtype="int32",
                                   chunks=(1 << 18,), compression=compression)
        indptr = x.create_dataset("indptr", shape=(n_cells + 1,), dtype="int64",
                                  compression=compression)
        indptr[0] = 0
        for a in range(0, n_cells, block_cells):
            b = min(a + block_cells, n_cells)
            mask = rng.random((b - a, n_genes), dtype=np.float32) < density
            rows, cols = np.nonzero(mask)
            vals = rng.geometric(0.3, rows.size).astype(np.int32)
            k = rows.size
            data.resize((nnz + k,))
            indices.resize((nnz + k,))
            data[nnz:] = vals
            indices[nnz:] = cols.astype(np.int32)
            indptr[a + 1:b + 1] = nnz + np.cumsum(np.bincount(rows, minlength=b - a))
            nnz += k
        write_elem(f, "obs", obs)
        write_elem(f, "var", var)
        for key in ("obsm", "varm", "obsp", "varp", "layers", "uns"):
            write_elem(f, key, {})
    return {"nnz": int(nnz), "bytes_x": int(nnz * 8 + (n_cells + 1) * 8)}
