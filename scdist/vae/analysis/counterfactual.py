"""Counterfactual states z_n^{s'} of a batch of cells for many samples, computed exactly but
without repeating per-cell or per-sample work (MrVI Eq. 2).

``MrVIModule.counterfactual_z`` broadcasts u_n against every sample and runs the whole
attention block on each (cell, sample) pair. In g^{u->z}(u, e_s) only the attention scores
and what follows depend on the pair: the query path (LayerNorm, projections) depends on the
cell alone and the key/value path on the sample alone, and the attention's output projection
is linear, so it folds into the first post-attention layer. Here each of those is computed
once per cell or once per sample and only the pair-specific part (scores, softmax, the folded
first layer and the two small layers after it) runs per pair -- the same numbers, several
times fewer operations. The per-pair part runs sample-major with the cells as the trailing
(long) axis, so each step is one batched matrix product per sample and no per-pair tensor is
permuted. ``fast=False`` (or any module layout this file does not recognise) falls back to the
module's own method.
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
    # Layout: the sample axis leads and the cell axis is last ("s ... b"), so every per-pair
    # step is one matrix product per sample with the cells as its long free dimension and no
    # per-pair tensor is ever permuted (copies of the B x S x 32 blocks cost more than the math).
    qn = att.q_norm(u)                                           # B x Lu, per cell
    Wq, Wk, Wv = mha.in_proj_weight.chunk(3)
    bq, bk, bv = mha.in_proj_bias.chunk(3)
    scale = 1.0 / math.sqrt(hd)
    # the query projection q_proj (Lu -> C x H) and the head projection Wq (H -> H) are both
    # linear: one product M qn^T gives the queries already laid out as (h d) x (i b)
    Wp = att.q_proj.weight.view(C, H, -1)                        # i x k x Lu
    M = torch.einsum("ek,ikl->eil", Wq, Wp).reshape(H * C, -1) * scale
    c = (torch.einsum("ek,ik->ei", Wq, att.q_proj.bias.view(C, H)) + bq[:, None]).reshape(H * C, 1) * scale
    Qt = torch.addmm(c, M, qn.T).view(H, C * B)                  # (h d) x (i b)
    # per sample: keys / values from the sample embedding e_s
    kv = att.kv_proj(att.kv_norm(module.sample_emb(samples))).view(S, C, H)
    K = F.linear(kv, Wk, bk).view(S, C, nh, hd)
    V = F.linear(kv, Wv, bv).view(S, C, nh, hd)
    # block-diagonal keys: row (s, h, j) holds K[s, j, h] in head h's columns, so one product
    # gives the scores of all heads at once: scores[s, h, j, i, b] = <Q[b, i, h], K[s, j, h]>
    Kbd = torch.zeros(S, nh, C, nh, hd, dtype=u.dtype)
    for h in range(nh):  # a handful of heads, on an S x C block
        Kbd[:, h, :, h, :] = K[:, :, h, :]
    scores = (Kbd.view(S * nh * C, H) @ Qt).view(S, nh, C, C, B)
    attn = torch.softmax(scores, dim=2)                          # over the key channels j
    # out_proj (linear) folded into the first post layer: W1a (hid x C x H) . Wo (H x H), then
    # with the values: VW[s, x, (h, j, i)] = sum_d W1a.Wo[x, i, h, d] V[s, j, h, d]
    lin1 = att.post[0]
    hid = lin1.out_features
    W1a = lin1.weight[:, :C * H].view(hid, C, H)
    Wc = torch.einsum("xik,kh->xih", W1a, mha.out_proj.weight).view(hid, C, nh, hd)
    VW = torch.einsum("sjhd,xihd->sxhji", V, Wc).reshape(S, hid, nh * C * C)
    cell = F.linear(qn, lin1.weight[:, C * H:], lin1.bias + torch.einsum("xik,k->x", W1a, mha.out_proj.bias))
    # (bias terms are added in place after each product: baddbmm would first copy a broadcast
    # bias into its output, a slow strided pass)
    pre = torch.bmm(VW, attn.view(S, nh * C * C, B)).add_(cell.T).relu_()   # S x hid x B
    lin2, lin3 = att.post[2], att.post[4]
    # batched products with the (small) weights expanded over samples: torch.matmul would fold
    # the sample axis into the rows and copy the transposed operand
    h = torch.bmm(lin2.weight.expand(S, -1, -1), pre).add_(lin2.bias[:, None]).relu_()
    # the last layer transposes for free inside the product: S x B x Lz, returned as a
    # B x S x Lz view (cells lead for the per-cell Gram products downstream)
    g = torch.bmm(h.transpose(1, 2), lin3.weight.T.expand(S, -1, -1)).add_(lin3.bias + module.z_base(u))
    return g.transpose(0, 1)
