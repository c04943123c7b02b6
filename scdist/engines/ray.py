"""Ray adapter: connect to (or start) Ray once per process."""
from __future__ import annotations

import contextlib
import os
from typing import Iterator

ENV_RAY_ADDRESS = "SCDIST_RAY_ADDRESS"


@contextlib.contextmanager
def ray_session(address: str | None = None, *, num_cpus: int | None = None) -> Iterator[None]:
    """Make sure Ray is initialised for the duration of the block.

    If Ray is already initialised in this process (a test session, a user's notebook), it is
    used and left running. Otherwise connect to ``address`` / ``SCDIST_RAY_ADDRESS`` (not ours
    to stop) or start a local instance, which is shut down on exit.
    """
    import ray

    if ray.is_initialized():
        yield
        return
    address = address or os.environ.get(ENV_RAY_ADDRESS) or None
    kwargs = dict(include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    if address:
        from ..errors import ClusterError
        _probe(address)
        try:
            info = ray.init(address=address, **kwargs)
        except (ConnectionError, RuntimeError) as exc:
            raise ClusterError(f"cannot reach Ray at {address!r}: {exc}", field="ray.address",
                               fix="start a head with `ray start --head` or correct the address") from exc
        url = getattr(info, "dashboard_url", None)
        if url:  # the head's dashboard, when it runs one
            import logging

            logging.getLogger("scdist").info("ray dashboard: http://%s", url.removeprefix("http://"))
    else:
        ray.init(num_cpus=num_cpus or os.cpu_count(), **kwargs)
    try:
        yield
    finally:
        ray.shutdown()


def _probe(address: str, timeout: float = 3.0) -> None:
    """Fail fast when a ``host:port`` / ``ray://host:port`` head does not answer at all.

    ``ray.init`` keeps retrying an unreachable GCS for a minute or more; one TCP connect
    tells a typo or a stopped head apart within seconds. ``auto`` is left to Ray.
    """
    import socket

    from ..errors import ClusterError

    hostport = address.split("://", 1)[-1]
    if hostport in ("auto", "local") or ":" not in hostport:
        return
    host, _, port = hostport.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            pass
    except (OSError, ValueError) as exc:
        raise ClusterError(f"cannot reach Ray at {address!r}: {exc}", field="ray.address",
                           fix="start a head with `ray start --head` or correct the address "
                               "(also --ray-address / SCDIST_RAY_ADDRESS)") from exc
