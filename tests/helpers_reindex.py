"""A reindexable store written by hand (as extraction would write it, without running the model),
for reindex tests whose changes are deletions and moves (which need no extraction)."""
from __future__ import annotations

import csv
import math
from collections.abc import Sequence

import fsspec
import numpy as np
import pyarrow as pa

from pipeline import storage
from pipeline.datasets import load_dataset
from pipeline.images import content_hash, read_bytes


def write_source(path: str, folder, frames: Sequence[int], east: dict[int, float] | None = None) -> str:
    """A manifest CSV of Gardens Point frames ``folder/ImageNNN.jpg`` (``utm_east`` = the frame, or
    ``east[frame]``: a move)."""
    east = east or {}
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "utm_east", "utm_north"])
        for i in frames:
            w.writerow([str(folder / f"Image{i:03d}.jpg"), east.get(i, float(i)), 0])
    return str(path)


def write_hand_store(store: str, source: str, tokens: int = 8, dim: int = 64, shard_size: int = 4,
                     chunk_rows: int = 2, seed: int = 0) -> None:
    """Every image of ``source`` in shards of ``shard_size``: random descriptors and local tokens,
    real content hashes, the manifest last."""
    table = load_dataset(source)
    n = table.num_rows
    n_shards = math.ceil(n / shard_size)
    lay = storage.StoreLayout(store)
    rng = np.random.default_rng(seed)
    zarr_tokens = storage.create_local_tokens(store, n_shards * shard_size, tokens, chunk_rows)
    for s in range(n_shards):
        part = table.slice(s * shard_size, shard_size)
        k = part.num_rows
        desc = rng.standard_normal((k, dim)).astype(np.float32)
        rows = list(range(s * shard_size, s * shard_size + k))
        storage.write_parquet(lay.global_part(s), pa.table({
            **{c: part.column(c) for c in ("image_id", "path", "utm_east", "utm_north", "heading", "timestamp",
                                           "place_id")},
            "width": pa.array([64] * k, pa.int32()), "height": pa.array([48] * k, pa.int32()),
            "global_descriptor": pa.FixedSizeListArray.from_arrays(pa.array(desc.ravel(), pa.float32()), dim),
            "shard": pa.array([s] * k, pa.int32()), "row": pa.array(rows, pa.int64()),
            "content_hash": pa.array([content_hash(read_bytes(p)) for p in part.column("path").to_pylist()],
                                     pa.string()),
            "tag": pa.nulls(k, pa.string())}, schema=storage.global_schema(dim)),
            {"layout_version": storage.LAYOUT_VERSION})
        zarr_tokens[s * shard_size:s * shard_size + k] = \
            rng.standard_normal((k, tokens, storage.TOKEN_DIM)).astype(np.float16)
        storage.write_json(lay.progress(s), dict(shard=s, images=k, extracted=k, failed=0))
    storage.write_json(lay.manifest, dict(
        layout_version=storage.LAYOUT_VERSION, shards=list(range(n_shards)), shard_size=shard_size,
        chunk_rows=chunk_rows, image_size=[128, 224], model=dict(backbone="efficientnet-lite0", checkpoint=None),
        tokens=tokens, global_dim=dim, rows=n_shards * shard_size))


def tree_bytes(url: str, exclude: Sequence[str] = ()) -> int:
    """Bytes of every file under ``url`` except those under the ``exclude`` URLs."""
    fs, root = storage.filesystem(url)
    skip = [storage.filesystem(e)[1].rstrip("/") + "/" for e in exclude]
    return int(sum(i["size"] for p, i in fs.find(root, detail=True).items()
                   if not any(p.startswith(s) for s in skip)))


def s3_fs(url: str):
    return fsspec.filesystem("s3", **storage.storage_options(url))
