"""Pseudobulk sufficient statistics over one chunk of cells (pure numpy / scipy).

Notation (CTMM, Chen & Dahl, Eqs 1-3). For donor ``i``, cell type ``c``, cell ``s`` and one
gene, ``y_ics`` is the normalised expression of cell ``s`` (argument ``x`` after
:func:`normalize`). The kernel accumulates, for every donor x cell type pair present in a
chunk and every gene, the sufficient statistics

* ``n``      = n_ic, the number of cells,
* ``mean``   = y_ic = (1/n_ic) sum_s y_ics (cell type-specific pseudobulk, CTP),
* ``m2``     = sum_s (y_ics - y_ic)^2 (so sigma2_ic = m2 / (n_ic - 1), unbiased),
* ``counts`` = sum_s of the raw integer counts (bulk-like counts),

and :func:`combine` merges two partials with Chan et al.'s parallel formula, so a tree
of merges over cell chunks gives the same result as one pass over all cells, whichever
way the chunks split donors. :func:`finalize` turns the merged statistics into the cube
(mean, var, nu, observed, P, OP y_i and nu_i).

Nothing here imports Dask or Ray; the engine adapter in :mod:`scdist.pseudobulk.compute`
only maps these functions over chunks.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from ..errors import InputError

NORMALIZATIONS = ("log1p_cp10k", "log1p", "none")
CP10K = 1e4


@dataclass
class Partial:
    """Sufficient statistics for the donor x cell type pairs present in some cells.

    ``groups`` holds sorted pair codes ``donor * n_celltypes + celltype`` (only pairs with
    at least one cell); row ``k`` of ``n``, ``mean``, ``m2`` and ``counts`` belongs to
    ``groups[k]``. Columns are genes. Keeping only present pairs makes a partial of a
    donor-sorted chunk small however many donors the study has.
    """

    groups: np.ndarray   # (k,) int64, sorted, unique
    n: np.ndarray        # (k,) int64
    mean: np.ndarray     # (k, G) float64
    m2: np.ndarray       # (k, G) float64
    counts: np.ndarray   # (k, G) int64

    @property
    def n_genes(self) -> int:
        return self.mean.shape[1]

    def gene_slice(self, start: int, stop: int) -> "Partial":
        """The same pairs restricted to genes ``start:stop`` (copies, so slices stand alone)."""
        return Partial(self.groups, self.n, self.mean[:, start:stop].copy(),
                       self.m2[:, start:stop].copy(), self.counts[:, start:stop].copy())


def _canonical(m) -> sp.csr_matrix:
    """CSR with sorted, duplicate-free entries (per-entry sums below rely on it)."""
    m = sp.csr_matrix(m)
    if not m.has_canonical_format:
        m = m.copy()
        m.sum_duplicates()
    return m


def _entry_rows(m: sp.csr_matrix) -> np.ndarray:
    """Row index of every stored entry of a CSR matrix."""
    return np.repeat(np.arange(m.shape[0]), np.diff(m.indptr))


def _normalized_data(counts: sp.csr_matrix, rows: np.ndarray, normalization: str) -> np.ndarray:
    """y_ics at the stored entries of ``counts`` (all normalisations map 0 to 0)."""
    if normalization not in NORMALIZATIONS:
        raise InputError(f"unknown normalization {normalization!r}", field="normalization",
                         fix=f"use one of {', '.join(NORMALIZATIONS)} or pass layer=")
    data = counts.data.astype(np.float64)
    if normalization == "log1p_cp10k":
        lib = np.bincount(rows, weights=data, minlength=counts.shape[0])
        scale = np.divide(CP10K, lib, out=np.zeros_like(lib), where=lib > 0)
        data *= scale[rows]
        np.log1p(data, out=data)
    elif normalization == "log1p":
        np.log1p(data, out=data)
    return data


def normalize(counts: sp.csr_matrix, normalization: str = "log1p_cp10k") -> sp.csr_matrix:
    """Normalised expression y_ics of a CSR count chunk (cells x genes), as float64 CSR.

    ``log1p_cp10k``: log(1 + 10^4 * count / library size), the library size being the sum
    of the cell's counts over all genes in ``counts`` (a cell with no counts stays all zero).
    ``log1p``: log(1 + count). ``none``: the counts themselves.
    All three map 0 to 0, so sparsity is kept.
    """
    m = _canonical(counts)
    data = _normalized_data(m, _entry_rows(m), normalization)
    return sp.csr_matrix((data, m.indices.copy(), m.indptr.copy()), shape=m.shape)


def _pair_sums(m: sp.csr_matrix, data: np.ndarray, rows: np.ndarray, local: np.ndarray,
               n: np.ndarray, k: int):
    """Per pair x gene: sum, mean and two-pass M2 of ``data`` stored at ``m``'s entries.

    ``key`` numbers each entry's (pair, gene) cell of the k x G output, so every sum is one
    ``np.bincount`` over the stored entries (no loop over cells or genes).
    """
    g = m.shape[1]
    key = local[rows] * g + m.indices
    s1 = np.bincount(key, weights=data, minlength=k * g)
    mean = s1 / np.repeat(n, g)
    dev2 = (data - mean[key]) ** 2
    nz_dev = np.bincount(key, weights=dev2, minlength=k * g)
    nnz = np.bincount(key, minlength=k * g)
    m2 = nz_dev + (np.repeat(n, g) - nnz) * mean ** 2
    return key, mean.reshape(k, g), m2.reshape(k, g)


def chunk_stats(counts: sp.spmatrix, donor: np.ndarray, celltype: np.ndarray, n_celltypes: int,
                *, normalization: str = "log1p_cp10k", values: sp.spmatrix | np.ndarray | None = None
                ) -> Partial:
    """Sufficient statistics of one chunk of cells.

    Parameters
    ----------
    counts : (cells x genes) integer counts, CSR (raw counts; summed into ``counts``).
    donor, celltype : integer codes of each cell's donor i and cell type c (0-based).
    n_celltypes : C, the number of cell types in the study (fixes the pair code).
    normalization : how y_ics is obtained from counts (see :func:`normalize`); ignored when
        ``values`` is given.
    values : optional user-provided normalised expression (same shape), e.g. a layer.

    Within the chunk the variance uses a two-pass scheme on the nonzeros: with the pair
    mean m, sum_s (y_s - m)^2 = sum_{nonzero} (y_s - m)^2 + (n - nnz) m^2, which never
    subtracts two large sums (no cancellation). Every sum is a weighted ``bincount`` over
    the stored entries keyed by (pair, gene): no loop over cells or genes.
    """
    counts = _canonical(counts)
    donor = np.asarray(donor, dtype=np.int64)
    celltype = np.asarray(celltype, dtype=np.int64)
    n_cells, n_genes = counts.shape
    if donor.shape != (n_cells,) or celltype.shape != (n_cells,):
        raise InputError(f"donor/celltype codes have shapes {donor.shape}/{celltype.shape}, "
                         f"expected ({n_cells},)", field="obs",
                         fix="pass one donor and one cell type code per cell of the chunk")
    code = donor * n_celltypes + celltype
    groups, local = np.unique(code, return_inverse=True)
    local = local.ravel()
    k = groups.shape[0]
    n = np.bincount(local, minlength=k).astype(np.int64)
    rows = _entry_rows(counts)
    if values is None:
        key, mean, m2 = _pair_sums(counts, _normalized_data(counts, rows, normalization),
                                   rows, local, n, k)
    else:
        y = values if sp.issparse(values) else sp.csr_matrix(np.asarray(values, np.float64))
        y = _canonical(y)
        if y.shape != counts.shape:
            raise InputError(f"layer has shape {y.shape}, counts {counts.shape}", field="layer",
                             fix="use a layer with the same cells and genes as X")
        _, mean, m2 = _pair_sums(y, y.data.astype(np.float64), _entry_rows(y), local, n, k)
        key = local[rows] * n_genes + counts.indices
    raw = np.bincount(key, weights=counts.data, minlength=k * n_genes)
    # float64 sums of integers are exact below 2**53 counts per pair and gene.
    raw = np.rint(raw).astype(np.int64).reshape(k, n_genes)
    return Partial(groups.astype(np.int64), n, mean, m2, raw)


def empty(n_genes: int) -> Partial:
    """A partial over no cells (the identity of :func:`combine`)."""
    z = np.zeros((0, n_genes))
    return Partial(np.zeros(0, np.int64), np.zeros(0, np.int64), z, z.copy(),
                   np.zeros((0, n_genes), np.int64))


def combine(a: Partial, b: Partial) -> Partial:
    """Merge two partials (cells of ``a`` and ``b`` disjoint) with Chan's parallel update.

    For a pair present in both: n = n_a + n_b, delta = mean_b - mean_a,
    mean = mean_a + delta n_b / n, M2 = M2_a + M2_b + delta^2 n_a n_b / n.
    Associative and commutative up to rounding, so any reduction tree gives the same cube.
    """
    if a.n_genes != b.n_genes:
        raise ValueError(f"partials over {a.n_genes} and {b.n_genes} genes cannot be combined")
    groups = np.union1d(a.groups, b.groups)
    k, g = groups.shape[0], a.n_genes
    ia = np.searchsorted(groups, a.groups)
    ib = np.searchsorted(groups, b.groups)
    na = np.zeros(k, np.int64)
    nb = np.zeros(k, np.int64)
    na[ia] = a.n
    nb[ib] = b.n
    n = na + nb
    mean_a = np.zeros((k, g))
    mean_b = np.zeros((k, g))
    mean_a[ia] = a.mean
    mean_b[ib] = b.mean
    m2 = np.zeros((k, g))
    m2[ia] += a.m2
    m2[ib] += b.m2
    counts = np.zeros((k, g), np.int64)
    counts[ia] += a.counts
    counts[ib] += b.counts
    # n > 0 for every pair in the union; weights are 0 for a side that lacks the pair.
    wb = (nb / n)[:, None]
    delta = mean_b - mean_a
    mean = mean_a + delta * wb
    m2 += delta ** 2 * (na * nb / n)[:, None]
    return Partial(groups, n, mean, m2, counts)


def combine_all(partials) -> Partial:
    """Merge any number of partials (an iterable; at least one)."""
    it = iter(partials)
    try:
        out = next(it)
    except StopIteration:
        raise ValueError("combine_all needs at least one partial") from None
    for p in it:
        out = combine(out, p)
    return out


@dataclass
class Cube:
    """Finalised pseudobulk arrays (dims: donor i, cell type c, gene g).

    ``mean``/``var``/``nu`` are NaN where ``observed`` is False (n_ic <= min_cells);
    ``counts`` holds every pair. ``op_mean``/``op_nu`` are CTMM's overall pseudobulk y_i and
    nu_i (Eq 2), computed from all cells of the donor (see :func:`finalize`).
    """

    n_cells: np.ndarray   # (D, C) int64
    observed: np.ndarray  # (D, C) bool
    P: np.ndarray         # (D, C) float64
    mean: np.ndarray      # (D, C, G)
    var: np.ndarray       # (D, C, G)
    nu: np.ndarray        # (D, C, G)
    counts: np.ndarray    # (D, C, G) int64
    op_mean: np.ndarray   # (D, G)
    op_nu: np.ndarray     # (D, G)


def finalize(partial: Partial, n_donors: int, n_celltypes: int, min_cells: int = 10) -> Cube:
    """Turn merged statistics into CTMM's pseudobulk quantities.

    Cell type-specific pseudobulk (CTP, Eq 3), for pairs with n_ic > ``min_cells`` (CTMM
    sets pairs with <= 10 cells to missing; ``observed`` is this mask):
        mean = y_ic,  var = sigma2_ic = M2_ic / (n_ic - 1),  nu = nu_ic = sigma2_ic / n_ic.
    Unobserved pairs get NaN in mean/var/nu; their cells are still counted in ``n_cells``,
    ``counts`` and ``P``.

    Overall pseudobulk (OP, Eq 2), from all cells of donor i, masked pairs included
    (y_i is defined over "all measured cells"):
        P_ic = n_ic / n_i,   y_i = sum_c P_ic y_ic = (1/n_i) sum_c sum_s y_ics,
        nu_i = sum_c n_ic sigma2_ic / n_i^2,
    where sigma2_ic is the same unbiased per-pair estimate for every pair with n_ic >= 2,
    and a pair with a single cell (sigma2 undefined) contributes 0 to nu_i. The masking
    threshold therefore affects only the CTP quantities. Donors with no cells get NaN.
    """
    n_genes = partial.n_genes
    dc = n_donors * n_celltypes
    if partial.groups.size and (partial.groups.min() < 0 or partial.groups.max() >= dc):
        raise ValueError("partial has pair codes outside donor x cell type range")
    n = np.zeros(dc, np.int64)
    n[partial.groups] = partial.n
    mean = np.full((dc, n_genes), np.nan)
    mean[partial.groups] = partial.mean
    m2 = np.full((dc, n_genes), np.nan)
    m2[partial.groups] = partial.m2
    counts = np.zeros((dc, n_genes), np.int64)
    counts[partial.groups] = partial.counts

    with np.errstate(invalid="ignore", divide="ignore"):
        sigma2 = m2 / (n - 1)[:, None]            # NaN/inf for n <= 1, masked below
    sigma2[n < 2] = np.nan
    sigma2 = np.maximum(sigma2, 0.0)              # rounding can leave -1e-17
    n = n.reshape(n_donors, n_celltypes)
    mean = mean.reshape(n_donors, n_celltypes, n_genes)
    sigma2 = sigma2.reshape(n_donors, n_celltypes, n_genes)
    counts = counts.reshape(n_donors, n_celltypes, n_genes)

    n_i = n.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        P = n / n_i[:, None]
        op_mean = np.einsum("dc,dcg->dg", P, np.nan_to_num(mean, nan=0.0))
        op_nu = np.einsum("dc,dcg->dg", n / (n_i ** 2)[:, None].astype(np.float64),
                          np.nan_to_num(sigma2, nan=0.0))
    empty_donor = n_i == 0
    P[empty_donor] = np.nan
    op_mean[empty_donor] = np.nan
    op_nu[empty_donor] = np.nan

    observed = n > min_cells
    ctp_mean = np.where(observed[..., None], mean, np.nan)
    var = np.where(observed[..., None], sigma2, np.nan)
    with np.errstate(invalid="ignore", divide="ignore"):
        nu = var / n[..., None]
    return Cube(n_cells=n, observed=observed, P=P, mean=ctp_mean, var=var, nu=nu,
                counts=counts, op_mean=op_mean, op_nu=op_nu)
