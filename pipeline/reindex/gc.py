"""Garbage collection: delete what no kept state references and no live reader holds.

A *state* is an index version plus the store generation it was built from. Kept states are:

- the newest ``keep_versions`` finished versions and the published one (``CURRENT``);
- the states ``CURRENT`` replaced less than ``gc_grace_s`` ago (its ``history``): a reader may have
  resolved one just before the switch without holding a lease;
- every state a live lease names (``pipeline.index.leases``: heartbeated, younger than the grace period);
- the unpublished generation an interrupted run left (the next run builds on it);
- the generation ``manifest.json`` describes (plain readers of the store use it).

Everything else goes, in this order, so a reader of a collected state fails before reading a
collected byte (``PublishedState.check_kept`` looks for its snapshot after reading tokens):

    1. snapshots of unkept generations (<store>/manifests/gNNNN.json) and their version records
    2. unkept index versions (<index_dir>/versions/vNNNN/)        -- the old ``prune_versions``
    3. Parquet parts, progress and error files of shards no kept generation lists
    4. Zarr chunks of local_tokens.zarr in which no kept generation has a live row; chunks whose
       live fraction is below ``gc_compact_below`` are rewritten with their dead rows zeroed
       (each chunk is compressed, so zeroed rows cost almost nothing; live rows keep their values
       and their row numbers, so no Parquet part changes)
    5. staging folders (<store>/reindex/staging/*) of runs that never adopted them

Nothing modified less than ``gc_grace_s`` ago is collected. It runs under the reindex lock, after a
publish (``gc: true``) or alone (``r2f reindex --gc [--dry-run]``). Memory: O(shards + Zarr chunks)
(per-chunk live counts; each kept part's ``row`` column is read one part at a time), never O(images).
"""
from __future__ import annotations

import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from .. import storage
from ..index import leases, retention
from ..log import get_logger
from .publish import pending_generation, read_snapshot, snapshot_generations, store_generation, version_generation

if TYPE_CHECKING:
    from . import ReindexConfig, ReindexLayout

log = get_logger(__name__)


@dataclass
class GarbageReport:
    dry_run: bool
    kept_versions: list[str] = field(default_factory=list)
    kept_generations: list[int] = field(default_factory=list)
    leases: list[str] = field(default_factory=list)          # jobs whose live leases kept a state
    versions: list[str] = field(default_factory=list)        # collected index versions
    generations: list[int] = field(default_factory=list)     # collected store generation snapshots
    shards: list[int] = field(default_factory=list)          # collected Parquet parts (shard numbers)
    chunks_deleted: int = 0
    chunks_compacted: int = 0
    staging: list[str] = field(default_factory=list)
    bytes: dict[str, int] = field(default_factory=dict)      # reclaimed per kind

    @property
    def bytes_reclaimed(self) -> int:
        return int(sum(self.bytes.values()))

    def summary(self) -> str:
        verb = "would reclaim" if self.dry_run else "reclaimed"
        return (f"gc {verb} {self.bytes_reclaimed} bytes: {len(self.versions)} index version(s), "
                f"{len(self.generations)} store generation(s), {len(self.shards)} Parquet part(s), "
                f"{self.chunks_deleted} Zarr chunk(s) deleted, {self.chunks_compacted} compacted, "
                f"{len(self.staging)} staging folder(s); kept versions {sorted(self.kept_versions)}, "
                f"generations {sorted(self.kept_generations)}" + (f", leases {self.leases}" if self.leases else ""))

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "bytes_reclaimed": self.bytes_reclaimed}


def _mtime(info: dict[str, Any]) -> float:
    t = info.get("mtime") or info.get("LastModified") or info.get("last_modified") or info.get("created")
    if t is None:
        return 0.0
    return float(t.timestamp()) if hasattr(t, "timestamp") else float(t)


def _files(url: str) -> dict[str, dict[str, Any]]:
    """Every file under ``url`` (path -> info), empty when it does not exist."""
    fs, path = storage.filesystem(url)
    try:
        found = fs.find(path, detail=True)
    except FileNotFoundError:
        return {}
    return {p: i for p, i in found.items() if i.get("type", "file") == "file"}


def _rm(url_or_path: str, store: str, recursive: bool = False) -> None:
    fs, _ = storage.filesystem(store)
    try:
        fs.rm(url_or_path, recursive=recursive)
    except FileNotFoundError:
        pass


def _shard_of(name: str, prefix: str) -> int | None:
    if not name.startswith(prefix):
        return None
    try:
        return int(name[len(prefix):].split(".", 1)[0])
    except ValueError:
        return None


def kept_states(cfg: ReindexConfig, layout: ReindexLayout, grace_s: float) -> tuple[set[str], set[int], list[str]]:
    """(kept versions, kept generations, jobs holding live leases)."""
    from ..index import layout as L

    index_dir, now = layout.index_dir, time.time()
    finished = L.list_versions(index_dir)
    versions = set(finished[-cfg.keep_versions:]) | retention.protected_versions(index_dir, grace_s)
    generations: set[int] = set()
    try:
        pointer = L.read_pointer(index_dir)
    except L.IndexFileError:
        pointer = None
    if pointer is not None:
        for h in [pointer, *[h for h in pointer["history"] if now - float(h.get("superseded_at") or 0) < grace_s]]:
            if h.get("store_generation") is not None:
                generations.add(int(h["store_generation"]))
    held = leases.live_leases(index_dir, grace_s)
    for lease in held:
        st = lease["state"]
        if st.get("index_version"):
            versions.add(st["index_version"])
        if st.get("store_generation") is not None:
            generations.add(int(st["store_generation"]))
    for v in versions:
        g = version_generation(index_dir, v)
        if g is not None:
            generations.add(g)
    if storage.exists(storage.StoreLayout(cfg.store).manifest):
        generations.add(store_generation(storage.read_manifest(cfg.store)))
    published_gen = None if pointer is None else pointer.get("store_generation")
    if published_gen is not None:
        pending = pending_generation(cfg.store, index_dir, int(published_gen))
        if pending is not None:
            generations.add(store_generation(pending))
    # snapshots written less than the grace period ago stay (with everything they list)
    for p, info in _files(storage.join(cfg.store, "manifests")).items():
        g = _shard_of(p.rsplit("/", 1)[-1], "g")
        if g is not None and now - _mtime(info) < grace_s:
            generations.add(g)
    return versions, generations, [str(lease.get("job")) for lease in held]


def collect_garbage(cfg: ReindexConfig, layout: ReindexLayout, dry_run: bool = False) -> GarbageReport:
    """Everything no kept state references and no live reader holds, oldest references first:
    snapshots, index versions, shard files, Zarr chunks, staging folders."""
    from ..index import layout as L

    grace, now = float(cfg.gc_grace_s), time.time()
    store, index_dir = cfg.store, layout.index_dir
    report = GarbageReport(dry_run=dry_run)
    nbytes: Counter = Counter()
    versions, generations, jobs = kept_states(cfg, layout, grace)
    report.kept_versions, report.leases = sorted(versions & set(L.list_versions(index_dir))), jobs
    existing = snapshot_generations(store)
    report.kept_generations = sorted(g for g in generations if g in existing)
    if not existing:
        log.info("gc: %s has no store generations (never reindexed): nothing to collect", store)
        return report
    # Snapshots first: from here on the readers of an unkept generation fail naming the snapshot.
    _collect_snapshots(store, generations, dry_run, report, nbytes)
    _collect_versions(cfg, index_dir, versions, grace, dry_run, report, nbytes)
    kept_shards, chunk_rows = _kept_shards(store, generations, existing)
    _collect_shard_files(store, kept_shards, grace, now, dry_run, report, nbytes)
    if chunk_rows and storage.exists(storage.StoreLayout(store).local_tokens):
        _collect_chunks(store, kept_shards, int(chunk_rows), grace, now, dry_run, cfg.gc_compact_below, report, nbytes)
    _collect_staging(store, grace, now, dry_run, report, nbytes)
    report.bytes = dict(nbytes)
    log.info("reindex: %s", report.summary())
    return report


def _collect_snapshots(store: str, generations: set[int], dry_run: bool, report: GarbageReport,
                       nbytes: Counter) -> None:
    """Manifest snapshots of generations no kept state names."""
    for p, info in _files(storage.join(store, "manifests")).items():
        g = _shard_of(p.rsplit("/", 1)[-1], "g")
        if g is not None and g not in generations:
            report.generations.append(g)
            nbytes["snapshots"] += int(info.get("size") or 0)
            if not dry_run:
                _rm(p, store)
    report.generations.sort()


def _collect_versions(cfg: ReindexConfig, index_dir: str, versions: set[str], grace: float, dry_run: bool,
                      report: GarbageReport, nbytes: Counter) -> None:
    """Index versions (and their reindex records) beyond the kept ones, lease- and grace-aware."""
    from ..index import layout as L

    doomed = retention.prune_versions(index_dir, keep=cfg.keep_versions, protect=versions, grace_s=grace, dry_run=True)
    for v in doomed:
        nbytes["index_versions"] += sum(int(i.get("size") or 0)
                                        for i in _files(L.IndexLayout(index_dir).version_dir(v)).values())
    if not dry_run:
        retention.prune_versions(index_dir, keep=cfg.keep_versions, protect=versions, grace_s=grace)
        for v in doomed:
            rec = storage.join(index_dir, "reindex", f"{v}.json")
            if storage.exists(rec):
                _rm(storage.filesystem(rec)[1], cfg.store)
    report.versions = doomed


def _kept_shards(store: str, generations: set[int], existing) -> tuple[set[int], int | None]:
    """Shards some kept generation lists, and the store's Zarr chunk rows."""
    kept: set[int] = set()
    chunk_rows = None
    for g in generations:
        if g in existing:
            snap = read_snapshot(store, g)
            kept |= {int(s) for s in snap["shards"]}
            chunk_rows = chunk_rows or snap.get("chunk_rows")
    return kept, chunk_rows


def _collect_shard_files(store: str, kept_shards: set[int], grace: float, now: float, dry_run: bool,
                         report: GarbageReport, nbytes: Counter) -> None:
    """Parquet parts, progress and error files of shards no kept generation lists."""
    slay = storage.StoreLayout(store)
    collected: set[int] = set()
    for folder, prefix, kind in ((slay.global_dir, "part-", "parquet"), (slay.progress_dir, "shard-", "progress"),
                                 (slay.errors_dir, "part-", "errors")):
        for p, info in _files(folder).items():
            s = _shard_of(p.rsplit("/", 1)[-1], prefix)
            if s is None or s in kept_shards or now - _mtime(info) < grace:
                continue
            nbytes[kind] += int(info.get("size") or 0)
            if kind == "parquet":
                collected.add(s)
            if not dry_run:
                _rm(p, store)
    report.shards = sorted(collected)


def _collect_staging(store: str, grace: float, now: float, dry_run: bool, report: GarbageReport,
                     nbytes: Counter) -> None:
    """Staging folders older than the grace period (the lock is held: no run extracts into one)."""
    fs, staging = storage.filesystem(storage.join(store, "reindex", "staging"))
    try:
        folders = fs.ls(staging, detail=False)
    except FileNotFoundError:
        folders = []
    for d in folders:
        files = _files(f"s3://{d}" if store.startswith("s3://") and not d.startswith("s3://") else d)
        if files and now - max(_mtime(i) for i in files.values()) < grace:
            continue
        report.staging.append(d.rstrip("/").rsplit("/", 1)[-1])
        nbytes["staging"] += sum(int(i.get("size") or 0) for i in files.values())
        if not dry_run:
            _rm(d, store, recursive=True)


def _collect_chunks(store: str, kept_shards: set[int], chunk_rows: int, grace: float, now: float, dry_run: bool,
                    compact_below: float, report: GarbageReport, nbytes: Counter) -> None:
    slay = storage.StoreLayout(store)
    parts = [slay.global_part(s) for s in sorted(kept_shards)]
    live: Counter = Counter()
    for url in parts:
        rows = storage.read_parquet(url, ["row"]).column("row").to_numpy()
        chunks, counts = np.unique(rows // chunk_rows, return_counts=True)
        live.update(dict(zip(chunks.tolist(), counts.tolist())))
    chunk_dir = storage.join(slay.local_tokens, "c")
    files = _files(chunk_dir)
    by_chunk: dict[int, tuple[str, dict[str, Any]]] = {}
    for p, info in files.items():
        rel = p.split("/c/", 1)[-1].split("/")
        try:
            by_chunk[int(rel[0])] = (p, info)
        except ValueError:
            continue
    compact = []
    for c, (p, info) in sorted(by_chunk.items()):
        if now - _mtime(info) < grace:
            continue
        if live.get(c, 0) == 0:
            report.chunks_deleted += 1
            nbytes["zarr_chunks"] += int(info.get("size") or 0)
            if not dry_run:
                _rm(p, store)
        elif live[c] < compact_below * chunk_rows:
            compact.append(c)
    if not compact:
        return
    if dry_run:
        report.chunks_compacted = len(compact)
        return
    wanted = set(compact)
    keep_rows: dict[int, list[int]] = {c: [] for c in compact}
    for url in parts:  # second pass: only the rows of chunks being compacted
        rows = storage.read_parquet(url, ["row"]).column("row").to_numpy()
        for r in rows[np.isin(rows // chunk_rows, list(wanted))].tolist():
            keep_rows[r // chunk_rows].append(r)
    tokens = storage.open_local_tokens(store, mode="r+")
    fs, _ = storage.filesystem(store)
    for c in compact:
        start, stop = c * chunk_rows, min((c + 1) * chunk_rows, tokens.shape[0])
        block = np.asarray(tokens[start:stop])
        dead = np.ones(stop - start, bool)
        dead[np.asarray(keep_rows[c], np.int64) - start] = False
        if not block[dead].any():
            continue  # compacted by an earlier collection already (or never written)
        block[dead] = 0
        report.chunks_compacted += 1
        before = int(by_chunk[c][1].get("size") or 0)
        tokens[start:stop] = block  # one chunk, replaced whole (atomic on local disk and S3)
        after = int(fs.info(by_chunk[c][0]).get("size") or 0)
        nbytes["zarr_compacted"] += max(0, before - after)
