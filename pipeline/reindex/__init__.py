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

Each step is a function of the module it is named after (``scan.scan_source``, ``plan.plan_against``,
``staging.extract_to_staging``, ``adopt.adopt`` and ``adopt.write_generation``, ``publish.build_version``,
``publish.check_version`` and ``publish.publish_pointer``, ``gc.collect_garbage``); ``_reindex``
calls them in this order and reports each to the ``on_stage`` hook.

Invariants that make this safe:

- Readers resolve only the pointer (``pipeline.index.published``): until it is rewritten every reader,
  new or running, reads the previous state's unchanged files; a run that dies anywhere before
  leaves it as it was, and the next run resumes (staging shards already extracted are skipped; a
  snapshot no pointer ever named is built on, not adopted again). Rollback is that one write.
- Shard and generation numbers are never reused (``<store>/reindex/numbers.json``) and a file is
  never rewritten once a manifest lists it, so every kept state stays readable until GC, which
  collects only what no kept state and no live lease (``pipeline.index.leases``) references.
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
    <index_dir>/leases/<job>.json               states running jobs read (``pipeline.index.leases``)
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .. import storage
from ..log import get_logger
from .adopt import adopt, first_generation, reserve_shard_numbers, write_generation
from .gc import GarbageReport, collect_garbage
from .layout import ReindexLayout
from .lock import ReindexBusy, ReindexError, ReindexLock
from .plan import (
    FAILURES_SCHEMA,
    POSITION_COLUMNS,
    ReindexPlan,
    plan_against,
    plan_changes,
    read_catalog,
    read_failures,
)
from .publish import (
    build_version,
    check_version,
    covers_generation,
    current_or_none,
    list_history,
    pending_generation,
    publish_pointer,
    published_base,
    read_snapshot,
    store_generation,
    version_generation,
    version_image_ids,
    write_version_record,
)
from .scan import SourceScan, file_stamp, read_scan_cache, remember_scan, scan_hashes, scan_source, write_scan_cache
from .staging import RUNTIME_EXTRACT_KEYS, discard_staging, extract_all, extract_to_staging

if TYPE_CHECKING:
    from ..index import IndexBuildResult

log = get_logger(__name__)

__all__ = ["run", "rollback", "collect", "list_history", "version_image_ids", "ReindexConfig", "ReindexResult",
           "ReindexPlan", "ReindexLayout", "ReindexError", "ReindexBusy", "ReindexLock", "GarbageReport",
           "plan_changes", "scan_hashes", "file_stamp", "read_catalog", "read_failures", "read_scan_cache",
           "write_scan_cache", "store_generation", "FAILURES_SCHEMA", "POSITION_COLUMNS", "RUNTIME_EXTRACT_KEYS",
           "register_cli"]


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
    lock_stale_s: float = 600.0           # a lock seen unchanged this long on the observer's clock (or of a dead local pid) is broken
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
    storage.check_output(config.store, "--store")  # before the lock or any work
    storage.check_output(index_dir, "--index-dir")
    layout = ReindexLayout(config.store, index_dir)
    hook = on_stage or (lambda name, info: None)
    with ReindexLock(layout.lock, config.lock_stale_s, config.lock_heartbeat_s) as lock:
        if config.rollback:
            return _rollback(config, layout, config.rollback, lock)
        if config.gc_only:
            report = collect_garbage(config, layout, dry_run=config.gc_dry_run)
            hook("collected", {"report": report})
            return ReindexResult(status="collected", message=report.summary(), version=current_or_none(index_dir),
                                 previous_version=current_or_none(index_dir), store_generation=-1, gc=report.as_dict())
        if not config.source:
            raise ReindexError("source is empty: give the dataset description of the images as they are now")
        result = _reindex(config, layout, hook, lock)
        # after a no-op too: what the grace period spared last time may be collectable now
        if config.gc and result.status in ("published", "noop"):
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
    previous = current_or_none(index_dir)
    generation = version_generation(index_dir, version)
    if generation is None:
        raise ReindexError(f"cannot roll back {index_dir} to {version}: it has no reindex record naming its store "
                           f"generation (built by `r2f index`?); point at it with pipeline.index.set_current")
    snapshot = read_snapshot(cfg.store, generation)  # fails naming the snapshot if it was collected
    lock.check()
    publish_pointer(cfg.store, index_dir, version, snapshot, lock=lock, expected_version=previous)
    msg = f"rolled back {index_dir} from {previous} to {version} (store generation {generation})"
    log.info("%s", msg)
    infos = L.read_infos(index_dir, version)
    return ReindexResult(status="rolled_back", message=msg, version=version, previous_version=previous,
                         store_generation=generation, num_images=int(infos.get("num_vectors", 0)),
                         stage_seconds={"rollback": round(time.perf_counter() - t0, 3)})


# ---------------------------------------------------------------- one run, step by step
@dataclass
class _Generation:
    """The store generation a run indexes and how it came about (what its version record and the
    run's result report)."""
    manifest: dict[str, Any]
    changes: dict[str, int]               # added, changed, moved, deleted, unchanged, failed, unreadable
    new_shards: list[int]
    retired_shards: list[int]
    resumed: bool = False                 # finishing a generation an interrupted run wrote


class _Laps:
    """Seconds of each step, for the result and the log."""

    def __init__(self) -> None:
        self.timings: dict[str, float] = {}
        self._t = time.perf_counter()

    def __call__(self, name: str) -> None:
        self.timings[name] = round(time.perf_counter() - self._t, 3)
        self._t = time.perf_counter()


def _reindex(cfg: ReindexConfig, layout: ReindexLayout, on_stage: Hook, lock: ReindexLock) -> ReindexResult:
    """scan -> plan -> extract to staging -> adopt -> build the index -> publish (module docstring)."""
    laps = _Laps()
    scan = scan_source(cfg, layout)
    laps("scan")
    if not storage.exists(storage.StoreLayout(cfg.store).manifest):
        previous_version, gen = None, _first_generation(cfg, layout, scan, laps, on_stage)
    else:
        base, previous_version = published_base(cfg.store, layout.index_dir)
        pending = pending_generation(cfg.store, layout.index_dir, store_generation(base))
        manifest = pending or base  # an interrupted run's generation is built on, not adopted again
        plan, catalog_rows = plan_against(cfg.store, layout, scan.source, scan.hashes, manifest)
        laps("plan")
        on_stage("planned", {"plan": plan})
        if not plan.empty:
            gen = _next_generation(cfg, layout, manifest, plan, laps, on_stage, resumed=pending is not None)
        elif pending is None and covers_generation(layout.index_dir, previous_version, manifest):
            return _nothing_to_do(cfg, layout, scan, plan, manifest, previous_version, catalog_rows, laps.timings)
        else:
            gen = _unindexed_generation(layout, manifest, plan, previous_version)
    built, num_images = _index(cfg, layout, gen, previous_version, laps, on_stage)
    _publish(cfg, layout, gen, built.version, previous_version, scan, lock, laps, on_stage)
    return _published_result(gen, built, previous_version, num_images, laps.timings)


def _changes(plan: ReindexPlan) -> dict[str, int]:
    return dict(added=len(plan.added_ids), changed=len(plan.changed_ids), moved=len(plan.moved),
                deleted=len(plan.deleted_ids), unchanged=plan.unchanged, failed=0, unreadable=len(plan.unreadable))


def _first_generation(cfg: ReindexConfig, layout: ReindexLayout, scan: SourceScan, laps: _Laps,
                      on_stage: Hook) -> _Generation:
    """No catalog yet: the whole source is new. A plain extraction, then generation 0."""
    ext = extract_all(cfg, scan.source)
    laps("extract")
    manifest = first_generation(cfg, layout, scan.source, [h for h, _ in scan.hashes])
    changes = dict(added=ext.num_extracted, changed=0, moved=0, deleted=0, unchanged=0, failed=ext.num_failed,
                   unreadable=sum(h is None for h, _ in scan.hashes))
    laps("store")
    on_stage("snapshot", {"generation": 0})
    return _Generation(manifest, changes, new_shards=list(manifest["shards"]), retired_shards=[])


def _next_generation(cfg: ReindexConfig, layout: ReindexLayout, manifest: dict[str, Any], plan: ReindexPlan,
                     laps: _Laps, on_stage: Hook, resumed: bool) -> _Generation:
    """Extract the plan's images into staging, adopt them as new shards, replace affected shards,
    and write the next store generation's snapshot (not published: only the pointer publishes)."""
    staged = extract_to_staging(cfg, layout, manifest, plan)
    numbers = reserve_shard_numbers(cfg.store, manifest, staged, plan)
    laps("extract")
    on_stage("extracted", {"staging": staged.url, "failed": staged.failed_rows.num_rows})
    adopted, rewritten = adopt(cfg.store, manifest, plan, staged, numbers)
    laps("adopt")
    on_stage("adopted", {"adopted": adopted, "rewritten": rewritten})
    new_manifest = write_generation(cfg, layout, manifest, plan, staged, numbers.generation, adopted, rewritten)
    laps("store")
    on_stage("snapshot", {"generation": new_manifest["generation"]})
    changes = dict(_changes(plan), failed=staged.failed_rows.num_rows)
    return _Generation(new_manifest, changes, new_shards=adopted + rewritten,
                       retired_shards=list(plan.affected_shards), resumed=resumed)


def _unindexed_generation(layout: ReindexLayout, manifest: dict[str, Any], plan: ReindexPlan,
                          previous_version: str | None) -> _Generation:
    """Nothing new in the source, but the generation has no index yet (a first index, or one an
    interrupted run never published): it is indexed with the changes of the run that made it."""
    if previous_version is None:
        log.info("reindex: %s has no index yet; building it", layout.index_dir)
    else:
        log.info("reindex: store generation %d was written but never published (an earlier run stopped "
                 "before publishing); building its index", store_generation(manifest))
    made = manifest.get("reindex") or {}
    changes = dict(_changes(plan), **{k: int(made.get(k, 0)) for k in ("added", "changed", "moved", "deleted")})
    return _Generation(manifest, changes, new_shards=list(made.get("new_shards", [])),
                       retired_shards=list(made.get("retired_shards", [])), resumed=previous_version is not None)


def _nothing_to_do(cfg: ReindexConfig, layout: ReindexLayout, scan: SourceScan, plan: ReindexPlan,
                   manifest: dict[str, Any], previous_version: str, catalog_rows: int,
                   timings: dict[str, float]) -> ReindexResult:
    msg = (f"nothing to do: {cfg.source} matches {cfg.store} ({plan.unchanged} images unchanged"
           + (f", {plan.skipped_failures} known-bad skipped" if plan.skipped_failures else "")
           + f") and {previous_version} indexes all of it")
    log.info("reindex: %s", msg)
    remember_scan(cfg, layout, scan)
    return ReindexResult(status="noop", message=msg, version=previous_version, previous_version=previous_version,
                         store_generation=store_generation(manifest), unchanged=plan.unchanged,
                         unreadable=len(plan.unreadable), num_images=catalog_rows, stage_seconds=timings)


def _index(cfg: ReindexConfig, layout: ReindexLayout, gen: _Generation, previous_version: str | None,
           laps: _Laps, on_stage: Hook) -> tuple[IndexBuildResult, int]:
    """Build the generation's index version (CURRENT untouched) and check it holds exactly the
    generation's ids; returns the build and that count."""
    built = build_version(cfg, layout.index_dir, gen.manifest, previous_version)
    laps("index")
    on_stage("index_built", {"version": built.version, "previous_version": previous_version})
    return built, check_version(cfg.store, layout.index_dir, built.version, gen.manifest)


def _publish(cfg: ReindexConfig, layout: ReindexLayout, gen: _Generation, version: str,
             previous_version: str | None, scan: SourceScan, lock: ReindexLock, laps: _Laps,
             on_stage: Hook) -> None:
    """The version's record, the lock proven ours, then the one pointer write that switches every
    reader; afterwards the scan cache and the staging store are settled."""
    store_gen = store_generation(gen.manifest)
    write_version_record(layout.index_dir, version, gen.manifest,
                         store_manifest=layout.manifest_snapshot(store_gen), previous_version=previous_version,
                         changes=gen.changes, new_shards=gen.new_shards, retired_shards=gen.retired_shards)
    lock.check()
    laps("check")
    on_stage("checked", {"version": version, "store_generation": store_gen})
    publish_pointer(cfg.store, layout.index_dir, version, gen.manifest, lock=lock, expected_version=previous_version)
    laps("publish")
    on_stage("published", {"version": version, "store_generation": store_gen})
    remember_scan(cfg, layout, scan)
    discard_staging(layout)


def _published_result(gen: _Generation, built: IndexBuildResult, previous_version: str | None, num_images: int,
                      timings: dict[str, float]) -> ReindexResult:
    c = gen.changes
    store_gen = store_generation(gen.manifest)
    msg = (f"published {built.version} (was {previous_version}"
           + (", finishing an interrupted run" if gen.resumed else "") + f"): +{c['added']} new, "
           f"{c['changed']} changed, {c['moved']} moved, -{c['deleted']} deleted, "
           f"{c['failed']} failed; {num_images} images in store generation {store_gen}")
    log.info("reindex: %s; timings %s", msg, json.dumps(timings))
    shards_info = built.infos.get("shards", [])
    return ReindexResult(
        status="published", message=msg, version=built.version, previous_version=previous_version,
        store_generation=store_gen, num_images=num_images, new_shards=gen.new_shards,
        retired_shards=gen.retired_shards,
        rebuilt_index_shards=[e["shard"] for e in shards_info if e.get("rebuilt")],
        reused_index_shards=[e["shard"] for e in shards_info if not e.get("rebuilt")],
        stage_seconds=timings, **c)


# ---------------------------------------------------------------- CLI
def register_cli(subparsers) -> None:
    from ..config import add_config_arguments

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
    from ..config import config_from_args

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
