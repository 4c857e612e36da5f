"""Where one photo becomes a place, online: a Ray Serve application over the published state.

``r2f serve --database-store D --index I`` (``start(ServeConfig)``)::

    ensure_ray (embedded local Ray, or RAY_ADDRESS) ─► serve.start on host:port (127.0.0.1 by default)
    app.build_app:
      QueryExtractor  (extractor.py) the store's model; @serve.batch over concurrent requests
      Localizer       (app.py) FastAPI ingress: checks, decode, extract, then ServingState.answer
                      (state.py: top-K on the pinned index version, tokens through the rerank
                      stage's chunk cache, PairScorer, the reranked-order rule)
      StateFollower   (state.py) polls CURRENT every poll_s; leases every state it may answer from
    page.py           the page at / (an upload, the top-5, a plot of positions; no map tiles)

An answer equals ``r2f run``'s ranked list for the same stores, reranker and K: the same decode
and resize, model and forward pass, the same float16 rounding of tokens as the store, the same
search merge, scorer, RANSAC pixel scale and order rule. See docs/serve.md.
"""
from __future__ import annotations

import argparse
import os
import signal
import threading
import time
from dataclasses import dataclass

from ..log import get_logger

log = get_logger(__name__)

TOKEN_ENV = "R2F_SERVE_TOKEN"  # the optional bearer token comes from here, never from a flag (ps shows flags)


@dataclass
class ServeConfig:
    database_store: str = ""
    index_dir: str = ""
    reranker: str = "auto"            # auto | r2former | ransac | none: the default of a request
    candidates: int = 10              # top-K reranked when a request does not say
    max_candidates: int = 100         # a request's `candidates` is capped here
    host: str = "127.0.0.1"           # no authentication of its own: expose it only behind an authenticated ingress
    port: int = 8000
    backbone: str | None = None       # default: the store's
    checkpoint: str | None = None     # default: the store's (same weights required: checkpoint_hash)
    poll_s: float = 2.0               # CURRENT is read this often
    keep_previous_s: float = 60.0     # a replaced state stays held (and leased) this long after its last request
    max_body_bytes: int = 20 * 2**20  # larger uploads get 413, refused from Content-Length before reading
    max_queue: int = 16               # requests one ingress replica takes at once; more get 503 + Retry-After
    retry_after_s: int = 1
    ingress_replicas: int = 1
    extractor_replicas: int = 1
    replica_cpus: float = 0.5         # Ray CPUs each replica reserves: a 2-CPU machine still runs a reindex
    max_batch_size: int = 8           # queries per extraction forward pass (@serve.batch)
    batch_wait_s: float = 0.005       # how long a batch waits to fill
    extract_threads: int | None = None  # torch threads of a CPU extractor (default R2F_TORCH_THREADS or cores)
    work_threads: int = 2             # decode/search/rerank threads per ingress replica
    use_gpu: str = "auto"
    cache_chunks: int = 64            # decoded Zarr chunks of database tokens kept per held state
    lease_heartbeat_s: float = 30.0
    request_timeout_s: float = 60.0   # an extraction slower than this answers 503
    app_name: str = "r2f-localize"


def check_config(cfg: ServeConfig) -> ServeConfig:
    from ..rerank.rerankers import RERANKERS

    for name in ("database_store", "index_dir"):
        if not getattr(cfg, name):
            raise ValueError(f"r2f serve needs --{name.replace('_dir', '').replace('_', '-')}")
    if cfg.reranker not in RERANKERS:
        raise ValueError(f"--reranker must be one of {', '.join(RERANKERS)}, got {cfg.reranker!r}")
    if cfg.candidates < 1 or cfg.max_candidates < 1:
        raise ValueError("--candidates and --max-candidates must be >= 1")
    if cfg.candidates > cfg.max_candidates:
        raise ValueError(f"--candidates {cfg.candidates} is over --max-candidates {cfg.max_candidates}")
    if not 0 < cfg.replica_cpus or cfg.poll_s <= 0 or cfg.max_queue < 1 or cfg.max_body_bytes < 1:
        raise ValueError("replica_cpus, poll_s, max_queue and max_body_bytes must be positive")
    return cfg


@dataclass
class ServeRunning:
    url: str
    app_name: str
    started_ray: bool

    def stop(self) -> None:
        from ray import serve

        serve.delete(self.app_name)
        serve.shutdown()
        if self.started_ray:
            import ray
            ray.shutdown()


def start(cfg: ServeConfig, token: str | None = None) -> ServeRunning:
    """Start the application; returns when it answers /health at its URL."""
    import urllib.request

    import ray
    from ray import serve

    from .. import storage
    from ..cluster import ensure_ray
    from .app import build_app

    check_config(cfg)
    storage.read_manifest(cfg.database_store)  # a missing store is one line, before Ray starts
    started = not ray.is_initialized()
    ensure_ray()
    serve.start(http_options={"host": cfg.host, "port": cfg.port})
    serve.run(build_app(cfg, token), name=cfg.app_name, route_prefix="/", blocking=False)
    host = "127.0.0.1" if cfg.host in ("0.0.0.0", "::") else cfg.host
    url = f"http://{host}:{cfg.port}/"
    deadline = time.monotonic() + 120
    while True:  # serve.run returns once replicas are up; the proxy may need a moment more
        try:
            with urllib.request.urlopen(url + "health", timeout=5) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"the service did not answer {url}health within 120 s")
        time.sleep(0.2)
    return ServeRunning(url=url, app_name=cfg.app_name, started_ray=started)


def serve_forever(cfg: ServeConfig) -> int:
    """Start, print the URL, stop cleanly on SIGINT/SIGTERM."""
    stop = threading.Event()

    def on_signal(*_):
        stop.set()

    running = start(cfg, os.environ.get(TOKEN_ENV) or None)
    # After Ray started: ray.init installs a fatal-signal handler for SIGTERM that would abort the
    # process instead of letting it delete the application and shut Ray down.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    print(f"serving {cfg.database_store} ({cfg.index_dir}) at {running.url}", flush=True)
    try:
        while not stop.wait(1.0):
            pass
    finally:
        log.info("serve: stopping")
        running.stop()
    print("stopped", flush=True)
    return 0


# ---------------------------------------------------------------- CLI
def register_cli(subparsers: argparse._SubParsersAction) -> None:
    from ..config import add_config_arguments

    p = subparsers.add_parser("serve", help="an HTTP localization service over the published index (Ray Serve)")
    add_config_arguments(p)
    p.add_argument("--database-store")
    p.add_argument("--index", dest="index_dir")
    p.add_argument("--reranker", choices=("auto", "r2former", "ransac", "none"))
    p.add_argument("--candidates", type=int, help="top-K reranked per request (default 10)")
    p.add_argument("--max-candidates", type=int, help="cap on a request's candidates (default 100)")
    p.add_argument("--host", help="default 127.0.0.1: the service has no authentication of its own")
    p.add_argument("--port", type=int, help="default 8000")
    p.add_argument("--checkpoint", help="default: the one the store records")
    p.add_argument("--backbone", help="default: the one the store records")
    p.add_argument("--poll-s", type=float, help="how often the published pointer is read (default 2)")
    p.add_argument("--max-body-bytes", type=int, help="uploads over this get 413 (default 20 MiB)")
    p.add_argument("--max-queue", type=int, help="requests in progress per ingress replica before 503 (default 16)")
    p.set_defaults(func=_cli)


def _cli(args: argparse.Namespace) -> int:
    from ..config import config_from_args

    cfg = config_from_args(ServeConfig, args, ("database_store", "index_dir", "reranker", "candidates",
                                               "max_candidates", "host", "port", "checkpoint", "backbone",
                                               "poll_s", "max_body_bytes", "max_queue"))
    return serve_forever(cfg)
