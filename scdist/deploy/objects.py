"""Kubernetes objects for one submission, built offline with the ``kubernetes`` client's models.

What is built (:func:`build_objects`), in creation order:

1. a ConfigMap ``<name>-pipeline`` holding the spec text as ``pipeline.yaml``;
2. the run, one of
   - a ``batch/v1`` Job running ``scdist run /etc/scdist/pipeline.yaml``,
   - a ``batch/v1`` CronJob (``--schedule``) whose every run resumes from the store's
     completion markers (concurrencyPolicy Forbid: two runs never write one store at once),
   - a KubeRay ``ray.io/v1`` RayJob, when the spec has a Ray stage and no Ray address is
     known: KubeRay brings up a Ray cluster for the run, runs the same command on its head and
     deletes the cluster afterwards.

Pods match the Helm chart's: non-root, read-only root filesystem with a writable /tmp, no
privilege escalation, no service-account token (they never call the API), the store on a PVC
mounted at ``mount_path`` (also the working directory, so a relative ``store`` lands on it) or
an object-store URL with credentials from a Secret (``envFrom``), never from the ConfigMap.
"""
from __future__ import annotations

import datetime as _dt
from typing import Any

from ..errors import SpecError
from .options import SubmitOptions
from .pipeline import SubmittedPipeline

PIPELINE_DIR = "/etc/scdist"
PIPELINE_FILE = "pipeline.yaml"
RAY_CLIENT_PORT = 10001
UID = 10001


def _k():
    from kubernetes import client

    return client


def labels(opts: SubmitOptions, component: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": "scdist", "app.kubernetes.io/instance": opts.name,
            "app.kubernetes.io/component": component, "app.kubernetes.io/managed-by": "scdist-submit"}


def run_name(opts: SubmitOptions, now: _dt.datetime | None = None) -> str:
    """Name of the run object: stable for a CronJob (resubmitting updates it), else timestamped."""
    if opts.schedule:
        return opts.name
    now = now or _dt.datetime.now(_dt.timezone.utc)
    return f"{opts.name}-{now:%Y%m%d-%H%M%S}"


def decide_kind(pipeline: SubmittedPipeline, opts: SubmitOptions) -> str:
    """"Job", "CronJob" or "RayJob" for this spec and these options."""
    if opts.ray_job and opts.schedule:
        raise SpecError("a KubeRay RayJob cannot be scheduled", field="--schedule",
                        fix="drop --ray-job and give --ray-address (or --release) for scheduled runs")
    if opts.schedule:
        return "CronJob"
    if opts.ray_job is None:
        wants_rayjob = (pipeline.needs_ray and not pipeline.ray_address
                        and not opts.resolved_ray_address(needs_ray=True))
        return "RayJob" if wants_rayjob else "Job"
    return "RayJob" if opts.ray_job else "Job"


def check_storage(pipeline: SubmittedPipeline, opts: SubmitOptions) -> None:
    """The store must outlive the pod: on the mounted PVC, or an object-store URL."""
    store = pipeline.store
    if pipeline.store_is_url:
        if opts.pvc:
            raise SpecError(f"store {store!r} is a URL but --pvc was given", field="--pvc",
                            fix="drop --pvc, or use a path on the volume as the spec's store")
        return
    if not opts.resolved_pvc():
        raise SpecError(f"store {store!r} is a local path but no volume is mounted, so results "
                        "would vanish with the pod", field="store",
                        fix="give --pvc CLAIM (or --release NAME), or an object-store URL as store")
    if store.startswith("/") and not store.startswith(opts.mount_path.rstrip("/") + "/"):
        raise SpecError(f"store {store!r} is outside the volume mounted at {opts.mount_path}",
                        field="store", fix=f"use a relative path or one under {opts.mount_path}")


# Pod building blocks ----------------------------------------------------------------------

def _pod_security():
    c = _k()
    return c.V1PodSecurityContext(run_as_non_root=True, run_as_user=UID, run_as_group=UID,
                                  fs_group=UID,
                                  seccomp_profile=c.V1SeccompProfile(type="RuntimeDefault"))


def _container_security():
    c = _k()
    return c.V1SecurityContext(allow_privilege_escalation=False, read_only_root_filesystem=True,
                               capabilities=c.V1Capabilities(drop=["ALL"]))


def _volumes(opts: SubmitOptions, config_map: str | None, shm: bool = False):
    c = _k()
    vols = [c.V1Volume(name="tmp", empty_dir=c.V1EmptyDirVolumeSource(size_limit="8Gi"))]
    if opts.resolved_pvc():
        vols.append(c.V1Volume(name="store", persistent_volume_claim=c.V1PersistentVolumeClaimVolumeSource(
            claim_name=opts.resolved_pvc())))
    if config_map:
        vols.append(c.V1Volume(name="pipeline", config_map=c.V1ConfigMapVolumeSource(name=config_map)))
    if shm:
        # Ray's object store lives in /dev/shm (a container's default is 64 MiB).
        vols.append(c.V1Volume(name="dshm", empty_dir=c.V1EmptyDirVolumeSource(
            medium="Memory", size_limit=opts.shm_size)))
    return vols


def _mounts(opts: SubmitOptions, pipeline: bool, shm: bool = False):
    c = _k()
    mounts = [c.V1VolumeMount(name="tmp", mount_path="/tmp")]
    if opts.resolved_pvc():
        mounts.append(c.V1VolumeMount(name="store", mount_path=opts.mount_path))
    if pipeline:
        mounts.append(c.V1VolumeMount(name="pipeline", mount_path=PIPELINE_DIR, read_only=True))
    if shm:
        mounts.append(c.V1VolumeMount(name="dshm", mount_path="/dev/shm"))
    return mounts


def _env(*, dask: str | None, ray: str | None):
    c = _k()
    env = [c.V1EnvVar(name="HOME", value="/tmp")]
    if dask:
        env.append(c.V1EnvVar(name="SCDIST_DASK_ADDRESS", value=dask))
    if ray:
        env.append(c.V1EnvVar(name="SCDIST_RAY_ADDRESS", value=ray))
    return env


def _env_from(opts: SubmitOptions):
    c = _k()
    if not opts.secret:
        return None
    return [c.V1EnvFromSource(secret_ref=c.V1SecretEnvSource(name=opts.secret))]


def _working_dir(opts: SubmitOptions) -> str:
    return opts.mount_path if opts.resolved_pvc() else "/tmp"


def runner_pod_spec(opts: SubmitOptions, config_map: str, ray_address: str | None = None):
    """The pod that runs ``scdist run`` against the configured clusters."""
    c = _k()
    container = c.V1Container(
        name="scdist", image=opts.image, image_pull_policy=opts.image_pull_policy,
        args=["run", f"{PIPELINE_DIR}/{PIPELINE_FILE}"],
        working_dir=_working_dir(opts),
        env=_env(dask=opts.resolved_dask_address(), ray=ray_address),
        env_from=_env_from(opts),
        resources=c.V1ResourceRequirements(requests={"cpu": opts.cpu, "memory": opts.memory},
                                           limits={"memory": opts.memory}),
        security_context=_container_security(),
        volume_mounts=_mounts(opts, pipeline=True))
    return c.V1PodSpec(restart_policy="Never", containers=[container],
                       service_account_name=opts.resolved_service_account(),
                       automount_service_account_token=False,
                       security_context=_pod_security(), volumes=_volumes(opts, config_map))


def _job_spec(opts: SubmitOptions, config_map: str, component: str, ttl: bool, ray_address: str | None):
    c = _k()
    return c.V1JobSpec(
        backoff_limit=opts.backoff_limit,
        active_deadline_seconds=opts.active_deadline_seconds,
        ttl_seconds_after_finished=opts.ttl_seconds_after_finished if ttl else None,
        template=c.V1PodTemplateSpec(metadata=c.V1ObjectMeta(labels=labels(opts, component)),
                                     spec=runner_pod_spec(opts, config_map, ray_address)))


# Objects ----------------------------------------------------------------------------------

def pipeline_config_map(pipeline: SubmittedPipeline, opts: SubmitOptions, name: str):
    c = _k()
    return c.V1ConfigMap(api_version="v1", kind="ConfigMap",
                         metadata=c.V1ObjectMeta(name=name, namespace=opts.namespace,
                                                 labels=labels(opts, "pipeline")),
                         data={PIPELINE_FILE: pipeline.text})


def job(opts: SubmitOptions, name: str, config_map: str, ray_address: str | None = None):
    c = _k()
    return c.V1Job(api_version="batch/v1", kind="Job",
                   metadata=c.V1ObjectMeta(name=name, namespace=opts.namespace, labels=labels(opts, "run")),
                   spec=_job_spec(opts, config_map, "run", ttl=True, ray_address=ray_address))


def cron_job(opts: SubmitOptions, name: str, config_map: str, ray_address: str | None = None):
    """A scheduled, resuming reanalysis; finished runs are kept per the history limits."""
    c = _k()
    return c.V1CronJob(
        api_version="batch/v1", kind="CronJob",
        metadata=c.V1ObjectMeta(name=name, namespace=opts.namespace, labels=labels(opts, "reanalysis")),
        spec=c.V1CronJobSpec(
            schedule=opts.schedule, time_zone=opts.time_zone,
            concurrency_policy=opts.concurrency_policy,
            successful_jobs_history_limit=opts.successful_jobs_history_limit,
            failed_jobs_history_limit=opts.failed_jobs_history_limit,
            starting_deadline_seconds=opts.starting_deadline_seconds,
            job_template=c.V1JobTemplateSpec(
                metadata=c.V1ObjectMeta(labels=labels(opts, "reanalysis")),
                spec=_job_spec(opts, config_map, "reanalysis", ttl=False, ray_address=ray_address))))


def _ray_pod(opts: SubmitOptions, *, head: bool, config_map: str | None):
    c = _k()
    if head:
        resources = c.V1ResourceRequirements(requests={"cpu": opts.cpu, "memory": opts.memory},
                                             limits={"memory": opts.memory})
        ports = [c.V1ContainerPort(name="gcs-server", container_port=6379),
                 c.V1ContainerPort(name="dashboard", container_port=8265),
                 c.V1ContainerPort(name="client", container_port=RAY_CLIENT_PORT)]
    else:
        req = {"cpu": opts.ray_worker_cpu, "memory": opts.ray_worker_memory}
        lim = {"memory": opts.ray_worker_memory}
        if opts.ray_worker_gpus:
            req["nvidia.com/gpu"] = lim["nvidia.com/gpu"] = str(opts.ray_worker_gpus)
        resources = c.V1ResourceRequirements(requests=req, limits=lim)
        ports = None
    gpu = not head and opts.ray_worker_gpus > 0
    container = c.V1Container(
        name="ray-head" if head else "ray-worker",
        image=opts.resolved_gpu_image() if gpu else opts.image,
        image_pull_policy=opts.image_pull_policy, working_dir=_working_dir(opts),
        env=_env(dask=opts.resolved_dask_address() if head else None, ray=None),
        env_from=_env_from(opts), ports=ports, resources=resources,
        security_context=_container_security(),
        volume_mounts=_mounts(opts, pipeline=head, shm=True))
    tolerations = None
    if gpu:
        tolerations = [c.V1Toleration(key="nvidia.com/gpu", operator="Exists", effect="NoSchedule")]
    return c.V1PodSpec(containers=[container], service_account_name=opts.resolved_service_account(),
                       automount_service_account_token=False, security_context=_pod_security(),
                       tolerations=tolerations,
                       volumes=_volumes(opts, config_map if head else None, shm=True))


def ray_job(opts: SubmitOptions, name: str, config_map: str) -> dict[str, Any]:
    """A KubeRay RayJob (custom resource, so a plain dict) running the pipeline on its head."""
    from kubernetes.client import ApiClient

    ser = ApiClient().sanitize_for_serialization
    env_vars = {"SCDIST_RAY_ADDRESS": "auto"}  # the Ray cluster the job runs in
    if opts.resolved_dask_address():
        env_vars["SCDIST_DASK_ADDRESS"] = opts.resolved_dask_address()
    runtime_env = "env_vars:\n" + "".join(f"  {k}: {v!r}\n" for k, v in env_vars.items())
    group = "gpu" if opts.ray_worker_gpus else "cpu"
    return {
        "apiVersion": "ray.io/v1", "kind": "RayJob",
        "metadata": {"name": name, "namespace": opts.namespace, "labels": labels(opts, "run")},
        "spec": {
            "entrypoint": f"scdist run {PIPELINE_DIR}/{PIPELINE_FILE}",
            "runtimeEnvYAML": runtime_env,
            "shutdownAfterJobFinishes": True,
            **({"ttlSecondsAfterFinished": opts.ttl_seconds_after_finished}
               if opts.ttl_seconds_after_finished is not None else {}),
            **({"activeDeadlineSeconds": opts.active_deadline_seconds}
               if opts.active_deadline_seconds else {}),
            "backoffLimit": opts.backoff_limit,
            "rayClusterSpec": {
                "rayVersion": opts.ray_version,
                "headGroupSpec": {
                    "rayStartParams": {"dashboard-host": "0.0.0.0", "num-cpus": "0"},
                    "template": {"metadata": {"labels": labels(opts, "ray-head")},
                                 "spec": ser(_ray_pod(opts, head=True, config_map=config_map))}},
                "workerGroupSpecs": [{
                    "groupName": group, "replicas": opts.ray_workers, "minReplicas": 0,
                    "maxReplicas": max(opts.ray_workers, 1), "rayStartParams": {},
                    "template": {"metadata": {"labels": labels(opts, f"ray-{group}-worker")},
                                 "spec": ser(_ray_pod(opts, head=False, config_map=None))}}],
            },
        },
    }


def build_objects(pipeline: SubmittedPipeline, opts: SubmitOptions,
                  now: _dt.datetime | None = None) -> list:
    """The ConfigMap and the run object (Job, CronJob or RayJob dict), in creation order."""
    check_storage(pipeline, opts)
    kind = decide_kind(pipeline, opts)
    name = run_name(opts, now)
    cm_name = f"{name}-pipeline"
    cm = pipeline_config_map(pipeline, opts, cm_name)
    ray_address = opts.resolved_ray_address(needs_ray=pipeline.needs_ray)
    if kind == "CronJob":
        run = cron_job(opts, name, cm_name, ray_address)
    elif kind == "RayJob":
        run = ray_job(opts, name, cm_name)
    else:
        run = job(opts, name, cm_name, ray_address)
    return [cm, run]


def to_manifests(objects: list) -> list[dict]:
    """Plain dicts as the API server receives them (camelCase keys, no null fields)."""
    from kubernetes.client import ApiClient

    return [ApiClient().sanitize_for_serialization(o) for o in objects]


def to_yaml(objects: list) -> str:
    """Multi-document YAML; multi-line strings (the spec) as readable ``|`` blocks."""
    import yaml

    class _Dumper(yaml.SafeDumper):
        pass

    def _str(dumper, value):
        style = "|" if "\n" in value and not any(ch in value for ch in "\t\r") else None
        if style and any(line != line.rstrip() for line in value.split("\n")):
            style = None  # trailing spaces cannot be kept in a block scalar
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)

    _Dumper.add_representer(str, _str)
    return yaml.dump_all(to_manifests(objects), Dumper=_Dumper, sort_keys=False)
