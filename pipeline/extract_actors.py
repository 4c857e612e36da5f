"""The two Ray Data stages of extraction (``pipeline.extract`` draws the dataflow): ``decode_shard``,
the CPU task that reads and resizes one shard's images, and ``ShardExtractor``, the model actor
that turns a decoded shard into descriptors and writes the shard itself. ``forward`` is the one
forward pass that actors, the online service and benchmarks share.
"""
from __future__ import annotations

import io
import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pyarrow as pa

from . import storage, weights
from .config import jsonable
from .images import ImageReadError, content_hash, decode_resize, read_bytes


class ExtractError(RuntimeError):
    pass


# Columns of the per-image metadata that travels with a decoded shard.
_META_SCHEMA = pa.schema([
    ("image_id", pa.int64()), ("path", pa.string()), ("utm_east", pa.float64()), ("utm_north", pa.float64()),
    ("heading", pa.float64()), ("timestamp", pa.string()), ("place_id", pa.string()), ("width", pa.int32()),
    ("height", pa.int32()), ("row", pa.int64()), ("content_hash", pa.string()), ("tag", pa.string()),
])


# ---------------------------------------------------------------- stage 1: CPU tasks
def to_ipc(table: pa.Table) -> bytes:
    """A table as Arrow IPC bytes: how a shard's rows travel inside one Ray Data row."""
    sink = io.BytesIO()
    with pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    return sink.getvalue()


def from_ipc(data: bytes) -> pa.Table:
    return pa.ipc.open_stream(pa.py_buffer(data)).read_all()


def decode_shard(batch: pa.Table, image_size: tuple[int, int], io_threads: int = 8) -> pa.Table:
    """One shard row (its dataset rows as Arrow IPC) -> one row with the resized pixels of every
    readable image, their metadata and the errors of the others."""
    out = []
    for i in range(batch.num_rows):
        rows = from_ipc(batch.column("rows")[i].as_py())
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
                        meta=to_ipc(meta.cast(_META_SCHEMA)), errors=to_ipc(errors), pixels=pixels.tobytes()))
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
        meta = from_ipc(row.column("meta")[0].as_py())
        errors = from_ipc(row.column("errors")[0].as_py())
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
