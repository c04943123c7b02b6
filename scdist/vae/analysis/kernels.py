"""Batched kernels of the MrVI analyses: pure torch / numpy functions of one block of cells
(cells are the leading batch axis), no model, no engine. Each is tested on plain arrays.

Notation: B cells in the block, S samples, L latent dimensions, K mixture components,
P regression columns, G genes.
"""
from __future__ import annotations

import math
import threading

import numpy as np
import torch
from scipy import stats


# ----------------------------------------------------------------------------- scratch memory
class Workspace:
    """Named scratch tensors reused across calls (grown when a call needs more).

    The per-pair intermediates of one minibatch are ~20 MB at S = 32; allocated afresh per
    call (or per chunk), glibc's allocator returns them to the OS between calls and every
    call pays page faults on fresh memory again (measured: ~1,900 faults per 625-cell
    minibatch, about half the counterfactual attention's time). A buffer handed out by
    :meth:`get` is valid until the next ``get`` of the same name in the same thread.
    """

    def __init__(self):
        self._bufs: dict[str, torch.Tensor] = {}

    def get(self, name: str, *shape: int, dtype=torch.float32) -> torch.Tensor:
        n = math.prod(shape)
        buf = self._bufs.get(name)
        if buf is None or buf.numel() < n or buf.dtype != dtype:
            buf = self._bufs[name] = torch.empty(n, dtype=dtype)
        return buf[:n].view(shape)

    def clear(self) -> None:
        self._bufs.clear()


_LOCAL = threading.local()


def workspace() -> Workspace:
    """This thread's :class:`Workspace` (kept for the thread's life: its size is that of the
    largest minibatch's intermediates, tens of MB)."""
    ws = getattr(_LOCAL, "ws", None)
    if ws is None:
        ws = _LOCAL.ws = Workspace()
    return ws


# ----------------------------------------------------------------------------- distances
def centre_t(Z: torch.Tensor) -> torch.Tensor:
    """Counterfactuals Z (B x S x L) centred on their mean over samples, laid out B x L x S
    (the operand of :func:`distances_from_centred`)."""
    return (Z - Z.mean(dim=1, keepdim=True)).transpose(1, 2).contiguous()


def distances_from_centred(Zt: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """D(n)_{s,s'} = ||z_n^s - z_n^{s'}||_2 from states centred per cell, laid out B x L x S: B x S x S.

    Gram form ||a||^2 + ||b||^2 - 2 a.b: one batched product Zt^T Zt (the L x S layout is the
    one the BLAS's small batched products run fastest on, measured ~3x the S x L one), whose
    diagonal holds the squared norms; the rest happens in place on the Gram matrices. Centred
    states keep the float32 cancellation error proportional to the sample effects, not to |z|
    (distances in null cell types are small). ``out``: a B x S x S tensor to write into.
    """
    D = torch.bmm(Zt.transpose(1, 2), Zt, out=out)
    sq = D.diagonal(dim1=1, dim2=2).clone()
    D.mul_(-2.0).add_(sq[:, :, None]).add_(sq[:, None, :]).clamp_min_(0.0).sqrt_()
    D.diagonal(dim1=1, dim2=2).zero_()
    return D


def pairwise_distances(Z: torch.Tensor) -> torch.Tensor:
    """D(n)_{s,s'} = ||z_n^s - z_n^{s'}||_2 for counterfactuals Z (B x S x L): B x S x S.

    Each cell's states are centred on their mean over samples first (:func:`centre_t`), then
    :func:`distances_from_centred`.
    """
    return distances_from_centred(centre_t(Z))


def distance_block(n_samples: int) -> int:
    """Cells per block of :func:`group_distance_sums`: a block's S x S matrices stay near the
    core's L2 cache (measured: 128 cells at S = 32, ~26 at S = 200)."""
    return int(min(128, max(16, 2**20 // max(1, n_samples * n_samples))))


def group_distance_sums(Z: torch.Tensor, codes: torch.Tensor, n_groups: int, mu: torch.Tensor | None = None,
                        sigma: torch.Tensor | None = None, *, centred_t: bool = False) -> torch.Tensor:
    """Sum over the cells of each group of D(n) (optionally z-scored, (D(n) - mu_n) / sigma_n):
    n_groups x S x S (float64). Z: B x S x L counterfactuals, or with ``centred_t`` the states
    already centred per cell and laid out B x L x S (:meth:`CounterfactualMap.centred_t`);
    codes (B,) in [0, n_groups), -1 = none.

    Blocks of cells keep the B x S x S distances small; each block is reduced by one product
    with the one-hot group matrix.
    """
    Zt = Z if centred_t else centre_t(Z)
    B, S = Zt.shape[0], Zt.shape[2]
    out = torch.zeros((n_groups, S * S), dtype=torch.float64)
    onehot = (codes[None, :] == torch.arange(n_groups)[:, None]).to(Zt.dtype)   # n_groups x B
    blk = distance_block(S)
    buf = workspace().get("distance_block", min(blk, B), S, S, dtype=Zt.dtype)
    for a in range(0, B, blk):  # blocks of cells, each a batched product
        D = distances_from_centred(Zt[a:a + blk], out=buf[:min(blk, B - a)])
        if mu is not None:
            D.sub_(mu[a:a + blk, None, None]).div_(sigma[a:a + blk, None, None])
        out += (onehot[:, a:a + blk] @ D.view(D.shape[0], S * S)).double()
    return out.view(n_groups, S, S)


def same_sample_distance_stats(z_own_draws: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Monte Carlo mean and s.d. (per cell) of ||z_n^{s_n}(u^1) - z_n^{s_n}(u^2)||, u^1, u^2 ~ q(u | x_n).

    ``z_own_draws``: 2M x B x L counterfactual states at the cell's own sample from 2M
    independent draws of u; the first M are paired with the last M. Returns (mu, sigma), each (B,).
    """
    M = z_own_draws.shape[0] // 2
    d = (z_own_draws[:M] - z_own_draws[M:2 * M]).pow(2).sum(-1).sqrt()   # M x B
    return d.mean(0), d.std(0).clamp_min(1e-8)


def group_sums(values: torch.Tensor, codes: torch.Tensor, n_groups: int) -> torch.Tensor:
    """Sum of ``values`` (B x ...) over the cells of each group (codes in [0, n_groups); -1 = none)."""
    keep = codes >= 0
    out = values.new_zeros((n_groups,) + tuple(values.shape[1:]))
    return out.index_add_(0, codes[keep], values[keep])


# ----------------------------------------------------------------------------- densities
def gaussian_log_density(u: torch.Tensor, means: torch.Tensor, stds: torch.Tensor) -> torch.Tensor:
    """log N(u_b; m_k, diag s_k^2) for every cell b and component k: B x K (float64).

    Expanded as a matrix product, [u^2, u] @ [-1/(2 s^2), m/s^2]^T + c_k, so cost is one GEMM
    of B x 2L x K; float64 keeps the expansion's cancellation harmless.
    """
    u = u.double()
    a = stds.double().pow(-2)                                    # K x L
    m = means.double()
    lhs = torch.cat([u * u, u], dim=1)                           # B x 2L
    rhs = torch.cat([-0.5 * a, m * a], dim=1)                    # K x 2L
    c = (-0.5 * (m * m * a).sum(1) - torch.log(stds.double()).sum(1)
         - 0.5 * m.shape[1] * math.log(2 * math.pi))
    return lhs @ rhs.T + c


class ComponentScorer:
    """Log densities of cells under each sample's posterior components, reduced per sample.

    Components are posteriors q(u | x_m) of (sub-sampled) cells m of each sample, padded to
    S x M: ``comp_mean`` / ``comp_std`` (S x M x L), ``comp_index`` (S x M global cell index,
    -1 for padding), ``comp_valid`` (S x M). Calling it with cells ``u`` (B x L) and their
    global ``index`` (B,) returns B x S (float64):
    ``reduce="max"``: max_m log q(u_n | x_m) (admissibility score A_s); ``"mean"``:
    log (1/M_s) sum_m q(u_n | x_m) (log of the aggregated posterior q_s, MrVI's DA).
    A cell's own posterior is left out (leave-one-out: its own component would measure the
    cell, not its sample's density).

    One float32 product per block of cells, [u^2, u] @ [-1/(2 s^2), m/s^2]^T + c_k, with u and
    the means centred on the components' mean first (the expansion's cancellation error is
    then ~1e-7 of the quadratic terms: far below the nats that separate admissible from not).
    Padding components get c_k = -inf and drop out of every reduction without a mask pass;
    a cell's own component is set to -inf by one scatter. Blocks of cells keep the B x S x M
    log densities near the core's cache before they are reduced.
    """

    def __init__(self, comp_mean: torch.Tensor, comp_std: torch.Tensor, comp_index: torch.Tensor,
                 comp_valid: torch.Tensor):
        S, M, L = comp_mean.shape
        self.S, self.M = S, M
        m, sd = comp_mean.double(), comp_std.double()
        valid = comp_valid.bool()
        center = m[valid].mean(0) if bool(valid.any()) else torch.zeros(L, dtype=torch.float64)
        a = sd.pow(-2)
        mc = m - center
        c = -0.5 * (mc * mc * a).sum(-1) - torch.log(sd).sum(-1) - 0.5 * L * math.log(2 * math.pi)
        self.center = center.float()
        self.rhs_t = torch.cat([-0.5 * a, mc * a], dim=-1).reshape(S * M, 2 * L).T.float().contiguous()
        self.c = c.masked_fill(~valid, -math.inf).reshape(S * M).float()
        flat = torch.where(valid, comp_index, torch.full_like(comp_index, -1)).reshape(-1)
        pos = torch.nonzero(flat >= 0).squeeze(1)
        order = torch.argsort(flat[pos])
        self.ids, self.pos = flat[pos][order], pos[order]     # component cells, sorted; their flat slot
        self.n_valid = valid.sum(1).double()

    def _own(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows of ``index`` that are components, their flat component slot)."""
        if not self.ids.numel():
            return index.new_zeros(0), index.new_zeros(0)
        k = torch.searchsorted(self.ids, index).clamp_max_(self.ids.numel() - 1)
        hit = self.ids[k] == index
        return torch.nonzero(hit).squeeze(1), self.pos[k[hit]]

    def __call__(self, u: torch.Tensor, index: torch.Tensor, reduce: str) -> torch.Tensor:
        if reduce not in ("max", "mean"):
            raise ValueError(f"reduce must be 'max' or 'mean', got {reduce!r}")
        B, S, M = u.shape[0], self.S, self.M
        uc = u.float() - self.center
        lhs = torch.cat([uc * uc, uc], dim=1)
        out = torch.empty((B, S), dtype=torch.float64)
        blk = max(8, 2**18 // max(1, S * M))
        for a in range(0, B, blk):  # blocks of cells: one product each
            ld = torch.addmm(self.c, lhs[a:a + blk], self.rhs_t)             # b x (S M)
            rows, slots = self._own(index[a:a + blk])
            ld[rows, slots] = -math.inf
            ld = ld.view(-1, S, M)
            if reduce == "max":
                out[a:a + blk] = ld.amax(-1)
            else:
                n = self.n_valid.expand(ld.shape[0], S).clone()
                n[rows, torch.div(slots, M, rounding_mode="floor")] -= 1
                out[a:a + blk] = torch.logsumexp(ld, -1).double() - torch.log(n)
        return out


def per_sample_log_density(u: torch.Tensor, index: torch.Tensor, comp_mean: torch.Tensor,
                           comp_std: torch.Tensor, comp_index: torch.Tensor, comp_valid: torch.Tensor,
                           reduce: str) -> torch.Tensor:
    """Per cell and sample, the log density of u_n under sample s's components, B x S (float64);
    see :class:`ComponentScorer` (build one and call it when scoring many blocks)."""
    return ComponentScorer(comp_mean, comp_std, comp_index, comp_valid)(u, index, reduce)


# ----------------------------------------------------------------------------- regression
def weighted_least_squares(Z: torch.Tensor, X: torch.Tensor, W: torch.Tensor) -> dict:
    """Per-cell least squares Z_n (S x L) ~ X (S x P) beta_n (P x L) over admissible samples.

    ``W`` (B x S) 0/1 weights (admissible cell-sample pairs). Returns ``beta`` (B x P x L),
    ``sigma2`` (B, residual variance pooled over the L dimensions), ``cov_diag`` (B x P,
    diagonal of (X^T W_n X)^{-1}), ``dof`` (B, admissible samples minus P) and
    ``identified`` (B x P, the column varies over the cell's admissible samples) and ``inv``
    (B x P x P, (X^T W_n X)^{-1}, for further regressions on the same design and weights).
    Unidentified columns get beta 0 (pseudo-inverse) and are reported as such.
    """
    Z, X, W = Z.double(), X.double(), W.double()
    XtWX = torch.einsum("sp,bs,sq->bpq", X, W, X)
    XtWZ = torch.einsum("sp,bs,bsl->bpl", X, W, Z)
    inv = torch.linalg.pinv(XtWX, hermitian=True)
    beta = inv @ XtWZ
    R = Z - torch.einsum("sp,bpl->bsl", X, beta)
    rss = (W[:, :, None] * R * R).sum((1, 2))
    n = W.sum(1)
    P, L = X.shape[1], Z.shape[2]
    dof = n - P
    sigma2 = rss / (dof.clamp_min(1) * L)
    # a column is identified when it is not constant over the admissible samples
    wmean = (W @ X) / n.clamp_min(1)[:, None]
    wvar = (W @ (X * X)) / n.clamp_min(1)[:, None] - wmean ** 2
    identified = wvar > 1e-10
    identified[:, 0] = n > 0  # intercept
    return {"beta": beta, "sigma2": sigma2, "cov_diag": torch.diagonal(inv, dim1=1, dim2=2),
            "dof": dof, "identified": identified, "inv": inv}


def covariate_statistics(fit: dict) -> dict:
    """Per-cell, per-covariate effect statistics from :func:`weighted_least_squares`.

    chi2_nj = ||beta_nj||^2 / (sigma_n^2 [(X^T W_n X)^{-1}]_jj) (MrVI's chi-squared statistic of
    beta_n^j, L degrees of freedom); with sigma^2 estimated from (S_n - P) L residual degrees
    of freedom, chi2 / L ~ F(L, (S_n - P) L) under no effect, which gives ``pvalue``.
    ``beta_norm`` = ||beta_nj||_2 (effect strength in z). NaN where not identified.
    """
    beta = fit["beta"]
    L = beta.shape[-1]
    norm2 = beta.pow(2).sum(-1)                                  # B x P
    chi2 = norm2 / (fit["sigma2"][:, None] * fit["cov_diag"]).clamp_min(1e-300)
    dof = fit["dof"]
    ok = fit["identified"] & (dof[:, None] > 0)
    chi2 = torch.where(ok, chi2, torch.full_like(chi2, math.nan))
    d2 = (dof.clamp_min(1) * L).numpy()[:, None]
    pval = stats.f.sf(chi2.numpy() / L, L, d2)
    return {"chi2": chi2.numpy(), "pvalue": pval, "beta_norm": torch.where(ok, norm2.sqrt(), torch.nan).numpy()}


# ----------------------------------------------------------------------------- tests
def composite_null_ttest(a: np.ndarray, b: np.ndarray, delta: float = 0.1) -> dict:
    """Welch two-sample t-test of H0: |mean(a) - mean(b)| <= delta against |difference| > delta.

    The p-value is the supremum over the composite null, reached at its boundary:
    p = P(T >= (|d| - delta)/se) + P(T <= (-|d| - delta)/se) with T ~ t(Welch df)
    (MrVI's cluster-level DA test, delta = 0.1). Returns diff, se, t = (|d| - delta)/se, df, pvalue.
    """
    a, b = np.asarray(a, float), np.asarray(b, float)
    a, b = a[np.isfinite(a)], b[np.isfinite(b)]
    na, nb = a.size, b.size
    if na < 2 or nb < 2:
        return {"diff": np.nan, "se": np.nan, "t": np.nan, "df": np.nan, "pvalue": np.nan}
    va, vb = a.var(ddof=1) / na, b.var(ddof=1) / nb
    se = math.sqrt(va + vb)
    d = a.mean() - b.mean()
    df = (va + vb) ** 2 / (va ** 2 / (na - 1) + vb ** 2 / (nb - 1)) if va + vb > 0 else np.inf
    if se == 0:
        p = 0.0 if abs(d) > delta else 1.0
        return {"diff": d, "se": 0.0, "t": np.inf if abs(d) > delta else -np.inf, "df": df, "pvalue": p}
    p = stats.t.sf((abs(d) - delta) / se, df) + stats.t.cdf((-abs(d) - delta) / se, df)
    return {"diff": d, "se": se, "t": (abs(d) - delta) / se, "df": df, "pvalue": float(min(1.0, p))}
