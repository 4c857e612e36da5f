"""Plan: what differs between the source (with its scan hashes) and one store generation's catalog.

    source rows + hashes, catalog (image_id, path, content_hash, shard, row, positions)
        -> added, changed (new bytes), moved (same bytes, new path or position), deleted,
           the catalog shards that lose or move a row

Memory: O(source + catalog rows) of ids, paths and hashes in the driver (no descriptors, no tokens).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from .. import storage
from ..log import get_logger
from ..storage import POSITION_COLUMNS

if TYPE_CHECKING:
    from .layout import ReindexLayout

log = get_logger(__name__)

FAILURES_SCHEMA = pa.schema([("path", pa.string()), ("content_hash", pa.string()), ("stage", pa.string()),
                             ("reason", pa.string())])


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


def plan_against(store: str, layout: ReindexLayout, source: pa.Table, hashes: list[tuple[str | None, str | None]],
                 manifest: dict[str, Any]) -> tuple[ReindexPlan, int]:
    """The plan step: the source against the catalog of the generation ``manifest`` describes (and
    the known-bad images). Returns the plan and the catalog's row count."""
    catalog = read_catalog(store, manifest)
    plan = plan_changes(source, catalog, hashes, read_failures(layout))
    if plan.unreadable:
        log.warning("reindex: %d source image(s) could not be read and are left as they are, e.g. %s",
                    len(plan.unreadable), plan.unreadable[0])
    return plan, int(catalog.num_rows)


def read_catalog(store: str, manifest: dict[str, Any] | None = None) -> pa.Table:
    """The rows of one store generation (default: ``manifest.json``'s) as the reindex compares them
    (no descriptors)."""
    return storage.read_global_table(store, ["image_id", "path", "content_hash", "shard", "row",
                                             *POSITION_COLUMNS], manifest=manifest)


def read_failures(layout: ReindexLayout) -> pa.Table:
    if not storage.exists(layout.failures):
        return FAILURES_SCHEMA.empty_table()
    return storage.read_parquet(layout.failures).cast(FAILURES_SCHEMA)


def write_failures(layout: ReindexLayout, rows: pa.Table, hashes: dict[str, str | None],
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


