"""q(u | x_n, s_n) for a block of cells straight from its CSR counts, without densifying the
work that does not need it.

``MrVIModule.encode`` takes dense counts, applies log1p to every entry (most are zero) and
concatenates the sample one-hot to the G gene columns before the first linear layer (a copy
of the whole B x G block). Here log1p runs on the stored nonzeros only, and the first layer is
split: W [log1p x; onehot(s)] + b = W_x log1p(x) + W_s[:, s] + b, the one-hot part being a
column lookup. Same numbers as the module (tested); any encoder layout this file does not
recognise falls back to the module's own method.
"""
from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn as nn
import torch.nn.functional as F


def log1p_csr(X: sp.csr_matrix) -> sp.csr_matrix:
    """log1p of the stored entries as float32 (log1p(0) = 0 keeps the sparsity)."""
    Xl = sp.csr_matrix((np.log1p(X.data, dtype=np.float32), X.indices, X.indptr), shape=X.shape)
    return Xl


def _split_ok(module) -> bool:
    enc = getattr(module, "encoder", None)
    net = getattr(enc, "net", None)
    return (isinstance(net, nn.Sequential) and len(net) > 0 and isinstance(net[0], nn.Linear)
            and hasattr(enc, "mean") and hasattr(enc, "var") and hasattr(enc, "var_eps")
            and getattr(enc, "distribution", "normal") == "normal")


@torch.no_grad()
def encode_log_counts(module, xlog: torch.Tensor, sample: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) of q(u | x, s) for dense log1p counts ``xlog`` (B x G) and sample codes (B,)."""
    enc = module.encoder
    use_sample = bool(getattr(module, "encoder_sample", False)) and enc.n_cat > 0
    if not _split_ok(module):
        return enc(xlog, sample if use_sample else None)
    lin0 = enc.net[0]
    G = xlog.shape[1]
    h = F.linear(xlog, lin0.weight[:, :G], lin0.bias)
    if use_sample:
        h += lin0.weight[:, G:].T[sample]
    h = enc.net[1:](h)
    return enc.mean(h), torch.sqrt(torch.exp(enc.var(h)) + enc.var_eps)
