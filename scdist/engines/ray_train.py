"""Ray Train adapter for the VAE models: data-parallel training with ``TorchTrainer`` (DDP).

Each worker rebuilds the module with the same seed, reads its own shard of cell chunks
(``CellLoader(rank, world_size)``) and runs :func:`scdist.vae.train.fit`, the same loop used
in-process; DDP (gloo on CPU, NCCL on GPU) averages gradients. Rank 0 writes the checkpoints
into the store (``checkpoint_dir``), and every epoch reports its metrics to Ray with a small
pointer checkpoint (Ray's ``Result.metrics`` needs one). A re-run with the same run name and
checkpoint directory resumes from the last checkpoint.

A worker lost during training (process killed, node gone): Ray Train's ``FailureConfig(max_failures)``
tears the worker group down and starts a new one, which runs the training function again; ``fit``
loads the latest checkpoint of the store (module, optimizer, early-stopping state, history and
every rank's torch RNG state, all written at the end of an epoch) and continues with the next
epoch. The epochs after the restore see the same shards, shuffles and random draws as in an
undisturbed run, so the final weights are the same (``tests/test_resilience_ray.py``); the
partial epoch that was running when the worker died is simply recomputed.
"""
from __future__ import annotations

import concurrent.futures
import json
import os
import tempfile
import time

from ..errors import ClusterError, InputError

DEFAULT_MAX_FAILURES = 3


def _train_loop(config: dict) -> None:
    import ray.train
    import ray.train.torch

    from ..vae.base import build_module, make_loaders
    from ..vae.train import CheckpointDir, fit

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if rank == 0 and ray.train.get_checkpoint() is not None:   # a restarted worker group
        import logging

        logging.getLogger("scdist.vae").warning("Ray Train restarted the workers after a failure; resuming from "
                                                 "the latest checkpoint in %s", config["checkpoint_dir"])
    cfg = config["config"]
    module = build_module(config["module_path"], config["module_kwargs"], cfg.seed)
    train, val = make_loaders(config["source"], config["covariates"], cfg, rank=rank, world_size=world)
    device = ray.train.torch.get_device()

    def wrap(m):
        return ray.train.torch.prepare_model(m, move_to_device=device)

    def report(metrics: dict, ckpt_path: str | None) -> None:
        if rank == 0:
            with tempfile.TemporaryDirectory() as d:
                with open(os.path.join(d, "pointer.json"), "w") as f:
                    json.dump({"store_checkpoint": ckpt_path, **metrics}, f)
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))
        else:
            ray.train.report(metrics)

    fit(module, train, val, cfg, checkpoints=CheckpointDir(config["checkpoint_dir"]), rank=rank,
        device=device, wrap=wrap, report=report, fingerprint=config.get("fingerprint"))


def train_distributed(*, module_path: str, module_kwargs: dict, source, covariates: dict, config,
                      checkpoint_dir: str | None, num_workers: int = 2, use_gpu: bool = False,
                      run_name: str = "scdist-vae", storage_path: str | None = None,
                      timeout_s: float | None = None, cpus_per_worker: float = 1.0, fingerprint: str | None = None,
                      max_failures: int = DEFAULT_MAX_FAILURES):
    """Train under ``TorchTrainer``; returns (best state_dict, History) read from the checkpoints.

    ``max_failures``: how many worker-group failures Ray Train recovers from (each restart resumes
    from the latest epoch checkpoint); 0 makes the first lost worker fail the run.

    ``checkpoint_dir``: where the epochs' checkpoints go (a study's results/<model>/<run>/checkpoints);
    a temporary directory when None (then nothing survives the process). Ray's own run
    directory is ``storage_path``/``run_name`` (default: beside the checkpoints).
    """
    if isinstance(max_failures, bool) or not isinstance(max_failures, int) or max_failures < 0:
        raise InputError(f"must be an integer >= 0, got {max_failures!r}", field="max_failures",
                         fix=f"pass how many worker failures Ray Train may recover from (default {DEFAULT_MAX_FAILURES})")
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from ..engines.ray import ray_session
    from ..vae.train import CheckpointDir, History

    tmp = None
    if checkpoint_dir is None:
        tmp = tempfile.mkdtemp(prefix="scdist-vae-")
        checkpoint_dir = os.path.join(tmp, "checkpoints")
    if storage_path is None:
        local = "://" not in checkpoint_dir or checkpoint_dir.startswith("file://")
        base = checkpoint_dir.replace("file://", "") if local else tempfile.mkdtemp(prefix="scdist-ray-")
        storage_path = os.path.abspath(os.path.join(base, os.pardir, "ray"))
    def saved_state():
        state = CheckpointDir(checkpoint_dir).load_latest()
        if state is None:
            return None
        best = state["best_state"] if state["best_state"] is not None else state["module"]
        return best, History(**state["history"]), state["finished"], state.get("fingerprint")

    done = saved_state()
    if done is not None and fingerprint is not None and done[3] not in (None, fingerprint):
        raise InputError(f"{checkpoint_dir} holds checkpoints of a run with other settings", field="checkpoint_dir",
                         fix="use another run name / checkpoint_dir, or delete that directory to start over")
    if done is not None and done[2]:  # a finished run: nothing to train, no workers to start
        return done[:2]
    with ray_session():
        need = num_workers * cpus_per_worker
        # Workers of a previous fit are released asynchronously: give them a moment.
        deadline = time.monotonic() + 30.0
        have = ray.available_resources().get("CPU", 0.0)
        while have + 1e-9 < need and time.monotonic() < deadline and ray.cluster_resources().get("CPU", 0) >= need:
            time.sleep(0.5)
            have = ray.available_resources().get("CPU", 0.0)
        if have + 1e-9 < need:
            raise ClusterError(f"Ray has {have:g} free CPUs, {need:g} needed for {num_workers} workers",
                               field="num_workers", fix="lower num_workers or free the CPUs held by other actors")
        if use_gpu and ray.available_resources().get("GPU", 0.0) < num_workers:
            raise ClusterError("not enough free GPUs in the Ray cluster", field="use_gpu",
                               fix="set use_gpu: false or add GPU nodes")
        trainer = TorchTrainer(
            _train_loop,
            train_loop_config={"module_path": module_path, "module_kwargs": module_kwargs, "source": source,
                               "covariates": covariates, "config": config, "checkpoint_dir": checkpoint_dir,
                               "fingerprint": fingerprint},
            scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu,
                                         resources_per_worker={"CPU": cpus_per_worker}),
            run_config=RunConfig(name=run_name, storage_path=storage_path,
                                 failure_config=FailureConfig(max_failures=max_failures)),
        )
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            fut = pool.submit(trainer.fit)
            try:
                result = fut.result(timeout=timeout_s)
            except concurrent.futures.TimeoutError as exc:
                raise ClusterError(f"Ray Train did not finish within {timeout_s} s", field="timeout_s",
                                   fix="raise timeout_s, or check that no other actors hold the CPUs") from exc
        if getattr(result, "error", None) is not None:
            raise result.error
    done = saved_state()
    if done is None:
        raise ClusterError("Ray Train finished without a checkpoint", field="checkpoint_dir",
                           fix="check the Ray worker logs")
    return done[:2]
