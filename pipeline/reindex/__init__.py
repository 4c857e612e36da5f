"""Scheduled incremental reindexing: bring the store and the index up to date with the image source.

One run (``r2f reindex``, ``jobs/reindex.py``, ``run(ReindexConfig)``), under the lock (``lock.py``)::

    scan      hash every new or touched image of the source (Ray tasks; ``pipeline.images.content_hash``;
              a file whose size and mtime/ETag match the last scan keeps its hash without being read)
    plan      compare with the catalog (the published store generation, or the unpublished one an
              interrupted run left): added, changed (new bytes), moved (new path or position), deleted
    extract   only added + changed images, into a staging store <store>/reindex/staging/<digest>
              (``pipeline.extract.extract_dataset``: resumable per shard like any extraction)
    adopt     staging shards become new shards of the store (never-used shard numbers, their local
              tokens copied to fresh Zarr rows); every old shard that lost or moved a row is replaced
              by a filtered copy under a new number whose rows still point at the old Zarr rows
    snapshot  the new store generation: manifests/g0004.json only (``publish.py``)
    index     ``pipeline.index.build(previous_version=CURRENT, manifest=<that snapshot>)``: unchanged
              index shards are copied, only index shards that lost an extraction shard are refilled
    check     the version's ids equal the generation's; the lock is still ours
    publish   ONE write: <index_dir>/CURRENT names the version and the store generation; then the
              informational <store>/manifest.json
    collect   garbage no kept state or live lease references (``gc.py``; ``gc: true``)

Invariants that make this safe:

- Readers resolve only the pointer (``pipeline.published``): until it is rewritten every reader,
  new or running, reads the previous state's unchanged files; a run that dies anywhere before
  leaves it as it was, and the next run resumes (staging shards already extracted are skipped; a
  snapshot no pointer ever named is built on, not adopted again). Rollback is that one write.
- Shard and generation numbers are never reused (``<store>/reindex/numbers.json``) and a file is
  never rewritten once a manifest lists it, so every kept state stays readable until GC, which
  collects only what no kept state and no live lease (``pipeline.leases``) references.
- A run with nothing new (no added, changed, moved or deleted image, and CURRENT covering exactly
  the published generation's shards) writes nothing and says so.
- Images that failed to decode are remembered with their content hash (``failures.parquet``) and
  are retried only when their bytes change; unreadable source files never delete catalog rows (an
  S3 hiccup must not drop a place from the index).

Layout added to a store (beside ``pipeline.storage``'s files)::

    <store>/manifests/g0003.json               snapshot of each store generation's manifest
    <store>/reindex/numbers.json                next shard and generation numbers (never reused)
    <store>/reindex/staging/<digest>/           extraction store of one run's new images
    <store>/reindex/failures.parquet            path, content_hash, stage, reason of known bad images
    <store>/reindex/scan_cache.parquet          path, size+mtime/ETag, content_hash: unchanged files are not reread

and to an index folder (beside ``pipeline.index.layout``'s files)::

    <index_dir>/reindex/v0003.json              which store generation version v0003 was built from
    <index_dir>/reindex.lock                    held (and heartbeated) while a reindex, rollback or GC runs
    <index_dir>/leases/<job>.json               states running jobs read (``pipeline.leases``)
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import socket
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import pyarrow as pa

from .. import storage
from ..log import get_logger
from .gc import GarbageReport, collect_garbage
from .lock import ReindexBusy, ReindexError, ReindexLock
from .publish import (pending_generation, publish_pointer, read_snapshot, reserve_numbers, store_generation,
                      version_generation, write_version_record)

log = get_logger(__name__)

POSITION_COLUMNS = ("utm_east", "utm_north", "heading", "timestamp", "place_id")
FAILURES_SCHEMA = pa.schema([("path", pa.string()), ("content_hash", pa.string()), ("stage", pa.string()),
                             ("reason", pa.string())])
# ExtractConfig keys a reindex may set: how to run, not what the descriptors are. What they are
# (backbone, checkpoint, image size, shard size) comes from the store, so new rows match old ones.
RUNTIME_EXTRACT_KEYS = ("batch_size", "num_actors", "threads_per_actor", "max_failures", "progress", "device",
                        "ray_address")


@dataclass
class ReindexConfig:
    source: str = ""                      # dataset description of the images as they are now
    store: str = ""                       # the extraction store: the catalog that is brought up to date
    index_dir: str | None = None          # default <store>/index (as pipeline.index)
    keep_versions: int = 3                # finished index versions kept for rollback (CURRENT always kept)
    rollback: str | None = None           # instead of reindexing, publish this kept version again
    extract: dict[str, Any] = field(default_factory=dict)  # ExtractConfig keys; model keys only for a first run
    index: dict[str, Any] = field(default_factory=dict)    # IndexConfig keys for full builds
    max_index_shards: int = 64            # more index shards than this: rebuild all (compaction)
    hash_chunk: int = 256                 # images hashed per Ray task
    trust_file_stamps: bool = True        # skip reading files whose size and mtime/ETag did not change
    lock_heartbeat_s: float = 30.0        # the lock holder rewrites the lock this often
    lock_stale_s: float = 600.0           # a lock not heartbeated for this long (or of a dead local pid) is broken
    gc: bool = True                       # collect garbage after each publish (scheduled runs)
    gc_only: bool = False                 # only collect garbage (`r2f reindex --gc`)
    gc_dry_run: bool = False              # report what GC would delete, delete nothing
    gc_grace_s: float = 3600.0            # nothing superseded, written or heartbeated more recently is collected
    gc_compact_below: float = 0.5         # rewrite Zarr chunks whose live-row fraction is below this (dead rows zeroed)
    ray_address: str | None = None

    @property
    def resolved_index_dir(self) -> str:
        if self.index_dir:
            return self.index_dir
        if not self.store:
            raise ReindexError("ReindexConfig needs `store`")
        return storage.join(self.store, "index")


@dataclass
class ReindexResult:
    status: str                           # "noop" | "published" | "rolled_back" | "collected"
    message: str
    version: str | None                   # CURRENT after the run
    previous_version: str | None          # CURRENT before the run
    store_generation: int
    added: int = 0
    changed: int = 0
    moved: int = 0
    deleted: int = 0
    unchanged: int = 0
    failed: int = 0                       # new or changed images whose extraction failed (kept in failures.parquet)
    unreadable: int = 0                   # source images that could not be read during the scan
    num_images: int = 0                   # rows of the published store generation
    new_shards: list[int] = field(default_factory=list)
    retired_shards: list[int] = field(default_factory=list)
    rebuilt_index_shards: list[int] = field(default_factory=list)
    reused_index_shards: list[int] = field(default_factory=list)
    pruned_versions: list[str] = field(default_factory=list)
    stage_seconds: dict[str, float] = field(default_factory=dict)
    gc: dict[str, Any] | None = None      # GarbageReport.as_dict() of the collection after publishing


@dataclass
class ReindexPlan:
    """What differs between the source and the catalog."""
    to_extract: pa.Table                  # dataset rows (pipeline.datasets schema) of added + changed images
    added_ids: np.ndarray
    changed_ids: np.ndarray
    moved: pa.Table                       # image_id + new path/positions of moved images
    deleted_ids: np.ndarray
    unchanged: int
    unreadable: list[str]
    skipped_failures: int                 # known-bad images with unchanged bytes, not retried
    affected_shards: list[int]            # catalog shards that lose or move a row
    source_hashes: dict[str, str]         # path -> content hash of every readable source image

    @property
    def empty(self) -> bool:
        return not (len(self.to_extract) or len(self.deleted_ids) or len(self.moved))


# ---------------------------------------------------------------- layout
@dataclass(frozen=True)
class ReindexLayout:
    """Where a reindex keeps its state: store-side paths are ``pipeline.storage.StoreLayout``'s."""
    store: str
    index_dir: str

    def manifest_snapshot(self, generation: int) -> str:
        return storage.StoreLayout(self.store).manifest_snapshot(generation)

    @property
    def staging_dir(self) -> str:
        return storage.StoreLayout(self.store).reindex_staging_dir

    def staging(self, digest: str) -> str:
        return storage.join(self.staging_dir, digest)

    @property
    def failures(self) -> str:
        return storage.StoreLayout(self.store).reindex_failures

    @property
    def scan_cache(self) -> str:
        return storage.StoreLayout(self.store).reindex_scan_cache

    def version_record(self, version: str) -> str:
        return storage.join(self.index_dir, "reindex", f"{version}.json")

    @property
    def lock(self) -> str:
        return storage.join(self.index_dir, "reindex.lock")


# ---------------------------------------------------------------- scan and plan
def file_stamp(fs, path: str) -> str | None:
    """Size plus modification stamp (mtime locally, ETag on S3): when it is unchanged the bytes are
    taken as unchanged, so a nightly run reads only new or touched files."""
    try:
        info = fs.info(path)
    except Exception:
        return None
    mark = info.get("ETag") or info.get("etag") or info.get("mtime") or info.get("LastModified") \
        or info.get("last_modified")
    return None if mark is None else f"{info.get('size')}:{mark}"


def _hash_paths(paths: list[str], cache: dict[str, tuple[str, str]] | None = None
                ) -> list[tuple[str | None, str | None, str | None]]:
    """``(content_hash, None, stamp)`` or ``(None, reason, None)`` per path. A path whose stamp
    equals the cached one keeps its cached hash without being read."""
    from ..images import ImageReadError, content_hash, read_bytes

    out = []
    for p in paths:
        stamp = None
        if cache is not None:
            fs, fp = storage.filesystem(p)
            stamp = file_stamp(fs, fp)
            hit = cache.get(p)
            if stamp is not None and hit is not None and hit[0] == stamp:
                out.append((hit[1], None, stamp))
                continue
        try:
            out.append((content_hash(read_bytes(p)), None, stamp))
        except ImageReadError as exc:
            out.append((None, f"{exc.stage}: {exc.reason}", None))
    return out


def scan_hashes(paths: list[str], chunk: int = 256, cache: dict[str, tuple[str, str]] | None = None
                ) -> list[tuple[str | None, str | None, str | None]]:
    """Content hashes of ``paths``, in Ray tasks of ``chunk`` paths (in-process when one chunk is
    all there is: a task would cost more than it saves). With ``cache`` (path -> (stamp, hash)),
    files whose size and mtime/ETag are unchanged are not read."""
    if len(paths) <= chunk:
        return _hash_paths(paths, cache)
    import ray

    task = ray.remote(num_cpus=1, max_retries=2)(_hash_paths)
    refs = [task.remote(paths[i:i + chunk], None if cache is None else {p: cache[p] for p in paths[i:i + chunk]
                                                                         if p in cache})
            for i in range(0, len(paths), chunk)]
    out: list[tuple[str | None, str | None, str | None]] = []
    for part in ray.get(refs):
        out.extend(part)
    return out


def read_scan_cache(layout: "ReindexLayout") -> dict[str, tuple[str, str]]:
    if not storage.exists(layout.scan_cache):
        return {}
    t = storage.read_parquet(layout.scan_cache)
    return {p: (st, h) for p, st, h in zip(t.column("path").to_pylist(), t.column("stamp").to_pylist(),
                                          t.column("content_hash").to_pylist())}


def write_scan_cache(layout: "ReindexLayout", paths: list[str], scanned) -> None:
    rows = [(p, st, h) for p, (h, _, st) in zip(paths, scanned) if h is not None and st is not None]
    storage.write_parquet(layout.scan_cache, pa.table({
        "path": pa.array([r[0] for r in rows], pa.string()), "stamp": pa.array([r[1] for r in rows], pa.string()),
        "content_hash": pa.array([r[2] for r in rows], pa.string())}))


def read_catalog(store: str, manifest: dict[str, Any] | None = None) -> pa.Table:
    """The rows of one store generation (default: ``manifest.json``'s) as the reindex compares them
    (no descriptors)."""
    return storage.read_global_table(store, ["image_id", "path", "content_hash", "shard", "row",
                                             *POSITION_COLUMNS], manifest=manifest)


def read_failures(layout: ReindexLayout) -> pa.Table:
    if not storage.exists(layout.failures):
        return FAILURES_SCHEMA.empty_table()
    return storage.read_parquet(layout.failures).cast(FAILURES_SCHEMA)


def _same(a: list, b: list) -> np.ndarray:
    """Element-wise equality treating None/NaN as equal to each other."""
    def norm(v):
        return None if v is None or (isinstance(v, float) and np.isnan(v)) else v
    return np.array([norm(x) == norm(y) for x, y in zip(a, b)], dtype=bool)


def plan_changes(source: pa.Table, catalog: pa.Table, hashes: list[tuple[str | None, str | None]],
                 failures: pa.Table | None = None) -> ReindexPlan:
    """Compare the dataset table (with one scan result per row) with the catalog."""
    src_ids = source.column("image_id").to_numpy()
    src_paths = source.column("path").to_pylist()
    src_hash = [h for h, _ in hashes]
    readable = np.array([h is not None for h in src_hash], dtype=bool)
    unreadable = [p for p, ok in zip(src_paths, readable) if not ok]

    cat_ids = catalog.column("image_id").to_numpy()
    cat_pos = {int(i): k for k, i in enumerate(cat_ids)}
    in_cat = np.array([int(i) in cat_pos for i in src_ids], dtype=bool)
    cat_idx = np.array([cat_pos.get(int(i), -1) for i in src_ids], dtype=np.int64)

    cat_hash = catalog.column("content_hash").to_pylist()
    same_bytes = np.array([in_cat[k] and readable[k] and cat_hash[cat_idx[k]] == src_hash[k]
                           for k in range(len(src_ids))], dtype=bool)
    added = ~in_cat & readable
    changed = in_cat & readable & ~same_bytes

    # known-bad images whose bytes did not change are not tried again
    known_bad = {}
    if failures is not None and failures.num_rows:
        known_bad = dict(zip(failures.column("path").to_pylist(), failures.column("content_hash").to_pylist()))
    skip = np.array([added[k] and known_bad.get(src_paths[k]) == src_hash[k] for k in range(len(src_ids))],
                    dtype=bool)
    added &= ~skip

    # same bytes, but the path or a position column differs: rewrite the row, no extraction
    moved_mask = np.zeros(len(src_ids), dtype=bool)
    both = np.flatnonzero(same_bytes)
    if len(both):
        cat_rows = catalog.take(pa.array(cat_idx[both]))
        src_rows = source.take(pa.array(both))
        differs = ~_same(src_rows.column("path").to_pylist(), cat_rows.column("path").to_pylist())
        for c in POSITION_COLUMNS:
            differs |= ~_same(src_rows.column(c).to_pylist(), cat_rows.column(c).to_pylist())
        moved_mask[both[differs]] = True
    moved = source.filter(pa.array(moved_mask)).select(["image_id", "path", *POSITION_COLUMNS])

    src_set = set(int(i) for i in src_ids)
    deleted_ids = np.array([int(i) for i in cat_ids if int(i) not in src_set], dtype=np.int64)

    changed_ids = src_ids[changed]
    lose = set(deleted_ids.tolist()) | set(changed_ids.tolist()) | set(moved.column("image_id").to_pylist())
    shards = catalog.column("shard").to_numpy()
    affected = sorted({int(s) for i, s in zip(cat_ids, shards) if int(i) in lose})

    return ReindexPlan(
        to_extract=source.filter(pa.array(added | changed)),
        added_ids=src_ids[added], changed_ids=changed_ids, moved=moved, deleted_ids=deleted_ids,
        unchanged=int((same_bytes & ~moved_mask).sum()), unreadable=unreadable,
        skipped_failures=int(skip.sum()), affected_shards=affected,
        source_hashes={p: h for p, h in zip(src_paths, src_hash) if h is not None},
    )


# ---------------------------------------------------------------- store generations
def _used_shard_numbers(store: str) -> set[int]:
    """Every shard number that has ever had a file in the store (listed or not): new shards get
    numbers above all of them, so no file a kept generation may read is ever overwritten."""
    lay = storage.StoreLayout(store)
    used: set[int] = set()
    for d, prefix in ((lay.global_dir, "part-"), (lay.progress_dir, "shard-"), (lay.errors_dir, "part-")):
        fs, path = storage.filesystem(d)
        if not fs.exists(path):
            continue
        for entry in fs.ls(path, detail=False):
            name = entry.rstrip("/").rsplit("/", 1)[-1]
            if name.startswith(prefix):
                try:
                    used.add(int(name[len(prefix):].split(".", 1)[0]))
                except ValueError:
                    continue
    return used


def _write_snapshot(layout: ReindexLayout, manifest: dict[str, Any]) -> None:
    """Step 1 of publishing: the new generation's snapshot. No reader sees it until a pointer names it."""
    storage.write_json(layout.manifest_snapshot(store_generation(manifest)), manifest)


def _count_rows(store: str, shards: list[int]) -> int:
    import pyarrow.parquet as pq

    lay = storage.StoreLayout(store)
    total = 0
    for s in shards:
        fs, path = storage.filesystem(lay.global_part(s))
        with fs.open(path, "rb") as f:
            total += pq.ParquetFile(f).metadata.num_rows
    return total


def _part_metadata(url: str) -> dict[str, Any]:
    meta = storage.parquet_metadata(url)
    return {k: v for k, v in meta.items() if k not in ("ARROW:schema", "pandas")}


def _rewrite_shard(store: str, old: int, new: int, drop_ids: set[int], moved: dict[int, dict[str, Any]]) -> int:
    """Copy shard ``old``'s rows minus ``drop_ids`` (moved rows get their new path/positions) into
    a part numbered ``new``. Rows keep their Zarr row: the old shard's tokens are never rewritten,
    so they stay valid for both generations. Returns the number of rows written (0: nothing)."""
    lay = storage.StoreLayout(store)
    url = lay.global_part(old)
    t = storage.read_parquet(url)
    ids = t.column("image_id").to_pylist()
    keep = pa.array([i not in drop_ids for i in ids])
    t = t.filter(keep)
    if t.num_rows == 0:
        return 0
    if moved:
        cols = {c: t.column(c).to_pylist() for c in ("path", *POSITION_COLUMNS)}
        for k, i in enumerate(t.column("image_id").to_pylist()):
            if i in moved:
                for c in cols:
                    cols[c][k] = moved[i][c]
        for c, values in cols.items():
            t = t.set_column(t.schema.get_field_index(c), c, pa.array(values, t.schema.field(c).type))
    t = t.set_column(t.schema.get_field_index("shard"), "shard", pa.array([new] * t.num_rows, pa.int32()))
    storage.write_parquet(lay.global_part(new), t, _part_metadata(url))
    storage.write_json(lay.progress(new), dict(shard=new, images=t.num_rows, extracted=t.num_rows, failed=0,
                                               rewritten_from=old))
    return t.num_rows


def _adopt_shard(staging: str, store: str, k: int, new: int, shard_size: int, staging_rows: int) -> int:
    """Staging shard ``k`` becomes store shard ``new``: Parquet rows renumbered into ``new``'s Zarr
    rows, and that block of local tokens copied (whole chunks: ``new * shard_size`` is a chunk
    boundary). Runs in a Ray task; one task per shard, so each owns its Zarr chunks."""
    src, dst = storage.StoreLayout(staging), storage.StoreLayout(store)
    url = src.global_part(k)
    t = storage.read_parquet(url)
    if t.num_rows == 0:
        return 0
    start, n = k * shard_size, min(shard_size, staging_rows - k * shard_size)
    block = np.asarray(storage.open_local_tokens(staging)[start:start + n])
    storage.open_local_tokens(store, mode="r+")[new * shard_size:new * shard_size + n] = block
    rows = t.column("row").to_numpy() - start + new * shard_size
    t = t.set_column(t.schema.get_field_index("row"), "row", pa.array(rows, pa.int64()))
    t = t.set_column(t.schema.get_field_index("shard"), "shard", pa.array([new] * t.num_rows, pa.int32()))
    storage.write_parquet(dst.global_part(new), t, _part_metadata(url))
    storage.write_json(dst.progress(new), dict(shard=new, row_start=new * shard_size, images=n,
                                               extracted=t.num_rows, failed=n - t.num_rows,
                                               adopted_from=f"{staging}#{k}"))
    return t.num_rows


def _delta_digest(table: pa.Table, hashes: dict[str, str]) -> str:
    d = hashlib.blake2b(digest_size=8)
    for key, path in zip(table.column("key").to_pylist(), table.column("path").to_pylist()):
        d.update(f"{key}\0{hashes.get(path)}\0".encode())
    return d.hexdigest()


def _staging_config(cfg: ReindexConfig, manifest: dict[str, Any]):
    """The ExtractConfig of new images: the model and sizes of the store, run settings from ``cfg``."""
    from ..extract import ExtractConfig

    model = manifest.get("model") or {}
    fixed = dict(backbone=model.get("backbone"), checkpoint=model.get("checkpoint"),
                 image_size=tuple(manifest["image_size"]), shard_size=int(manifest["shard_size"]),
                 chunk_rows=int(manifest["chunk_rows"]))
    for k, v in cfg.extract.items():
        if k in fixed and v is not None and _norm(v) != _norm(fixed[k]):
            raise ReindexError(f"extract.{k}={v!r} differs from the store {cfg.store} ({fixed[k]!r}); new rows must "
                               "match the old ones, so a different model or size needs a new store")
        if k not in fixed and k not in RUNTIME_EXTRACT_KEYS:
            raise ReindexError(f"extract.{k} cannot be set for a reindex (allowed: {', '.join(RUNTIME_EXTRACT_KEYS)})")
    from ..config import from_dict

    run = {k: v for k, v in cfg.extract.items() if k in RUNTIME_EXTRACT_KEYS}
    run.setdefault("ray_address", cfg.ray_address)
    return from_dict(ExtractConfig, {"dataset": cfg.source, **fixed, **run})


def _norm(v: Any) -> Any:
    return list(v) if isinstance(v, (list, tuple)) else v


# ---------------------------------------------------------------- index versions
def version_image_ids(index_dir: str, version: str | None = None) -> np.ndarray:
    """Sorted image ids held by an index version (read from its shard files)."""
    import faiss

    from ..index import layout as L

    infos = L.read_infos(index_dir, version)
    lay = L.IndexLayout(index_dir)
    out = []
    for entry in infos["shards"]:
        index = L.read_index_file(lay.file(infos["version"], entry["file"]), entry)
        out.append(_ids_of(index, faiss))
    return np.sort(np.concatenate(out)) if out else np.zeros(0, np.int64)


def _ids_of(index, faiss) -> np.ndarray:
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        inv = ivf.invlists
        parts = [faiss.rev_swig_ptr(inv.get_ids(c), inv.list_size(c)).copy()
                 for c in range(inv.nlist) if inv.list_size(c)]
        return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)
    for cls in ("IndexIDMap2", "IndexIDMap"):
        downcast = getattr(faiss, cls, None)
        if downcast is not None and isinstance(index, downcast):
            return faiss.vector_to_array(index.id_map).astype(np.int64)
    if hasattr(index, "id_map"):
        return faiss.vector_to_array(index.id_map).astype(np.int64)
    raise ReindexError(f"cannot read the ids of a {type(index).__name__} index")


def _current_or_none(index_dir: str) -> str | None:
    from ..index import layout as L

    try:
        return L.current_version(index_dir)
    except L.IndexFileError:
        return None


def _covered_shards(index_dir: str, version: str) -> set[int]:
    from ..index import layout as L

    infos = L.read_infos(index_dir, version)
    return {int(s) for e in infos["shards"] for s in e["extraction_shards"]}


def list_history(cfg: ReindexConfig) -> list[dict[str, Any]]:
    """Finished index versions, oldest first, with their store generation and counts."""
    from ..index import layout as L

    index_dir = cfg.resolved_index_dir
    layout = ReindexLayout(cfg.store, index_dir)
    current = _current_or_none(index_dir)
    out = []
    for v in L.list_versions(index_dir):
        infos = L.read_infos(index_dir, v)
        rec = storage.read_json(layout.version_record(v)) if storage.exists(layout.version_record(v)) else {}
        out.append(dict(version=v, current=v == current, num_vectors=infos.get("num_vectors"),
                        num_shards=infos.get("num_shards"), created=infos.get("created"),
                        store_generation=rec.get("store_generation"), changes=rec.get("changes")))
    return out


# ---------------------------------------------------------------- entry points
Hook = Callable[[str, dict[str, Any]], None]


def run(config: ReindexConfig, on_stage: Hook | None = None) -> ReindexResult:
    """Bring ``config.store`` and its index up to date with ``config.source`` (or roll back, or
    only collect garbage when ``config.source`` is empty and ``config.gc_only``).

    ``on_stage(name, info)`` is called after each step (``planned``, ``extracted``, ``adopted``,
    ``snapshot``, ``index_built``, ``checked``, ``published``, ``collected``); operators' tooling and
    the tests use it to look at the system between steps."""
    if not config.store:
        raise ReindexError("store is empty: name the extraction store to keep up to date")
    if config.keep_versions < 1:
        raise ReindexError(f"keep_versions must be at least 1, got {config.keep_versions}")
    index_dir = config.resolved_index_dir
    layout = ReindexLayout(config.store, index_dir)
    hook = on_stage or (lambda name, info: None)
    with ReindexLock(layout.lock, config.lock_stale_s, config.lock_heartbeat_s) as lock:
        if config.rollback:
            return _rollback(config, layout, config.rollback, lock)
        if config.gc_only:
            report = collect_garbage(config, layout, dry_run=config.gc_dry_run)
            hook("collected", {"report": report})
            return ReindexResult(status="collected", message=report.summary(), version=_current_or_none(index_dir),
                                 previous_version=_current_or_none(index_dir), store_generation=-1, gc=report.as_dict())
        if not config.source:
            raise ReindexError("source is empty: give the dataset description of the images as they are now")
        result = _reindex(config, layout, hook, lock)
        if config.gc and result.status == "published":
            report = collect_garbage(config, layout, dry_run=config.gc_dry_run)
            result.gc = report.as_dict()
            result.pruned_versions = report.versions
            result.message += f"; {report.summary()}"
            hook("collected", {"report": report})
        return result


def rollback(config: ReindexConfig, version: str) -> ReindexResult:
    return run(dataclasses.replace(config, rollback=version))


def collect(config: ReindexConfig, dry_run: bool = False) -> ReindexResult:
    """Collect garbage only (``r2f reindex --gc [--dry-run]``)."""
    return run(dataclasses.replace(config, gc_only=True, gc_dry_run=dry_run))


def _rollback(cfg: ReindexConfig, layout: ReindexLayout, version: str, lock: ReindexLock) -> ReindexResult:
    """One pointer write to a kept version and the store generation it was built from."""
    from ..index import layout as L

    t0 = time.perf_counter()
    index_dir = layout.index_dir
    if version not in L.list_versions(index_dir):
        kept = ", ".join(L.list_versions(index_dir)) or "none"
        raise ReindexError(f"cannot roll back {index_dir} to {version}: not a finished version (kept: {kept})")
    previous = _current_or_none(index_dir)
    generation = version_generation(index_dir, version)
    if generation is None:
        raise ReindexError(f"cannot roll back {index_dir} to {version}: it has no reindex record naming its store "
                           f"generation (built by `r2f index`?); point at it with pipeline.index.set_current")
    snapshot = read_snapshot(cfg.store, generation)  # fails naming the snapshot if it was collected
    lock.check()
    publish_pointer(cfg.store, index_dir, version, snapshot)
    msg = f"rolled back {index_dir} from {previous} to {version} (store generation {generation})"
    log.info("%s", msg)
    infos = L.read_infos(index_dir, version)
    return ReindexResult(status="rolled_back", message=msg, version=version, previous_version=previous,
                         store_generation=generation, num_images=int(infos.get("num_vectors", 0)),
                         stage_seconds={"rollback": round(time.perf_counter() - t0, 3)})


def _published_base(cfg: ReindexConfig, layout: ReindexLayout) -> tuple[dict[str, Any], str | None]:
    """(manifest of the published store generation, published version). A store made by
    ``r2f extract`` (no generation yet) becomes generation 0."""
    from .. import published

    state = published.resolve(cfg.store, layout.index_dir)
    manifest = dict(state.manifest)
    if state.store_generation is None:
        manifest.setdefault("generation", 0)
        url = layout.manifest_snapshot(store_generation(manifest))
        if not storage.exists(url):
            storage.write_json(url, manifest)
    return manifest, state.index_version


def _reindex(cfg: ReindexConfig, layout: ReindexLayout, on_stage: Hook, lock: ReindexLock) -> ReindexResult:
    from ..cluster import ensure_ray
    from ..config import from_dict
    from ..datasets import load_dataset
    from ..extract import ExtractConfig, extract_dataset
    from ..index import build, IndexConfig
    from ..index import layout as L

    timings: dict[str, float] = {}
    t = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal t
        timings[name] = round(time.perf_counter() - t, 3)
        t = time.perf_counter()

    index_dir = layout.index_dir
    store_lay = storage.StoreLayout(cfg.store)
    first_run = not storage.exists(store_lay.manifest)
    resumed = False

    source = load_dataset(cfg.source)
    ensure_ray(cfg.ray_address)
    paths = source.column("path").to_pylist()
    scanned = scan_hashes(paths, cfg.hash_chunk, read_scan_cache(layout) if cfg.trust_file_stamps else None)
    hashes = [(h, why) for h, why, _ in scanned]
    lap("scan")

    if first_run:
        # No catalog yet: the whole source is new. A plain extraction, then generation 0.
        previous_version = None
        log.info("reindex: %s holds no extraction yet; extracting all %d images of %s", cfg.store,
                 source.num_rows, cfg.source)
        ecfg = from_dict(ExtractConfig, {"dataset": cfg.source, "ray_address": cfg.ray_address, **cfg.extract})
        ext = extract_dataset(source, cfg.store, ecfg, source=cfg.source)
        if ext.too_many_failures:
            raise ReindexError(f"{ext.num_failed} of {ext.num_images} images of {cfg.source} failed to extract, "
                               f"more than extract.max_failures={ecfg.max_failures} allows; nothing was published")
        lap("extract")
        manifest = dict(storage.read_manifest(cfg.store), generation=0)
        _write_snapshot(layout, manifest)
        _write_failures(layout, storage.read_errors(cfg.store), dict(zip(source.column("path").to_pylist(),
                                                                         [h for h, _ in hashes])))
        plan_counts = dict(added=ext.num_extracted, changed=0, moved=0, deleted=0, unchanged=0,
                           failed=ext.num_failed, unreadable=sum(h is None for h, _ in hashes))
        new_shards, retired = list(manifest["shards"]), []
        lap("store")
        on_stage("snapshot", {"generation": 0})
    else:
        base, previous_version = _published_base(cfg, layout)
        pending = pending_generation(cfg.store, index_dir, store_generation(base))
        manifest = pending or base  # an interrupted run's generation is built on, not adopted again
        catalog = read_catalog(cfg.store, manifest)
        failures = read_failures(layout)
        plan = plan_changes(source, catalog, hashes, failures)
        lap("plan")
        on_stage("planned", {"plan": plan})
        plan_counts = dict(added=len(plan.added_ids), changed=len(plan.changed_ids), moved=len(plan.moved),
                           deleted=len(plan.deleted_ids), unchanged=plan.unchanged, failed=0,
                           unreadable=len(plan.unreadable))
        if plan.unreadable:
            log.warning("reindex: %d source image(s) could not be read and are left as they are, e.g. %s",
                        len(plan.unreadable), plan.unreadable[0])
        new_shards, retired = [], []

        if plan.empty:
            current_ok = pending is None and previous_version is not None and \
                _covered_shards(index_dir, previous_version) == {int(s) for s in manifest["shards"]}
            if current_ok:
                msg = (f"nothing to do: {cfg.source} matches {cfg.store} ({plan.unchanged} images unchanged"
                       + (f", {plan.skipped_failures} known-bad skipped" if plan.skipped_failures else "")
                       + f") and {previous_version} indexes all of it")
                log.info("reindex: %s", msg)
                if cfg.trust_file_stamps:
                    write_scan_cache(layout, paths, scanned)
                return ReindexResult(status="noop", message=msg, version=previous_version,
                                     previous_version=previous_version, store_generation=store_generation(manifest),
                                     unchanged=plan.unchanged, unreadable=len(plan.unreadable),
                                     num_images=int(catalog.num_rows), stage_seconds=timings)
            if previous_version is None:
                log.info("reindex: %s has no index yet; building it", layout.index_dir)
            else:
                log.info("reindex: store generation %d was written but never published (an earlier run stopped "
                         "before publishing); building its index", store_generation(manifest))
                resumed = True
            # the changes are those of the run that made this generation
            made = manifest.get("reindex") or {}
            for k in ("added", "changed", "moved", "deleted"):
                plan_counts[k] = int(made.get(k, 0))
            new_shards, retired = list(made.get("new_shards", [])), list(made.get("retired_shards", []))
        else:
            resumed = pending is not None
            manifest, new_shards, retired, failed = _update_store(cfg, layout, manifest, plan, timings, lap,
                                                                  on_stage, extract_dataset)
            plan_counts["failed"] = failed

    # ---- index: copy unchanged index shards, refill the affected ones, never touch CURRENT
    store_gen = store_generation(manifest)
    use_previous = previous_version
    if use_previous is not None:
        prev_infos = L.read_infos(index_dir, use_previous)
        if prev_infos.get("num_shards", 0) >= cfg.max_index_shards:
            log.info("reindex: %s has %d index shards (max %d): rebuilding every shard", use_previous,
                     prev_infos["num_shards"], cfg.max_index_shards)
            use_previous = None
    icfg_keys = {**cfg.index, "store": cfg.store, "index_dir": index_dir, "make_current": False,
                 "ray_address": cfg.ray_address}
    built = build(from_dict(IndexConfig, icfg_keys), previous_version=use_previous, manifest=manifest)
    version = built.version
    lap("index")
    on_stage("index_built", {"version": version, "previous_version": previous_version})

    # ---- check, then the one pointer write
    expected = storage.read_global_table(cfg.store, ["image_id"], manifest=manifest).column("image_id").to_numpy()
    got = version_image_ids(index_dir, version)
    if len(got) != len(expected) or not np.array_equal(got, np.sort(expected)):
        raise ReindexError(f"index {index_dir}/{version} holds {len(got)} ids but store generation {store_gen} "
                           f"has {len(expected)}; not publishing it")
    write_version_record(index_dir, version, manifest, store_manifest=layout.manifest_snapshot(store_gen),
                         previous_version=previous_version, changes=plan_counts, new_shards=new_shards,
                         retired_shards=retired)
    lock.check()
    lap("check")
    on_stage("checked", {"version": version, "store_generation": store_gen})
    publish_pointer(cfg.store, index_dir, version, manifest)  # the one write that switches every reader
    lap("publish")
    on_stage("published", {"version": version, "store_generation": store_gen})

    if cfg.trust_file_stamps:
        write_scan_cache(layout, paths, scanned)  # only once the hashes it holds are in a published state
    fs, path = storage.filesystem(layout.staging_dir)
    if fs.exists(path):
        fs.rm(path, recursive=True)  # adopted: its rows now live in the store; no reader ever reads staging

    shards_info = built.infos.get("shards", [])
    msg = (f"published {version} (was {previous_version}"
           + (", finishing an interrupted run" if resumed else "") + f"): +{plan_counts['added']} new, "
           f"{plan_counts['changed']} changed, {plan_counts['moved']} moved, -{plan_counts['deleted']} deleted, "
           f"{plan_counts['failed']} failed; {len(got)} images in store generation {store_gen}")
    log.info("reindex: %s; timings %s", msg, json.dumps(timings))
    return ReindexResult(
        status="published", message=msg, version=version, previous_version=previous_version,
        store_generation=store_gen, num_images=int(len(got)), new_shards=new_shards, retired_shards=retired,
        rebuilt_index_shards=[e["shard"] for e in shards_info if e.get("rebuilt")],
        reused_index_shards=[e["shard"] for e in shards_info if not e.get("rebuilt")],
        stage_seconds=timings, **plan_counts)


def _update_store(cfg, layout, manifest, plan: ReindexPlan, timings, lap, on_stage, extract_dataset):
    """Extract the plan's images into staging, adopt them as new shards, replace affected shards,
    and write the next store generation's snapshot (not published: only the pointer publishes).
    Returns (manifest, new shards, retired shards, failed)."""
    import ray

    shard_size = int(manifest["shard_size"])
    used = _used_shard_numbers(cfg.store)
    next_shard = max(used | {int(s) for s in manifest["shards"]} | {-1}) + 1
    staging_shards: list[int] = []

    # 1. extract new and changed images into a staging store named by what it holds, so a rerun
    #    after a crash finds (and resumes) the same one
    failed_rows = FAILURES_SCHEMA.empty_table()
    staged: list[tuple[int, int]] = []
    staging = None
    staging_rows = 0
    if plan.to_extract.num_rows:
        staging = layout.staging(_delta_digest(plan.to_extract, plan.source_hashes))
        ecfg = _staging_config(cfg, manifest)
        log.info("reindex: extracting %d new/changed image(s) into %s", plan.to_extract.num_rows, staging)
        ext = extract_dataset(plan.to_extract, staging, ecfg, source=cfg.source)
        if ext.too_many_failures:
            raise ReindexError(f"{ext.num_failed} of {ext.num_images} new/changed images of {cfg.source} failed to "
                               f"extract, more than extract.max_failures={ecfg.max_failures} allows (errors in "
                               f"{storage.StoreLayout(staging).errors_dir}); nothing was published")
        smanifest = storage.read_manifest(staging)
        for key in ("tokens", "global_dim", "image_size", "shard_size", "chunk_rows"):
            if smanifest.get(key) is not None and manifest.get(key) is not None and smanifest[key] != manifest[key]:
                raise ReindexError(f"new images came out with {key}={smanifest[key]!r}, the store {cfg.store} has "
                                   f"{manifest[key]!r}; refusing to mix them")
        old_hash = (manifest.get("model") or {}).get("checkpoint_hash")
        new_hash = (smanifest.get("model") or {}).get("checkpoint_hash")
        if old_hash and new_hash and old_hash != new_hash:
            raise ReindexError(f"the checkpoint changed since {cfg.store} was extracted ({old_hash} -> {new_hash}); "
                               "descriptors would not be comparable: extract into a new store")
        staging_rows = int(smanifest["rows"])
        staging_shards = [int(k) for k in smanifest["shards"]]
        errs = storage.read_errors(staging)
        failed_rows = pa.table({
            "path": errs.column("path"),
            "content_hash": pa.array([plan.source_hashes.get(p) for p in errs.column("path").to_pylist()], pa.string()),
            "stage": errs.column("stage"), "reason": errs.column("reason")}, schema=FAILURES_SCHEMA)
        if ext.num_failed:
            log.warning("reindex: %d new/changed image(s) failed to extract; they are retried when their bytes "
                        "change (see %s)", ext.num_failed, layout.failures)
    # numbers above every one ever used (recorded first), so no kept or collected state's file is reused
    next_shard, generation = reserve_numbers(cfg.store, next_shard, len(staging_shards) + len(plan.affected_shards))
    staged = [(k, next_shard + i) for i, k in enumerate(staging_shards)]
    lap("extract")
    on_stage("extracted", {"staging": staging, "failed": failed_rows.num_rows})

    # 2. adopt staging shards (tokens copied into fresh Zarr rows) and rewrite affected shards
    adopted: list[int] = []
    if staged:
        last = max(new for _, new in staged)
        needed = last * shard_size + min(shard_size, staging_rows - staged[-1][0] * shard_size)
        tokens = storage.open_local_tokens(cfg.store, mode="r+")
        if tokens.shape[0] < needed:
            tokens.resize((needed, *tokens.shape[1:]))
        task = ray.remote(num_cpus=1, max_retries=2)(_adopt_shard)
        counts = ray.get([task.remote(staging, cfg.store, k, new, shard_size, staging_rows) for k, new in staged])
        adopted = [new for (_, new), c in zip(staged, counts) if c > 0]
    next_after = max([next_shard - 1, *[new for _, new in staged]]) + 1
    drop = set(plan.deleted_ids.tolist()) | set(plan.changed_ids.tolist())
    moved = {int(r["image_id"]): r for r in plan.moved.to_pylist()}
    rewritten: list[int] = []
    for i, old in enumerate(plan.affected_shards):
        new = next_after + i
        if _rewrite_shard(cfg.store, old, new, drop, moved) > 0:
            rewritten.append(new)
    lap("adopt")
    on_stage("adopted", {"adopted": adopted, "rewritten": rewritten})

    # 3. the next store generation
    retired = list(plan.affected_shards)
    shards = sorted(({int(s) for s in manifest["shards"]} - set(retired)) | set(adopted) | set(rewritten))
    rows = storage.open_local_tokens(cfg.store).shape[0]
    new_manifest = dict(manifest)
    new_manifest.update(
        generation=generation, previous_generation=store_generation(manifest),
        dataset=cfg.source, shards=shards, rows=int(rows),
        finished_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        reindex=dict(added=len(plan.added_ids), changed=len(plan.changed_ids), moved=len(plan.moved),
                     deleted=len(plan.deleted_ids), new_shards=adopted + rewritten, retired_shards=retired))
    new_manifest.pop("keys_digest", None)  # described the first extraction's key list only
    n_rows = _count_rows(cfg.store, shards)
    new_manifest["counts"] = dict(images=n_rows + failed_rows.num_rows, extracted=n_rows, failed=failed_rows.num_rows)
    _write_snapshot(layout, new_manifest)
    previous_failures = read_failures(layout)
    _write_failures(layout, pa.concat_tables([previous_failures, failed_rows]), plan.source_hashes,
                    keep_paths=set(plan.source_hashes))
    lap("store")
    on_stage("snapshot", {"generation": new_manifest["generation"]})
    return new_manifest, adopted + rewritten, retired, failed_rows.num_rows


def _write_failures(layout: ReindexLayout, rows: pa.Table, hashes: dict[str, str | None],
                    keep_paths: set[str] | None = None) -> None:
    """Known-bad images: the newest entry per path, only for paths still in the source with the
    same bytes (a fixed file is tried again)."""
    latest: dict[str, dict[str, Any]] = {}
    for r in rows.to_pylist():
        h = r.get("content_hash") or hashes.get(r["path"])
        if h is None or hashes.get(r["path"]) != h:
            continue
        if keep_paths is not None and r["path"] not in keep_paths:
            continue
        latest[r["path"]] = dict(r, content_hash=h)
    table = pa.Table.from_pylist(list(latest.values()), schema=FAILURES_SCHEMA)
    if table.num_rows or storage.exists(layout.failures):
        storage.write_parquet(layout.failures, table)


# ---------------------------------------------------------------- CLI
def register_cli(subparsers) -> None:
    from ..cli import add_config_arguments

    p = subparsers.add_parser("reindex", help="bring a store and its index up to date with the image source; "
                                               "roll back; list versions",
                              description=__doc__.split("\n\n")[0])
    add_config_arguments(p)
    p.add_argument("--source", help="dataset description of the images as they are now")
    p.add_argument("--store", help="extraction store (the catalog)")
    p.add_argument("--index-dir", help="index folder (default <store>/index)")
    p.add_argument("--keep", type=int, help="finished index versions to keep (default 3)")
    p.add_argument("--rollback", metavar="VERSION", help="publish this kept version (and its store generation) again")
    p.add_argument("--list", action="store_true", help="list kept versions with their store generations")
    p.add_argument("--gc", action="store_true", help="only collect garbage: parts, Zarr chunks, index versions and "
                                                    "staging no kept state or live lease references")
    p.add_argument("--dry-run", action="store_true", help="with --gc: report what would be collected, delete nothing")
    p.set_defaults(func=_cli)


def _cli(args: argparse.Namespace) -> int:
    from ..cli import config_from_args

    config = config_from_args(ReindexConfig, args, ("source", "store", "index_dir", ("keep", "keep_versions"),
                                                    "rollback"))
    if args.list:
        for row in list_history(config):
            print(json.dumps(row))
        return 0
    if args.gc or args.dry_run:
        config = dataclasses.replace(config, gc_only=True, gc_dry_run=bool(args.dry_run))
    result = run(config)
    print(result.message)
    return 0
