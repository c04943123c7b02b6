"""Ray Train path: LDVAE trained by TorchTrainer with 2 CPU workers (DDP over gloo) on the
session's local Ray, checkpoints in the given directory, resume of a finished run."""
from __future__ import annotations

import numpy as np
import pytest

from scdist.errors import ClusterError, InputError
from scdist.vae import train_ldvae
from scdist.vae.simulate import gene_programs
from scdist.vae.train import CheckpointDir


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.timeout(400)
def test_ldvae_two_ray_workers(ray_local, tmp_path):
    adata, _ = gene_programs(n_cells=2000, n_genes=100, n_types=3, n_markers=10, seed=0)
    ck = str(tmp_path / "ck")
    kw = dict(n_latent=3, max_epochs=3, n_hidden=32, num_workers=2, checkpoint_dir=ck, timeout_s=300,
              ray_storage=str(tmp_path / "ray"), run_name="t2")
    m = train_ldvae(adata, "batch", seed=0, **kw)
    h = m.history
    assert h.epoch == [0, 1, 2]
    # each epoch: both shards together see the same number of full minibatches
    assert h.train_cells[0] == 2 * 256 * (int((~_val(2000)).sum()) // 512)
    assert h.val_nelbo[-1] < h.val_nelbo[0]
    assert CheckpointDir(ck).latest() == {"file": "epoch-00002.pt", "epoch": 2, "finished": True}
    assert np.all(np.isfinite(m.loadings().values))
    # re-running the same run resumes from the finished checkpoint: same weights
    again = train_ldvae(adata, "batch", seed=0, **kw)
    np.testing.assert_array_equal(again.loadings().values, m.loadings().values)


def _val(n):
    from scdist.vae.data import validation_mask
    return validation_mask(np.arange(n), 0.1, 0)


@pytest.mark.ray
def test_ray_path_fails_early_when_workers_cannot_run(ray_local):
    adata, _ = gene_programs(n_cells=3000, n_genes=50, n_types=2, n_markers=10, seed=0)
    with pytest.raises(ClusterError, match=r"\[num_workers\]"):
        train_ldvae(adata, n_latent=2, max_epochs=1, num_workers=8, timeout_s=30)
    with pytest.raises(InputError, match=r"\[num_workers\]"):
        train_ldvae(adata[:300].copy(), n_latent=2, max_epochs=1, num_workers=3, batch_size=32, timeout_s=30)
