"""What a submitted run is doing: :func:`job_status` reads it once, :func:`follow` watches it.

Works for the three kinds `scdist submit` creates (Job, CronJob, KubeRay RayJob) and for the
Helm chart's runs (``<release>-scdist-run-<revision>``, ``<release>-scdist-reanalysis``).
The phase logic is in pure functions over the API's status dicts (:func:`job_phase`,
:func:`rayjob_phase`) so it is tested without a cluster; watching uses the client's
``kubernetes.watch.Watch``.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Mapping

from ..errors import ClusterError

TERMINAL = ("Succeeded", "Failed")


@dataclass
class RunStatus:
    """The state of one run object. ``phase`` is Pending, Running, Succeeded, Failed,
    Suspended or (CronJob) Scheduled; ``last_job`` is a CronJob's most recent run."""

    kind: str
    name: str
    namespace: str
    phase: str
    active: int = 0
    succeeded: int = 0
    failed: int = 0
    start_time: str | None = None
    completion_time: str | None = None
    message: str | None = None
    schedule: str | None = None
    last_schedule_time: str | None = None
    last_job: "RunStatus | None" = None
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def done(self) -> bool:
        return self.phase in TERMINAL

    def to_dict(self) -> dict:
        return asdict(self)

    def render(self) -> str:
        line = f"{self.kind} {self.namespace}/{self.name}: {self.phase}"
        if self.kind != "CronJob":
            line += f" (active {self.active}, succeeded {self.succeeded}, failed {self.failed})"
        else:
            line += f" (schedule {self.schedule!r}, last run {self.last_schedule_time or 'never'})"
        if self.message:
            line += f" - {self.message}"
        if self.last_job is not None:
            line += "\n  last run: " + self.last_job.render()
        return line


def job_phase(status: Mapping | None, spec: Mapping | None = None) -> tuple[str, str | None]:
    """(phase, message) of a batch/v1 Job from its ``status`` (and ``spec``) dicts."""
    status = status or {}
    for cond in status.get("conditions") or []:
        if cond.get("status") != "True":
            continue
        if cond.get("type") in ("Complete", "SuccessCriteriaMet"):
            return "Succeeded", cond.get("message")
        if cond.get("type") in ("Failed", "FailureTarget"):
            return "Failed", cond.get("message") or cond.get("reason")
        if cond.get("type") == "Suspended":
            return "Suspended", cond.get("message")
    if (spec or {}).get("suspend"):
        return "Suspended", None
    if status.get("active") or status.get("ready"):
        return "Running", None
    return "Pending", None


# KubeRay: status.jobStatus is Ray's own (PENDING, RUNNING, STOPPED, SUCCEEDED, FAILED);
# status.jobDeploymentStatus is KubeRay's (Initializing, Running, Complete, Failed, Suspended, ...).
def rayjob_phase(status: Mapping | None) -> tuple[str, str | None]:
    """(phase, message) of a KubeRay RayJob from its ``status`` dict."""
    status = status or {}
    job, deploy = status.get("jobStatus"), status.get("jobDeploymentStatus")
    msg = status.get("message") or status.get("reason")
    if job == "SUCCEEDED":
        return "Succeeded", msg
    if job in ("FAILED", "STOPPED") or deploy in ("Failed", "ValidationFailed"):
        return "Failed", msg
    if deploy in ("Suspended", "Suspending"):
        return "Suspended", msg
    if job == "RUNNING" or deploy == "Running":
        return "Running", msg
    if deploy == "Complete":
        return "Succeeded", msg
    return "Pending", msg


def _job_status(obj: Mapping, namespace: str) -> RunStatus:
    status = obj.get("status") or {}
    phase, msg = job_phase(status, obj.get("spec"))
    return RunStatus("Job", obj["metadata"]["name"], namespace, phase,
                     active=status.get("active") or 0, succeeded=status.get("succeeded") or 0,
                     failed=status.get("failed") or 0, start_time=status.get("startTime"),
                     completion_time=status.get("completionTime"), message=msg)


def _rayjob_status(obj: Mapping, namespace: str) -> RunStatus:
    status = obj.get("status") or {}
    phase, msg = rayjob_phase(status)
    return RunStatus("RayJob", obj["metadata"]["name"], namespace, phase,
                     active=int(phase == "Running"), succeeded=int(phase == "Succeeded"),
                     failed=status.get("failed") or int(phase == "Failed"),
                     start_time=status.get("startTime"), completion_time=status.get("endTime"),
                     message=msg, details={k: status.get(k) for k in
                                           ("jobStatus", "jobDeploymentStatus", "rayClusterName",
                                            "dashboardURL", "jobId") if status.get(k)})


def _cronjob_status(obj: Mapping, namespace: str, jobs: list[Mapping]) -> RunStatus:
    spec, status = obj.get("spec") or {}, obj.get("status") or {}
    uid = obj["metadata"].get("uid")
    own = [j for j in jobs if any(r.get("uid") == uid or (r.get("kind") == "CronJob" and r.get("name") == obj["metadata"]["name"])
                                  for r in (j["metadata"].get("ownerReferences") or []))]
    own.sort(key=lambda j: j["metadata"].get("creationTimestamp") or "")
    last = _job_status(own[-1], namespace) if own else None
    active = len(status.get("active") or [])
    phase = "Suspended" if spec.get("suspend") else ("Running" if active else "Scheduled")
    return RunStatus("CronJob", obj["metadata"]["name"], namespace, phase, active=active,
                     succeeded=sum(1 for j in own if job_phase(j.get("status"))[0] == "Succeeded"),
                     failed=sum(1 for j in own if job_phase(j.get("status"))[0] == "Failed"),
                     schedule=spec.get("schedule"), last_schedule_time=status.get("lastScheduleTime"),
                     last_job=last, details={"lastSuccessfulTime": status.get("lastSuccessfulTime")})


def _namespace(namespace: str | None, context: str | None) -> str:
    if namespace:
        return namespace
    from .submit import current_namespace

    return current_namespace(context) or "default"


def job_status(name: str, namespace: str | None = None, *, kind: str | None = None,
               api=None, context: str | None = None) -> RunStatus:
    """Status of the Job, CronJob or RayJob ``name`` (``kind`` None: whichever exists).

    Raises :class:`ClusterError` when no kube context is configured, the API server cannot be
    reached, or no such run exists.
    """
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    from .submit import _cluster_error, api_client

    namespace = _namespace(namespace, context)
    api = api or api_client(context)
    ser = api.sanitize_for_serialization
    batch, custom = client.BatchV1Api(api), client.CustomObjectsApi(api)
    kinds = [kind] if kind else ["Job", "CronJob", "RayJob"]
    for k in kinds:
        try:
            if k == "Job":
                return _job_status(ser(batch.read_namespaced_job(name, namespace)), namespace)
            if k == "CronJob":
                cj = ser(batch.read_namespaced_cron_job(name, namespace))
                inst = (cj["metadata"].get("labels") or {}).get("app.kubernetes.io/instance")
                selector = f"app.kubernetes.io/instance={inst}" if inst else None
                jobs = ser(batch.list_namespaced_job(namespace, label_selector=selector)).get("items", [])
                return _cronjob_status(cj, namespace, jobs)
            if k == "RayJob":
                return _rayjob_status(custom.get_namespaced_custom_object(
                    "ray.io", "v1", namespace, "rayjobs", name), namespace)
        except ApiException as exc:
            if exc.status == 404:
                continue
            raise _cluster_error(exc, f"read {k} {namespace}/{name}") from exc
        except Exception as exc:
            if type(exc).__module__.startswith("urllib3"):
                raise _cluster_error(exc, f"read {k} {namespace}/{name}") from exc
            raise
    raise ClusterError(f"no {' / '.join(kinds)} named {name!r} in namespace {namespace!r}",
                       field="name", fix=f"list runs with `kubectl -n {namespace} get jobs,cronjobs,rayjobs`")


def follow(name: str, namespace: str | None = None, *, kind: str | None = None, api=None,
           context: str | None = None, timeout_s: int | None = None,
           on_update: Callable[[RunStatus], None] | None = None) -> RunStatus:
    """Watch a run until it succeeds or fails (or ``timeout_s`` passes); return the last status.

    A CronJob is followed through its currently running Job, if any.
    """
    from kubernetes import client, watch

    from .submit import api_client

    namespace = _namespace(namespace, context)
    api = api or api_client(context)
    current = job_status(name, namespace, kind=kind, api=api)
    if current.kind == "CronJob":
        if not current.active or current.last_job is None:
            return current
        current = job_status(current.last_job.name, namespace, kind="Job", api=api)
    if on_update:
        on_update(current)
    if current.done:
        return current
    ser = api.sanitize_for_serialization
    w = watch.Watch()
    kwargs = dict(field_selector=f"metadata.name={current.name}", timeout_seconds=timeout_s)
    if current.kind == "Job":
        stream = w.stream(client.BatchV1Api(api).list_namespaced_job, namespace, **kwargs)
        convert = lambda o: _job_status(ser(o), namespace)  # noqa: E731
    else:
        stream = w.stream(client.CustomObjectsApi(api).list_namespaced_custom_object,
                          "ray.io", "v1", namespace, "rayjobs", **kwargs)
        convert = lambda o: _rayjob_status(o, namespace)  # noqa: E731
    for event in stream:
        status = convert(event["object"])
        if (status.phase, status.active, status.succeeded, status.failed) != \
                (current.phase, current.active, current.succeeded, current.failed) and on_update:
            on_update(status)
        current = status
        if current.done:
            w.stop()
            break
    return current
