"""Covariance models of CTMM: Hom, IID, Free and Full (Chen & Dahl, Eq 1-3).

Per donor i the cell type effects are ``alpha_i 1_C + Gamma_i`` with
``alpha_i ~ N(0, sigma_alpha^2)`` and ``Gamma_i ~ N(0, V)``, so the C x C covariance of a
donor's CTP vector is ``A = sigma_alpha^2 J_C + V`` (+ ``diag(nu_i)`` noise). Each model writes
``A`` as a linear combination ``A = sum_k theta_k k_k`` of fixed C x C basis matrices
``k_k``; that linearity is what the batched REML/ML/HE code exploits.

- ``hom``:  theta = (sigma_alpha^2,),                 V = 0
- ``iid``:  theta = (sigma_alpha^2, v),               V = v I_C
- ``free``: theta = (sigma_alpha^2, V_11, ..., V_CC),   V diagonal
- ``full``: theta = lower triangle of V (row-major),  sigma_alpha^2 = 0 (not identified)

For overall pseudobulk (OP, Eq 2) donor i's scalar variance is ``P_i' A P_i``, i.e. the same
parameters with per-donor basis values ``P_i' k_k P_i``.
"""
from __future__ import annotations

import numpy as np

from ..errors import InputError

MODELS = ("hom", "iid", "free", "full")


def check_models(models) -> tuple[str, ...]:
    """Validate and normalise a list of model names."""
    if isinstance(models, str):
        models = (models,)
    out = []
    for m in models:
        m = str(m).lower()
        if m not in MODELS:
            raise InputError(f"unknown CTMM model {m!r}", field="models",
                             fix=f"use some of {', '.join(MODELS)}")
        if m not in out:
            out.append(m)
    if not out:
        raise InputError("no model given", field="models", fix="e.g. models=('hom', 'free')")
    return tuple(out)


def basis(model: str, C: int) -> np.ndarray:
    """Basis matrices ``k_k`` (K, C, C) of the donor covariance ``A`` for ``model``."""
    J = np.ones((C, C))
    eye = np.eye(C)
    if model == "hom":
        return J[None]
    if model == "iid":
        return np.stack([J, eye])
    if model == "free":
        mats = [J]
        for c in range(C):
            e = np.zeros((C, C))
            e[c, c] = 1.0
            mats.append(e)
        return np.stack(mats)
    if model == "full":
        mats = []
        for c, d in zip(*np.tril_indices(C)):
            e = np.zeros((C, C))
            e[c, d] = e[d, c] = 1.0
            mats.append(e)
        return np.stack(mats)
    raise InputError(f"unknown CTMM model {model!r}", field="models", fix=f"use one of {MODELS}")


def n_params(model: str, C: int) -> int:
    """Number of variance parameters of ``model`` (without extra random effects)."""
    return {"hom": 1, "iid": 2, "free": C + 1, "full": C * (C + 1) // 2}[model]


def param_names(model: str, celltypes) -> list[str]:
    """Human-readable parameter names, e.g. ``hom2``, ``V[B]``, ``V[B,T]``."""
    cts = [str(c) for c in celltypes]
    if model == "hom":
        return ["hom2"]
    if model == "iid":
        return ["hom2", "v"]
    if model == "free":
        return ["hom2"] + [f"V[{c}]" for c in cts]
    C = len(cts)
    return [f"V[{cts[c]},{cts[d]}]" for c, d in zip(*np.tril_indices(C))]


def unpack(model: str, theta: np.ndarray, C: int) -> tuple[np.ndarray, np.ndarray]:
    """Map ``theta`` (..., K) to ``(hom2 (...,), V (..., C, C))``."""
    theta = np.asarray(theta, float)
    lead = theta.shape[:-1]
    V = np.zeros(lead + (C, C))
    if model == "hom":
        return theta[..., 0], V
    if model == "iid":
        V[..., np.arange(C), np.arange(C)] = theta[..., 1:2]
        return theta[..., 0], V
    if model == "free":
        V[..., np.arange(C), np.arange(C)] = theta[..., 1:C + 1]
        return theta[..., 0], V
    r, c = np.tril_indices(C)
    V[..., r, c] = theta
    V[..., c, r] = theta
    return np.zeros(lead), V


def initial(model: str, C: int, total: np.ndarray) -> np.ndarray:
    """Default starting values (R, K): the residual variance ``total`` split evenly."""
    K = n_params(model, C)
    total = np.asarray(total, float)
    if model == "full":
        th = np.zeros(total.shape + (K,))
        r, c = np.tril_indices(C)
        th[..., r == c] = (total / 2.0)[..., None]
        return th
    return np.repeat((total / (K + 1.0))[..., None], K, axis=-1)
