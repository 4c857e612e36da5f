"""Where an image becomes a descriptor: distributed extraction into the store of ``pipeline.storage``.

Dataflow (Ray Data; the driver only describes it and counts finished shards)::

    one row per pending shard ──map_batches(decode_shard)──▶ one row per shard: pixels + metadata
        (CPU tasks: read bytes through fsspec, decode with PIL, bilinear resize, record errors)
    ──map_batches(ShardExtractor, ActorPoolStrategy)──▶ one summary row per shard
        (model actors, one GPU each or CPU actors: descriptors in mini-batches of ``batch_size``,
         then the actor writes the shard itself: Zarr rows, Parquet part, errors part, progress marker)

A Ray Data row is a whole shard so that exactly one actor writes each shard: it owns the shard's
Zarr rows (whole chunks, since ``chunk_rows`` divides ``shard_size``), its Parquet part and its
errors part. A retried or resumed shard overwrites the same files, so rows are never duplicated.
The progress marker comes last; the driver writes ``manifest.json`` after every shard has one.
Each progress marker records the Ray node and process that extracted the shard.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow as pa

from . import storage, weights
from .datasets import DATASET_SCHEMA, load_dataset
from .extract_actors import ExtractError, ShardExtractor, decode_shard, forward, to_ipc
from .images import PREPROCESSING
from .log import get_logger
from .timefmt import utc_now

__all__ = ["ExtractConfig", "ExtractResult", "ExtractError", "extract_dataset", "extract_into", "forward",
           "parse_max_failures", "register_cli", "run"]

log = get_logger(__name__)

@dataclass
class ExtractConfig:
    dataset: str = ""
    store: str = ""
    backbone: str = "r2former"
    checkpoint: str | None = None
    image_size: tuple[int, int] = (480, 640)     # (H, W)
    batch_size: int = 16                         # images per model forward
    shard_size: int = 256                        # images per shard (unit of writing and of resume)
    chunk_rows: int = 16                         # Zarr row chunk; must divide shard_size
    num_actors: int | None = None                # None: one per GPU, or one per node on CPU clusters
    threads_per_actor: int | None = None         # torch intra-op threads of a CPU actor; None: cores / actors
    max_failures: str | None = None              # "10", "0.05" or "5%" (numbers work too); None: never fail
    ray_address: str | None = None
    progress: bool = True
    device: str = "auto"                         # auto | cpu | cuda (pipeline.device decides)
    # Extra Ray resources each model actor needs, e.g. {"vpr_node": 1} with `ray start --resources
    # '{"vpr_node": 1}'` to place exactly one actor per node (SPREAD alone is best effort).
    actor_resources: dict = field(default_factory=dict)


@dataclass
class ExtractResult:
    store: str
    num_images: int
    num_extracted: int
    num_failed: int
    skipped_shards: list[int]
    images_per_second: float   # images handled by this run / seconds of its dataflow
    seconds: float             # the whole run
    too_many_failures: bool = False
    node_ids: list[str] = field(default_factory=list)  # nodes whose actors wrote shards in this run

    def summary(self) -> str:
        skipped = f", skipped {len(self.skipped_shards)} finished shard(s)" if self.skipped_shards else ""
        return (f"extracted {self.num_extracted}/{self.num_images} images into {self.store}, "
                f"{self.num_failed} failed{skipped}; {self.images_per_second:.1f} images/s, {self.seconds:.1f} s")


# ---------------------------------------------------------------- configuration checks
def parse_max_failures(value: int | float | str | None, num_images: int) -> float:
    """The largest allowed number of failed images (``inf`` when unlimited)."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none")):
        return math.inf
    text = str(value).strip()
    try:
        if text.endswith("%"):
            return float(text[:-1]) / 100.0 * num_images
        if isinstance(value, float) or "." in text:
            f = float(text)
            return f * num_images if f < 1 else f
        return float(int(text))
    except ValueError:
        raise ValueError(f"max_failures must be a count (10), a fraction (0.05) or a percentage (5%), "
                         f"got {value!r}") from None


def _check(config: ExtractConfig) -> None:
    h, w = (list(config.image_size) + [0, 0])[:2]
    if len(config.image_size) != 2 or h <= 0 or w <= 0:
        raise ValueError(f"image_size must be two positive ints (H, W), got {config.image_size!r}")
    if config.batch_size <= 0 or config.shard_size <= 0 or config.chunk_rows <= 0:
        raise ValueError("batch_size, shard_size and chunk_rows must be positive")
    if config.shard_size % config.chunk_rows:
        raise ValueError(f"chunk_rows ({config.chunk_rows}) must divide shard_size ({config.shard_size}) so "
                         "that each shard's writer owns whole Zarr chunks")
    if not config.store:
        raise ValueError("store is empty: give a folder or s3:// URL to write the extraction to")


# ---------------------------------------------------------------- driver
def _keys_digest(table: pa.Table) -> str:
    d = hashlib.blake2b(digest_size=16)
    for k in table.column("key").to_pylist():
        d.update(k.encode() + b"\0")
    return d.hexdigest()


def _plan(table: pa.Table, config: ExtractConfig, source: str, ckpt_hash: str | None) -> dict[str, Any]:
    return dict(layout_version=storage.LAYOUT_VERSION, dataset=source, num_images=table.num_rows,
                keys_digest=_keys_digest(table), backbone=config.backbone, checkpoint_hash=ckpt_hash,
                image_size=list(config.image_size), shard_size=config.shard_size, chunk_rows=config.chunk_rows)


def _check_or_write_plan(layout: storage.StoreLayout, plan: dict[str, Any]) -> None:
    if storage.exists(layout.plan):
        old = storage.read_json(layout.plan)
        keys = ("layout_version", "num_images", "keys_digest", "backbone", "checkpoint_hash", "image_size",
                "shard_size", "chunk_rows")
        diff = [k for k in keys if old.get(k) != plan.get(k)]
        if "layout_version" in diff and old.get("layout_version") in storage.RESUMABLE_LAYOUTS:
            # Layout 2 only adds the optional ``tag``: finished shards of layout 1 stay as they are
            # (their tags read as null); an extraction into a new store gets every tag.
            diff.remove("layout_version")
            log.info("%s was started with store layout %s; resuming it (tags of its finished shards read as "
                     "null)", layout.root, old.get("layout_version"))
        if diff:
            raise storage.StoreError(
                f"{layout.root} already holds an extraction with different {', '.join(diff)} "
                f"(stored: {', '.join(f'{k}={old.get(k)!r}' for k in diff)}); use a new store or delete it")
        return
    storage.write_json(layout.plan, plan)


def _shard_rows(table: pa.Table, shards: Iterable[int], shard_size: int) -> pa.Table:
    rows = []
    for s in shards:
        part = table.slice(s * shard_size, shard_size)
        rows.append(dict(shard=s, row_start=s * shard_size, rows=to_ipc(part)))
    return pa.Table.from_pylist(rows, schema=pa.schema([("shard", pa.int32()), ("row_start", pa.int64()),
                                                          ("rows", pa.large_binary())]))


def _read_markers(layout: storage.StoreLayout, shards: list[int]) -> dict[int, dict[str, Any]]:
    """Progress markers of the given shards that exist (fetched concurrently on object stores)."""
    fs, _ = storage.filesystem(layout.progress_dir)
    urls = {s: storage.filesystem(layout.progress(s))[1] for s in shards}
    try:
        blobs = fs.cat(list(urls.values()), on_error="omit")
    except FileNotFoundError:
        blobs = {}
    by_path = {k.split("://", 1)[-1]: v for k, v in blobs.items()}
    out = {}
    for s, p in urls.items():
        data = by_path.get(p.split("://", 1)[-1])
        if data is not None:
            out[s] = json.loads(data)
    return out


def _actor_plan(config: ExtractConfig) -> tuple[int, int, int | None]:
    """``(num_actors, gpus_per_actor, threads_per_actor)``."""
    import ray

    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    if gpus > 0 and config.device != "cpu":
        return (config.num_actors or gpus), 1, None
    nodes = [n for n in ray.nodes() if n.get("Alive") and n.get("Resources", {}).get("CPU", 0) > 0]
    num = config.num_actors or max(1, len(nodes))
    threads = config.threads_per_actor
    if threads is None and os.environ.get("R2F_TORCH_THREADS"):
        threads = int(os.environ["R2F_TORCH_THREADS"])
    if threads is None:
        cpus = min(int(n["Resources"]["CPU"]) for n in nodes) if nodes else (os.cpu_count() or 1)
        per_node = max(1, math.ceil(num / max(1, len(nodes))))
        threads = max(1, cpus // per_node)
    return num, 0, threads


def extract_dataset(table: pa.Table, store: str, config: ExtractConfig | None = None,
                    source: str | None = None) -> ExtractResult:
    """Extract the images of a dataset table (``pipeline.datasets`` schema) into ``store``.
    ``config`` gives the model and sizes (its ``dataset``/``store`` fields are not used here)."""
    config = config or ExtractConfig()
    config = ExtractConfig(**{**asdict(config), "store": store})
    _check(config)
    t_start = time.perf_counter()
    table = _dataset_rows(table)
    max_failed = parse_max_failures(config.max_failures, table.num_rows)
    job = _start_or_resume(table, config, source or config.dataset or "<table>")
    markers = dict(job.done)
    flow = _FlowStats()
    if job.pending:
        markers.update(_extract_pending(table, config, job, flow))
    result = _write_manifest(config, job, markers, flow, max_failed, seconds=time.perf_counter() - t_start)
    log.info("%s", result.summary())
    if result.too_many_failures:
        log.error("%d images failed, more than --max-failures %s allows; see %s", result.num_failed,
                  config.max_failures, job.layout.errors_dir)
    return result


@dataclass
class _Job:
    """One extraction into a store: its plan (checked against a store's earlier start), the shards
    already finished and those left, and what every file of the store records."""
    layout: storage.StoreLayout
    source: str
    plan: dict[str, Any]
    num_images: int
    num_shards: int
    done: dict[int, dict[str, Any]]    # progress markers of finished shards
    pending: list[int]
    model_info: dict[str, Any]
    preprocessing: dict[str, Any]

    @property
    def file_metadata(self) -> dict[str, Any]:
        return dict(layout_version=storage.LAYOUT_VERSION, model=self.model_info,
                    checkpoint_hash=self.model_info["checkpoint_hash"], preprocessing=self.preprocessing)


@dataclass
class _FlowStats:
    images: int = 0                    # images handled by this run's dataflow
    seconds: float = 0.0
    nodes: set[str] = field(default_factory=set)


def _dataset_rows(table: pa.Table) -> pa.Table:
    """The dataset table in the schema and key order that shards are cut from."""
    if "tag" not in table.column_names:  # a dataset without conditions: every tag is null
        table = table.append_column(pa.field("tag", pa.string()), pa.nulls(table.num_rows, pa.string()))
    missing = [c for c in DATASET_SCHEMA.names if c not in table.column_names]
    if missing:
        raise ValueError(f"dataset table lacks columns {missing}")
    return table.select(DATASET_SCHEMA.names).cast(DATASET_SCHEMA).sort_by("key")


def _start_or_resume(table: pa.Table, config: ExtractConfig, source: str) -> _Job:
    """Write the store's plan (or check it against the one an earlier run wrote) and find the
    shards whose progress markers say they are finished."""
    layout = storage.StoreLayout(config.store)
    ckpt_hash = weights.checkpoint_hash(config.backbone, config.checkpoint)
    plan = _plan(table, config, source, ckpt_hash)
    _check_or_write_plan(layout, plan)
    num_shards = math.ceil(table.num_rows / config.shard_size)
    done = _read_markers(layout, list(range(num_shards)))
    if done:
        log.info("resuming %s: skipping %d finished shard(s) %s", config.store, len(done), _ranges(sorted(done)))
    return _Job(layout=layout, source=source, plan=plan, num_images=table.num_rows, num_shards=num_shards,
                done=done, pending=[s for s in range(num_shards) if s not in done],
                model_info=dict(backbone=config.backbone, checkpoint=config.checkpoint, checkpoint_hash=ckpt_hash),
                preprocessing=dict(PREPROCESSING, image_size=list(config.image_size)))


def _extract_pending(table: pa.Table, config: ExtractConfig, job: _Job, flow: _FlowStats) -> dict[int, dict]:
    """Run the actor-pool dataflow over the pending shards; their progress markers (as written
    to the store where it has them: what a later resume will trust)."""
    import ray

    from .cluster import ensure_ray, pools_start_whole

    ensure_ray(config.ray_address)
    num_actors, gpus, threads = _actor_plan(config)
    to_do = job.num_images - sum(d["images"] for d in job.done.values())
    log.info("extracting %d images in %d shard(s) with %d %s actor(s)", to_do, len(job.pending), num_actors,
             "GPU" if gpus else f"CPU ({threads} threads)")
    ctx = ray.data.DataContext.get_current()
    saved = ctx.enable_progress_bars  # restored after the run
    ctx.enable_progress_bars = False  # our own bar counts images; Ray's would count shards
    ds = _dataflow(table, config, job, num_actors, gpus, threads)
    bar = _progress_bar(config.progress, total=to_do)
    t_flow = time.perf_counter()
    markers = {}
    try:
        with pools_start_whole():  # every model actor loaded before the first shard is handed out
            for marker in ds.iter_rows():
                markers[marker["shard"]] = marker
                flow.nodes.add(marker["node_id"])
                flow.images += marker["images"]
                if bar is not None:
                    bar.update(marker["images"])
    finally:
        if bar is not None:
            bar.close()
        ctx.enable_progress_bars = saved
    flow.seconds = time.perf_counter() - t_flow
    markers.update(_read_markers(job.layout, job.pending))
    missing_shards = [s for s in job.pending if s not in markers]
    if missing_shards:
        raise ExtractError(f"shards {_ranges(missing_shards)} of {config.store} have no progress marker after the run")
    return markers


def _dataflow(table: pa.Table, config: ExtractConfig, job: _Job, num_actors: int, gpus: int,
              threads: int | None):
    """The Ray Data dataset of the module docstring: pending shards -> decode -> model actors."""
    import ray

    n = job.num_images
    shard_bytes = min(config.shard_size, n) * config.image_size[0] * config.image_size[1] * 3
    # One block per shard, so decode tasks run side by side and each feeds one actor call.
    ds = ray.data.from_arrow([_shard_rows(table, [s], config.shard_size) for s in job.pending])
    ds = ds.map_batches(decode_shard, batch_size=1, batch_format="pyarrow", zero_copy_batch=True,
                        fn_kwargs=dict(image_size=tuple(config.image_size)), num_cpus=1,
                        # Reserve a worker plus a decoded shard per task; distinct remote args also keep
                        # Ray Data from fusing decoding into the model actors.
                        memory=256 * 2**20 + 2 * shard_bytes)
    ckpt_hash = job.model_info["checkpoint_hash"]
    return ds.map_batches(
        ShardExtractor, batch_size=1, batch_format="pyarrow", zero_copy_batch=True,
        fn_constructor_kwargs=dict(backbone=config.backbone, checkpoint=config.checkpoint, store=config.store,
                                   image_size=tuple(config.image_size), batch_size=config.batch_size,
                                   chunk_rows=config.chunk_rows, num_rows=n, threads=threads,
                                   device=config.device, file_metadata=job.file_metadata,
                                   checkpoint_sha256=ckpt_hash if config.checkpoint else None),
        compute=ray.data.ActorPoolStrategy(size=num_actors, max_tasks_in_flight_per_actor=2),
        # Ray Data restarts a dead actor and retries its shard (the rewrite is idempotent).
        num_cpus=1, num_gpus=gpus, **({"resources": dict(config.actor_resources)} if config.actor_resources else {}))


def _write_manifest(config: ExtractConfig, job: _Job, markers: dict[int, dict[str, Any]], flow: _FlowStats,
                    max_failed: float, seconds: float) -> ExtractResult:
    """Every shard's progress marker -> ``manifest.json`` (the store is then finished) and the result."""
    n = job.num_images
    extracted = sum(m["extracted"] for m in markers.values())
    failed = sum(m["failed"] for m in markers.values())
    tokens = next((m["tokens"] for m in markers.values() if m.get("tokens")), None)
    model_info = {**job.model_info, **next((m.get("model_info") or {} for m in markers.values()), {})}
    dim = next((m["global_dim"] for m in markers.values() if m.get("tokens")), storage.GLOBAL_DIM)
    manifest = dict(
        layout_version=storage.LAYOUT_VERSION, dataset=job.source, model=model_info, preprocessing=job.preprocessing,
        image_size=list(config.image_size), shard_size=config.shard_size, chunk_rows=config.chunk_rows,
        tokens=tokens, token_dim=storage.TOKEN_DIM, global_dim=dim, rows=n, shards=list(range(job.num_shards)),
        counts=dict(images=n, extracted=extracted, failed=failed), keys_digest=job.plan["keys_digest"],
        finished_at=utc_now(),
    )
    storage.write_json(job.layout.manifest, manifest)
    return ExtractResult(store=config.store, num_images=n, num_extracted=extracted, num_failed=failed,
                         skipped_shards=sorted(job.done),
                         images_per_second=flow.images / flow.seconds if flow.seconds else 0.0,
                         seconds=seconds, too_many_failures=failed > max_failed, node_ids=sorted(flow.nodes))


def run(config: ExtractConfig) -> ExtractResult:
    """Extract ``config.dataset`` (any ``pipeline.datasets`` description) into ``config.store``."""
    _check(config)
    storage.check_output(config.store, "--store")  # before Ray starts or a model loads
    table = load_dataset(config.dataset)
    return extract_dataset(table, config.store, config, source=config.dataset)


def _ranges(xs: list[int]) -> str:
    if not xs:
        return "[]"
    out, start, prev = [], xs[0], xs[0]
    for x in xs[1:] + [None]:
        if x is not None and x == prev + 1:
            prev = x
            continue
        out.append(f"{start}" if start == prev else f"{start}-{prev}")
        if x is not None:
            start = prev = x
    return "[" + ", ".join(out) + "]"


def _progress_bar(enabled: bool, total: int):
    if not enabled:
        return None
    from tqdm import tqdm
    return tqdm(total=total, unit="img", desc="extract", file=sys.stderr, dynamic_ncols=True)


# ---------------------------------------------------------------- CLI
def extract_into(dataset: str, store: str, backbone: str, checkpoint: str | None, image_size: list[int],
                 extra: dict[str, Any] | None = None) -> ExtractResult:
    """Run the extraction stage on ``dataset`` into ``store`` (resumes a partial store)."""
    cfg = ExtractConfig(dataset=dataset, store=store, backbone=backbone, checkpoint=checkpoint,
                        image_size=list(image_size), **(extra or {}))
    return run(cfg)


def register_cli(subparsers) -> None:
    from .config import add_config_arguments, add_image_size_argument

    p = subparsers.add_parser("extract", help="extract global descriptors and local tokens into a store",
                              description=__doc__.split("\n\n")[0])
    add_config_arguments(p)
    p.add_argument("--dataset", help="folder/URL, VG folder, manifest .csv/.parquet or sequence:<folder>")
    p.add_argument("--store", help="output folder or s3:// URL")
    p.add_argument("--backbone", choices=("r2former", "efficientnet-lite0"))
    p.add_argument("--checkpoint")
    add_image_size_argument(p)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--shard-size", type=int)
    p.add_argument("--num-actors", type=int)
    p.add_argument("--max-failures", help="count (10), fraction (0.05) or percentage (5%%) of failed images "
                                          "that still exits 0")
    p.add_argument("--ray-address")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cli)


def _cli(args: argparse.Namespace) -> int:
    from .config import config_from_args

    if args.no_progress:
        args.progress = False
    config = config_from_args(ExtractConfig, args, ("dataset", "store", "backbone", "checkpoint", "image_size",
                                                    "batch_size", "shard_size", "num_actors", "max_failures",
                                                    "ray_address", "progress"))
    if not config.dataset:
        raise ValueError("--dataset is required (or `dataset:` in --config)")
    result = run(config)
    print(result.summary())
    return 3 if result.too_many_failures else 0
