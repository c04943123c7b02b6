"""Deep generative models on cell counts: LDVAE (linear factor VAE) and MrVI (multi-resolution
sample effects), trained by one loop in-process or under Ray Train (see ``scdist.engines.ray_train``)."""
from __future__ import annotations

from .ldvae import LDVAE, train_ldvae
from .mrvi import MrVI, train_mrvi

__all__ = ["LDVAE", "MrVI", "train_ldvae", "train_mrvi"]
