"""Write deploy/requirements.lock: exact pins of scdist[k8s]'s runtime closure, from an environment
where it is installed and tested (python deploy/make_lock.py > deploy/requirements.lock).

torch is left out: the Dockerfiles install `torch==$TORCH_VERSION` from the CPU or CUDA wheel index.
"""
from __future__ import annotations

import sys
from importlib.metadata import PackageNotFoundError, distribution

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ENV = {"python_version": "3.11", "python_full_version": "3.11.9", "sys_platform": "linux",
       "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
       "implementation_name": "cpython", "platform_python_implementation": "CPython"}
SKIP = {"scdist", "torch"}


def closure(root: str, extras: tuple[str, ...]) -> dict[str, tuple[str, str]]:
    seen: dict[str, tuple[str, str, set]] = {}

    def walk(name: str, wanted: tuple[str, ...]) -> None:
        key = canonicalize_name(name)
        try:
            dist = distribution(name)
        except PackageNotFoundError:
            sys.exit(f"{name} is required but not installed here")
        if key in seen and set(wanted) <= seen[key][2]:
            return
        seen.setdefault(key, (dist.metadata["Name"], dist.version, set()))[2].update(wanted)
        for text in dist.requires or []:
            req = Requirement(text)
            if req.marker is None or any(req.marker.evaluate(dict(ENV, extra=e)) for e in wanted):
                walk(req.name, tuple(req.extras))
            elif req.marker.evaluate(dict(ENV, extra="")) and "extra" not in str(req.marker):
                walk(req.name, tuple(req.extras))

    walk(root, extras)
    return {k: (n, v) for k, (n, v, _) in seen.items()}


if __name__ == "__main__":
    print("# Exact pins of scdist[k8s]'s runtime dependencies (Python 3.11, linux x86_64), made by")
    print("# deploy/make_lock.py from the tested environment. torch is pinned in the Dockerfiles.")
    for key, (name, version) in sorted(closure("scdist", ("k8s",)).items()):
        if key not in SKIP:
            print(f"{name}=={version}")
