"""The container image definitions (deploy/Dockerfile, deploy/Dockerfile.cuda), checked offline.

No Docker engine runs here, so the images are not built: the Dockerfiles are linted with
hadolint and parsed for what the cluster relies on (non-root user 10001 matching the chart's
runAsUser, the `scdist` entrypoint, installs pinned by deploy/requirements.lock), and the lock is
checked against pyproject's dependencies.
"""
from __future__ import annotations

import re
import subprocess

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from k8s_fixtures import ROOT, hadolint_bin  # noqa: F401  (fixture)

DOCKERFILES = [ROOT / "deploy" / "Dockerfile", ROOT / "deploy" / "Dockerfile.cuda"]
LOCK = ROOT / "deploy" / "requirements.lock"


def instructions(path):
    """(INSTRUCTION, argument) pairs with line continuations joined and comments dropped."""
    text = re.sub(r"\\\n\s*", " ", path.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def lock_pins():
    pins = {}
    for line in LOCK.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, sep, version = line.partition("==")
            assert sep and version and not re.search(r"[<>~!*,;]", version), f"not an exact pin: {line!r}"
            pins[canonicalize_name(name)] = version
    return pins


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_clean(hadolint_bin, path):
    proc = subprocess.run([str(hadolint_bin), "--failure-threshold", "info", str(path)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_image_runs_scdist_as_the_charts_non_root_user(path):
    ins = instructions(path)
    froms = [a for i, a in ins if i == "FROM"]
    assert froms and all(re.match(r"python:3\.11(\.\d+)?-slim", f) for f in froms)
    users = [a for i, a in ins if i == "USER"]
    assert users and users[-1].split(":")[0] not in ("0", "root")
    values = yaml.safe_load((ROOT / "helm" / "scdist" / "values.yaml").read_text())
    assert users[-1] == f"{values['podSecurityContext']['runAsUser']}:{values['podSecurityContext']['runAsGroup']}"
    # The last USER comes after every RUN (nothing runs as root at the end).
    last_user = max(k for k, (i, _) in enumerate(ins) if i == "USER")
    assert all(i != "RUN" for i, _ in ins[last_user:])
    assert [a for i, a in ins if i == "ENTRYPOINT"] == ['["scdist"]']


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_image_installs_are_pinned(path):
    runs = " ".join(a for i, a in instructions(path) if i == "RUN")
    installs = re.findall(r"pip install ([^&]+)", runs)
    assert installs
    for cmd in installs:
        if "-r /tmp/requirements.lock" in cmd:
            assert "--no-deps" in cmd                      # nothing unpinned comes in beside the lock
        elif "torch==" in cmd:
            assert '"torch==${TORCH_VERSION}"' in cmd
        else:
            assert "--no-deps" in cmd and "/src" in cmd     # scdist itself, from the build context
    args = dict(a.split("=", 1) for i, a in instructions(path) if i == "ARG" and "=" in a)
    assert re.fullmatch(r"\d+\.\d+\.\d+", args["TORCH_VERSION"])


def test_lock_pins_every_runtime_dependency():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = lock_pins()
    args = dict(a.split("=", 1) for i, a in instructions(DOCKERFILES[0]) if i == "ARG" and "=" in a)
    pins_with_torch = {**pins, "torch": args["TORCH_VERSION"]}
    needed = project["dependencies"] + project["optional-dependencies"]["k8s"]
    for text in needed:
        req = Requirement(text)
        name = canonicalize_name(req.name)
        assert name in pins_with_torch, f"{req.name} is not in deploy/requirements.lock: run deploy/make_lock.py"
        assert req.specifier.contains(pins_with_torch[name], prereleases=True), \
            f"lock pins {req.name}=={pins_with_torch[name]}, pyproject wants {req.specifier}"
    assert "torch" not in pins  # the CPU / CUDA wheel is chosen by the Dockerfile
