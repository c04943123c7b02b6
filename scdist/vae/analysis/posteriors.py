"""Per-sample sets of posterior components q(u | x_m), the building block of the aggregated
posteriors q_s (DA) and of the admissibility scores A_s (out-of-distribution filter).

Each sample s is represented by at most ``max_cells`` of its cells, drawn without replacement
with a seed: q_s(u) ~= (1/M_s) sum_{m in subsample(s)} q(u | x_m). Evaluating every cell
against every component then costs N x S x M (near-linear in N for fixed M), instead of the
N x N of using all cells as components.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ...errors import InputError
from .stream import map_chunks


@dataclass
class SampleComponents:
    """Padded S x M arrays: ``mean``, ``std`` (S x M x L), ``index`` (global cell index, -1 =
    padding), ``valid`` (S x M), ``n_cells`` (S, all cells of each sample), ``samples`` (codes)."""

    mean: torch.Tensor
    std: torch.Tensor
    index: torch.Tensor
    valid: torch.Tensor
    n_cells: np.ndarray
    samples: np.ndarray

    def as_params(self) -> dict:
        return {"comp_mean": self.mean, "comp_std": self.std, "comp_index": self.index, "comp_valid": self.valid}


@torch.no_grad()
def _posterior_kernel(model, batches, *, chunk, local):
    out = [(b["index"].numpy(), b["u_mean"].numpy(), b["u_std"].numpy()) for b in batches]
    return tuple(np.concatenate([o[i] for o in out]) for i in range(3))


def subsample_cells(sample_codes: np.ndarray, sample_set: np.ndarray, max_cells: int, seed: int
                    ) -> list[np.ndarray]:
    """Sorted global indices of at most ``max_cells`` cells of each sample in ``sample_set``."""
    rng = np.random.default_rng([seed, 17])
    order = np.argsort(sample_codes, kind="stable")
    bounds = np.searchsorted(sample_codes[order], np.arange(sample_codes.max() + 2))
    picks = []
    for s in sample_set:
        cells = order[bounds[s]:bounds[s + 1]]
        if cells.size > max_cells:
            cells = np.sort(rng.choice(cells, max_cells, replace=False))
        picks.append(cells)
    return picks


def sample_components(model, data=None, *, samples: np.ndarray | None = None, max_cells: int = 500,
                      seed: int = 0, client=None, batch_size: int = 1024) -> SampleComponents:
    """Encode the sub-sampled cells of each sample (codes ``samples``, all when None)."""
    if int(max_cells) < 2:
        raise InputError(f"max_cells={max_cells}", field="max_cells", fix="use at least 2 cells per sample")
    source, cats = model._resolve(data)
    codes = cats["sample"].codes
    sset = np.arange(cats["sample"].n) if samples is None else np.asarray(samples)
    picks = subsample_cells(codes, sset, int(max_cells), seed)
    chosen = np.concatenate(picks) if picks else np.zeros(0, np.int64)
    idx, qm, qs = [], [], []
    for _, (i, m, s) in map_chunks(model, data, _posterior_kernel, cells=chosen, client=client,
                                   batch_size=batch_size):
        idx.append(i), qm.append(m), qs.append(s)
    L = model.module.n_latent_u
    idx = np.concatenate(idx) if idx else np.zeros(0, np.int64)
    qm = np.concatenate(qm) if qm else np.zeros((0, L), np.float32)
    qs = np.concatenate(qs) if qs else np.ones((0, L), np.float32)
    order = np.argsort(idx)
    idx, qm, qs = idx[order], qm[order], qs[order]
    M = max(1, max((p.size for p in picks), default=1))
    S = len(sset)
    mean = np.zeros((S, M, L), np.float32)
    std = np.ones((S, M, L), np.float32)
    index = np.full((S, M), -1, np.int64)
    for k, p in enumerate(picks):
        r = np.searchsorted(idx, p)
        mean[k, :p.size], std[k, :p.size], index[k, :p.size] = qm[r], qs[r], p
    return SampleComponents(torch.from_numpy(mean), torch.from_numpy(std), torch.from_numpy(index),
                            torch.from_numpy(index >= 0), np.bincount(codes, minlength=cats["sample"].n)[sset],
                            sset)
