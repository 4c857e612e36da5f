"""Adopt: staging shards become store shards, affected shards are replaced by filtered copies, and
the next store generation's snapshot is written (not published: only the pointer publishes).

    staging shard k  --(Ray task per shard: owns its Zarr chunks)-->  store shard N (fresh rows)
    old shard s that lost/moved rows  -->  shard M: the survivors, still pointing at s's Zarr rows
    <store>/manifests/gNNNN.json         the new generation (numbers from ``publish.reserve_numbers``)
"""
from __future__ import annotations

import hashlib
import time
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from .. import storage
from ..log import get_logger
from .lock import ReindexError
from .plan import FAILURES_SCHEMA, POSITION_COLUMNS, ReindexPlan, read_failures
from .publish import reserve_numbers, store_generation
from ..timefmt import utc_now

if TYPE_CHECKING:
    from . import ReindexConfig, ReindexLayout

log = get_logger(__name__)

# ExtractConfig keys a reindex may set: how to run, not what the descriptors are. What they are
# (backbone, checkpoint, image size, shard size) comes from the store, so new rows match old ones.
RUNTIME_EXTRACT_KEYS = ("batch_size", "num_actors", "threads_per_actor", "max_failures", "progress", "device",
                        "ray_address")



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
        finished_at=utc_now(),
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


