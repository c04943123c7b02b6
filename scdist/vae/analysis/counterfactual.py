"""Counterfactual states z_n^{s'} of a batch of cells for many samples, computed exactly but
without repeating per-cell or per-sample work (MrVI Eq. 2).

``MrVIModule.counterfactual_z`` broadcasts u_n against every sample and runs the whole
attention block on each (cell, sample) pair. In g^{u->z}(u, e_s) only the attention scores
and what follows depend on the pair: the query path (LayerNorm, projections) depends on the
cell alone and the key/value path on the sample alone, and the attention's output projection
is linear, so it folds into the first post-attention layer. Here each of those is computed
once per cell or once per sample and only the pair-specific part (scores, softmax, the folded
first layer and the two small layers after it) runs per pair -- the same numbers, several
times fewer operations. ``fast=False`` (or any module layout this file does not recognise)
falls back to the module's own method.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def _attention_ok(module) -> bool:
    att = getattr(module, "g_uz", None)
    if att is None or not hasattr(module, "sample_emb"):
        return False
    post = getattr(att, "post", None)
    mha = getattr(att, "attn", None)
    return (isinstance(mha, nn.MultiheadAttention) and mha.in_proj_weight is not None and mha.batch_first
            and isinstance(post, nn.Sequential) and len(post) == 5
            and all(isinstance(post[i], nn.Linear) for i in (0, 2, 4))
            and all(isinstance(post[i], nn.ReLU) for i in (1, 3))
            and (not module.training or mha.dropout == 0.0))


@torch.no_grad()
def counterfactual_states(module, u: torch.Tensor, samples: torch.Tensor, *, fast: bool = True) -> torch.Tensor:
    """z_n^{s'} for cells ``u`` (B x L, u_n) and sample codes ``samples`` (S,): B x S x L_z.

    Cells lead (B first) so per-cell S x S distance matrices and per-cell regressions follow
    without a transpose.
    """
    variant = getattr(module, "variant", "attention")
    if fast and variant == "linear":
        base = module.z_base(u)
        A, a = module.A_s[samples], module.a_s[samples]          # S x Lz x Lu, S x Lz
        return base[:, None, :] + torch.einsum("slk,bk->bsl", A, u) + a[None]
    if fast and variant == "attention" and _attention_ok(module):
        return _attention_states(module, u, samples)
    return module.counterfactual_z(u, samples).permute(1, 0, 2)


def _attention_states(module, u: torch.Tensor, samples: torch.Tensor) -> torch.Tensor:
    att = module.g_uz
    mha = att.attn
    B, S = u.shape[0], samples.shape[0]
    C, H, nh = att.n_channels, att.n_hidden, mha.num_heads
    hd = H // nh
    # per cell: normalised query and its projections
    qn = att.q_norm(u)                                           # B x Lu
    q = att.q_proj(qn).view(B, C, H)
    # per sample: keys / values from the sample embedding e_s
    kv = att.kv_proj(att.kv_norm(module.sample_emb(samples))).view(S, C, H)
    Wq, Wk, Wv = mha.in_proj_weight.chunk(3)
    bq, bk, bv = mha.in_proj_bias.chunk(3)
    Q = F.linear(q, Wq, bq).view(B, C, nh, hd) / math.sqrt(hd)
    K = F.linear(kv, Wk, bk).view(S, C, nh, hd)
    V = F.linear(kv, Wv, bv).view(S, C, nh, hd)
    # per pair: scores over the C key channels of each head
    # key channel j leads so that the softmax reductions over j are elementwise operations
    # between C contiguous slabs (a reduction over a trailing axis of length C = 4 is slow)
    scores = torch.einsum("bihd,sjhd->jbshi", Q, K).contiguous()    # C_j x B x S x nh x C_i
    attn = (scores - scores.amax(dim=0, keepdim=True)).exp_()
    attn = attn.div_(attn.sum(dim=0, keepdim=True))
    # out_proj (linear) folded into the first post layer: W1a (hid x C x H) . Wo (H x H)
    lin1 = att.post[0]
    hid = lin1.out_features
    W1a = lin1.weight[:, :C * H].view(hid, C, H)
    W1q = lin1.weight[:, C * H:]
    Wc = torch.einsum("xik,kh->xih", W1a, mha.out_proj.weight).view(hid, C, nh, hd)
    const = torch.einsum("xik,k->x", W1a, mha.out_proj.bias)
    VW = torch.einsum("sjhd,xihd->sjhix", V, Wc)                 # S x C_j x nh x C_i x hid (per sample)
    pre = torch.einsum("jbshi,sjhix->bsx", attn, VW)
    pre = pre + (F.linear(qn, W1q, lin1.bias) + const)[:, None, :]
    h = att.post[2](torch.relu(pre))
    g = att.post[4](torch.relu(h))                               # B x S x Lz
    return module.z_base(u)[:, None, :] + g
