"""Count likelihoods, vectorised over (cells, genes): negative binomial, zero-inflated NB, Poisson.

Notation (scVI / LDVAE / MrVI): ``x`` counts, ``mu`` mean (= library * normalised expression
rho / h), ``theta`` inverse dispersion r (Var = mu + mu^2 / theta), ``pi_logits`` logit of the
zero-inflation (dropout) probability. All functions return elementwise log-probabilities.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

EPS = 1e-8


def log_nb(x: torch.Tensor, mu: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """log NB(x; mean mu, inverse dispersion theta), elementwise (dense)."""
    log_theta_mu = torch.log(theta + mu + EPS)
    return (theta * (torch.log(theta + EPS) - log_theta_mu)
            + x * (torch.log(mu + EPS) - log_theta_mu)
            + torch.lgamma(x + theta) - torch.lgamma(theta) - torch.lgamma(x + 1.0))


def log_nb_cells(batch: dict, log_mu: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """sum_g log NB(x_ng; mu_ng, theta_g) per cell (B,), using the batch's nonzero list.

    Terms that vanish at x = 0 (x log(mu / (theta + mu)), lgamma(x + theta) - lgamma(theta),
    log x!) are evaluated only at the nonzero counts (``nz_*`` and the per-cell ``log_xfact``
    the loader derives from the CSR block); only theta log(theta / (theta + mu)) needs the
    dense cells x genes grid. For per-gene theta, lgamma(x + theta) - lgamma(theta) =
    sum_{k<x} log(theta + k) is read from a genes x 16 table for the (usual) small counts, so
    lgamma / digamma -- which dominate a dense evaluation -- run only on the large counts.
    ``log_mu`` is log mu (B x G); ``theta`` is (G,) or (B, G). Equals ``log_nb(...).sum(-1)``.
    """
    rows, cols, flat, xv = batch["nz_rows"], batch["nz_cols"], batch["nz_flat"], batch["nz_vals"]
    mu = torch.exp(log_mu)
    log_theta_mu = torch.log(theta + mu + EPS)
    dense = (theta * (torch.log(theta + EPS) - log_theta_mu)).sum(-1)
    sparse = xv * (log_mu - log_theta_mu).reshape(-1).index_select(0, flat)
    if theta.dim() == 1:
        ns = int(batch["nz_nsmall"][0]) if "nz_nsmall" in batch else 0
        K = 16
        table = torch.cumsum(torch.log(theta.unsqueeze(1) + torch.arange(K, dtype=theta.dtype,
                                                                           device=theta.device)), dim=1)
        xs = xv[:ns].long()
        small = table.reshape(-1).index_select(0, cols[:ns] * K + (xs - 1))
        tb = theta.index_select(0, cols[ns:])
        big = torch.lgamma(xv[ns:] + tb) - torch.lgamma(tb)
        gam = torch.cat([small, big])
    else:
        tv = theta.reshape(-1).index_select(0, flat)
        gam = torch.lgamma(xv + tv) - torch.lgamma(tv)
    per_cell = torch.zeros_like(dense).index_add(0, rows, sparse + gam)
    return dense + per_cell - batch["log_xfact"]


def log_zinb(x: torch.Tensor, mu: torch.Tensor, theta: torch.Tensor, pi_logits: torch.Tensor) -> torch.Tensor:
    """log ZINB: with probability sigmoid(pi_logits) a structural zero, else NB(mu, theta)."""
    softplus_pi = F.softplus(-pi_logits)
    log_theta_eps = torch.log(theta + EPS)
    log_theta_mu = torch.log(theta + mu + EPS)
    pi_theta_log = -pi_logits + theta * (log_theta_eps - log_theta_mu)
    zero = F.softplus(pi_theta_log) - softplus_pi
    nonzero = (-softplus_pi + pi_theta_log + x * (torch.log(mu + EPS) - log_theta_mu)
               + torch.lgamma(x + theta) - torch.lgamma(theta) - torch.lgamma(x + 1.0))
    return torch.where(x < EPS, zero, nonzero)


def log_poisson(x: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
    """log Poisson(x; mu)."""
    return x * torch.log(mu + EPS) - mu - torch.lgamma(x + 1.0)


def log_count_likelihood(kind: str, x, mu, theta=None, pi_logits=None) -> torch.Tensor:
    """Dispatch on ``kind`` in {"nb", "zinb", "poisson"}."""
    if kind == "nb":
        return log_nb(x, mu, theta)
    if kind == "zinb":
        return log_zinb(x, mu, theta, pi_logits)
    if kind == "poisson":
        return log_poisson(x, mu)
    raise ValueError(f"unknown likelihood {kind!r}")
