"""The Helm chart, checked offline with the real helm binary and the upstream schemas.

helm lint --strict and helm template for every values file in helm/scdist/ci; every rendered
core object validated with kubernetes-validate (strict), every custom resource against its CRD;
bad values rejected by values.schema.json or the chart's own checks; the plain manifests in
deploy/manifests kept identical to the chart's output.
"""
from __future__ import annotations

import copy
import subprocess
from pathlib import Path

import pytest
import yaml

from k8s_fixtures import ROOT, crd_schemas, helm_bin, kubectl_bin  # noqa: F401  (fixtures)
from scdist.deploy.validate import manifest_problems

CHART = ROOT / "helm" / "scdist"
CI_VALUES = sorted((CHART / "ci").glob("*.yaml"))
VALUE_SETS = [None] + CI_VALUES
IDS = ["default"] + [p.stem for p in CI_VALUES]
RELEASE, NS = "atlas", "sc"


def helm(helm_bin, *args, check=True) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(helm_bin), *args], capture_output=True, text=True, timeout=120)
    if check and proc.returncode:
        raise AssertionError(f"helm {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


def template_args(values: Path | None, sets=()) -> list[str]:
    args = ["template", RELEASE, str(CHART), "--namespace", NS]
    if values is not None:
        args += ["-f", str(values)]
    for s in sets:
        args += ["--set", s]
    return args


@pytest.fixture(scope="module")
def rendered(helm_bin):
    """Rendered documents for each values file (one helm call each, shared by the tests)."""
    cache = {}

    def get(values):
        if values not in cache:
            out = helm(helm_bin, *template_args(values)).stdout
            cache[values] = [d for d in yaml.safe_load_all(out) if d]
        return cache[values]
    return get


def kinds(docs):
    return sorted(d["kind"] for d in docs)


def one(docs, kind):
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, got {len(found)}: {kinds(docs)}"
    return found[0]


def pod_specs(doc):
    """Every pod spec inside a rendered object (workloads and custom resources)."""
    kind, spec = doc["kind"], doc.get("spec") or {}
    if kind in ("Job", "Deployment"):
        return [spec["template"]["spec"]]
    if kind == "CronJob":
        return [spec["jobTemplate"]["spec"]["template"]["spec"]]
    if kind == "DaskCluster":
        return [spec["scheduler"]["spec"], spec["worker"]["spec"]]
    if kind == "DaskJob":
        cluster = spec["cluster"]["spec"]
        return [spec["job"]["spec"], cluster["scheduler"]["spec"], cluster["worker"]["spec"]]
    if kind in ("RayCluster", "RayJob"):
        rc = spec if kind == "RayCluster" else spec["rayClusterSpec"]
        return [rc["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in rc.get("workerGroupSpecs", [])]
    return []


def env_of(container) -> dict:
    return {e["name"]: e.get("value") for e in container.get("env", [])}


# --- lint and schema validation of every values file ---------------------------------------

@pytest.mark.parametrize("values", VALUE_SETS, ids=IDS)
def test_helm_lint_strict(helm_bin, values):
    args = ["lint", "--strict", str(CHART)] + (["-f", str(values)] if values else [])
    proc = helm(helm_bin, *args, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 chart(s) failed" in proc.stdout


def test_ci_values_cover_the_deployment_choices():
    names = {p.stem for p in CI_VALUES}
    assert {"cpu", "gpu", "cronjob", "plain-dask", "operator-dask", "rayjob", "daskjob"} <= names


@pytest.mark.parametrize("values", VALUE_SETS, ids=IDS)
def test_every_rendered_object_validates(rendered, crd_schemas, values):
    docs = rendered(values)
    assert docs
    problems = {f"{d['kind']}/{d['metadata']['name']}": manifest_problems(d, crd_schemas) for d in docs}
    assert not {k: v for k, v in problems.items() if v}, problems


@pytest.mark.parametrize("values", VALUE_SETS, ids=IDS)
def test_pods_are_locked_down(rendered, values):
    docs = rendered(values)
    pods = [p for d in docs for p in pod_specs(d)]
    assert pods
    for pod in pods:
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["automountServiceAccountToken"] is False
        assert pod["serviceAccountName"] == f"{RELEASE}-scdist"
        for c in pod["containers"]:
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False
            assert sc["readOnlyRootFilesystem"] is True
            assert sc["capabilities"]["drop"] == ["ALL"]
            assert c["resources"]["requests"] and c["resources"]["limits"], c["name"]
            assert any(m["mountPath"] == "/tmp" for m in c["volumeMounts"])  # writable scratch
    roles = [d for d in docs if d["kind"] in ("Role", "ClusterRole")]
    assert [r["kind"] for r in roles] == ["Role"]  # namespaced, nothing cluster-wide
    for rule in roles[0]["rules"]:
        assert "*" not in rule["verbs"] and "delete" not in rule["verbs"]
        assert "secrets" not in rule["resources"]


# --- what each values file deploys -----------------------------------------------------------

def test_default_values_render_a_job_against_the_plain_dask_cluster(rendered):
    docs = rendered(None)
    assert "Job" in kinds(docs) and "CronJob" not in kinds(docs)
    job = one(docs, "Job")
    pod = job["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert c["args"][:2] == ["run", "/etc/scdist/pipeline.yaml"]
    assert pod["restartPolicy"] == "Never"
    # The address the run gets is the Service the chart deploys, on the scheduler's port.
    svc = one(docs, "Service")
    port = next(p["port"] for p in svc["spec"]["ports"] if p["name"] == "tcp-comm")
    assert env_of(c)["SCDIST_DASK_ADDRESS"] == f"tcp://{svc['metadata']['name']}:{port}"
    scheduler = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == svc["metadata"]["name"])
    assert svc["spec"]["selector"].items() <= scheduler["spec"]["template"]["metadata"]["labels"].items()
    # The spec is mounted from the ConfigMap, verbatim and in stage order.
    cm = one(docs, "ConfigMap")
    vol = next(v for v in pod["volumes"] if v["name"] == "pipeline")
    assert vol["configMap"]["name"] == cm["metadata"]["name"]
    text = cm["data"]["pipeline.yaml"]
    assert list(yaml.safe_load(text)["stages"]) == ["pseudobulk", "ctmm"]
    # Store on the PVC, which is the working directory (relative store paths land on it).
    pvc = one(docs, "PersistentVolumeClaim")
    assert pvc["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    store = next(v for v in pod["volumes"] if v["name"] == "store")
    assert store["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
    assert c["workingDir"] == next(m["mountPath"] for m in c["volumeMounts"] if m["name"] == "store")
    # Dask workers mount the same store.
    workers = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"].endswith("dask-worker"))
    wpod = workers["spec"]["template"]["spec"]
    assert any(v.get("persistentVolumeClaim", {}).get("claimName") == pvc["metadata"]["name"] for v in wpod["volumes"])
    assert wpod["containers"][0]["args"][0] == env_of(c)["SCDIST_DASK_ADDRESS"]


def test_cronjob_values_render_a_resuming_scheduled_reanalysis(rendered):
    values = yaml.safe_load((CHART / "ci" / "cronjob.yaml").read_text())
    docs = rendered(CHART / "ci" / "cronjob.yaml")
    assert "Job" not in kinds(docs)
    cj = one(docs, "CronJob")
    spec = cj["spec"]
    assert spec["schedule"] == values["schedule"]["cron"]
    assert spec["concurrencyPolicy"] == "Forbid"
    assert spec["successfulJobsHistoryLimit"] == values["schedule"]["successfulJobsHistoryLimit"]
    assert spec["failedJobsHistoryLimit"] == values["schedule"]["failedJobsHistoryLimit"]
    assert spec["timeZone"] == "Etc/UTC"
    (c,) = spec["jobTemplate"]["spec"]["template"]["spec"]["containers"]
    assert c["args"][:2] == ["run", "/etc/scdist/pipeline.yaml"]
    # Object store: credentials from the Secret as env, never in the ConfigMap; no PVC.
    assert c["envFrom"] == [{"secretRef": {"name": "atlas-s3-credentials"}}]
    assert env_of(c)["AWS_REGION"] == "eu-west-1"
    assert "PersistentVolumeClaim" not in kinds(docs)
    cm = one(docs, "ConfigMap")
    assert "secret" not in cm["data"]["pipeline.yaml"].lower()
    for d in docs:
        if d["kind"] == "Deployment" and "worker" in d["metadata"]["name"]:
            assert d["spec"]["template"]["spec"]["containers"][0]["envFrom"] == c["envFrom"]


def test_gpu_values_render_a_gpu_worker_group(rendered):
    docs = rendered(CHART / "ci" / "gpu.yaml")
    rc = one(docs, "RayCluster")
    groups = {g["groupName"]: g for g in rc["spec"]["workerGroupSpecs"]}
    assert list(groups) == ["gpu"]
    pod = groups["gpu"]["template"]["spec"]
    (c,) = pod["containers"]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert c["resources"]["requests"]["nvidia.com/gpu"] == "1"
    assert c["resources"]["limits"]["memory"] == "32Gi"  # the user's limits are kept
    assert c["image"].endswith("-cuda")
    assert pod["nodeSelector"] == {"cloud.google.com/gke-accelerator": "nvidia-tesla-a100"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    for p in pod_specs(rc):
        shm = next(v for v in p["volumes"] if v["name"] == "dshm")
        assert shm["emptyDir"]["medium"] == "Memory"
        assert any(m["mountPath"] == "/dev/shm" for m in p["containers"][0]["volumeMounts"])
    job = one(docs, "Job")
    env = env_of(job["spec"]["template"]["spec"]["containers"][0])
    assert env["SCDIST_RAY_ADDRESS"] == f"ray://{rc['metadata']['name']}-head-svc:10001"
    head = rc["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert {p["containerPort"] for p in head["ports"]} == {6379, 8265, 10001}


def test_operator_and_plain_dask_give_the_run_the_same_scheduler_address(rendered):
    plain = rendered(CHART / "ci" / "plain-dask.yaml")
    operator = rendered(CHART / "ci" / "operator-dask.yaml")
    assert "DaskCluster" not in kinds(plain) and kinds(plain).count("Deployment") == 2
    assert "Deployment" not in kinds(operator)
    dc = one(operator, "DaskCluster")
    assert dc["spec"]["worker"]["replicas"] == 4
    assert dc["spec"]["scheduler"]["spec"]["containers"][0]["name"] == "scheduler"
    assert dc["spec"]["worker"]["spec"]["containers"][0]["name"] == "worker"
    assert "$(DASK_SCHEDULER_ADDRESS)" in dc["spec"]["worker"]["spec"]["containers"][0]["args"]
    addr = {name: env_of(one(docs, "Job")["spec"]["template"]["spec"]["containers"][0])["SCDIST_DASK_ADDRESS"]
            for name, docs in (("plain", plain), ("operator", operator))}
    # The operator names the scheduler Service "<DaskCluster name>-scheduler".
    assert addr["operator"] == f"tcp://{dc['metadata']['name']}-scheduler:8786" == addr["plain"]
    # plain-dask.yaml uses an existing claim: no PVC is created, the claim is mounted.
    assert "PersistentVolumeClaim" not in kinds(plain)
    pod = one(plain, "Job")["spec"]["template"]["spec"]
    assert {"name": "store", "persistentVolumeClaim": {"claimName": "atlas-store"}} in pod["volumes"]


def test_rayjob_values_render_a_rayjob_running_the_pipeline_on_its_head(rendered):
    docs = rendered(CHART / "ci" / "rayjob.yaml")
    assert "Job" not in kinds(docs) and "RayCluster" not in kinds(docs)
    rj = one(docs, "RayJob")
    assert rj["spec"]["entrypoint"] == "scdist run /etc/scdist/pipeline.yaml"
    assert rj["spec"]["shutdownAfterJobFinishes"] is True
    assert yaml.safe_load(rj["spec"]["runtimeEnvYAML"])["env_vars"]["SCDIST_RAY_ADDRESS"] == "auto"
    head = rj["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    cm = one(docs, "ConfigMap")
    assert any(v.get("configMap", {}).get("name") == cm["metadata"]["name"] for v in head["volumes"])
    assert any(m["mountPath"] == "/etc/scdist" for m in head["containers"][0]["volumeMounts"])


def test_daskjob_values_render_a_daskjob_on_its_own_dask_cluster(rendered, crd_schemas):
    docs = rendered(CHART / "ci" / "daskjob.yaml")
    assert not {"Job", "DaskCluster", "Deployment", "Service"} & set(kinds(docs))
    dj = one(docs, "DaskJob")
    name = dj["metadata"]["name"]
    (c,) = dj["spec"]["job"]["spec"]["containers"]
    assert c["name"] == "job" and c["args"][:2] == ["run", "/etc/scdist/pipeline.yaml"]
    # The operator names the job's cluster after the job, and its scheduler Service "<name>-scheduler".
    assert env_of(c)["SCDIST_DASK_ADDRESS"] == f"tcp://{name}-scheduler:8786"
    cluster = dj["spec"]["cluster"]["spec"]
    assert cluster["scheduler"]["service"]["selector"]["dask.org/cluster-name"] == name
    assert cluster["worker"]["replicas"] == 6
    assert manifest_problems(dj, crd_schemas) == []


def test_notes_tell_how_to_follow_the_run(helm_bin):
    out = helm(helm_bin, "install", RELEASE, str(CHART), "--namespace", NS, "--dry-run=client").stdout
    notes = out.split("NOTES:", 1)[1]
    assert f"kubectl -n {NS} logs -f job/{RELEASE}-scdist-run-1" in notes
    assert f"scdist status {RELEASE}-scdist-run-1" in notes
    assert "port-forward svc/atlas-scdist-dask-scheduler 8787" in notes
    cron = helm(helm_bin, "install", RELEASE, str(CHART), "--namespace", NS, "--dry-run=client",
                "-f", str(CHART / "ci" / "cronjob.yaml")).stdout.split("NOTES:", 1)[1]
    assert "create job --from=cronjob/atlas-scdist-reanalysis" in cron


# --- bad values are rejected before anything is deployed -----------------------------------

BAD_VALUES = [
    (["schedule.concurrencyPolicy=Allow"], "concurrencyPolicy"),
    (["schedule.cron=every sunday"], "cron"),
    (["dask.mode=yarn"], "mode"),
    (["dask.worker.replicas=-1"], "replicas"),
    (["dask.wrokers=3"], "wrokers"),
    (["storage.type=objectStore"], "existingSecret"),
    (["storage.pvc.create=false"], "existingClaim"),
    (["podSecurityContext.runAsNonRoot=false"], "runAsNonRoot"),
    (["securityContext.allowPrivilegeEscalation=true"], "allowPrivilegeEscalation"),
    (["job.kind=Pod"], "kind"),
    (["ray.gpuWorkers.gpusPerWorker=0"], "gpusPerWorker"),
    (["image.pullPolicy=Sometimes"], "pullPolicy"),
    (["pipeline.specYaml="], "specYaml"),
]


@pytest.mark.parametrize("sets,field", BAD_VALUES, ids=[b[1] + "-" + b[0][0].split("=")[1] for b in BAD_VALUES])
def test_schema_rejects_bad_values(helm_bin, sets, field):
    proc = helm(helm_bin, *template_args(None, sets), check=False)
    assert proc.returncode != 0, f"{sets} was accepted"
    assert "schema" in proc.stderr and field in proc.stderr, proc.stderr


CROSS_CHECKS = [
    (["pipeline.specYaml=store: s3://b/a.zarr\nstages: {ctmm: {}}"], "storage.type"),
    (["storage.type=objectStore", "storage.objectStore.existingSecret=s3"], "is not a URL"),
    (["pipeline.specYaml=store: /scratch/a.zarr\nstages: {ctmm: {}}"], "outside the volume"),
    (["pipeline.specYaml=stages: {ctmm: {}}"], "no `store`"),
    (["pipeline.specYaml=store: a.zarr"], "no `stages`"),
    (["schedule.enabled=true", "job.kind=RayJob"], "cannot be scheduled"),
    (["job.kind=RayJob", "ray.enabled=true"], "ray.enabled"),
    (["job.kind=DaskJob"], "needs the Dask operator"),
    (["ray.enabled=true", "ray.cpuWorkers.enabled=false"], "no worker group"),
    (["job.kind=DaskJob", "dask.mode=operator", "schedule.enabled=true"], "DaskJob cannot be scheduled"),
]


@pytest.mark.parametrize("sets,message", CROSS_CHECKS, ids=[c[1] for c in CROSS_CHECKS])
def test_chart_rejects_inconsistent_values_naming_the_fix(helm_bin, sets, message):
    args = template_args(None)
    for s in sets:
        key, _, value = s.partition("=")
        args += ["--set-string" if key == "pipeline.specYaml" else "--set", f"{key}={value}"]
    proc = helm(helm_bin, *args, check=False)
    assert proc.returncode != 0, f"{sets} was accepted"
    assert message in proc.stderr and "Fix:" in proc.stderr, proc.stderr


# --- the validators are not rubber stamps ----------------------------------------------------

def test_validators_catch_broken_objects(rendered, crd_schemas):
    docs = rendered(CHART / "ci" / "operator-dask.yaml")
    rc = copy.deepcopy(one(docs, "RayCluster"))
    rc["spec"]["headGroupSpec"]["rayStartParam"] = {}          # typo of rayStartParams
    assert any("rayStartParam" in p for p in manifest_problems(rc, crd_schemas))
    rc = copy.deepcopy(one(docs, "RayCluster"))
    rc["spec"]["workerGroupSpecs"][0]["replicas"] = "two"
    assert any("replicas" in p for p in manifest_problems(rc, crd_schemas))
    dc = copy.deepcopy(one(docs, "DaskCluster"))
    del dc["spec"]["worker"]
    assert any("worker" in p for p in manifest_problems(dc, crd_schemas))
    job = copy.deepcopy(one(docs, "Job"))
    job["spec"]["template"]["spec"]["containers"][0]["imagePullPolcy"] = "Always"
    assert manifest_problems(job, crd_schemas)                 # strict: unknown field
    job = copy.deepcopy(one(docs, "Job"))
    job["spec"]["backoffLimit"] = "four"
    assert manifest_problems(job, crd_schemas)
    assert manifest_problems({"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"}},
                             crd_schemas)                      # unknown kinds are not waved through


def test_crd_quirks_are_handled_like_the_api_server(rendered, crd_schemas):
    dc = copy.deepcopy(one(rendered(CHART / "ci" / "operator-dask.yaml"), "DaskCluster"))
    # int-or-string: a Service targetPort may be a number or a port name.
    dc["spec"]["scheduler"]["service"]["ports"][0]["targetPort"] = 8786
    assert manifest_problems(dc, crd_schemas) == []
    # null fields are pruned by the API server, not rejected.
    dc["spec"]["scheduler"]["spec"]["nodeSelector"] = None
    assert manifest_problems(dc, crd_schemas) == []


# --- plain manifests for users without Helm --------------------------------------------------

def test_plain_manifests_match_the_chart(helm_bin, kubectl_bin, crd_schemas):
    out_dir = ROOT / "deploy" / "manifests"
    default = helm(helm_bin, "template", "scdist", str(CHART), "--namespace", "scdist").stdout
    cron = helm(helm_bin, "template", "scdist", str(CHART), "--namespace", "scdist", "--set", "schedule.enabled=true",
                "--show-only", "templates/cronjob.yaml").stdout
    header = "# Generated by deploy/render-manifests.sh from helm/scdist; do not edit by hand.\n"
    assert (out_dir / "scdist.yaml").read_text() == header + default, "run deploy/render-manifests.sh"
    assert (out_dir / "reanalysis-cronjob.yaml").read_text() == header + cron, "run deploy/render-manifests.sh"
    proc = subprocess.run([str(kubectl_bin), "kustomize", str(out_dir)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    docs = [d for d in yaml.safe_load_all(proc.stdout) if d]
    assert "Job" in kinds(docs)
    for d in docs:
        assert d["metadata"].get("namespace") == "scdist" or d["kind"] in ("ClusterRole",)
        assert manifest_problems(d, crd_schemas) == [], d["kind"]
    cj = [d for d in yaml.safe_load_all(cron) if d]
    assert [d["kind"] for d in cj] == ["CronJob"] and manifest_problems(cj[0], crd_schemas) == []
