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
import io
import json
import math
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable

import numpy as np
import pyarrow as pa

from . import storage, weights
from .config import jsonable
from .datasets import DATASET_SCHEMA, load_dataset
from .images import PREPROCESSING, ImageReadError, content_hash, decode_resize, read_bytes
from .log import get_logger
from .timefmt import utc_now

log = get_logger(__name__)

# Columns of the per-image metadata that travels with a decoded shard.
_META_SCHEMA = pa.schema([
    ("image_id", pa.int64()), ("path", pa.string()), ("utm_east", pa.float64()), ("utm_north", pa.float64()),
    ("heading", pa.float64()), ("timestamp", pa.string()), ("place_id", pa.string()), ("width", pa.int32()),
    ("height", pa.int32()), ("row", pa.int64()), ("content_hash", pa.string()), ("tag", pa.string()),
])


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


class ExtractError(RuntimeError):
    pass


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


# ---------------------------------------------------------------- stage 1: CPU tasks
def _ipc(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    with pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    return sink.getvalue()


def _from_ipc(data: bytes) -> pa.Table:
    return pa.ipc.open_stream(pa.py_buffer(data)).read_all()


def decode_shard(batch: pa.Table, image_size: tuple[int, int], io_threads: int = 8) -> pa.Table:
    """One shard row (its dataset rows as Arrow IPC) -> one row with the resized pixels of every
    readable image, their metadata and the errors of the others."""
    out = []
    for i in range(batch.num_rows):
        rows = _from_ipc(batch.column("rows")[i].as_py())
        row_start = batch.column("row_start")[i].as_py()
        paths = rows.column("path").to_pylist()

        def load(path: str):
            try:
                data = read_bytes(path)
                pixels, width, height = decode_resize(data, image_size)
                return pixels, width, height, content_hash(data)
            except ImageReadError as exc:
                return exc

        # Remote reads are latency bound, so they overlap; local reads stay sequential (CPU bound).
        remote = any("://" in p for p in paths[:1])
        if remote and len(paths) > 1:
            with ThreadPoolExecutor(max_workers=io_threads) as pool:
                loaded = list(pool.map(load, paths))
        else:
            loaded = [load(p) for p in paths]
        ok = [j for j, r in enumerate(loaded) if not isinstance(r, ImageReadError)]
        meta = rows.select(["image_id", "path", "utm_east", "utm_north", "heading", "timestamp", "place_id"])
        meta = meta.take(pa.array(ok, pa.int64()))
        tags = rows.column("tag").take(pa.array(ok, pa.int64()))
        meta = meta.append_column("width", pa.array([loaded[j][1] for j in ok], pa.int32()))
        meta = meta.append_column("height", pa.array([loaded[j][2] for j in ok], pa.int32()))
        meta = meta.append_column("row", pa.array([row_start + j for j in ok], pa.int64()))
        meta = meta.append_column("content_hash", pa.array([loaded[j][3] for j in ok], pa.string()))
        meta = meta.append_column("tag", tags)
        errors = pa.table({
            "path": [paths[j] for j, r in enumerate(loaded) if isinstance(r, ImageReadError)],
            "stage": [r.stage for r in loaded if isinstance(r, ImageReadError)],
            "reason": [r.reason for r in loaded if isinstance(r, ImageReadError)],
        }, schema=storage.ERROR_SCHEMA)
        pixels = np.stack([loaded[j][0] for j in ok]) if ok else np.zeros((0, *image_size, 3), np.uint8)
        out.append(dict(shard=batch.column("shard")[i].as_py(), row_start=row_start, n=len(paths),
                        meta=_ipc(meta.cast(_META_SCHEMA)), errors=_ipc(errors), pixels=pixels.tobytes()))
    return pa.Table.from_pylist(out, schema=pa.schema([
        ("shard", pa.int32()), ("row_start", pa.int64()), ("n", pa.int32()),
        ("meta", pa.large_binary()), ("errors", pa.large_binary()), ("pixels", pa.large_binary())]))


# ---------------------------------------------------------------- stage 2: model actors
def forward(model, pixels: np.ndarray, batch_size: int, plan=None) -> tuple[np.ndarray, np.ndarray]:
    """Descriptors of uint8 (N, H, W, 3) images: ``global_descriptor`` (N, D) float32 and
    ``local_tokens`` (N, T, 131) float32. The one forward path of actors and direct calls."""
    import torch

    from .device import autocast, choose_device
    from .model import normalize_images

    plan = plan or choose_device("cpu")
    globals_, tokens = [], []
    with torch.inference_mode():
        for start in range(0, len(pixels), batch_size):
            # uint8 goes to the device and is normalised there: a quarter of the float32 transfer.
            x = torch.from_numpy(np.array(pixels[start:start + batch_size], copy=True))
            x = normalize_images(x.to(plan.device, non_blocking=True))
            with autocast(plan):
                feats = model.extract(x)
            feats = feats.cpu_float()
            globals_.append(feats.global_descriptor.numpy())
            tokens.append(feats.local_tokens.numpy())
    return np.concatenate(globals_), np.concatenate(tokens)


class ShardExtractor:
    """A model actor: builds the model once, then extracts and writes whole shards."""

    def __init__(self, backbone: str, checkpoint: str | None, store: str, image_size: tuple[int, int],
                 batch_size: int, chunk_rows: int, num_rows: int, threads: int | None, device: str,
                 file_metadata: dict[str, Any], checkpoint_sha256: str | None = None):
        import ray

        from .device import choose_device, set_cpu_threads

        self.plan = choose_device(device)
        if not self.plan.is_cuda:
            set_cpu_threads(threads)
        # R²Former's positional-embedding grid follows the image size; other backbones are size-free.
        kwargs = {"img_size": tuple(image_size)} if backbone == "r2former" else {}
        # The bytes the driver hashed into the plan, or an error: a store never records other weights.
        model = weights.build_model(backbone, checkpoint, expected_sha256=checkpoint_sha256, **kwargs)
        self.model = (model.place(self.plan) if hasattr(model, "place") else model.to(self.plan.device)).eval()
        self.store, self.layout = store, storage.StoreLayout(store)
        self.image_size, self.batch_size = tuple(image_size), batch_size
        self.chunk_rows, self.num_rows = chunk_rows, num_rows
        self.model_info = jsonable(getattr(model, "info", {}) or {})
        self.file_metadata = {**file_metadata, "model": {**file_metadata.get("model", {}), **self.model_info}}
        self.node_id = ray.get_runtime_context().get_node_id()
        self.tokens_array = None
        self.global_dim = int(getattr(getattr(model, "config", None), "global_dim", storage.GLOBAL_DIM))
        storage.write_json(self.layout.actor_record(self.node_id, os.getpid()),
                           dict(node_id=self.node_id, pid=os.getpid(), started_at=time.time(),
                                device=str(self.plan.device), threads=threads))

    def __call__(self, batch: pa.Table) -> pa.Table:
        return pa.Table.from_pylist([self._extract_shard(batch.slice(i, 1)) for i in range(batch.num_rows)])

    def _extract_shard(self, row: pa.Table) -> dict[str, Any]:
        t0 = time.perf_counter()
        shard, row_start, n = (row.column(c)[0].as_py() for c in ("shard", "row_start", "n"))
        meta = _from_ipc(row.column("meta")[0].as_py())
        errors = _from_ipc(row.column("errors")[0].as_py())
        h, w = self.image_size
        pixels = np.frombuffer(row.column("pixels")[0].as_buffer(), np.uint8).reshape(meta.num_rows, h, w, 3)
        desc, tokens = (forward(self.model, pixels, self.batch_size, self.plan) if meta.num_rows
                        else (None, None))
        if tokens is not None:
            block = np.zeros((n, tokens.shape[1], storage.TOKEN_DIM), np.float16)
            block[meta.column("row").to_numpy() - row_start] = tokens.astype(np.float16)
            self._tokens(tokens.shape[1])[row_start:row_start + n] = block
        # A shard whose images all failed still gets the model's width, so parts concatenate.
        dim = desc.shape[1] if desc is not None else self.global_dim
        gd = desc if desc is not None else np.zeros((0, dim), np.float32)
        table = meta.select(["image_id", "path", "utm_east", "utm_north", "heading", "timestamp", "place_id",
                             "width", "height"])
        table = table.append_column("global_descriptor", pa.FixedSizeListArray.from_arrays(
            pa.array(gd.astype(np.float32).ravel(), pa.float32()), dim))
        table = table.append_column("shard", pa.array([shard] * meta.num_rows, pa.int32()))
        table = table.append_column("row", meta.column("row"))
        table = table.append_column("content_hash", meta.column("content_hash"))
        table = table.append_column("tag", meta.column("tag"))
        table = table.cast(storage.global_schema(dim))
        storage.write_parquet(self.layout.global_part(shard), table, self.file_metadata)
        storage.write_parquet(self.layout.errors_part(shard), errors, self.file_metadata)
        marker = dict(shard=shard, row_start=row_start, images=n, extracted=meta.num_rows,
                      failed=errors.num_rows, tokens=None if tokens is None else int(tokens.shape[1]),
                      global_dim=dim, node_id=self.node_id, pid=os.getpid(), model_info=self.model_info,
                      seconds=round(time.perf_counter() - t0, 3), finished_at=time.time())
        storage.write_json(self.layout.progress(shard), marker)
        return {k: marker[k] for k in ("shard", "images", "extracted", "failed", "node_id", "pid", "seconds")}

    def _tokens(self, t: int):
        """The store's ``local_tokens`` array, created by whichever actor gets there first (every
        actor would write the same array metadata, so a race is harmless)."""
        if self.tokens_array is None:
            for attempt in range(5):
                try:
                    if not storage.exists(self.layout.local_tokens + "/zarr.json"):
                        try:
                            storage.create_local_tokens(self.store, self.num_rows, t, self.chunk_rows)
                        except Exception:  # another actor created it meanwhile
                            pass
                    arr = storage.open_local_tokens(self.store, mode="r+")
                    break
                except Exception:
                    if attempt == 4:
                        raise
                    time.sleep(0.2 * (attempt + 1))
            if tuple(arr.shape) != (self.num_rows, t, storage.TOKEN_DIM):
                raise ExtractError(f"{self.layout.local_tokens} has shape {tuple(arr.shape)}, expected "
                                   f"{(self.num_rows, t, storage.TOKEN_DIM)}; it belongs to another extraction")
            self.tokens_array = arr
        return self.tokens_array


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
        rows.append(dict(shard=s, row_start=s * shard_size, rows=_ipc(part)))
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
    import ray

    from .cluster import ensure_ray

    config = config or ExtractConfig()
    config = ExtractConfig(**{**asdict(config), "store": store})
    _check(config)
    t_start = time.perf_counter()
    if "tag" not in table.column_names:  # dataset tables built before tags: no condition named
        table = table.append_column(pa.field("tag", pa.string()), pa.nulls(table.num_rows, pa.string()))
    missing = [c for c in DATASET_SCHEMA.names if c not in table.column_names]
    if missing:
        raise ValueError(f"dataset table lacks columns {missing}")
    table = table.select(DATASET_SCHEMA.names).cast(DATASET_SCHEMA).sort_by("key")
    n = table.num_rows
    max_failed = parse_max_failures(config.max_failures, n)
    layout = storage.StoreLayout(store)
    ckpt_hash = weights.checkpoint_hash(config.backbone, config.checkpoint)
    source = source or config.dataset or "<table>"
    plan = _plan(table, config, source, ckpt_hash)
    _check_or_write_plan(layout, plan)

    num_shards = math.ceil(n / config.shard_size)
    done = _read_markers(layout, list(range(num_shards)))
    pending = [s for s in range(num_shards) if s not in done]
    skipped = sorted(done)
    if skipped:
        log.info("resuming %s: skipping %d finished shard(s) %s", store, len(skipped), _ranges(skipped))

    model_info = dict(backbone=config.backbone, checkpoint=config.checkpoint, checkpoint_hash=ckpt_hash)
    preprocessing = dict(PREPROCESSING, image_size=list(config.image_size))
    file_metadata = dict(layout_version=storage.LAYOUT_VERSION, model=model_info, checkpoint_hash=ckpt_hash,
                         preprocessing=preprocessing)

    markers = dict(done)
    handled, flow_seconds, nodes = 0, 0.0, set()
    if pending:
        ensure_ray(config.ray_address)
        num_actors, gpus, threads = _actor_plan(config)
        log.info("extracting %d images in %d shard(s) with %d %s actor(s)", n - sum(d["images"] for d in done.values()),
                 len(pending), num_actors, "GPU" if gpus else f"CPU ({threads} threads)")
        shard_bytes = min(config.shard_size, n) * config.image_size[0] * config.image_size[1] * 3
        ctx = ray.data.DataContext.get_current()
        saved = ctx.enable_progress_bars, ctx.wait_for_min_actors_s  # restored after the run
        ctx.enable_progress_bars = False  # our own bar counts images; Ray's would count shards
        # Start every model actor before the first shard is handed out: otherwise the actor that
        # builds its model first takes the early shards while the others are still loading, and an
        # unschedulable pool (more GPUs asked than the cluster has) fails with a clear timeout.
        ctx.wait_for_min_actors_s = int(os.environ.get("R2F_ACTOR_START_TIMEOUT_S", "900"))
        # One block per shard, so decode tasks run side by side and each feeds one actor call.
        ds = ray.data.from_arrow([_shard_rows(table, [s], config.shard_size) for s in pending])
        ds = ds.map_batches(decode_shard, batch_size=1, batch_format="pyarrow", zero_copy_batch=True,
                            fn_kwargs=dict(image_size=tuple(config.image_size)), num_cpus=1,
                            # Reserve a worker plus a decoded shard per task; distinct remote args also keep
                            # Ray Data from fusing decoding into the model actors.
                            memory=256 * 2**20 + 2 * shard_bytes)
        ds = ds.map_batches(
            ShardExtractor, batch_size=1, batch_format="pyarrow", zero_copy_batch=True,
            fn_constructor_kwargs=dict(backbone=config.backbone, checkpoint=config.checkpoint, store=store,
                                       image_size=tuple(config.image_size), batch_size=config.batch_size,
                                       chunk_rows=config.chunk_rows, num_rows=n, threads=threads,
                                       device=config.device, file_metadata=file_metadata,
                                       checkpoint_sha256=ckpt_hash if config.checkpoint else None),
            compute=ray.data.ActorPoolStrategy(size=num_actors, max_tasks_in_flight_per_actor=2),
            # Ray Data restarts a dead actor and retries its shard (the rewrite is idempotent).
            num_cpus=1, num_gpus=gpus, **({"resources": dict(config.actor_resources)} if config.actor_resources else {}))
        bar = _progress_bar(config.progress, total=n - sum(d["images"] for d in done.values()))
        t_flow = time.perf_counter()
        try:
            for marker in ds.iter_rows():
                markers[marker["shard"]] = marker
                nodes.add(marker["node_id"])
                handled += marker["images"]
                if bar is not None:
                    bar.update(marker["images"])
        finally:
            if bar is not None:
                bar.close()
            ctx.enable_progress_bars, ctx.wait_for_min_actors_s = saved
        flow_seconds = time.perf_counter() - t_flow
        # Markers from the files, not the stream: they are what a later resume will trust.
        markers.update(_read_markers(layout, pending))
        missing_shards = [s for s in range(num_shards) if s not in markers]
        if missing_shards:
            raise ExtractError(f"shards {_ranges(missing_shards)} of {store} have no progress marker after the run")

    extracted = sum(m["extracted"] for m in markers.values())
    failed = sum(m["failed"] for m in markers.values())
    tokens = next((m["tokens"] for m in markers.values() if m.get("tokens")), None)
    model_info = {**model_info, **next((m.get("model_info") or {} for m in markers.values()), {})}
    dim = next((m["global_dim"] for m in markers.values() if m.get("tokens")), storage.GLOBAL_DIM)
    seconds = time.perf_counter() - t_start
    manifest = dict(
        layout_version=storage.LAYOUT_VERSION, dataset=source, model=model_info, preprocessing=preprocessing,
        image_size=list(config.image_size), shard_size=config.shard_size, chunk_rows=config.chunk_rows,
        tokens=tokens, token_dim=storage.TOKEN_DIM, global_dim=dim, rows=n, shards=list(range(num_shards)),
        counts=dict(images=n, extracted=extracted, failed=failed), keys_digest=plan["keys_digest"],
        finished_at=utc_now(),
    )
    storage.write_json(layout.manifest, manifest)
    result = ExtractResult(store=store, num_images=n, num_extracted=extracted, num_failed=failed,
                           skipped_shards=skipped, images_per_second=handled / flow_seconds if flow_seconds else 0.0,
                           seconds=seconds, too_many_failures=failed > max_failed, node_ids=sorted(nodes))
    log.info("%s", result.summary())
    if result.too_many_failures:
        log.error("%d images failed, more than --max-failures %s allows; see %s", failed, config.max_failures,
                  layout.errors_dir)
    return result


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
