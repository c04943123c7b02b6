"""Running scdist on Kubernetes: the objects `scdist submit` sends, sending them, following them.

- :mod:`scdist.deploy.pipeline` reads and checks the pipeline spec a submission carries.
- :mod:`scdist.deploy.options` the submission's settings (:class:`SubmitOptions`).
- :mod:`scdist.deploy.objects` builds the ConfigMap and the Job / CronJob / KubeRay RayJob with
  the ``kubernetes`` Python client's models (offline, no API server needed).
- :mod:`scdist.deploy.validate` checks manifests offline: core kinds with ``kubernetes-validate``
  (strict), custom resources against their CRD's OpenAPI schema with ``jsonschema``.
- :mod:`scdist.deploy.submit` sends objects to the current kube context.
- :mod:`scdist.deploy.status` reads and follows a submitted run (``job_status``).

The Helm chart in ``helm/scdist`` deploys the same kinds of objects plus long-lived Dask and Ray
clusters; ``scdist submit --release NAME`` points a submission at such a release.
Needs the ``k8s`` extra (``pip install 'scdist[k8s]'``).
"""
from __future__ import annotations

from .options import SubmitOptions

__all__ = ["SubmitOptions"]
