"""Connecting to Ray: an existing cluster when one is named, otherwise an embedded local one.

Credentials never travel in the runtime environment: Ray keeps a job's runtime_env in its config
(dashboard, state API, GCS). Workers get them the way the cluster provides them: the nodes' own
environment (the KubeRay secret as envFrom on every pod, variables set before ``ray start``), an
instance profile or pod role; the embedded local Ray's raylet and workers are children of the
driver and inherit its environment. Only non-secret storage settings (endpoint, region, retries,
R2F_* knobs) are forwarded, so that ``s3://`` URLs resolve the same on every node
(infra/OPERATIONS.md, "Credentials").
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

from .log import SECRET_ENV_NAME, get_logger

log = get_logger(__name__)

# An allow-list: a new AWS variable is not forwarded until it is known to hold no secret.
FORWARDED_AWS = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION",
                 "AWS_RETRY_MODE", "AWS_MAX_ATTEMPTS")
# Every worker process logs through pipeline.log's redacting handler.
WORKER_SETUP_HOOK = "pipeline.log.setup_worker_logging"


def forwarded_env() -> dict[str, str]:
    """The settings every Ray worker gets from the driver: the non-secret AWS ones above and the
    project's R2F_* knobs, except any R2F_* whose name says it holds a secret."""
    return {k: v for k, v in os.environ.items()
            if k in FORWARDED_AWS or (k.startswith("R2F_") and not SECRET_ENV_NAME.search(k))}


def runtime_env() -> dict:
    return {"env_vars": forwarded_env(), "worker_process_setup_hook": WORKER_SETUP_HOOK}


def ensure_ray(address: str | None = None, num_cpus: int | None = None,
               object_store_memory: int | None = None) -> None:
    """Start or join Ray once per process. ``address`` (or ``RAY_ADDRESS``) joins a running cluster;
    otherwise a local Ray starts in-process."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        log.info("joining Ray cluster at %s", address)
        ray.init(address=address, runtime_env=runtime_env(), log_to_driver=True)
        return
    store = object_store_memory or int(os.environ.get("R2F_OBJECT_STORE_BYTES", str(512 * 1024 * 1024)))
    log.info("starting an embedded local Ray (%s CPUs)", num_cpus or os.cpu_count())
    # address="local": without it ray.init() joins whatever cluster /tmp/ray/ray_current_cluster
    # names (any `ray start --head` on this machine), instead of starting the embedded one.
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, object_store_memory=store,
             runtime_env=runtime_env(), log_to_driver=True)


def cluster_gpus() -> int:
    import ray

    return int(ray.cluster_resources().get("GPU", 0)) if ray.is_initialized() else 0


@contextlib.contextmanager
def pools_start_whole() -> Iterator[None]:
    """Inside the block, a Ray Data actor pool starts every one of its initial actors before the
    first input is handed out: otherwise the actor that loads first takes the early inputs while
    the others still start (the job then runs below the rate of its slots), and a pool the cluster
    cannot place (more GPUs asked than it has) fails with a clear timeout instead of waiting
    forever. The timeout is ``R2F_ACTOR_START_TIMEOUT_S`` (default 900 s)."""
    import ray

    ctx = ray.data.DataContext.get_current()
    saved = ctx.wait_for_min_actors_s
    ctx.wait_for_min_actors_s = int(os.environ.get("R2F_ACTOR_START_TIMEOUT_S", "900"))
    try:
        yield
    finally:
        ctx.wait_for_min_actors_s = saved
