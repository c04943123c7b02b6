"""Figures of the report, each a function of one result Dataset returning PNG bytes.

Matplotlib with the Agg backend (no display needed); every function draws into its own
figure and closes it. Notation follows the papers: CTMM's ``hom2`` (sigma_alpha^2, shared
donor variance) and ``V`` (cell type-specific variance, its diagonal per cell type); LDVAE's
loadings ``W`` (gene x factor) and latent ``z``; MrVI's sample-sample distances; URSM's
profiles ``A`` (gene x cell type) and bulk proportions ``W`` (bulk sample x cell type).
"""
from __future__ import annotations

import io

import numpy as np


def _labels(values) -> np.ndarray:
    """Labels as plain Python strings (coordinates may be NumPy StringDType, which
    ``astype(str)`` cannot cast)."""
    return np.array([str(v) for v in np.asarray(values).ravel()], dtype=object)


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    _plt().close(fig)
    return buf.getvalue()


def variance_components(hom2: np.ndarray, v_diag: np.ndarray, celltypes) -> bytes:
    """Histograms of hom2 (genes) and of each cell type's V_cc (genes), Free model."""
    plt = _plt()
    k = 1 + v_diag.shape[1]
    fig, axes = plt.subplots(1, k, figsize=(2.6 * k, 2.4), squeeze=False)
    panels = [("hom2 (shared)", hom2)] + [(f"V[{c}]", v_diag[:, j]) for j, c in enumerate(celltypes)]
    for ax, (title, x) in zip(axes[0], panels):
        x = x[np.isfinite(x)]
        ax.hist(x, bins=30, color="#4c72b0")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("variance", fontsize=8)
    axes[0][0].set_ylabel("genes", fontsize=8)
    fig.suptitle("CTMM Free model: variance components across genes", fontsize=10)
    return _png(fig)


def qq_pvalues(pvalues: dict[str, np.ndarray]) -> bytes:
    """QQ plot (-log10 expected vs observed) of each test's p-values, with the y = x line."""
    plt = _plt()
    k = max(1, len(pvalues))
    fig, axes = plt.subplots(1, k, figsize=(2.8 * k, 2.8), squeeze=False)
    for ax, (name, p) in zip(axes[0], pvalues.items()):
        p = np.sort(p[np.isfinite(p)])
        if p.size:
            exp = -np.log10((np.arange(1, p.size + 1) - 0.5) / p.size)
            obs = -np.log10(np.clip(p, 1e-300, 1))
            ax.scatter(exp, obs, s=6, color="#dd8452")
            top = max(exp.max(), obs.max())
            ax.plot([0, top], [0, top], color="grey", lw=0.8)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("expected -log10 p", fontsize=8)
        ax.set_ylabel("observed -log10 p", fontsize=8)
    return _png(fig)


def loadings_bars(loadings: np.ndarray, genes, top: int = 8, max_factors: int = 6) -> bytes:
    """Top genes (largest |loading|) of each factor as horizontal bars."""
    plt = _plt()
    k = min(loadings.shape[1], max_factors)
    fig, axes = plt.subplots(1, k, figsize=(2.6 * k, 2.8), squeeze=False)
    genes = _labels(genes)
    for j, ax in enumerate(axes[0]):
        w = loadings[:, j]
        idx = np.argsort(-np.abs(np.nan_to_num(w)))[:top][::-1]
        ax.barh(range(len(idx)), w[idx], color=np.where(w[idx] > 0, "#55a868", "#c44e52"))
        ax.set_yticks(range(len(idx)), genes[idx], fontsize=7)
        ax.set_title(f"factor {j}", fontsize=9)
    fig.suptitle("LDVAE loadings: top genes per factor", fontsize=10)
    return _png(fig)


def latent_scatter(z: np.ndarray, labels=None, title: str = "latent") -> bytes:
    """First two latent dimensions of (a subsample of) cells, coloured by label."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(3.6, 3.2))
    if labels is None:
        ax.scatter(z[:, 0], z[:, 1] if z.shape[1] > 1 else np.zeros(len(z)), s=3, alpha=0.6)
    else:
        labels = _labels(labels)
        for lab in np.unique(labels)[:12]:
            m = labels == lab
            ax.scatter(z[m, 0], z[m, 1] if z.shape[1] > 1 else np.zeros(m.sum()), s=3, alpha=0.6, label=lab)
        ax.legend(fontsize=6, markerscale=3, frameon=False)
    ax.set_xlabel(f"{title} 1", fontsize=8)
    ax.set_ylabel(f"{title} 2", fontsize=8)
    return _png(fig)


def distance_heatmap(d: np.ndarray, samples, title: str) -> bytes:
    """Sample x sample distances ordered by Ward-linkage clustering, with its dendrogram."""
    from scipy.cluster.hierarchy import dendrogram, linkage
    from scipy.spatial.distance import squareform

    plt = _plt()
    d = np.nan_to_num(0.5 * (d + d.T))
    np.fill_diagonal(d, 0.0)
    fig, (ax_d, ax_h) = plt.subplots(1, 2, figsize=(6.4, 3.6), gridspec_kw={"width_ratios": [1, 3]})
    order = np.arange(len(d))
    if len(d) > 2:
        link = linkage(squareform(d, checks=False), method="ward")
        dn = dendrogram(link, orientation="left", no_labels=True, ax=ax_d, color_threshold=0)
        order = np.asarray(dn["leaves"])[::-1]
    ax_d.axis("off")
    im = ax_h.imshow(d[np.ix_(order, order)], cmap="viridis")
    labels = _labels(samples)[order]
    if len(labels) <= 40:
        ax_h.set_yticks(range(len(labels)), labels, fontsize=6)
        ax_h.set_xticks(range(len(labels)), labels, fontsize=6, rotation=90)
    fig.colorbar(im, ax=ax_h, fraction=0.046)
    ax_h.set_title(title, fontsize=9)
    return _png(fig)


def proportions_bars(W: np.ndarray, samples, celltypes) -> bytes:
    """Stacked bars of each bulk sample's mixing proportions W."""
    plt = _plt()
    n = W.shape[0]
    fig, ax = plt.subplots(figsize=(min(12, 1.5 + 0.25 * n), 3))
    bottom = np.zeros(n)
    for j, c in enumerate(celltypes):
        ax.bar(range(n), W[:, j], bottom=bottom, label=str(c))
        bottom += np.nan_to_num(W[:, j])
    if n <= 50:
        ax.set_xticks(range(n), _labels(samples), fontsize=6, rotation=90)
    ax.set_ylabel("proportion", fontsize=8)
    ax.legend(fontsize=7, frameon=False, bbox_to_anchor=(1.0, 1.0), loc="upper left")
    ax.set_title("URSM: bulk mixing proportions W", fontsize=10)
    return _png(fig)


def profile_heatmap(A: np.ndarray, genes, celltypes, top: int = 40) -> bytes:
    """URSM profiles A for the genes varying most across cell types."""
    plt = _plt()
    spread = np.nan_to_num(A.std(axis=1))
    idx = np.argsort(-spread)[:top]
    fig, ax = plt.subplots(figsize=(1.5 + 0.5 * A.shape[1], 0.5 + 0.16 * len(idx)))
    im = ax.imshow(A[idx], aspect="auto", cmap="magma")
    ax.set_yticks(range(len(idx)), _labels(genes)[idx], fontsize=6)
    ax.set_xticks(range(A.shape[1]), _labels(celltypes), fontsize=7, rotation=45)
    fig.colorbar(im, ax=ax, fraction=0.05)
    ax.set_title("URSM: profiles A (most variable genes)", fontsize=9)
    return _png(fig)
