"""Settings of one submission (what `scdist submit` flags set), checked before anything is built."""
from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ..errors import SpecError

# RFC 1123 label; 40 characters leaves room for suffixes such as "-20260101-120000-pipeline".
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_CRON = re.compile(r"^(@(yearly|annually|monthly|weekly|daily|midnight|hourly)|(\S+\s+){4}\S+)$")
_QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?(m|k|Ki|Mi|Gi|Ti|Pi|Ei|M|G|T|P|E)?$")
CHART_NAME = "scdist"


def default_image() -> str:
    """The image built from deploy/Dockerfile for this scdist version."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"scdist/scdist:{version('scdist')}"
    except PackageNotFoundError:  # pragma: no cover - running from a source tree
        return "scdist/scdist:latest"


def release_fullname(release: str) -> str:
    """The chart's ``scdist.fullname`` for a release (helm/scdist/templates/_helpers.tpl)."""
    name = release if CHART_NAME in release else f"{release}-{CHART_NAME}"
    return name[:40].rstrip("-")


def dns_label(text: str) -> str:
    """A valid object-name stem from free text (a spec file name): lower case, [a-z0-9-], <= 40."""
    s = re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")
    return s[:40].rstrip("-") or "scdist"


class SubmitOptions(BaseModel):
    """How to run a pipeline on Kubernetes.

    ``release`` points the run at an installed ``helm/scdist`` release: its Dask scheduler
    Service, its Ray head (when the spec has Ray stages), its store PVC and ServiceAccount,
    unless given explicitly. Without a release and without addresses, the run starts an
    embedded Dask LocalCluster in its own pod, and Ray stages get a KubeRay RayJob.
    """

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="stem of the object names")
    namespace: str = "default"
    image: str = Field(default_factory=default_image)
    gpu_image: str | None = Field(None, description="image of GPU Ray workers (default: <image>-cuda)")
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    schedule: str | None = None
    time_zone: str | None = None
    concurrency_policy: Literal["Forbid", "Replace"] = "Forbid"
    successful_jobs_history_limit: int = Field(3, ge=0, le=100)
    failed_jobs_history_limit: int = Field(3, ge=0, le=100)
    starting_deadline_seconds: int | None = Field(3600, ge=10)
    ray_job: bool | None = None
    release: str | None = None
    dask_address: str | None = None
    ray_address: str | None = None
    pvc: str | None = None
    mount_path: str = "/data"
    secret: str | None = None
    service_account: str | None = None
    cpu: str = "1"
    memory: str = "4Gi"
    backoff_limit: int = Field(4, ge=0)
    ttl_seconds_after_finished: int | None = Field(604800, ge=0)
    active_deadline_seconds: int | None = Field(None, ge=1)
    ray_version: str = "2.60.0"
    # The head runs no tasks (num-cpus 0), so a RayJob needs at least one worker.
    ray_workers: int = Field(2, ge=1)
    ray_worker_cpu: str = "2"
    ray_worker_memory: str = "8Gi"
    ray_worker_gpus: int = Field(0, ge=0)
    shm_size: str = "2Gi"

    @field_validator("name", "namespace", "release", "pvc", "secret", "service_account")
    @classmethod
    def _dns(cls, v):
        if v is not None and (len(v) > 63 or not _DNS_LABEL.match(v)):
            raise ValueError("must be lower-case letters, digits and '-', starting and ending "
                             "with a letter or digit, at most 63 characters")
        return v

    @field_validator("name")
    @classmethod
    def _short(cls, v):
        if len(v) > 40:
            raise ValueError("at most 40 characters (suffixes are added to it)")
        return v

    @field_validator("schedule")
    @classmethod
    def _cron(cls, v):
        if v is not None and not _CRON.match(v.strip()):
            raise ValueError("must be five cron fields ('0 3 * * 0') or a macro such as @weekly")
        return v.strip() if v else v

    @field_validator("cpu", "memory", "ray_worker_cpu", "ray_worker_memory", "shm_size")
    @classmethod
    def _quantity(cls, v):
        if not _QUANTITY.match(v):
            raise ValueError("must be a Kubernetes quantity such as 500m, 2, 4Gi")
        return v

    @field_validator("mount_path")
    @classmethod
    def _abs(cls, v):
        if not v.startswith("/"):
            raise ValueError("must be an absolute path")
        return v

    @classmethod
    def make(cls, **kwargs) -> "SubmitOptions":
        """Build from keyword arguments (CLI flags), turning pydantic errors into SpecError."""
        try:
            return cls(**{k: v for k, v in kwargs.items() if v is not None})
        except ValidationError as exc:
            err = exc.errors()[0]
            key = ".".join(str(p) for p in err["loc"])
            raise SpecError(f"{err['msg']} (got {err.get('input')!r})", field=f"--{key.replace('_', '-')}",
                            fix="correct the option; see `scdist submit --help`") from None

    # Resolved settings ---------------------------------------------------------------------

    @property
    def fullname(self) -> str | None:
        return release_fullname(self.release) if self.release else None

    def resolved_dask_address(self) -> str | None:
        if self.dask_address:
            return self.dask_address
        if self.release:
            return f"tcp://{self.fullname}-dask-scheduler:8786"
        return None

    def resolved_ray_address(self, needs_ray: bool = True) -> str | None:
        """An explicit address, else the release's Ray head when the spec has a Ray stage."""
        if self.ray_address:
            return self.ray_address
        if self.release and needs_ray:
            return f"ray://{self.fullname}-ray-head-svc:10001"
        return None

    def resolved_pvc(self) -> str | None:
        if self.pvc:
            return self.pvc
        if self.release and not self.secret:
            return f"{self.fullname}-store"
        return None

    def resolved_gpu_image(self) -> str:
        """The CUDA variant (deploy/Dockerfile.cuda), tagged "<tag>-cuda" like the chart's default."""
        return self.gpu_image or f"{self.image}-cuda"

    def resolved_service_account(self) -> str | None:
        if self.service_account:
            return self.service_account
        return self.fullname
