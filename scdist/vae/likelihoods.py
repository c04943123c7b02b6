"""Count likelihoods, vectorised over (cells, genes): negative binomial, zero-inflated NB, Poisson.

Notation (scVI / LDVAE / MrVI): ``x`` counts, ``mu`` mean (= library * normalised expression
rho / h), ``theta`` inverse dispersion r (Var = mu + mu^2 / theta), ``pi_logits`` logit of the
zero-inflation (dropout) probability. All functions return elementwise log-probabilities.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

EPS = 1e-8


def _gamma_terms(x: torch.Tensor, theta: torch.Tensor, with_constant: bool) -> torch.Tensor:
    """lgamma(x + theta) - lgamma(theta) [- lgamma(x + 1)], evaluated at the nonzero counts only.

    Every term is 0 where x = 0, and count matrices are mostly zeros, so the lgamma / digamma
    work (the bulk of a training step) shrinks by the density. ``theta`` broadcasts against x.
    """
    th = theta.expand_as(x)
    nz = x > 0
    xv, tv = x[nz], th[nz]
    vals = torch.lgamma(xv + tv) - torch.lgamma(tv)
    if with_constant:
        vals = vals - torch.lgamma(xv + 1.0)
    out = torch.zeros(x.shape, dtype=vals.dtype, device=x.device)
    return out.masked_scatter(nz, vals)


def log_nb(x: torch.Tensor, mu: torch.Tensor, theta: torch.Tensor, *, with_constant: bool = True) -> torch.Tensor:
    """log NB(x; mean mu, inverse dispersion theta).

    ``with_constant=False`` drops -log x! (no parameter in it): the training objective does
    not need it, reported log-likelihoods do.
    """
    log_theta_mu = torch.log(theta + mu + EPS)
    return (theta * (torch.log(theta + EPS) - log_theta_mu)
            + x * (torch.log(mu + EPS) - log_theta_mu)
            + _gamma_terms(x, theta, with_constant))


def log_zinb(x: torch.Tensor, mu: torch.Tensor, theta: torch.Tensor, pi_logits: torch.Tensor) -> torch.Tensor:
    """log ZINB: with probability sigmoid(pi_logits) a structural zero, else NB(mu, theta)."""
    softplus_pi = F.softplus(-pi_logits)
    log_theta_eps = torch.log(theta + EPS)
    log_theta_mu = torch.log(theta + mu + EPS)
    pi_theta_log = -pi_logits + theta * (log_theta_eps - log_theta_mu)
    zero = F.softplus(pi_theta_log) - softplus_pi
    nonzero = (-softplus_pi + pi_theta_log + x * (torch.log(mu + EPS) - log_theta_mu)
               + _gamma_terms(x, theta, True))
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
