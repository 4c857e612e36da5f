"""Connecting to Ray: an existing cluster when one is named, otherwise an embedded local one.

Workers get the storage settings (S3 endpoint, AWS credentials, R2F_* knobs) through the
runtime environment, so that ``s3://`` URLs resolve the same on every node. Values are passed,
never logged.
"""
from __future__ import annotations

import os

from .log import get_logger

log = get_logger(__name__)

_FORWARD_PREFIXES = ("AWS_", "R2F_")


def forwarded_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k.startswith(_FORWARD_PREFIXES)}


def ensure_ray(address: str | None = None, num_cpus: int | None = None,
               object_store_memory: int | None = None) -> None:
    """Start or join Ray once per process. ``address`` (or ``RAY_ADDRESS``) joins a running cluster;
    otherwise a local Ray starts in-process."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    runtime_env = {"env_vars": forwarded_env()}
    if address:
        log.info("joining Ray cluster at %s", address)
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=True)
        return
    store = object_store_memory or int(os.environ.get("R2F_OBJECT_STORE_BYTES", str(512 * 1024 * 1024)))
    log.info("starting an embedded local Ray (%s CPUs)", num_cpus or os.cpu_count())
    # address="local": without it ray.init() joins whatever cluster /tmp/ray/ray_current_cluster
    # names (any `ray start --head` on this machine), instead of starting the embedded one.
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, object_store_memory=store,
             runtime_env=runtime_env, log_to_driver=True)


def cluster_gpus() -> int:
    import ray

    return int(ray.cluster_resources().get("GPU", 0)) if ray.is_initialized() else 0
