"""Extract: the images a run has to read become descriptors, with the store's own model and sizes.

    first run      every source image --pipeline.extract.extract_dataset--> the store itself
    later runs     added + changed images --extract_dataset--> <store>/reindex/staging/<digest>
                   (named by what it holds, so a rerun after a crash finds and resumes the same one)

A staging store is an ordinary extraction store; the adopt step turns its shards into the store's.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from .. import storage
from ..log import get_logger
from .lock import ReindexError
from .plan import FAILURES_SCHEMA, ReindexPlan

if TYPE_CHECKING:
    from ..extract import ExtractConfig, ExtractResult
    from . import ReindexConfig
    from .layout import ReindexLayout

log = get_logger(__name__)

# ExtractConfig keys a reindex may set: how to run, not what the descriptors are. What they are
# (backbone, checkpoint, image size, shard size) comes from the store, so new rows match old ones.
RUNTIME_EXTRACT_KEYS = ("batch_size", "num_actors", "threads_per_actor", "max_failures", "progress", "device",
                        "ray_address")


@dataclass
class Staged:
    """What the extract step left for the adopt step."""
    url: str | None                       # the staging store (None: nothing to extract)
    rows: int = 0                         # its manifest's rows
    shards: list[int] | None = None       # its shards
    failed_rows: pa.Table | None = None   # FAILURES_SCHEMA rows of the images that failed

    def __post_init__(self) -> None:
        self.shards = self.shards or []
        if self.failed_rows is None:
            self.failed_rows = FAILURES_SCHEMA.empty_table()


def extract_all(cfg: ReindexConfig, source: pa.Table) -> ExtractResult:
    """A first run: no catalog yet, so the whole source is new and goes straight into the store."""
    from ..config import from_dict
    from ..extract import ExtractConfig, extract_dataset

    log.info("reindex: %s holds no extraction yet; extracting all %d images of %s", cfg.store,
             source.num_rows, cfg.source)
    ecfg = from_dict(ExtractConfig, {"dataset": cfg.source, "ray_address": cfg.ray_address, **cfg.extract})
    ext = extract_dataset(source, cfg.store, ecfg, source=cfg.source)
    if ext.too_many_failures:
        raise ReindexError(f"{ext.num_failed} of {ext.num_images} images of {cfg.source} failed to extract, "
                           f"more than extract.max_failures={ecfg.max_failures} allows; nothing was published")
    return ext


def extract_to_staging(cfg: ReindexConfig, layout: ReindexLayout, manifest: dict[str, Any],
                       plan: ReindexPlan) -> Staged:
    """Extract the plan's added and changed images into this run's staging store and check that
    they came out like the store's rows (same token count, width, sizes and checkpoint)."""
    from ..extract import extract_dataset

    if not plan.to_extract.num_rows:
        return Staged(url=None)
    staging = layout.staging(_delta_digest(plan.to_extract, plan.source_hashes))
    ecfg = staging_config(cfg, manifest)
    log.info("reindex: extracting %d new/changed image(s) into %s", plan.to_extract.num_rows, staging)
    ext = extract_dataset(plan.to_extract, staging, ecfg, source=cfg.source)
    if ext.too_many_failures:
        raise ReindexError(f"{ext.num_failed} of {ext.num_images} new/changed images of {cfg.source} failed to "
                           f"extract, more than extract.max_failures={ecfg.max_failures} allows (errors in "
                           f"{storage.StoreLayout(staging).errors_dir}); nothing was published")
    smanifest = storage.read_manifest(staging)
    _check_matches_store(cfg.store, manifest, smanifest)
    errs = storage.read_errors(staging)
    failed_rows = pa.table({
        "path": errs.column("path"),
        "content_hash": pa.array([plan.source_hashes.get(p) for p in errs.column("path").to_pylist()], pa.string()),
        "stage": errs.column("stage"), "reason": errs.column("reason")}, schema=FAILURES_SCHEMA)
    if ext.num_failed:
        log.warning("reindex: %d new/changed image(s) failed to extract; they are retried when their bytes "
                    "change (see %s)", ext.num_failed, layout.failures)
    return Staged(url=staging, rows=int(smanifest["rows"]), shards=[int(k) for k in smanifest["shards"]],
                  failed_rows=failed_rows)


def _check_matches_store(store: str, manifest: dict[str, Any], smanifest: dict[str, Any]) -> None:
    for key in ("tokens", "global_dim", "image_size", "shard_size", "chunk_rows"):
        if smanifest.get(key) is not None and manifest.get(key) is not None and smanifest[key] != manifest[key]:
            raise ReindexError(f"new images came out with {key}={smanifest[key]!r}, the store {store} has "
                               f"{manifest[key]!r}; refusing to mix them")
    old_hash = (manifest.get("model") or {}).get("checkpoint_hash")
    new_hash = (smanifest.get("model") or {}).get("checkpoint_hash")
    if old_hash and new_hash and old_hash != new_hash:
        raise ReindexError(f"the checkpoint changed since {store} was extracted ({old_hash} -> {new_hash}); "
                           "descriptors would not be comparable: extract into a new store")


def _delta_digest(table: pa.Table, hashes: dict[str, str]) -> str:
    d = hashlib.blake2b(digest_size=8)
    for key, path in zip(table.column("key").to_pylist(), table.column("path").to_pylist()):
        d.update(f"{key}\0{hashes.get(path)}\0".encode())
    return d.hexdigest()


def staging_config(cfg: ReindexConfig, manifest: dict[str, Any]) -> ExtractConfig:
    """The ExtractConfig of new images: the model and sizes of the store, run settings from ``cfg``."""
    from ..config import from_dict
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
    run = {k: v for k, v in cfg.extract.items() if k in RUNTIME_EXTRACT_KEYS}
    run.setdefault("ray_address", cfg.ray_address)
    return from_dict(ExtractConfig, {"dataset": cfg.source, **fixed, **run})


def _norm(v: Any) -> Any:
    return list(v) if isinstance(v, (list, tuple)) else v


def discard_staging(layout: ReindexLayout) -> None:
    """After publishing: adopted rows now live in the store, and no reader ever reads staging."""
    fs, path = storage.filesystem(layout.staging_dir)
    if fs.exists(path):
        fs.rm(path, recursive=True)
