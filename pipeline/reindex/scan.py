"""Scan: the content hash of every image of the source, reading only files whose stamp changed.

    source paths --(Ray tasks of ``hash_chunk`` paths; in-process when one chunk is all)--> hashes
    <store>/reindex/scan_cache.parquet   path, size+mtime/ETag stamp, content_hash of the last scan

Memory: O(source images) of short strings in the driver (the source table is held anyway).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import pyarrow as pa

from .. import storage

if TYPE_CHECKING:
    from . import ReindexConfig
    from .layout import ReindexLayout


@dataclass
class SourceScan:
    """The source as it is now: its dataset rows and one scan result per row."""
    source: pa.Table
    paths: list[str]
    scanned: list[tuple[str | None, str | None, str | None]]   # (content_hash, reason, stamp) per path

    @property
    def hashes(self) -> list[tuple[str | None, str | None]]:
        """``(content_hash, reason)`` per row: what the plan compares."""
        return [(h, why) for h, why, _ in self.scanned]


def scan_source(cfg: ReindexConfig, layout: ReindexLayout) -> SourceScan:
    """The scan step: load the source's dataset rows and hash every image (trusting unchanged
    file stamps when ``cfg.trust_file_stamps``)."""
    from ..cluster import ensure_ray
    from ..datasets import load_dataset

    source = load_dataset(cfg.source)
    ensure_ray(cfg.ray_address)
    paths = source.column("path").to_pylist()
    scanned = scan_hashes(paths, cfg.hash_chunk, read_scan_cache(layout) if cfg.trust_file_stamps else None)
    return SourceScan(source, paths, scanned)


def remember_scan(cfg: ReindexConfig, layout: ReindexLayout, scan: SourceScan) -> None:
    """Keep this scan's stamps for the next run; only once the hashes it holds are in a published
    state (or match one), so a run that dies never makes the next one skip a file."""
    if cfg.trust_file_stamps:
        write_scan_cache(layout, scan.paths, scan.scanned)


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


def read_scan_cache(layout: ReindexLayout) -> dict[str, tuple[str, str]]:
    if not storage.exists(layout.scan_cache):
        return {}
    t = storage.read_parquet(layout.scan_cache)
    return {p: (st, h) for p, st, h in zip(t.column("path").to_pylist(), t.column("stamp").to_pylist(),
                                          t.column("content_hash").to_pylist())}


def write_scan_cache(layout: ReindexLayout, paths: list[str], scanned) -> None:
    rows = [(p, st, h) for p, (h, _, st) in zip(paths, scanned) if h is not None and st is not None]
    storage.write_parquet(layout.scan_cache, pa.table({
        "path": pa.array([r[0] for r in rows], pa.string()), "stamp": pa.array([r[1] for r in rows], pa.string()),
        "content_hash": pa.array([r[2] for r in rows], pa.string())}))


