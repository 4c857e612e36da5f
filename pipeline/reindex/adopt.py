"""Adopt: staging shards become store shards, affected shards are replaced by filtered copies, and
the next store generation's snapshot is written (not published: only the pointer publishes).

    staging shard k  --(Ray task per shard: owns its Zarr chunks)-->  store shard N (fresh rows)
    old shard s that lost/moved rows  -->  shard M: the survivors, still pointing at s's Zarr rows
    <store>/manifests/gNNNN.json         the new generation (numbers from ``publish.reserve_numbers``)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from .. import storage
from ..timefmt import utc_now
from .plan import POSITION_COLUMNS, ReindexPlan, read_failures, write_failures
from .publish import reserve_numbers, store_generation, write_snapshot
from .staging import Staged

if TYPE_CHECKING:
    from . import ReindexConfig
    from .layout import ReindexLayout

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


@dataclass
class Numbering:
    """Numbers of the new shards and of the next store generation, reserved before any file with
    them is written."""
    staged: list[tuple[int, int]]         # (staging shard, store shard it becomes)
    first_rewritten: int                  # affected shard i is rewritten as first_rewritten + i
    generation: int


def reserve_shard_numbers(store: str, manifest: dict[str, Any], staged: Staged, plan: ReindexPlan) -> Numbering:
    """Numbers above every one ever used (recorded first), so no kept or collected state's file is reused."""
    used = _used_shard_numbers(store)
    next_shard = max(used | {int(s) for s in manifest["shards"]} | {-1}) + 1
    next_shard, generation = reserve_numbers(store, next_shard, len(staged.shards) + len(plan.affected_shards))
    pairs = [(k, next_shard + i) for i, k in enumerate(staged.shards)]
    first_rewritten = max([next_shard - 1, *[new for _, new in pairs]]) + 1
    return Numbering(staged=pairs, first_rewritten=first_rewritten, generation=generation)


def adopt(store: str, manifest: dict[str, Any], plan: ReindexPlan, staged: Staged, numbers: Numbering
          ) -> tuple[list[int], list[int]]:
    """Staging shards become store shards (tokens copied into fresh Zarr rows, one Ray task per
    shard) and every affected shard is rewritten without its lost rows. Returns the store shards
    written: ``(adopted, rewritten)``, leaving out those that came out empty."""
    adopted: list[int] = []
    if numbers.staged:
        import ray

        shard_size = int(manifest["shard_size"])
        last = max(new for _, new in numbers.staged)
        needed = last * shard_size + min(shard_size, staged.rows - numbers.staged[-1][0] * shard_size)
        tokens = storage.open_local_tokens(store, mode="r+")
        if tokens.shape[0] < needed:
            tokens.resize((needed, *tokens.shape[1:]))
        task = ray.remote(num_cpus=1, max_retries=2)(_adopt_shard)
        counts = ray.get([task.remote(staged.url, store, k, new, shard_size, staged.rows)
                          for k, new in numbers.staged])
        adopted = [new for (_, new), c in zip(numbers.staged, counts) if c > 0]
    drop = set(plan.deleted_ids.tolist()) | set(plan.changed_ids.tolist())
    moved = {int(r["image_id"]): r for r in plan.moved.to_pylist()}
    rewritten: list[int] = []
    for i, old in enumerate(plan.affected_shards):
        new = numbers.first_rewritten + i
        if _rewrite_shard(store, old, new, drop, moved) > 0:
            rewritten.append(new)
    return adopted, rewritten


def write_generation(cfg: ReindexConfig, layout: ReindexLayout, manifest: dict[str, Any], plan: ReindexPlan,
                     staged: Staged, generation: int, adopted: list[int], rewritten: list[int]) -> dict[str, Any]:
    """The next store generation's snapshot (not published: only the pointer publishes) and the
    known-bad images; returns its manifest."""
    retired = list(plan.affected_shards)
    shards = sorted(({int(s) for s in manifest["shards"]} - set(retired)) | set(adopted) | set(rewritten))
    rows = storage.open_local_tokens(cfg.store).shape[0]
    new_manifest = dict(manifest)
    new_manifest.update(
        generation=generation, previous_generation=store_generation(manifest),
        dataset=cfg.source, shards=shards, rows=int(rows),
        finished_at=utc_now(),
        reindex=dict(added=len(plan.added_ids), changed=len(plan.changed_ids), moved=len(plan.moved),
                     deleted=len(plan.deleted_ids), new_shards=adopted + rewritten, retired_shards=retired))
    new_manifest.pop("keys_digest", None)  # described the first extraction's key list only
    n_rows = _count_rows(cfg.store, shards)
    failed = staged.failed_rows.num_rows
    new_manifest["counts"] = dict(images=n_rows + failed, extracted=n_rows, failed=failed)
    write_snapshot(layout, new_manifest)
    write_failures(layout, pa.concat_tables([read_failures(layout), staged.failed_rows]), plan.source_hashes,
                   keep_paths=set(plan.source_hashes))
    return new_manifest


def first_generation(cfg: ReindexConfig, layout: ReindexLayout, source: pa.Table,
                     hashes: list[str | None]) -> dict[str, Any]:
    """A first run's store becomes generation 0 as extracted: its snapshot and known-bad images."""
    manifest = dict(storage.read_manifest(cfg.store), generation=0)
    write_snapshot(layout, manifest)
    write_failures(layout, storage.read_errors(cfg.store), dict(zip(source.column("path").to_pylist(), hashes)))
    return manifest
