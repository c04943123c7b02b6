"""LDVAE: scVI with a linear decoder (Svensson et al., "Interpretable factor models of
single-cell RNA-seq via variational autoencoders").

Generative model (paper notation -> arguments):
    z_n ~ N(0, I_K)                          K = ``n_latent``
    rho_n = softmax(W z_n [+ B s_n])         W = decoder weight (G x K) = the loadings;
                                             s_n the batch one-hot (``batch_key``)
    l_n  observed log total count (``library="observed"``) or
         log l_n ~ N(l_mu_b, l_var_b) per batch (``library="latent"``, scVI)
    x_ng ~ NB(l_n rho_ng, theta_g)           ``likelihood`` "nb" | "zinb" | "poisson";
                                             theta_g per gene (``dispersion="gene"``) or per
                                             gene and batch ("gene-batch")
Inference: q(z_n | x_n, s_n) Normal from an MLP on log1p(x) (``n_hidden``, ``n_layers``,
``dropout``); ``latent_distribution="ln"`` gives scVI's logistic-normal z = softmax(sample).
``decoder_batch_norm=True`` (the default) is the paper's variant with batch normalisation on
W z_n [+ B s_n] (LinearSCVI's decoder); the loadings then fold the normalisation's per-gene
scale into W. Three choices differ from LinearSCVI's (README, LDVAE "Reading"):
- the normalisation's per-gene offset beta_g starts at the log of gene g's share of all counts
  (read before training from at most 8 cell chunks spread over the data); at beta_g = 0 every
  gene starts at rate 1/G, and Adam moves an offset by about lr per step;
- its running statistics are a bias-corrected moving average (:class:`DecoderBatchNorm`);
- the encoder has no batch normalisation (``encoder_batch_norm`` defaults to ``not
  decoder_batch_norm``): the encoder's running statistics lag its fast-moving hidden units early
  in training, so its eval-mode output differs from training's, and the decoder's normalisation
  amplifies the difference in every held-out ELBO and latent computed in eval mode.
``decoder_bn_scale`` is the normalisation's initial per-gene scale gamma_g (1 as in BatchNorm);
``train_ldvae`` refuses it when batch normalisation is off.
``loadings()`` centres each factor over genes (the softmax makes a per-factor offset
unidentifiable).
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import torch
import torch.nn as nn
import torch.nn.functional as F
import xarray as xr

from ..errors import InputError
from .base import VAEModel, latent_dataarray, split_options
from .components import GaussianEncoder, kl_normal_normal, kl_normal_standard
from .likelihoods import log_count_likelihood, log_nb_cells

MODULE_KEYS = ("n_hidden", "n_layers", "dropout", "likelihood", "dispersion", "latent_distribution",
               "decoder_batch_norm", "decoder_bn_scale", "decoder_bias", "library", "encoder_batch_norm")


class DecoderBatchNorm(nn.BatchNorm1d):
    """BatchNorm1d whose running statistics are a bias-corrected moving average: batch t (1-based)
    enters with weight max(momentum, 1/t), so the statistics are the plain mean over the batches
    seen until 1/momentum of them, then the usual moving average. They never carry BatchNorm's
    arbitrary start (mean 0, variance 1), which with momentum 0.01 still holds ~90% of the
    weight after 10 steps. ``num_batches_tracked`` is a buffer, so resume and DDP's buffer
    broadcast keep the count."""

    def __init__(self, n, *, momentum: float = 0.01, eps: float = 1e-3):
        super().__init__(n, momentum=momentum, eps=eps)
        self.base_momentum = momentum

    def forward(self, x):
        if self.training and self.track_running_stats:
            # BatchNorm1d increments the count before using momentum as the update weight
            self.momentum = max(self.base_momentum, 1.0 / (float(self.num_batches_tracked) + 1.0))
        return super().forward(x)


class LDVAEModule(nn.Module):
    """The torch module (generative model + inference network) of LDVAE."""

    def __init__(self, n_genes: int, n_latent: int = 10, *, n_batch: int = 1, n_sample: int = 1, n_label: int = 1,
                 n_hidden: int = 128, n_layers: int = 1, dropout: float = 0.1, likelihood: str = "nb",
                 dispersion: str = "gene", latent_distribution: str = "normal", decoder_batch_norm: bool = True,
                 decoder_bn_scale: float = 1.0, decoder_bias: bool = False, library: str = "observed",
                 encoder_batch_norm: bool | None = None,
                 library_log_means=None, library_log_vars=None, gene_log_freq=None):
        super().__init__()
        checks = {"likelihood": (likelihood, ("nb", "zinb", "poisson")), "dispersion": (dispersion, ("gene", "gene-batch")),
                  "latent_distribution": (latent_distribution, ("normal", "ln")), "library": (library, ("observed", "latent"))}
        for key, (val, allowed) in checks.items():
            if val not in allowed:
                raise InputError(f"{key}={val!r} is not supported", field=key, fix=f"use one of {list(allowed)}")
        self.n_genes, self.n_latent, self.n_batch = n_genes, n_latent, n_batch
        self.likelihood, self.dispersion, self.library = likelihood, dispersion, library
        if encoder_batch_norm is None:
            # the encoder's batch norm only with the plain linear decoder (see the module docstring)
            encoder_batch_norm = not decoder_batch_norm
        self.encoder = GaussianEncoder(n_genes, n_latent, n_cat=n_batch, n_hidden=n_hidden, n_layers=n_layers,
                                       dropout=dropout, batch_norm=encoder_batch_norm,
                                       distribution=latent_distribution)
        nb = n_batch if n_batch > 1 else 0
        self._nb = nb
        self.decoder = nn.Linear(n_latent + nb, n_genes, bias=decoder_bias)
        self.decoder_bn = DecoderBatchNorm(n_genes, momentum=0.01, eps=1e-3) if decoder_batch_norm else None
        if self.decoder_bn is not None:
            if not (isinstance(decoder_bn_scale, (int, float)) and decoder_bn_scale > 0):
                raise InputError(f"decoder_bn_scale={decoder_bn_scale!r}", field="decoder_bn_scale",
                                 fix="use a positive number (the initial per-gene scale of the decoder batch norm)")
            # BatchNorm's usual initial scale 1 gives every gene's logit unit variance across
            # cells from the first step; a smaller scale starts the decoder nearer the
            # data's (small) per-gene log-fold variation.
            nn.init.constant_(self.decoder_bn.weight, float(decoder_bn_scale))
            if gene_log_freq is not None:
                # rho starts at the genes' shares of all counts (the no-z model's MLE), not at 1/G
                init = torch.as_tensor(gene_log_freq, dtype=torch.float32).reshape(-1)
                if init.shape[0] != n_genes:
                    raise InputError(f"gene_log_freq has {init.shape[0]} values for {n_genes} genes",
                                     field="gene_log_freq", fix="give one value per gene (or None)")
                with torch.no_grad():
                    self.decoder_bn.bias.copy_(init)
        if likelihood == "zinb":
            self.dropout_decoder = nn.Linear(n_latent + nb, n_genes, bias=True)
        self.log_theta = nn.Parameter(torch.randn(n_genes, n_batch if dispersion == "gene-batch" else 1).T.contiguous())
        if library == "latent":
            self.l_encoder = GaussianEncoder(n_genes, 1, n_cat=n_batch, n_hidden=n_hidden, n_layers=1,
                                             dropout=dropout, batch_norm=encoder_batch_norm)
            means = torch.as_tensor(library_log_means if library_log_means is not None else np.zeros(n_batch),
                                    dtype=torch.float32).reshape(-1)
            vars_ = torch.as_tensor(library_log_vars if library_log_vars is not None else np.ones(n_batch),
                                    dtype=torch.float32).reshape(-1)
            self.register_buffer("lib_mean", means)
            self.register_buffer("lib_var", vars_)

    def _with_batch(self, z, batch):
        if self._nb:
            return torch.cat([z, F.one_hot(batch, self._nb).to(z.dtype)], dim=-1)
        return z

    def encode(self, x, batch, *, sample: bool = True, log_x=None):
        """q(z | x): returns (z, q_mean, q_std) with z = transform(q_mean + q_std * eps).
        ``log_x``: log1p(x) when the caller has it already."""
        qm, qs = self.encoder(torch.log1p(x) if log_x is None else log_x, batch)
        pre = qm + qs * torch.randn_like(qs) if sample else qm
        return self.encoder.transform(pre), qm, qs

    def decode(self, z, batch, log_library):
        """Returns (log mu, theta, pi_logits) of the count likelihood; rho = softmax(W z [+ B s])."""
        h = self._with_batch(z, batch)
        logits = self.decoder(h)
        if self.decoder_bn is not None:
            logits = self.decoder_bn(logits)
        log_mu = log_library + torch.log_softmax(logits, dim=-1)
        theta = torch.exp(self.log_theta[batch] if self.dispersion == "gene-batch" else self.log_theta[0])
        pi = self.dropout_decoder(h) if self.likelihood == "zinb" else None
        return log_mu, theta, pi

    def forward(self, batch: dict, kl_weight: float = 1.0) -> dict:
        x, b = batch["x"], batch["batch"]
        log_x = torch.log1p(x)  # one B x G pass shared by both encoders
        z, qm, qs = self.encode(x, b, log_x=log_x)
        kl_z = kl_normal_standard(qm, qs)
        kl_l = torch.zeros_like(kl_z)
        if self.library == "latent":
            lm, ls = self.l_encoder(log_x, b)
            log_lib = lm + ls * torch.randn_like(ls)
            kl_l = kl_normal_normal(lm, ls, self.lib_mean[b].unsqueeze(-1), torch.sqrt(self.lib_var[b]).unsqueeze(-1))
        else:
            log_lib = batch["library"]
        log_mu, theta, pi = self.decode(z, b, log_lib)
        if self.likelihood == "nb":
            recon = -log_nb_cells(batch, log_mu, theta)
        else:
            recon = -log_count_likelihood(self.likelihood, x, torch.exp(log_mu), theta, pi).sum(-1)
        loss = (recon + kl_weight * kl_z + kl_l).mean()
        return {"loss": loss, "nelbo": (recon + kl_z + kl_l).sum().detach(), "recon": recon.sum().detach(),
                "kl": (kl_z + kl_l).sum().detach()}

    def loadings(self) -> np.ndarray:
        """W (G x K), each factor centred over genes; with decoder batch norm, the per-gene scale
        gamma_g / sqrt(running_var_g + eps) is folded in first.

        softmax(W z) is unchanged when a constant c_k is added to every gene's loading on factor
        k (each logit of a cell moves by c_k z_k), so only the centred loadings are identified;
        an uncentred column ranks genes by |W_gk + c_k| for an arbitrary c_k.
        """
        W = self.decoder.weight.detach()[:, : self.n_latent].clone()
        if self.decoder_bn is not None:
            bn = self.decoder_bn
            W = W * (bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)).unsqueeze(-1)
        return (W - W.mean(0)).cpu().numpy()


def _module_with_legacy_defaults(**kwargs) -> LDVAEModule:
    """LDVAEModule from saved kwargs. Kwargs saved before decoder batch norm became the default
    lack ``decoder_batch_norm`` (training now always records it): they meant the defaults of
    then, no decoder batch norm and an encoder batch norm."""
    if "decoder_batch_norm" not in kwargs:
        kwargs = {"decoder_batch_norm": False, "encoder_batch_norm": True, **kwargs}
    return LDVAEModule(**kwargs)


def _prepare(source, cats, module_kwargs, *, max_offset_chunks: int = 8):
    """Streaming pass before training: the decoder batch norm's initial offsets (log of each
    gene's share of all counts) and, for library="latent", the per-batch mean and variance of
    the log library size (every chunk). The offsets are only a starting point: without a
    latent library they come from at most ``max_offset_chunks`` chunks spread over the store,
    so the pass costs the same at any cell count."""
    module_kwargs = dict(module_kwargs, decoder_batch_norm=bool(module_kwargs.get("decoder_batch_norm", True)))
    module_kwargs.setdefault("encoder_batch_norm", not module_kwargs["decoder_batch_norm"])
    latent = module_kwargs.get("library", "observed") == "latent"
    bn = module_kwargs["decoder_batch_norm"]
    if not (latent or bn):
        return module_kwargs
    chunks = list(source.chunks)
    if not latent and len(chunks) > max_offset_chunks:
        chunks = [chunks[i] for i in np.linspace(0, len(chunks) - 1, max_offset_chunks).round().astype(int)]
    nb = cats["batch"].n
    s1, s2, n = np.zeros(nb), np.zeros(nb), np.zeros(nb)
    gene_tot = np.zeros(source.n_genes)
    for a, b in chunks:
        X = source.read(a, b)
        gene_tot += np.asarray(X.sum(0)).ravel()
        if latent:
            ll = np.log(np.maximum(np.asarray(X.sum(1)).ravel(), 1.0))
            codes = cats["batch"].codes[a:b]
            s1 += np.bincount(codes, ll, nb)
            s2 += np.bincount(codes, ll ** 2, nb)
            n += np.bincount(codes, minlength=nb)
    out = dict(module_kwargs)
    if bn:
        # +1: a gene never seen starts small but finite; softmax ignores the common offset
        lf = np.log(gene_tot + 1.0)
        out["gene_log_freq"] = np.round(lf - lf.mean(), 4).tolist()
    if latent:
        mean = s1 / np.maximum(n, 1)
        var = np.maximum(s2 / np.maximum(n, 1) - mean ** 2, 1e-4)
        out.update(library_log_means=mean.tolist(), library_log_vars=var.tolist())
    return out


class LDVAE(VAEModel):
    """A trained LDVAE. Build with :func:`train_ldvae`; reload with ``LDVAE.load(path)``."""

    module_path = "scdist.vae.ldvae:LDVAEModule"
    method = "ldvae"

    @classmethod
    def _module_cls(cls):
        return _module_with_legacy_defaults

    @property
    def n_latent(self) -> int:
        return self.module.n_latent

    @torch.no_grad()
    def latent(self, data=None, *, give_mean: bool = True, cells=None, batch_size: int = 1024) -> xr.DataArray:
        """Posterior mean (or a sample) of z_n per cell: DataArray (cell, latent), streamed over chunks."""
        self.module.eval()
        out = []
        for b in self.iter_batches(data, batch_size=batch_size, cells=cells):
            z, _, _ = self.module.encode(b["x"], b["batch"], sample=not give_mean)
            out.append(z.numpy())
        values = np.concatenate(out) if out else np.zeros((0, self.n_latent), np.float32)
        return latent_dataarray(values, self._cells(data, cells), "z")

    def loadings(self) -> xr.DataArray:
        """Gene loadings W: DataArray (gene, latent) with gene names as coordinates, each factor
        centred over genes (the identified part of W, see :meth:`LDVAEModule.loadings`)."""
        W = self.module.loadings()
        return xr.DataArray(W, dims=("gene", "latent"), name="loadings",
                            coords={"gene": self.gene_names, "latent": np.array(
                                [str(i) for i in range(W.shape[1])], dtype=object)})

    def top_genes(self, n: int = 20, *, sign: str = "both") -> pd.DataFrame:
        """The ``n`` genes with the largest loadings per factor.

        ``sign``: "positive" (largest W), "negative" (most negative) or "both" (largest |W|).
        Returns a DataFrame (rank x factor) of gene names.
        """
        W = self.module.loadings()
        key = {"positive": -W, "negative": W, "both": -np.abs(W)}.get(sign)
        if key is None:
            raise InputError(f"sign={sign!r}", field="sign", fix="use 'positive', 'negative' or 'both'")
        order = np.argsort(key, axis=0, kind="stable")[:n]
        return pd.DataFrame({str(k): self.gene_names[order[:, k]] for k in range(W.shape[1])})

    def results(self, data=None) -> xr.Dataset:
        """Latent and loadings as one Dataset (what the ``ldvae`` stage stores)."""
        z = self.latent(data)
        W = self.loadings()
        W = W.rename(latent="latent")
        ds = xr.Dataset({"latent": z, "loadings": W})
        ds.attrs.update(n_latent=self.n_latent, best_epoch=int(self.history.best_epoch),
                        epochs=len(self.history.epoch))
        return ds


def train_ldvae(data, batch_key: str | None = None, n_latent: int = 10, *, seed: int = 0, **options) -> LDVAE:
    """Train an LDVAE on raw counts.

    ``data``: AnnData (raw counts in X), a scdist Study (its ``cells/``), a study URL, or a
    CSR matrix. ``batch_key``: obs column of the batch covariate s_n (None: one batch).
    ``n_latent``: K, the number of factors. ``seed``: initialisation, shuffling and sampling.

    Options: architecture (``n_hidden``=128, ``n_layers``=1, ``dropout``=0.1, ``likelihood``
    "nb"|"zinb"|"poisson", ``dispersion`` "gene"|"gene-batch", ``latent_distribution``
    "normal"|"ln", ``decoder_batch_norm``=True, ``decoder_bn_scale``=1.0 (initial scale of that
    batch norm; only with it), ``decoder_bias``=False, ``library``
    "observed"|"latent"), training (:class:`~scdist.vae.train.TrainConfig` fields:
    ``max_epochs``, ``batch_size``=256, ``lr``, ``optimizer``, ``kl_warmup_epochs``,
    ``val_fraction``=0.1, ``patience``...), engine (``num_workers``=1, ``use_gpu``=False,
    ``checkpoint_dir``; a study defaults to results/ldvae/<run_name>/checkpoints).
    """
    if not isinstance(n_latent, (int, np.integer)) or n_latent < 1:
        raise InputError(f"n_latent={n_latent!r}", field="n_latent", fix="use a positive integer (e.g. 10)")
    mod, tr, eng = split_options(options, MODULE_KEYS)
    if "decoder_bn_scale" in mod and not mod.get("decoder_batch_norm", True):
        raise InputError("decoder_bn_scale is given but decoder_batch_norm=False (it would be ignored)",
                         field="decoder_bn_scale",
                         fix="drop decoder_bn_scale, or set decoder_batch_norm=True (the default)")
    mod["n_latent"] = int(n_latent)
    return LDVAE._train(data, {"batch": batch_key}, mod, tr, eng, seed=seed, prepare=_prepare)
