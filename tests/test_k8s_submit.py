"""`scdist submit`: the manifests it builds (validated offline like the chart's), its errors, and
what it sends to / reads from an API server.

No API server can run here, so sending and following are checked against a small in-process
HTTP stand-in that speaks the few REST paths involved; the real ``kubernetes`` client, kubeconfig
loading, serialisation and ``watch`` are exercised unchanged.
"""
from __future__ import annotations

import copy
import json
import re
import subprocess
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pytest
import yaml

pytest.importorskip("kubernetes")

from typer.testing import CliRunner  # noqa: E402

from k8s_fixtures import ROOT, crd_schemas, helm_bin  # noqa: E402,F401  (fixtures)
from scdist.cli import app  # noqa: E402
from scdist.deploy.status import follow, job_phase, job_status, rayjob_phase  # noqa: E402
from scdist.deploy.validate import manifest_problems  # noqa: E402
from scdist.errors import ClusterError  # noqa: E402

SPEC = """\
# weekly CTMM on the atlas
store: atlas.zarr
stages:
  pseudobulk: {min_cells: 10}
  ctmm: {run: default}
"""
RAY_SPEC = """\
store: s3://atlas-bucket/deconv.zarr
stages:
  ursm: {run: default}
"""


@pytest.fixture
def spec(tmp_path):
    p = tmp_path / "Atlas_CTMM.yaml"
    p.write_text(SPEC)
    return p


@pytest.fixture
def ray_spec(tmp_path):
    p = tmp_path / "deconv.yaml"
    p.write_text(RAY_SPEC)
    return p


@pytest.fixture
def no_kube(tmp_path, monkeypatch):
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "no-such-kubeconfig"))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)


def submit(*args):
    res = CliRunner().invoke(app, ["submit", *map(str, args)])
    return res.exit_code, res.output


def dry_run(*args):
    code, out = submit(*args, "--dry-run")
    assert code == 0, out
    return [d for d in yaml.safe_load_all(out) if d]


def assert_valid(docs, crds):
    problems = {f"{d['kind']}/{d['metadata']['name']}": manifest_problems(d, crds) for d in docs}
    assert not {k: v for k, v in problems.items() if v}, problems


def run_pod(doc):
    if doc["kind"] == "Job":
        return doc["spec"]["template"]["spec"]
    if doc["kind"] == "CronJob":
        return doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    raise AssertionError(doc["kind"])


def env_of(container):
    return {e["name"]: e.get("value") for e in container.get("env", [])}


# --- --dry-run manifests -----------------------------------------------------------------

def test_dry_run_job_on_a_pvc(spec, crd_schemas, no_kube):
    docs = dry_run(spec, "--pvc", "atlas-store", "--namespace", "lab")
    assert [d["kind"] for d in docs] == ["ConfigMap", "Job"]
    assert_valid(docs, crd_schemas)
    cm, job = docs
    assert cm["data"]["pipeline.yaml"] == SPEC                  # verbatim, comments and order kept
    assert {d["metadata"]["namespace"] for d in docs} == {"lab"}
    assert re.fullmatch(r"atlas-ctmm-\d{8}-\d{6}", job["metadata"]["name"])
    assert cm["metadata"]["name"] == job["metadata"]["name"] + "-pipeline"
    pod = run_pod(job)
    (c,) = pod["containers"]
    assert c["args"] == ["run", "/etc/scdist/pipeline.yaml"]
    assert c["workingDir"] == "/data"
    assert {"name": "store", "persistentVolumeClaim": {"claimName": "atlas-store"}} in pod["volumes"]
    assert {"name": "pipeline", "configMap": {"name": cm["metadata"]["name"]}} in pod["volumes"]
    assert "SCDIST_DASK_ADDRESS" not in env_of(c)                # no cluster given: embedded Dask
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert job["spec"]["backoffLimit"] >= 1 and job["spec"]["ttlSecondsAfterFinished"] > 0


def test_dry_run_against_a_chart_release_uses_the_release_services(spec, crd_schemas, helm_bin, no_kube):
    docs = dry_run(spec, "--release", "atlas", "--namespace", "sc")
    assert_valid(docs, crd_schemas)
    pod = run_pod(docs[1])
    env = env_of(pod["containers"][0])
    chart = [d for d in yaml.safe_load_all(subprocess.run(
        [str(helm_bin), "template", "atlas", str(ROOT / "helm" / "scdist"), "--namespace", "sc",
         "-f", str(ROOT / "helm" / "scdist" / "ci" / "gpu.yaml")],
        capture_output=True, text=True, check=True).stdout) if d]
    chart_job_env = env_of(next(d for d in chart if d["kind"] == "Job")["spec"]["template"]["spec"]["containers"][0])
    names = {(d["kind"], d["metadata"]["name"]) for d in chart}
    # The same addresses, claim and identity the chart's own Job uses.
    assert env["SCDIST_DASK_ADDRESS"] == chart_job_env["SCDIST_DASK_ADDRESS"]
    claim = next(v for v in pod["volumes"] if v["name"] == "store")["persistentVolumeClaim"]["claimName"]
    assert ("PersistentVolumeClaim", claim) in names
    assert ("ServiceAccount", pod["serviceAccountName"]) in names
    assert "SCDIST_RAY_ADDRESS" not in env                       # no Ray stage, no Ray address


def test_ray_stages_with_a_release_use_its_ray_cluster(ray_spec, crd_schemas, helm_bin, no_kube):
    docs = dry_run(ray_spec, "--release", "atlas", "--namespace", "sc", "--secret", "s3")
    assert [d["kind"] for d in docs] == ["ConfigMap", "Job"]          # not a RayJob
    assert_valid(docs, crd_schemas)
    chart = [d for d in yaml.safe_load_all(subprocess.run(
        [str(helm_bin), "template", "atlas", str(ROOT / "helm" / "scdist"), "--namespace", "sc",
         "-f", str(ROOT / "helm" / "scdist" / "ci" / "gpu.yaml")],
        capture_output=True, text=True, check=True).stdout) if d]
    chart_env = env_of(next(d for d in chart if d["kind"] == "Job")["spec"]["template"]["spec"]["containers"][0])
    env = env_of(run_pod(docs[1])["containers"][0])
    assert env["SCDIST_RAY_ADDRESS"] == chart_env["SCDIST_RAY_ADDRESS"]
    assert not any(v["name"] == "store" for v in run_pod(docs[1])["volumes"])   # object store: no PVC


def test_dry_run_schedule_is_a_resuming_cronjob(spec, crd_schemas, no_kube):
    docs = dry_run(spec, "--pvc", "atlas-store", "--schedule", "0 3 * * 0", "--time-zone", "Europe/Berlin")
    assert [d["kind"] for d in docs] == ["ConfigMap", "CronJob"]
    assert_valid(docs, crd_schemas)
    cj = docs[1]
    assert cj["metadata"]["name"] == "atlas-ctmm"            # stable: resubmitting updates it
    s = cj["spec"]
    assert (s["schedule"], s["timeZone"], s["concurrencyPolicy"]) == ("0 3 * * 0", "Europe/Berlin", "Forbid")
    assert s["successfulJobsHistoryLimit"] == 3 and s["failedJobsHistoryLimit"] == 3
    assert run_pod(cj)["containers"][0]["args"] == ["run", "/etc/scdist/pipeline.yaml"]


def test_ray_stages_without_a_ray_cluster_become_a_rayjob(ray_spec, crd_schemas, no_kube):
    docs = dry_run(ray_spec, "--secret", "s3-creds", "--ray-workers", "3", "--ray-worker-gpus", "1")
    assert [d["kind"] for d in docs] == ["ConfigMap", "RayJob"]
    assert_valid(docs, crd_schemas)                                 # RayJob against KubeRay's CRD
    rj = docs[1]["spec"]
    assert rj["entrypoint"] == "scdist run /etc/scdist/pipeline.yaml"
    assert yaml.safe_load(rj["runtimeEnvYAML"]) == {"env_vars": {"SCDIST_RAY_ADDRESS": "auto"}}
    assert rj["shutdownAfterJobFinishes"] is True
    head = rj["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    (group,) = rj["rayClusterSpec"]["workerGroupSpecs"]
    assert group["groupName"] == "gpu" and group["replicas"] == 3
    worker = group["template"]["spec"]
    assert worker["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert worker["containers"][0]["image"] == head["containers"][0]["image"] + "-cuda"
    assert any(t["key"] == "nvidia.com/gpu" for t in worker["tolerations"])
    assert any(v["name"] == "pipeline" for v in head["volumes"])
    for pod in (head, worker):
        c = pod["containers"][0]
        assert c["envFrom"] == [{"secretRef": {"name": "s3-creds"}}]   # credentials only from the Secret
        assert {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "2Gi"}} in pod["volumes"]
        assert not any(v["name"] == "store" for v in pod["volumes"])   # object store: no PVC
    # Given a Ray cluster, the same spec is a plain Job connecting to it.
    docs = dry_run(ray_spec, "--secret", "s3-creds", "--ray-address", "ray://head:10001")
    assert [d["kind"] for d in docs] == ["ConfigMap", "Job"]
    assert env_of(run_pod(docs[1])["containers"][0])["SCDIST_RAY_ADDRESS"] == "ray://head:10001"
    assert_valid(docs, crd_schemas)


# --- errors before anything is sent ------------------------------------------------------

@pytest.mark.parametrize("args,text,needle", [
    (["--dry-run"], SPEC, "[store]"),                                        # local store, no volume
    (["--dry-run", "--pvc", "s", "--schedule", "every week"], SPEC, "[--schedule]"),
    (["--dry-run", "--pvc", "s", "--name", "Bad_Name"], SPEC, "[--name]"),
    (["--dry-run", "--pvc", "s", "--cpu", "lots"], SPEC, "[--cpu]"),
    (["--dry-run", "--pvc", "s"], SPEC.replace("stages:", "stagez:"), "stagez"),
    (["--dry-run", "--pvc", "s"], SPEC.replace("ctmm:", "ctmmm:"), "[stages.ctmmm]"),
    (["--dry-run", "--pvc", "s"], "store: /scratch/a.zarr\nstages: {pseudobulk: {}}\n", "outside the volume"),
    (["--dry-run", "--pvc", "s"], RAY_SPEC, "[--pvc]"),                      # URL store and a PVC
    (["--dry-run", "--ray-job", "--schedule", "@weekly"], RAY_SPEC, "[--schedule]"),
    (["--dry-run", "--ray-workers", "0"], RAY_SPEC, "[--ray-workers]"),
])
def test_bad_input_fails_naming_the_field_and_the_fix(tmp_path, no_kube, args, text, needle):
    p = tmp_path / "p.yaml"
    p.write_text(text)
    code, out = submit(p, *args)
    assert code == 2, out
    assert needle in out and "Fix:" in out, out


def test_no_kube_context_is_a_clear_error(spec, no_kube):
    code, out = submit(spec, "--pvc", "atlas-store")
    assert code == 2
    assert "[kube context]" in out and "KUBECONFIG" in out and "--dry-run" in out, out


# --- sending and following, against an API-server stand-in -------------------------------

class FakeApiServer:
    """Enough of the Kubernetes REST API for create / replace / patch / get / list / watch."""

    def __init__(self):
        self.objects: dict[tuple[str, str], dict] = {}      # (collection path, name) -> object
        self.requests: list[tuple[str, str]] = []
        self.watch_events: dict[str, list[dict]] = {}       # collection path -> events
        self.fail: dict[tuple[str, str], int] = {}          # (method, path) -> HTTP status
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _send(self, code, body):
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _body(self):
                n = int(self.headers.get("Content-Length") or 0)
                return json.loads(self.rfile.read(n)) if n else None

            def _route(self):
                url = urlparse(self.path)
                parts = url.path.strip("/").split("/")
                i = parts.index("namespaces")
                coll = "/".join(parts[: i + 3])
                name = parts[i + 3] if len(parts) > i + 3 else None
                return url, coll, name

            def _status(self, code, reason):
                self._send(code, {"kind": "Status", "apiVersion": "v1", "status": "Failure",
                                  "reason": reason, "code": code, "message": reason})

            def do_POST(self):
                url, coll, _ = self._route()
                server.requests.append(("POST", url.path))
                if ("POST", url.path) in server.fail:
                    return self._status(server.fail[("POST", url.path)], "Forbidden")
                obj = self._body()
                key = (coll, obj["metadata"]["name"])
                if key in server.objects:
                    return self._status(409, "AlreadyExists")
                obj["metadata"].update(uid=str(uuid.uuid4()), creationTimestamp="2026-11-21T10:00:00Z")
                server.objects[key] = obj
                self._send(201, obj)

            def do_PUT(self):
                url, coll, name = self._route()
                server.requests.append(("PUT", url.path))
                if (coll, name) not in server.objects:
                    return self._status(404, "NotFound")
                obj = self._body()
                obj["metadata"]["uid"] = server.objects[(coll, name)]["metadata"]["uid"]
                server.objects[(coll, name)] = obj
                self._send(200, obj)

            def do_PATCH(self):
                url, coll, name = self._route()
                server.requests.append(("PATCH", url.path))
                if (coll, name) not in server.objects:
                    return self._status(404, "NotFound")
                patch = self._body()
                server.objects[(coll, name)]["metadata"].update(patch.get("metadata", {}))
                self._send(200, server.objects[(coll, name)])

            def do_GET(self):
                url, coll, name = self._route()
                q = parse_qs(url.query)
                server.requests.append(("GET", url.path + ("?watch" if "watch" in q else "")))
                if name:
                    obj = server.objects.get((coll, name))
                    return self._send(200, obj) if obj else self._status(404, "NotFound")
                if q.get("watch") == ["true"]:
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.end_headers()
                    for ev in server.watch_events.get(coll, []):
                        self.wfile.write((json.dumps(ev) + "\n").encode())
                        self.wfile.flush()
                    return
                items = [o for (c, _), o in server.objects.items() if c == coll]
                for sel in q.get("labelSelector", []):
                    k, _, v = sel.partition("=")
                    items = [o for o in items if (o["metadata"].get("labels") or {}).get(k) == v]
                self._send(200, {"apiVersion": "v1", "kind": "List", "metadata": {}, "items": items})

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def kubeconfig(self, path: Path, namespace="lab") -> Path:
        path.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "fake",
            "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
            "users": [{"name": "me", "user": {"token": "t"}}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "me", "namespace": namespace}}]}))
        return path


@pytest.fixture
def api_server(tmp_path, monkeypatch):
    server = FakeApiServer()
    monkeypatch.setenv("KUBECONFIG", str(server.kubeconfig(tmp_path / "kubeconfig")))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    yield server
    server.httpd.shutdown()
    server.httpd.server_close()


CM = "api/v1/namespaces/lab/configmaps"
JOBS = "apis/batch/v1/namespaces/lab/jobs"
CRONJOBS = "apis/batch/v1/namespaces/lab/cronjobs"
RAYJOBS = "apis/ray.io/v1/namespaces/lab/rayjobs"


def test_submit_creates_the_configmap_then_the_job_and_ties_them(spec, api_server):
    code, out = submit(spec, "--pvc", "atlas-store")             # namespace from the kube context
    assert code == 0, out
    writes = [r for r in api_server.requests if r[0] != "GET"]
    assert [m for m, _ in writes] == ["POST", "POST", "PATCH"]
    assert writes[0][1] == "/" + CM and writes[1][1] == "/" + JOBS
    (job,) = [o for (c, _), o in api_server.objects.items() if c == JOBS]
    (cm,) = [o for (c, _), o in api_server.objects.items() if c == CM]
    assert cm["data"]["pipeline.yaml"] == SPEC
    # The spec is garbage-collected with its run.
    assert cm["metadata"]["ownerReferences"] == [{"apiVersion": "batch/v1", "kind": "Job",
                                                  "name": job["metadata"]["name"], "uid": job["metadata"]["uid"]}]
    assert f"job/{job['metadata']['name']} created in namespace lab" in out


def test_resubmitting_a_schedule_updates_it_in_place(spec, api_server):
    assert submit(spec, "--pvc", "s", "--schedule", "@weekly")[0] == 0
    code, out = submit(spec, "--pvc", "s", "--schedule", "0 4 * * 1")
    assert code == 0, out
    assert "cronjob/atlas-ctmm updated" in out and "configmap/atlas-ctmm-pipeline updated" in out
    assert ("PUT", f"/{CRONJOBS}/atlas-ctmm") in api_server.requests
    assert api_server.objects[(CRONJOBS, "atlas-ctmm")]["spec"]["schedule"] == "0 4 * * 1"
    assert len([k for k in api_server.objects if k[0] == CRONJOBS]) == 1


def test_submit_rayjob_goes_to_the_kuberay_api(ray_spec, api_server):
    code, out = submit(ray_spec, "--secret", "s3")
    assert code == 0, out
    (rj,) = [o for (c, _), o in api_server.objects.items() if c == RAYJOBS]
    assert rj["kind"] == "RayJob" and rj["metadata"]["namespace"] == "lab"


def test_api_errors_become_cluster_errors(spec, api_server, tmp_path, monkeypatch):
    api_server.fail[("POST", "/" + JOBS)] = 403
    code, out = submit(spec, "--pvc", "s")
    assert code == 2 and "[kube context]" in out and "403" in out and "submitter" in out, out
    # A context whose server is not there.
    dead = FakeApiServer()
    dead.httpd.shutdown()
    dead.httpd.server_close()
    monkeypatch.setenv("KUBECONFIG", str(dead.kubeconfig(tmp_path / "dead")))
    code, out = submit(spec, "--pvc", "s")
    assert code == 2 and "cannot reach the API server" in out, out


def _job(name, status, **meta):
    return {"apiVersion": "batch/v1", "kind": "Job",
            "metadata": {"name": name, "namespace": "lab", "uid": str(uuid.uuid4()), **meta},
            "spec": {"template": {"spec": {"containers": [{"name": "c", "image": "i"}], "restartPolicy": "Never"}}},
            "status": status}


def test_job_status_and_follow(api_server):
    running = _job("run-1", {"active": 1, "startTime": "2026-11-21T10:00:00Z"})
    api_server.objects[(JOBS, "run-1")] = running
    st = job_status("run-1")
    assert (st.kind, st.phase, st.active, st.namespace) == ("Job", "Running", 1, "lab")
    done = copy.deepcopy(running)
    done["status"] = {"succeeded": 1, "startTime": "2026-11-21T10:00:00Z", "completionTime": "2026-11-21T11:00:00Z",
                      "conditions": [{"type": "Complete", "status": "True"}]}
    api_server.watch_events[JOBS] = [{"type": "MODIFIED", "object": running}, {"type": "MODIFIED", "object": done}]
    seen = []
    final = follow("run-1", "lab", on_update=seen.append, timeout_s=30)
    assert final.phase == "Succeeded" and final.completion_time.startswith("2026-11-21T11:00:00")
    assert [s.phase for s in seen] == ["Running", "Succeeded"]
    assert ("GET", f"/{JOBS}?watch") in api_server.requests
    with pytest.raises(ClusterError, match=r"\[name\].*no Job / CronJob / RayJob named 'nope'"):
        job_status("nope")


def test_cronjob_and_rayjob_status(api_server):
    labels = {"app.kubernetes.io/instance": "atlas"}
    cj = {"apiVersion": "batch/v1", "kind": "CronJob",
          "metadata": {"name": "atlas", "namespace": "lab", "uid": "cj-uid", "labels": labels},
          "spec": {"schedule": "@weekly", "jobTemplate": {"spec": {"template": {"spec": {
              "containers": [{"name": "c", "image": "i"}]}}}}},
          "status": {"lastScheduleTime": "2026-11-15T03:00:00Z"}}
    api_server.objects[(CRONJOBS, "atlas")] = cj
    owner = [{"apiVersion": "batch/v1", "kind": "CronJob", "name": "atlas", "uid": "cj-uid"}]
    api_server.objects[(JOBS, "atlas-1")] = _job("atlas-1", {"failed": 1, "conditions": [
        {"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded"}]}, labels=labels,
        ownerReferences=owner, creationTimestamp="2026-11-08T03:00:00Z")
    api_server.objects[(JOBS, "atlas-2")] = _job("atlas-2", {"succeeded": 1, "conditions": [
        {"type": "Complete", "status": "True"}]}, labels=labels, ownerReferences=owner,
        creationTimestamp="2026-11-15T03:00:00Z")
    st = job_status("atlas", "lab")
    assert (st.kind, st.phase, st.schedule, st.succeeded, st.failed) == ("CronJob", "Scheduled", "@weekly", 1, 1)
    assert st.last_job.name == "atlas-2" and st.last_job.phase == "Succeeded"
    assert "last run" in st.render()
    api_server.objects[(RAYJOBS, "deconv")] = {"apiVersion": "ray.io/v1", "kind": "RayJob",
                                               "metadata": {"name": "deconv", "namespace": "lab"},
                                               "status": {"jobStatus": "RUNNING", "jobDeploymentStatus": "Running",
                                                          "rayClusterName": "deconv-raycluster-x"}}
    st = job_status("deconv", "lab")
    assert (st.kind, st.phase, st.details["rayClusterName"]) == ("RayJob", "Running", "deconv-raycluster-x")


@pytest.mark.parametrize("status,phase", [
    ({}, "Pending"),
    ({"active": 1}, "Running"),
    ({"active": 1, "conditions": [{"type": "Complete", "status": "False"}]}, "Running"),
    ({"succeeded": 1, "conditions": [{"type": "Complete", "status": "True"}]}, "Succeeded"),
    ({"failed": 5, "conditions": [{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded"}]}, "Failed"),
    ({"conditions": [{"type": "FailureTarget", "status": "True"}]}, "Failed"),
    ({"conditions": [{"type": "Suspended", "status": "True"}]}, "Suspended"),
])
def test_job_phase(status, phase):
    assert job_phase(status)[0] == phase


@pytest.mark.parametrize("status,phase", [
    ({}, "Pending"),
    ({"jobDeploymentStatus": "Initializing"}, "Pending"),
    ({"jobStatus": "RUNNING", "jobDeploymentStatus": "Running"}, "Running"),
    ({"jobStatus": "SUCCEEDED", "jobDeploymentStatus": "Complete"}, "Succeeded"),
    ({"jobStatus": "FAILED", "jobDeploymentStatus": "Complete"}, "Failed"),
    ({"jobDeploymentStatus": "Failed", "reason": "DeadlineExceeded"}, "Failed"),
    ({"jobDeploymentStatus": "Suspended"}, "Suspended"),
])
def test_rayjob_phase(status, phase):
    assert rayjob_phase(status)[0] == phase
