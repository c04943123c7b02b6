"""Send a submission's objects to the current kube context.

Creation order matters: the ConfigMap first (the run's pod mounts it), then the run. After the
run exists, the ConfigMap gets the run as its owner, so Kubernetes' garbage collector removes
the spec together with the run (a finished Job's TTL, a deleted CronJob).

Resubmitting a scheduled pipeline under the same name updates the CronJob and its spec in place;
Jobs and RayJobs carry a timestamp in their name, so each submission is a new run (which resumes
from the store's completion markers).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from ..errors import ClusterError

_NO_CONTEXT_FIX = ("point KUBECONFIG at a kubeconfig file or select a context with "
                   "`kubectl config use-context NAME` (or pass --context); "
                   "`scdist submit --dry-run` prints the manifests without a cluster")


def kubeconfig_path() -> str:
    """KUBECONFIG as it is now (the client library reads it once, at import), else ~/.kube/config."""
    return os.environ.get("KUBECONFIG") or "~/.kube/config"


@dataclass(frozen=True)
class Submitted:
    """One object sent: what it is, where, and whether it was created or updated."""

    kind: str
    name: str
    namespace: str
    action: str
    uid: str | None = None


def api_client(context: str | None = None):
    """An ``ApiClient`` for ``context`` (default: the current one), or the in-cluster config.

    Raises :class:`ClusterError` naming the fix when no kube context is configured.
    """
    from kubernetes import client, config
    from kubernetes.config.config_exception import ConfigException

    configuration = client.Configuration()
    try:
        config.load_kube_config(config_file=kubeconfig_path(), context=context,
                                client_configuration=configuration, persist_config=False)
    except (ConfigException, FileNotFoundError, OSError) as exc:
        if context is None and os.environ.get("KUBERNETES_SERVICE_HOST"):
            try:
                config.load_incluster_config(client_configuration=configuration)
            except ConfigException as exc2:  # pragma: no cover - only inside a pod
                raise ClusterError(f"no usable in-cluster config: {exc2}", field="kube context",
                                   fix=_NO_CONTEXT_FIX) from exc2
        else:
            what = f"context {context!r}" if context else "kube context"
            raise ClusterError(f"no {what} is configured ({exc})", field="kube context",
                               fix=_NO_CONTEXT_FIX) from exc
    return client.ApiClient(configuration)


def current_namespace(context: str | None = None) -> str | None:
    """The namespace of the (current) kube context, when the kubeconfig names one."""
    from kubernetes import config
    from kubernetes.config.config_exception import ConfigException

    try:
        contexts, current = config.list_kube_config_contexts(kubeconfig_path())
    except (ConfigException, FileNotFoundError, OSError):
        return None
    ctx = next((c for c in contexts if c["name"] == context), None) if context else current
    return ((ctx or {}).get("context") or {}).get("namespace")


def _cluster_error(exc, what: str) -> ClusterError:
    from kubernetes.client.exceptions import ApiException

    if isinstance(exc, ApiException):
        reason = f"HTTP {exc.status} {exc.reason}"
        if exc.status in (401, 403):
            fix = ("ask for the rights the chart's `<release>-submitter` Role grants "
                   "(create configmaps, jobs, cronjobs, rayjobs in the namespace)")
        elif exc.status == 404 and "rayjobs" in str(exc.body or "") + what:
            fix = "install the KubeRay operator (its CRDs), or give --ray-address / --no-ray-job"
        else:
            fix = "see the API server's message above"
        return ClusterError(f"{what} failed: {reason}: {exc.body}", field="kube context", fix=fix)
    return ClusterError(f"{what} failed: cannot reach the API server ({exc})", field="kube context",
                        fix="check the cluster is up and the kube context's server address")


def submit_objects(objects: list, api=None, *, context: str | None = None) -> list[Submitted]:
    """Create ``objects`` (ConfigMap, then Job / CronJob / RayJob dict) in their namespaces."""
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    api = api or api_client(context)
    core, batch, custom = client.CoreV1Api(api), client.BatchV1Api(api), client.CustomObjectsApi(api)
    done: list[Submitted] = []
    config_maps = []
    for obj in objects:
        manifest = obj if isinstance(obj, dict) else api.sanitize_for_serialization(obj)
        kind, meta = manifest["kind"], manifest["metadata"]
        name, ns = meta["name"], meta.get("namespace") or "default"
        action = "created"
        try:
            if kind == "ConfigMap":
                try:
                    out = core.create_namespaced_config_map(ns, manifest)
                except ApiException as exc:
                    if exc.status != 409:
                        raise
                    out = core.replace_namespaced_config_map(name, ns, manifest)
                    action = "updated"
                config_maps.append((name, ns))
                uid = out.metadata.uid
            elif kind == "Job":
                uid = batch.create_namespaced_job(ns, manifest).metadata.uid
            elif kind == "CronJob":
                try:
                    uid = batch.create_namespaced_cron_job(ns, manifest).metadata.uid
                except ApiException as exc:
                    if exc.status != 409:
                        raise
                    uid = batch.replace_namespaced_cron_job(name, ns, manifest).metadata.uid
                    action = "updated"
            elif kind == "RayJob":
                group, version = manifest["apiVersion"].split("/")
                out = custom.create_namespaced_custom_object(group, version, ns, "rayjobs", manifest)
                uid = out["metadata"]["uid"]
            else:
                raise ValueError(f"scdist submit does not send {kind} objects")
        except (ApiException, OSError) as exc:
            raise _cluster_error(exc, f"{action[:-1]}e {kind} {ns}/{name}") from exc
        except Exception as exc:  # urllib3 MaxRetryError and friends: no server there
            if type(exc).__module__.startswith("urllib3"):
                raise _cluster_error(exc, f"create {kind} {ns}/{name}") from exc
            raise
        done.append(Submitted(kind, name, ns, action, uid))
        if kind != "ConfigMap":
            owner = {"apiVersion": manifest["apiVersion"], "kind": kind, "name": name, "uid": uid}
            for cm, cm_ns in config_maps:
                if cm_ns == ns:
                    try:
                        core.patch_namespaced_config_map(cm, ns, {"metadata": {"ownerReferences": [owner]}})
                    except ApiException as exc:
                        raise _cluster_error(exc, f"set owner of ConfigMap {ns}/{cm}") from exc
    return done
