"""Ray failures for real (issue 6, item 2), on the session's local Ray (``ray_local``).

* URSM: one of the Gibbs-chain actors is SIGKILLed while it runs an E-step after the first EM
  iteration (so its chains carry warm state). Ray restarts the actor and retries the call; the
  new actor restores its chains' state of the previous EM iteration from the object store and the
  fit ends bit-identical to an undisturbed fit with the same seed. With ``max_actor_restarts=0``
  the same kill fails the fit with a ``ClusterError`` naming that option.
* Ray Train: one of the two ``RayTrainWorker`` processes of an LDVAE fit is SIGKILLed after the
  epoch-1 checkpoint; ``FailureConfig(max_failures)`` starts a new worker group, which resumes from
  the store's latest checkpoint, and the final weights equal an undisturbed run's.

Processes are looked up among this test process's descendants only (the local Ray's workers are
its children), so nothing outside this session can be hit.
"""
from __future__ import annotations

import os
import signal
import threading
import time

import numpy as np
import psutil
import pytest

from scdist.errors import ClusterError

pytestmark = [pytest.mark.resilience, pytest.mark.ray]


def _ray_procs(title: str) -> list[psutil.Process]:
    """This session's Ray worker processes whose title (``ray::Class.method``) starts with ``title``."""
    out = []
    for p in psutil.Process().children(recursive=True):
        try:
            cmd = p.cmdline()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if cmd and cmd[0].startswith(title):
            out.append(p)
    return out


class _Killer(threading.Thread):
    """SIGKILLs the first process titled ``title`` once ``ready()`` holds; records what it killed."""

    def __init__(self, title: str, ready=lambda: True, timeout: float = 120.0):
        super().__init__(daemon=True)
        self.title, self.ready, self.timeout = title, ready, timeout
        self.killed: list[tuple[int, str, float]] = []

    def run(self):
        t0 = time.monotonic()
        while time.monotonic() - t0 < self.timeout:
            if self.ready():
                for p in _ray_procs(self.title):
                    try:
                        name = p.cmdline()[0]
                        os.kill(p.pid, signal.SIGKILL)
                    except (psutil.NoSuchProcess, ProcessLookupError, IndexError):
                        continue
                    self.killed.append((p.pid, name, time.monotonic()))
                    return
            time.sleep(0.02)


# ------------------------------------------------------------------------------------------
# URSM actors
# ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ursm_case():
    from scdist.ursm import simulate

    s = simulate(n_genes=100, n_cells=160, n_bulk=40, seed=4)
    # 2 chains x (2 cell blocks + 2 bulk blocks) = 8 samplers on 2 actors; warm-started chains
    kw = dict(em_iters=4, burnin=15, samples=30, chains=2, cell_block_size=80, bulk_block_size=20, seed=2,
              engine="ray", min_ray_entries=0, n_actors=2, ray_timeout=180)
    return s, kw


def _fit_killing_one_actor(s, kw, **extra):
    """Fit, SIGKILLing one actor busy in an E-step (title ``ray::BlockActor.run``) after EM iteration 1."""
    from scdist.ursm import fit

    killer = _Killer("ray::BlockActor.run")
    iters = []

    def callback(it, theta, pooled):
        iters.append((it, time.monotonic()))
        if it == 1:
            killer.start()

    t0 = time.monotonic()
    try:
        return fit(s.Y, s.cell_types, s.X, callback=callback, **kw, **extra), killer, iters, t0
    finally:
        killer.join(timeout=5)


@pytest.mark.timeout(300)
def test_ursm_actor_sigkilled_mid_estep_restarts_and_result_is_identical(ray_local, ursm_case):
    from scdist.ursm import fit

    s, kw = ursm_case
    t0 = time.monotonic()
    ref = fit(s.Y, s.cell_types, s.X, **kw)
    t_ref = time.monotonic() - t0
    got, killer, iters, t0 = _fit_killing_one_actor(s, kw)
    t_got = time.monotonic() - t0
    assert len(killer.killed) == 1, "no actor was caught in an E-step"
    pid, title, when = killer.killed[0]
    assert title.startswith("ray::BlockActor.run")       # killed while computing, not idle
    assert when > iters[1][1]                             # after iteration 1: warm state had to be restored
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert [i for i, _ in iters] == list(range(kw["em_iters"]))
    assert got.attrs["engine"] == "ray"
    for v in ref.data_vars:
        np.testing.assert_array_equal(got[v].values, ref[v].values, err_msg=v)
    print(f"ursm: undisturbed {t_ref:.1f} s, with one actor killed {t_got:.1f} s")


@pytest.mark.timeout(300)
def test_ursm_actor_killed_without_restarts_fails_naming_the_option(ray_local, ursm_case):
    s, kw = ursm_case
    with pytest.raises(ClusterError, match=r"\[max_actor_restarts\]") as err:
        _fit_killing_one_actor(s, kw, max_actor_restarts=0)
    assert "could not be restarted" in str(err.value)


def test_ursm_max_actor_restarts_is_validated_before_any_work():
    from scdist.errors import InputError
    from scdist.ursm import fit, simulate

    s = simulate(n_genes=80, n_cells=30, n_bulk=20, seed=9)
    with pytest.raises(InputError, match=r"\[max_actor_restarts\]"):
        fit(s.Y, s.cell_types, s.X, engine="ray", max_actor_restarts=-1)


# ------------------------------------------------------------------------------------------
# Ray Train
# ------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_ray_train_worker_sigkilled_resumes_from_checkpoint_with_identical_weights(ray_local, tmp_path):
    """2 DDP workers; one is SIGKILLed once the epoch-1 checkpoint exists (mid-run). Exact equality
    holds because the checkpoint of epoch e carries everything the later epochs depend on: weights,
    Adam moments, early-stopping state, history and each rank's torch RNG state; the cell shards and
    shuffles of epoch e' are functions of (seed, e', rank) only. The killed epoch is recomputed from
    scratch by the new worker group."""
    from scdist.vae import train_ldvae
    from scdist.vae.simulate import gene_programs
    from scdist.vae.train import CheckpointDir

    adata, _ = gene_programs(n_cells=1000, n_genes=60, n_types=3, n_markers=10, seed=0)

    def kw(name):
        return dict(n_latent=3, max_epochs=8, n_hidden=16, batch_size=64, num_workers=2, timeout_s=500,
                    checkpoint_dir=str(tmp_path / name / "ck"), ray_storage=str(tmp_path / name / "ray"),
                    run_name=name, max_failures=2)

    t0 = time.monotonic()
    ref = train_ldvae(adata, "batch", seed=0, **kw("ref"))
    t_ref = time.monotonic() - t0

    ck = CheckpointDir(kw("dis")["checkpoint_dir"])
    at_kill = {}

    def ready():
        latest = ck.latest()
        if latest is not None and latest["epoch"] >= 1 and not latest["finished"]:
            at_kill.update(latest)
            at_kill["workers"] = {p.pid for p in _ray_procs("ray::RayTrainWorker")}
            return True
        return False

    killer = _Killer("ray::RayTrainWorker", ready, timeout=500)
    restarted = []

    def watch():   # a worker that was not there at the kill: Ray Train started a new group
        while killer.is_alive() or (killer.killed and not restarted):
            if killer.killed:
                new = {p.pid for p in _ray_procs("ray::RayTrainWorker")} - at_kill["workers"]
                if new:
                    restarted.append(time.monotonic())
                    return
            time.sleep(0.1)

    watcher = threading.Thread(target=watch, daemon=True)
    killer.start()
    watcher.start()
    t0 = time.monotonic()
    got = train_ldvae(adata, "batch", seed=0, **kw("dis"))
    t_got = time.monotonic() - t0
    killer.join(timeout=5)
    watcher.join(timeout=5)
    assert len(killer.killed) == 1 and at_kill["epoch"] < 7
    assert restarted, "no new RayTrainWorker appeared after the kill"
    assert got.history.epoch == ref.history.epoch == list(range(8))
    assert got.history.val_nelbo == ref.history.val_nelbo
    a, b = ref.module.state_dict(), got.module.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(b[k].numpy(), a[k].numpy(), err_msg=k)
    assert CheckpointDir(kw("dis")["checkpoint_dir"]).latest()["finished"]
    print(f"ray train: undisturbed {t_ref:.1f} s, killed after epoch {at_kill['epoch']} {t_got:.1f} s, "
          f"new workers {restarted[0] - killer.killed[0][2]:.1f} s after the kill")


def test_ray_train_max_failures_is_validated_before_ray_starts():
    from scdist.engines.ray_train import train_distributed
    from scdist.errors import InputError

    for bad in (-1, 1.5, True):
        with pytest.raises(InputError, match=r"\[max_failures\]"):
            train_distributed(module_path="x:y", module_kwargs={}, source=None, covariates={}, config=None,
                              checkpoint_dir=None, max_failures=bad)


def test_spec_options_reach_the_engines():
    """``stages.ursm.options.max_actor_restarts`` and ``stages.<vae>.options.max_failures`` are known
    options (unknown ones are refused by name at plan time)."""
    from scdist.errors import InputError
    from scdist.plan.stages.ursm import UrsmConfig, UrsmStage
    from scdist.vae.base import split_options

    UrsmStage().check(UrsmConfig(options={"max_actor_restarts": 5}), None)
    with pytest.raises(InputError, match=r"max_actor_restart\b"):
        UrsmStage().check(UrsmConfig(options={"max_actor_restart": 5}), None)
    assert split_options({"max_failures": 1}, ())[2] == {"max_failures": 1}
