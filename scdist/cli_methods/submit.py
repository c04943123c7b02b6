"""`scdist submit SPEC`: run a pipeline on Kubernetes (Job, scheduled CronJob, or KubeRay RayJob)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..errors import ScdistError

_K8S_MISSING = "the `kubernetes` Python client is not installed. Fix: pip install 'scdist[k8s]'"


def submit(
    spec: Path = typer.Argument(..., help="Pipeline spec (YAML) to run in the cluster."),
    namespace: Optional[str] = typer.Option(None, "--namespace", "-n",
                                            help="Namespace (default: the kube context's, else 'default')."),
    schedule: Optional[str] = typer.Option(None, "--schedule",
                                           help="Cron schedule ('0 3 * * 0', '@weekly'): a CronJob whose runs "
                                                "resume, computing only what is new or unfinished."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the manifests (YAML) instead of submitting."),
    name: Optional[str] = typer.Option(None, "--name", help="Name stem of the objects (default: the spec file's name)."),
    release: Optional[str] = typer.Option(None, "--release",
                                          help="A helm/scdist release whose Dask scheduler, Ray head, store PVC "
                                               "and ServiceAccount the run uses."),
    image: Optional[str] = typer.Option(None, "--image", help="Container image (default: scdist/scdist:<version>)."),
    gpu_image: Optional[str] = typer.Option(None, "--gpu-image", help="Image of GPU Ray workers (default: <image>-cuda)."),
    pvc: Optional[str] = typer.Option(None, "--pvc", help="PersistentVolumeClaim holding the store (mounted at --mount-path)."),
    mount_path: Optional[str] = typer.Option(None, "--mount-path", help="Where the PVC is mounted (default /data); "
                                                                         "also the working directory."),
    secret: Optional[str] = typer.Option(None, "--secret", help="Secret with object-store credentials (env vars)."),
    dask_address: Optional[str] = typer.Option(None, "--dask-address", help="Dask scheduler the run connects to."),
    ray_address: Optional[str] = typer.Option(None, "--ray-address", help="Ray head the run connects to (ray://...)."),
    ray_job: Optional[bool] = typer.Option(None, "--ray-job/--no-ray-job",
                                           help="Run as a KubeRay RayJob on its own Ray cluster (default: when the "
                                                "spec has a Ray stage and no Ray address is known)."),
    ray_workers: Optional[int] = typer.Option(None, "--ray-workers", help="Ray worker pods of a RayJob (default 2)."),
    ray_worker_gpus: Optional[int] = typer.Option(None, "--ray-worker-gpus", help="GPUs per Ray worker of a RayJob."),
    cpu: Optional[str] = typer.Option(None, "--cpu", help="CPU request of the run pod (default 1)."),
    memory: Optional[str] = typer.Option(None, "--memory", help="Memory of the run pod (default 4Gi)."),
    time_zone: Optional[str] = typer.Option(None, "--time-zone", help="IANA time zone of --schedule."),
    service_account: Optional[str] = typer.Option(None, "--service-account", help="ServiceAccount of the pods."),
    context: Optional[str] = typer.Option(None, "--context", help="Kube context (default: the current one)."),
    follow_: bool = typer.Option(False, "--follow", help="After submitting, follow the run until it ends."),
):
    """Run a pipeline spec on Kubernetes.

    Builds a ConfigMap with the spec and a Job running `scdist run` on it (a CronJob with --schedule; a KubeRay RayJob when the spec has Ray stages and no Ray cluster is given), checks them offline, and creates them in the current kube context.

    The store must outlive the pod: a path on --pvc (or the --release's volume) or an object-store URL (--secret for credentials).
    """  # noqa: E501 (typer keeps line breaks, so paragraphs are single lines)
    try:
        import kubernetes  # noqa: F401
    except ImportError:
        typer.echo(f"error: {_K8S_MISSING}", err=True)
        raise typer.Exit(2)
    from ..deploy import objects as k8s_objects
    from ..deploy.options import SubmitOptions, dns_label
    from ..deploy.pipeline import load_pipeline
    from ..deploy.submit import current_namespace, submit_objects
    from ..deploy.validate import validate_manifests

    try:
        pipeline = load_pipeline(spec)
        if namespace is None:
            namespace = current_namespace(context)  # None without a kubeconfig: "default"
        opts = SubmitOptions.make(
            name=name or dns_label(spec.stem), namespace=namespace, schedule=schedule, release=release,
            image=image, gpu_image=gpu_image, pvc=pvc, mount_path=mount_path, secret=secret, dask_address=dask_address,
            ray_address=ray_address, ray_job=ray_job, ray_workers=ray_workers,
            ray_worker_gpus=ray_worker_gpus, cpu=cpu, memory=memory, time_zone=time_zone,
            service_account=service_account)
        objs = k8s_objects.build_objects(pipeline, opts)
        manifests = k8s_objects.to_manifests(objs)
        # Core kinds are checked against Kubernetes' own schemas before anything is sent.
        validate_manifests(manifests, allow_unknown=True)
        if dry_run:
            typer.echo(k8s_objects.to_yaml(objs), nl=False)
            return
        sent = submit_objects(manifests, context=context)
        for s in sent:
            typer.echo(f"{s.kind.lower()}/{s.name} {s.action} in namespace {s.namespace}")
        run = sent[-1]
        typer.echo(f"follow it: scdist submit ... --follow, or kubectl -n {run.namespace} get {run.kind.lower()} "
                   f"{run.name} -w")
        if follow_:
            from ..deploy.status import follow

            final = follow(run.name, run.namespace, kind=run.kind, context=context,
                           on_update=lambda s: typer.echo(s.render()))
            if final.phase == "Failed":
                raise typer.Exit(1)
    except ScdistError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2)


def register(app: typer.Typer) -> None:
    app.command(name="submit")(submit)
