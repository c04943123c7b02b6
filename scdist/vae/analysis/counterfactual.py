"""Counterfactual states z_n^{s'} of a batch of cells for many samples, computed exactly but
without repeating per-cell or per-sample work (MrVI Eq. 2).

``MrVIModule.counterfactual_z`` broadcasts u_n against every sample and runs the whole
attention block on each (cell, sample) pair. In g^{u->z}(u, e_s) only the attention scores
and what follows depend on the pair: the query path (LayerNorm, projections) depends on the
cell alone and the key/value path on the sample alone, and the attention's output projection
is linear, so it folds into the first post-attention layer. :class:`CounterfactualMap`
computes the weight- and sample-only terms once (per analysis chunk), each call the
per-cell terms once per cell, and only the pair-specific part (scores, softmax, the folded
first layer and the two small layers after it) per pair -- the same numbers, several times
fewer operations. The per-pair part runs sample-major, (sample, cell, feature): the scores
and softmax with the cells as the long trailing axis, the three post-attention layers as
row-major products whose bias adds are part of the product (the two after the first are
single big GEMMs over all pairs). ``fast=False`` (or any module layout this file does not
recognise) falls back to the module's own method.

Notation -> arguments: u (B x L, u_n, usually the posterior mean), ``samples`` (S codes s'),
states B x S x L_z (z_n^{s'}); :meth:`CounterfactualMap.centred_t` gives the states centred
over the sample axis, laid out B x L_z x S, the operand of the distance kernels;
:meth:`CounterfactualMap.own` gives z_n^{s_n} for one sample per row (the Monte Carlo
normalisation's draws).
"""
from __future__ import annotations

import math
import threading
import weakref

import torch
import torch.nn as nn
import torch.nn.functional as F

from .kernels import workspace


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


class CounterfactualMap:
    """u -> z_n^{s'} for one module and a fixed set of ``samples`` (codes, S,).

    Build it once per block of work (it precomputes what depends only on the weights and the
    samples) and call it per minibatch. The module must not change while it is used.
    """

    @torch.no_grad()
    def __init__(self, module, samples: torch.Tensor, *, fast: bool = True):
        self._module = weakref.ref(module)   # cached maps must not keep a model alive
        self.samples = samples
        self.ws = workspace()
        variant = getattr(module, "variant", "attention")
        self.kind = "module"
        if fast and variant == "linear":
            self.kind = "linear"
        elif fast and variant == "attention" and _attention_ok(module):
            self.kind = "attention"
            self._prepare_attention()

    @property
    def module(self):
        return self._module()

    # ------------------------------------------------------------------ public
    @torch.no_grad()
    def __call__(self, u: torch.Tensor) -> torch.Tensor:
        """z_n^{s'}: B x S x L_z (cells lead, a view of a sample-major tensor)."""
        m = self.module
        if self.kind == "linear":
            base = m.z_base(u)
            A, a = m.A_s[self.samples], m.a_s[self.samples]          # S x Lz x Lu, S x Lz
            return base[:, None, :] + torch.einsum("slk,bk->bsl", A, u) + a[None]
        if self.kind == "attention":
            S, B = self.samples.shape[0], u.shape[0]
            qn = self.module.g_uz.q_norm(u)
            h = self._hidden(qn, None, B)                             # (S B) x hid
            g = torch.addmm(self.b3, h, self.W3t).view(S, B, -1)
            return g.add_(m.z_base(u)).transpose(0, 1)
        return m.counterfactual_z(u, self.samples).permute(1, 0, 2)

    @torch.no_grad()
    def centred_t(self, u: torch.Tensor) -> torch.Tensor:
        """z_n^{s'} - mean_{s''} z_n^{s''}, laid out B x L_z x S (contiguous). On the attention
        path the result lives in this map's workspace: valid until the next call.

        Centring removes what does not depend on the sample (z_base(u), the last bias), so the
        attention path skips them; the float32 error of the distances computed from these
        states then scales with the sample effects, not with |z|.
        """
        if self.kind == "attention":
            S, B, ws = self.samples.shape[0], u.shape[0], self.ws
            h = self._hidden(self.module.g_uz.q_norm(u), None, B).view(S, B, self.hid)
            L = self.W3.shape[0]
            # the last layer per cell, W3 (L x hid) . h[:, b, :]^T (hid x S, read in place), lands
            # directly in the B x L x S layout; then centre over the contiguous sample axis
            zt = torch.bmm(self.W3.expand(B, L, self.hid), h.permute(1, 2, 0), out=ws.get("zt", B, L, S))
            return zt.sub_(torch.mean(zt, -1, keepdim=True, out=ws.get("mean", B, L, 1)))
        Z = self(u)
        return (Z - Z.mean(1, keepdim=True)).transpose(1, 2).contiguous()

    @torch.no_grad()
    def own(self, u: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """z for one sample per row: row r gets z^{samples[pos[r]]}(u_r). u: N x L, pos: (N,)
        positions on this map's sample axis. Returns N x L_z.

        The attention path groups the rows by sample (one sort) and runs the per-pair part on
        each sample's rows: one set of products per sample present, never per row.
        """
        m = self.module
        if self.kind == "attention":
            order = torch.argsort(pos, stable=True)
            present, counts = torch.unique_consecutive(pos[order], return_counts=True)
            us = u[order]
            qn = m.g_uz.q_norm(us)
            h = torch.empty(us.shape[0], self.hid, dtype=u.dtype)
            start = 0
            for s, n in zip(present.tolist(), counts.tolist()):   # samples present, not rows
                h[start:start + n] = self._hidden(qn[start:start + n], s, n)
                start += n
            z = torch.addmm(self.b3, h, self.W3t).add_(m.z_base(us))
            out = torch.empty_like(z)
            out[order] = z
            return out
        return m.z_from_u(u, self.samples[pos])

    # ------------------------------------------------------------------ attention
    def _prepare_attention(self):
        m = self.module
        att = m.g_uz
        mha = att.attn
        S = self.samples.shape[0]
        C, H, nh = att.n_channels, att.n_hidden, mha.num_heads
        hd = H // nh
        self.C, self.H, self.nh = C, H, nh
        Wq, Wk, Wv = mha.in_proj_weight.chunk(3)
        bq, bk, bv = mha.in_proj_bias.chunk(3)
        scale = 1.0 / math.sqrt(hd)
        # the query projection q_proj (Lu -> C x H) and the head projection Wq (H -> H) are both
        # linear: one product M qn^T gives the queries already laid out as (h d) x (i b)
        Wp = att.q_proj.weight.view(C, H, -1)                        # i x k x Lu
        self.M = (torch.einsum("ek,ikl->eil", Wq, Wp).reshape(H * C, -1) * scale).contiguous()
        self.c = ((torch.einsum("ek,ik->ei", Wq, att.q_proj.bias.view(C, H)) + bq[:, None])
                  .reshape(H * C, 1) * scale).contiguous()
        # per sample: keys / values from the sample embedding e_s
        kv = att.kv_proj(att.kv_norm(m.sample_emb(self.samples))).view(S, C, H)
        K = F.linear(kv, Wk, bk).view(S, C, nh, hd)
        V = F.linear(kv, Wv, bv).view(S, C, nh, hd)
        # block-diagonal keys: row (s, h, j) holds K[s, j, h] in head h's columns, so one product
        # gives the scores of all heads at once: scores[s, h, j, i, b] = <Q[b, i, h], K[s, j, h]>
        Kbd = torch.zeros(S, nh, C, nh, hd, dtype=kv.dtype)
        for h in range(nh):  # a handful of heads, on an S x C block
            Kbd[:, h, :, h, :] = K[:, :, h, :]
        self.Kbd = Kbd.view(S, nh * C, H)
        # out_proj (linear) folded into the first post layer: W1a (hid x C x H) . Wo (H x H), then
        # with the values: VWt[s, (h, j, i), x] = sum_d W1a.Wo[x, i, h, d] V[s, j, h, d]
        lin1, lin2, lin3 = att.post[0], att.post[2], att.post[4]
        self.hid = lin1.out_features
        W1a = lin1.weight[:, :C * H].view(self.hid, C, H)
        Wc = torch.einsum("xik,kh->xih", W1a, mha.out_proj.weight).view(self.hid, C, nh, hd)
        self.VWt = torch.einsum("sjhd,xihd->shjix", V, Wc).reshape(S, nh * C * C, self.hid).contiguous()
        self.W1q = lin1.weight[:, C * H:].T.contiguous()              # Lu x hid (the query's own columns)
        self.b1 = lin1.bias + torch.einsum("xik,k->x", W1a, mha.out_proj.bias)
        self.W2t, self.b2 = lin2.weight.T.contiguous(), lin2.bias
        self.W3, self.W3t, self.b3 = lin3.weight.contiguous(), lin3.weight.T.contiguous(), lin3.bias

    def _hidden(self, qn: torch.Tensor, spos: int | None, B: int) -> torch.Tensor:
        """Second post-attention layer's output for every (sample, cell) pair, sample-major:
        (S B) x hid for all of this map's samples (``spos`` None), B x hid for the one at
        position ``spos``. ``qn``: B x Lu normalised queries. Lives in the workspace."""
        C, H, nh, hid, ws = self.C, self.H, self.nh, self.hid, self.ws
        K = nh * C * C
        Kbd, VWt = (self.Kbd, self.VWt) if spos is None else (self.Kbd[spos:spos + 1], self.VWt[spos:spos + 1])
        S = Kbd.shape[0]
        Qt = torch.addmm(self.c, self.M, qn.T, out=ws.get("Qt", H * C, B)).view(H, C * B)   # (h d) x (i b)
        scores = torch.mm(Kbd.reshape(S * nh * C, H), Qt, out=ws.get("scores", S * nh * C, C * B))
        # softmax over the key channels j of scores[s, h, j, i, b]; the out= form of the same
        # kernel as torch.softmax (no fresh S x K x B tensor per call)
        attn = torch.ops.aten._softmax.out(scores.view(S, nh, C, C, B), 2, False,
                                           out=ws.get("attn", S, nh, C, C, B)).view(S, K, B)
        # first post layer, pair part: (B x K) . (K x hid) per sample, the attention weights read
        # transposed in place; then the cell part (B x hid, one row per cell) broadcast over samples
        pre = torch.bmm(attn.transpose(1, 2), VWt, out=ws.get("pre", S, B, hid))
        pre.add_(torch.addmm(self.b1, qn, self.W1q, out=ws.get("cell", B, hid))).relu_()
        return torch.addmm(self.b2, pre.view(S * B, hid), self.W2t, out=ws.get("h", S * B, hid)).relu_()


_MAPS = threading.local()
_MAX_CACHED = 4


def counterfactual_map(module, samples: torch.Tensor, *, fast: bool = True) -> CounterfactualMap:
    """A :class:`CounterfactualMap`, reused while this thread asks for the same module, samples
    and parameter values (every chunk of an analysis: the preparation is ~3 ms, a chunk's
    work ~20 ms). Any in-place change of a parameter (an optimiser step) bumps its version
    and builds a fresh map. The last few maps are kept; they reference their module weakly.
    """
    key = (tuple(samples.tolist()), bool(fast), bool(module.training),
           tuple(p._version for p in module.parameters()))
    cache = getattr(_MAPS, "maps", None)
    if cache is None:
        cache = _MAPS.maps = []
    for i, (ref, k, cmap) in enumerate(cache):
        if ref() is module and k == key:
            cache.append(cache.pop(i))                          # most recently used last
            return cmap
    cmap = CounterfactualMap(module, samples, fast=fast)
    cache.append((weakref.ref(module), key, cmap))
    del cache[:-_MAX_CACHED]
    return cmap


@torch.no_grad()
def counterfactual_states(module, u: torch.Tensor, samples: torch.Tensor, *, fast: bool = True) -> torch.Tensor:
    """z_n^{s'} for cells ``u`` (B x L, u_n) and sample codes ``samples`` (S,): B x S x L_z.

    Cells lead (B first) so per-cell S x S distance matrices and per-cell regressions follow
    without a transpose. For many minibatches build one :class:`CounterfactualMap` instead.
    """
    return CounterfactualMap(module, samples, fast=fast)(u)
