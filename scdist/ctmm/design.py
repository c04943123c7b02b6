"""Fixed-effect design and block layout of a CTMM fit.

The CTP vector of all donors (length N*C) has a block-diagonal covariance: one C x C block per
donor, or, with extra random effects for blocked factors such as experimental batch
(Supplementary Note of Chen & Dahl), one block per group of donors that share a level. Donors
are arranged into ``B`` blocks of ``n`` donor slots (padded), so every gene's data becomes
arrays ``(rows, B, m)`` with ``m = n * c`` (``c = C`` for CTP, ``1`` for OP). Missing donor x
cell type pairs and padding slots are switched off by a boolean mask; the likelihood code
treats masked entries as absent (no dense N*C x N*C matrix is ever formed).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from functools import cached_property

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from ..errors import InputError


@dataclass
class Problem:
    """Batched data of one fit: ``R`` rows (genes, or gene x left-out donor) sharing a design.

    y, nu, mask: (R, B, m) responses, noise variances (``nu_ic``), observed flags.
    X: (B, m, p) fixed-effect design (zero rows at padding).
    K: (K, Bk, m, m) covariance basis per block (Bk is 1 when shared by all blocks).
    n_vc: number of model variance parameters (the rest of K are extra random effects).
    """

    y: np.ndarray
    nu: np.ndarray
    mask: np.ndarray
    X: np.ndarray
    K: np.ndarray
    n_vc: int
    # Rows that share data (the jackknife's gene x left-out donor rows) without copies:
    # row r uses data row src[r] with block drop[r] left out (-1: none). Only for layouts with
    # one donor per block; dense() materialises the masked copies for the numpy code paths.
    src: np.ndarray | None = None
    drop: np.ndarray | None = None

    @property
    def rows(self) -> int:
        return self.y.shape[0] if self.src is None else len(self.src)

    def dense(self) -> "Problem":
        """The same problem with one data row per row (masked copies where rows share data)."""
        if self.src is None:
            return self
        mask = self.mask[self.src].copy()
        keep = self.drop >= 0
        mask[np.flatnonzero(keep), self.drop[keep]] = False
        return Problem(y=self.y[self.src], nu=self.nu[self.src], mask=mask, X=self.X, K=self.K,
                       n_vc=self.n_vc)

    @cached_property
    def all_observed(self) -> bool:
        """No masked entry in any row (lets the likelihood skip masking)."""
        return bool(self.mask.all()) and (self.drop is None or not (self.drop >= 0).any())

    @cached_property
    def identity_design(self) -> bool:
        """X is the identity in every block (CTP with cell type means only): W X = W."""
        B, m, p = self.X.shape
        return bool(p == m and np.array_equal(self.X, np.broadcast_to(np.eye(m), self.X.shape)))

    @cached_property
    def contiguous(self) -> tuple:
        """``(y, nu, mask, X, K, all observed)`` as C-contiguous float64 / bool arrays: the
        compiled kernels' input, made once per problem (no copy where already contiguous)."""
        return (np.ascontiguousarray(self.y, dtype=np.float64),
                np.ascontiguousarray(self.nu, dtype=np.float64),
                np.ascontiguousarray(self.mask, dtype=np.bool_),
                np.ascontiguousarray(self.X, dtype=np.float64),
                np.ascontiguousarray(self.K, dtype=np.float64),
                bool(self.mask.all()))

    @cached_property
    def free_basis(self) -> bool:
        """The basis is Free's on CTP (J, then e_c e_c', shared by all blocks): the compiled
        kernel's closed forms apply (see :func:`scdist.ctmm.blockkernel.is_free_basis`)."""
        from .blockkernel import is_free_basis

        return is_free_basis(self.K)

    @cached_property
    def rank_one(self):
        """Per-donor statistics of the closed-form kernel (:mod:`scdist.ctmm.rankone`) when the
        model is one rank-one variance component per donor block (Hom on CTP or OP, no extra
        random effects), every observed ``nu`` is positive and rows do not share data; else
        None (the general kernels run)."""
        from .rankone import RankOneStats, rank_one_vectors

        if self.src is not None or self.n_vc != 1 or self.K.shape[0] != 1:
            return None
        u = rank_one_vectors(self.K)
        if u is None:
            return None
        y, nu, mask, X, _, _ = self.contiguous
        if not (np.where(mask, nu, 1.0) > 0).all() or not np.isfinite(np.where(mask, y, 0.0)).all():
            return None
        return RankOneStats(y, nu, mask, X, u)

    @cached_property
    def scalar(self):
        """Tables of the scalar-variance kernel (:mod:`scdist.ctmm.scalar`) when every block
        is one donor's single observation (OP without extra random effects); else None."""
        from . import scalar

        if not scalar.SCALAR_FORM or self.X.shape[1] != 1 or self.K.shape[0] != self.n_vc:
            return None
        y, nu, mask, X, Kb, _ = self.contiguous
        return scalar.ScalarProblem(y, nu, mask, X, Kb)

    def take(self, idx) -> "Problem":
        """The same problem restricted to rows ``idx``."""
        if self.src is not None:
            return replace(self, src=self.src[idx], drop=self.drop[idx])
        return replace(self, y=self.y[idx], nu=self.nu[idx], mask=self.mask[idx])


@dataclass
class Layout:
    """How donors map to blocks and slots; shared by every gene of a study."""

    slots: np.ndarray        # (B, n) donor index per slot, -1 for padding
    c: int                   # entries per donor (C for CTP, 1 for OP)

    @property
    def n_blocks(self) -> int:
        return self.slots.shape[0]

    @property
    def m(self) -> int:
        return self.slots.shape[1] * self.c

    def donor_of_entry(self) -> np.ndarray:
        """(B, m) donor index of every entry (-1 for padding)."""
        return np.repeat(self.slots, self.c, axis=1)

    def to_blocks(self, a: np.ndarray, fill: float = 0.0) -> np.ndarray:
        """(R, N, c) per-donor data -> (R, B, m) block layout."""
        R = a.shape[0]
        B, n = self.slots.shape
        if n == 1 and B == a.shape[1] and (self.slots[:, 0] == np.arange(B)).all():
            return a.reshape(R, B, self.c).copy()       # one donor per block, in order
        out = np.full((R, B, n, self.c), fill, dtype=a.dtype)
        valid = self.slots >= 0
        out[:, valid] = a[:, self.slots[valid]]
        return out.reshape(R, B, n * self.c)


def make_layout(n_donors: int, c: int, factors: list[np.ndarray] | None) -> Layout:
    """Group donors into blocks: connected components of "shares a random-effect level"."""
    if not factors:
        return Layout(slots=np.arange(n_donors)[:, None], c=c)
    rows, cols = [], []
    for codes in factors:
        codes = np.asarray(codes)
        order = np.argsort(codes, kind="stable")
        sc = codes[order]
        same = sc[1:] == sc[:-1]
        rows.append(order[1:][same])
        cols.append(order[:-1][same])
    rows = np.concatenate(rows) if rows else np.zeros(0, int)
    cols = np.concatenate(cols) if cols else np.zeros(0, int)
    adj = coo_matrix((np.ones(len(rows)), (rows, cols)), shape=(n_donors, n_donors))
    n_comp, label = connected_components(adj, directed=False)
    sizes = np.bincount(label, minlength=n_comp)
    n = int(sizes.max())
    slots = -np.ones((n_comp, n), int)
    order = np.argsort(label, kind="stable")
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    pos = np.arange(n_donors) - np.repeat(starts, sizes)
    slots[label[order], pos] = order
    return Layout(slots=slots, c=c)


def fixed_design(layout: Layout, cov: np.ndarray | None, P: np.ndarray | None = None) -> np.ndarray:
    """Fixed-effect design (B, m, p) in block layout.

    CTP (``P is None``): row (i, c) = [e_c, z_i] -- cell type means ``beta_c`` plus donor
    covariate effects. OP: row i = [P_i, z_i] (Eq 2: ``sum_c P_ic beta_c``).
    """
    N = layout.slots.max() + 1 if layout.slots.size else 0
    N = max(N, cov.shape[0] if cov is not None else 0, P.shape[0] if P is not None else 0)
    c = layout.c
    if P is None:
        C = c
        base = np.broadcast_to(np.eye(C), (N, C, C))
    else:
        C = P.shape[1]
        base = P[:, None, :]
    parts = [base]
    if cov is not None and cov.shape[1]:
        parts.append(np.broadcast_to(cov[:, None, :], (N, c, cov.shape[1])))
    per_donor = np.concatenate(parts, axis=-1)  # (N, c, p)
    p = per_donor.shape[-1]
    B, n = layout.slots.shape
    X = np.zeros((B, n, c, p))
    valid = layout.slots >= 0
    X[valid] = per_donor[layout.slots[valid]]
    return X.reshape(B, n * c, p)


def covariance_basis(layout: Layout, k: np.ndarray, factors: list[np.ndarray] | None,
                     P: np.ndarray | None = None) -> np.ndarray:
    """Per-block basis (K, Bk, m, m): model matrices ``k`` on each donor's diagonal block,
    then one ``(Z Z') (x) J_c`` matrix per extra random effect.

    For OP the donor block is the scalar ``P_i' k P_i``.
    """
    B, n = layout.slots.shape
    c = layout.c
    m = n * c
    valid = layout.slots >= 0
    if P is None and not factors and n == 1:
        return k[:, None]                                  # shared by every donor block
    if P is None:
        kd = np.broadcast_to(k[:, None], (k.shape[0], max(1, len(valid.ravel())), c, c))
        per = np.zeros((k.shape[0], B, n, c, c))
        per[:, valid] = k[:, None]
    else:
        kd = np.einsum("ic,kcd,id->ki", P, k, P)           # (K, N)
        per = np.zeros((k.shape[0], B, n, 1, 1))
        per[:, valid, 0, 0] = kd[:, layout.slots[valid]]
    Kb = np.zeros((k.shape[0], B, n, c, n, c))
    idx = np.arange(n)
    Kb[:, :, idx, :, idx, :] = np.moveaxis(per, 2, 0)
    mats = [Kb.reshape(k.shape[0], B, m, m)]
    for codes in factors or []:
        codes = np.asarray(codes)
        lev = np.where(valid, codes[np.maximum(layout.slots, 0)], -1)   # (B, n)
        same = (lev[:, :, None] == lev[:, None, :]) & valid[:, :, None] & valid[:, None, :]
        Z = np.repeat(np.repeat(same.astype(float), c, axis=1), c, axis=2)
        mats.append(Z[None])
    return np.concatenate(mats, axis=0)


def encode_factor(values, field: str) -> np.ndarray:
    """Integer codes of a categorical donor-level factor (validates missing labels)."""
    vals = np.asarray(values).astype(object)
    bad = np.array([v is None or (isinstance(v, float) and np.isnan(v)) or str(v) == "" for v in vals])
    if bad.any():
        raise InputError(f"{int(bad.sum())} donors have no {field} label", field=field,
                         fix="fill the missing labels or drop those donors")
    _, codes = np.unique(vals.astype(str), return_inverse=True)
    return codes
