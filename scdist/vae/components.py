"""Reusable torch blocks for the VAE models: MLP encoders, covariate attention, MoG prior.

Each block maps the paper's notation to its arguments in its docstring. Blocks take whole
minibatches (cells as the leading batch axis); counterfactual decoding adds a sample axis
in front (S x B x ...), which every block here broadcasts over.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def mlp(n_in: int, n_hidden: int, n_layers: int, *, dropout: float = 0.0, batch_norm: bool = False,
        layer_norm: bool = False, activation=nn.ReLU) -> nn.Sequential:
    """``n_layers`` x (Linear -> [BatchNorm|LayerNorm] -> activation -> [Dropout])."""
    layers: list[nn.Module] = []
    d = n_in
    for _ in range(n_layers):
        layers.append(nn.Linear(d, n_hidden))
        if batch_norm:
            layers.append(nn.BatchNorm1d(n_hidden, momentum=0.01, eps=1e-3))
        if layer_norm:
            layers.append(nn.LayerNorm(n_hidden, elementwise_affine=False))
        layers.append(activation())
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        d = n_hidden
    return nn.Sequential(*layers)


class GaussianEncoder(nn.Module):
    """q(z | x, [batch]) = Normal(m, diag(v)) from an MLP on log1p(x) (scVI's encoder f_phi).

    ``n_input``: genes G; ``n_cat``: number of batch categories concatenated one-hot to the
    input (0 for none); ``n_output``: latent dimension L. ``distribution="ln"`` gives the
    logistic-normal latent z = softmax(sample) used by LDVAE as an option.
    """

    def __init__(self, n_input: int, n_output: int, *, n_cat: int = 0, n_hidden: int = 128,
                 n_layers: int = 1, dropout: float = 0.1, batch_norm: bool = True,
                 layer_norm: bool = False, distribution: str = "normal", var_eps: float = 1e-4):
        super().__init__()
        self.n_cat = n_cat if n_cat > 1 else 0
        self.distribution = distribution
        self.var_eps = var_eps
        self.net = mlp(n_input + self.n_cat, n_hidden, n_layers, dropout=dropout,
                       batch_norm=batch_norm, layer_norm=layer_norm)
        self.mean = nn.Linear(n_hidden, n_output)
        self.var = nn.Linear(n_hidden, n_output)

    def forward(self, x: torch.Tensor, cat: torch.Tensor | None = None):
        """(q_mean, q_std) of the pre-transform Gaussian for log1p counts ``x`` (B x G) and
        category codes ``cat`` (B,; used when ``n_cat``).

        The first layer on [x; onehot(cat)] is applied split: W_x x + b + W_c[:, cat], the
        one-hot part a column lookup, so the B x (G + n_cat) concatenation is never built.
        """
        lin0 = self.net[0]
        G = x.shape[-1]
        h = F.linear(x, lin0.weight[:, :G], lin0.bias)
        if self.n_cat:
            h = h + lin0.weight[:, G:].T[cat]
        h = self.net[1:](h)
        return self.mean(h), torch.sqrt(torch.exp(self.var(h)) + self.var_eps)

    def transform(self, sample: torch.Tensor) -> torch.Tensor:
        return torch.softmax(sample, dim=-1) if self.distribution == "ln" else sample


class CovariateAttention(nn.Module):
    """g(q, c): multi-head attention of a cell's latent over its covariate's learned embedding.

    MrVI (Methods, Extended Data Fig. 9): the cell latent (u_n for g^{u->z}, z_n for g^{z->h})
    is the query; the learned embedding e_c of the cell's covariate (sample s_n, or nuisance
    b_n) gives keys and values. The attention output, concatenated with the query, goes through
    two fully connected ReLU layers and a linear map to ``n_out``. Inputs may carry leading
    axes (S x B x L for counterfactuals); ``emb`` must broadcast against ``query``.

    ``n_query``: query dim; ``n_emb``: embedding dim; ``n_heads``; ``n_hidden``: width of the
    head and of the post-attention MLP.
    """

    def __init__(self, n_query: int, n_emb: int, n_out: int, *, n_heads: int = 2, n_hidden: int = 32,
                 n_channels: int = 4, dropout: float = 0.0, detach_query: bool = False):
        super().__init__()
        self.detach_query = detach_query
        self.n_heads, self.n_hidden, self.n_channels = n_heads, n_hidden, n_channels
        self.q_norm = nn.LayerNorm(n_query)
        self.kv_norm = nn.LayerNorm(n_emb)
        # Each input vector is expanded into n_channels tokens so that attention has
        # several key/value positions to weigh (a single token makes softmax trivial).
        self.q_proj = nn.Linear(n_query, n_channels * n_hidden)
        self.kv_proj = nn.Linear(n_emb, n_channels * n_hidden)
        self.attn = nn.MultiheadAttention(n_hidden, n_heads, dropout=dropout, batch_first=True)
        self.post = nn.Sequential(
            nn.Linear(n_channels * n_hidden + n_query, n_hidden), nn.ReLU(),
            nn.Linear(n_hidden, n_hidden), nn.ReLU(),
            nn.Linear(n_hidden, n_out),
        )

    def forward(self, query: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        emb = emb.expand(*query.shape[:-1], emb.shape[-1])
        lead = query.shape[:-1]
        qn = self.q_norm(query)
        # detach_query: the attention weights do not send gradients back into the query (the
        # post-attention MLP still does)
        q = self.q_proj(qn.detach() if self.detach_query else qn).reshape(-1, self.n_channels, self.n_hidden)
        kv = self.kv_proj(self.kv_norm(emb)).reshape(-1, self.n_channels, self.n_hidden)
        a, _ = self.attn(q, kv, kv, need_weights=False)
        a = a.reshape(*lead, self.n_channels * self.n_hidden)
        return self.post(torch.cat([a, qn], dim=-1))


class MixtureOfGaussians(nn.Module):
    """Learnable MoG prior p(u) = sum_k pi_k N(u; mu_k, diag(sigma_k^2)) (MrVI Eq. for u_n).

    ``n_components`` K, ``n_latent`` L. With per-cell ``labels`` and ``label_epsilon`` > 0
    (weakly label-informed prior, K = number of labels): log pi'_{k,n} = log pi_k +
    epsilon * 1(y_n = k).
    """

    def __init__(self, n_components: int, n_latent: int, label_epsilon: float = 0.0):
        super().__init__()
        self.K, self.L = n_components, n_latent
        self.label_epsilon = label_epsilon
        self.means = nn.Parameter(torch.randn(n_components, n_latent))
        self.log_scales = nn.Parameter(torch.zeros(n_components, n_latent))
        self.logits = nn.Parameter(torch.zeros(n_components))

    def log_prob(self, u: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """log p(u) for u of shape (..., L); ``labels`` (...,) used when label_epsilon > 0."""
        scales = F.softplus(self.log_scales) + 1e-3
        d = (u.unsqueeze(-2) - self.means) / scales  # (..., K, L)
        comp = (-0.5 * d.pow(2) - torch.log(scales) - 0.5 * math.log(2 * math.pi)).sum(-1)
        logits = self.logits.expand(*u.shape[:-1], self.K)
        if self.label_epsilon > 0 and labels is not None:
            logits = logits + self.label_epsilon * F.one_hot(labels, self.K).to(u.dtype)
        return torch.logsumexp(comp + torch.log_softmax(logits, -1), dim=-1)


def normal_log_prob(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Elementwise log N(x; mean, std^2)."""
    return -0.5 * ((x - mean) / std).pow(2) - torch.log(std) - 0.5 * math.log(2 * math.pi)


def kl_normal_standard(mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, std^2) || N(0, 1)) summed over the last axis."""
    return 0.5 * (mean.pow(2) + std.pow(2) - 1.0 - 2.0 * torch.log(std)).sum(-1)


def kl_normal_normal(m1, s1, m2, s2) -> torch.Tensor:
    """KL(N(m1, s1^2) || N(m2, s2^2)) summed over the last axis."""
    return (torch.log(s2 / s1) + (s1.pow(2) + (m1 - m2).pow(2)) / (2 * s2.pow(2)) - 0.5).sum(-1)
