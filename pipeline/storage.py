"""The extraction store: one versioned layout, defined here and nowhere else.

A store is a folder or URL (local path or ``s3://``, through fsspec)::

    <store>/manifest.json                 written last: makes a finished extraction visible
    <store>/global/part-00012.parquet     one row per image of shard 12 (schema: GLOBAL_SCHEMA)
    <store>/errors/part-00012.parquet     bad inputs of shard 12 (schema: ERROR_SCHEMA)
    <store>/progress/shard-00012.json     shard 12 finished (written after its Parquet and Zarr)
    <store>/plan.json                     written first: what is being extracted (checked on resume)
    <store>/local_tokens.zarr             Zarr v3 array (rows, T, 131) float16
    <store>/manifests/g0003.json          (reindex) snapshot of store generation 3's manifest
    <store>/reindex/staging/<digest>/     (reindex) a store holding one run's new images, adopted after
    <store>/reindex/failures.parquet      (reindex) known-bad images: path, content_hash, stage, reason
    <store>/reindex/scan_cache.parquet    (reindex) path, size+mtime/ETag stamp, content_hash of the last scan

Shard ``s`` owns Zarr rows ``[s * shard_size, (s + 1) * shard_size)``; the row chunk size divides
``shard_size``, so every writer owns whole chunks (concurrent partial writes to one chunk lose
data). The ``row`` column of the Parquet table is the Zarr row of that image.

Layout versions: 2 adds the nullable string column ``tag`` (the image's condition as the dataset
names it: night, season, viewpoint; null when the dataset gives none). A version-1 part has no
``tag``; ``read_global_part`` / ``read_global_table`` read it as all-null, so old stores, and stores
whose reindexed generations mix both versions, read as one table.

The file holds the layout with everything that reads or writes it (the S3 options it is written
through, the output checks, the model signature a manifest records), which is why it runs past
450 lines: splitting them would give the layout two homes.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

LAYOUT_VERSION = 2  # 2: optional ``tag`` column
# Layouts an extraction of this version resumes (their parts differ only in optional columns).
RESUMABLE_LAYOUTS = (1, 2)
# R2Former's descriptor width, the default of an empty table. A store's own width is the model's
# (``manifest["global_dim"]``, the Parquet list size): 1280 for EfficientNet-Lite0's plain GeM.
GLOBAL_DIM = 256
TOKEN_DIM = 131  # x, y, attention/score, 128-d feature
POSITION_COLUMNS = ("utm_east", "utm_north", "heading", "timestamp", "place_id")


def global_schema(dim: int = GLOBAL_DIM) -> pa.Schema:
    return pa.schema([
        ("image_id", pa.int64()),
        ("path", pa.string()),
        ("utm_east", pa.float64()),
        ("utm_north", pa.float64()),
        ("heading", pa.float64()),
        ("timestamp", pa.string()),
        ("place_id", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("global_descriptor", pa.list_(pa.float32(), dim)),
        ("shard", pa.int32()),
        ("row", pa.int64()),
        ("content_hash", pa.string()),
        ("tag", pa.string()),  # layout 2; null when the dataset names no condition
    ])


# Columns a part written by an older layout may lack, with the type they are read as (all null).
OPTIONAL_GLOBAL_COLUMNS = {"tag": pa.string()}


ERROR_SCHEMA = pa.schema([
    ("path", pa.string()),
    ("stage", pa.string()),
    ("reason", pa.string()),
])


class StoreError(RuntimeError):
    pass


class OutputLocationError(ValueError):
    """An output URL that cannot be written (missing bucket, no permission); names the option."""


class StoreMismatch(ValueError):
    """Two stores (or a store and a model) made by different models; names both and the field."""


# Retries of every S3 request (throttling, 5xx, timeouts, dropped connections): botocore's
# "standard" mode with this many attempts, unless R2F_S3_RETRY_MODE / R2F_S3_MAX_ATTEMPTS say
# otherwise. Both are forwarded to Ray workers (pipeline.cluster), so every node retries alike.
S3_RETRY_MODE = "standard"
S3_MAX_ATTEMPTS = 10


def s3_retry_settings() -> dict[str, Any]:
    """botocore's ``retries`` setting as this process sees it (``infra/OPERATIONS.md``)."""
    mode = os.environ.get("R2F_S3_RETRY_MODE", S3_RETRY_MODE)
    if mode not in ("legacy", "standard", "adaptive"):
        raise ValueError(f"R2F_S3_RETRY_MODE must be legacy, standard or adaptive, got {mode!r}")
    try:
        attempts = int(os.environ.get("R2F_S3_MAX_ATTEMPTS", str(S3_MAX_ATTEMPTS)))
    except ValueError:
        raise ValueError(f"R2F_S3_MAX_ATTEMPTS must be an int, got {os.environ['R2F_S3_MAX_ATTEMPTS']!r}") from None
    if attempts < 1:
        raise ValueError(f"R2F_S3_MAX_ATTEMPTS must be at least 1, got {attempts}")
    return {"mode": mode, "max_attempts": attempts}


def storage_options(url: str) -> dict[str, Any]:
    """fsspec options for ``url``. S3 endpoint comes from ``R2F_S3_ENDPOINT_URL`` / ``AWS_ENDPOINT_URL``,
    retries from ``s3_retry_settings``; credentials come from the standard AWS chain (environment,
    instance or pod role) and are never logged or passed here."""
    if url.startswith("s3://"):
        endpoint = os.environ.get("R2F_S3_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL")
        # No listings cache: other processes (Ray workers, other jobs) write the same prefixes, and a
        # cached listing makes a file written since then look missing.
        opts: dict[str, Any] = {"config_kwargs": {"retries": s3_retry_settings()}, "use_listings_cache": False}
        if endpoint:
            opts["endpoint_url"] = endpoint
        return opts
    return {}


def filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """``(fs, path)`` for a local path or URL."""
    fs, path = fsspec.core.url_to_fs(url, **storage_options(url))
    return fs, path


def join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *[p.strip("/") for p in parts]])


def image_id_for(key: str) -> int:
    """Stable 63-bit id of an image from its dataset-relative key (same on every run and machine)."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little") & ((1 << 63) - 1)


@dataclass(frozen=True)
class StoreLayout:
    root: str

    @property
    def manifest(self) -> str:
        return join(self.root, "manifest.json")

    @property
    def global_dir(self) -> str:
        return join(self.root, "global")

    @property
    def errors_dir(self) -> str:
        return join(self.root, "errors")

    @property
    def progress_dir(self) -> str:
        return join(self.root, "progress")

    @property
    def local_tokens(self) -> str:
        return join(self.root, "local_tokens.zarr")

    @property
    def plan(self) -> str:
        """What an extraction in progress is extracting (dataset digest, model, sizes), written
        first, so that a resumed run refuses to mix shards of two different extractions."""
        return join(self.root, "plan.json")

    # ---- written by pipeline.reindex: a store kept up to date goes through generations; each
    # manifest.json is snapshotted, and shard numbers are never reused (a reindex replaces a shard
    # by a filtered copy under a new number whose ``row`` values still point at the old Zarr rows)
    def manifest_snapshot(self, generation: int) -> str:
        return join(self.root, "manifests", f"g{generation:04d}.json")

    @property
    def reindex_staging_dir(self) -> str:
        return join(self.root, "reindex", "staging")

    @property
    def reindex_failures(self) -> str:
        return join(self.root, "reindex", "failures.parquet")

    @property
    def reindex_scan_cache(self) -> str:
        """path, stamp (size + mtime/ETag), content_hash of the last scan: unchanged files are not reread."""
        return join(self.root, "reindex", "scan_cache.parquet")

    def global_part(self, shard: int) -> str:
        return join(self.global_dir, f"part-{shard:05d}.parquet")

    def errors_part(self, shard: int) -> str:
        return join(self.errors_dir, f"part-{shard:05d}.parquet")

    def actor_record(self, node_id: str, pid: int) -> str:
        """Written by each model actor when it starts: where the extraction ran (node, process)."""
        return join(self.root, "actors", f"{node_id[:16]}-{pid}.json")

    def progress(self, shard: int) -> str:
        return join(self.progress_dir, f"shard-{shard:05d}.json")


# ---------------------------------------------------------------- output locations
def makedirs(fs, path: str) -> None:
    """The folder a file is about to be written in. Only on local disks: object stores have no
    folders, and s3fs's ``makedirs`` creates a missing bucket, which outputs never do."""
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    if "file" in protocols or "local" in protocols:
        fs.makedirs(path, exist_ok=True)


def check_output(url: str, option: str) -> None:
    """Before any work: the bucket of an ``s3://`` output exists and takes a write (a probe object,
    deleted again), else one ``OutputLocationError`` naming ``option``, the URL and the reason.
    Local outputs are created as needed."""
    if not url.startswith("s3://"):
        return
    fs, path = filesystem(url)
    bucket = path.split("/", 1)[0]
    if not bucket:
        raise OutputLocationError(f"{option} {url}: no bucket named")
    probe = f"{path.rstrip('/')}/.r2f-write-check-{os.getpid()}-{os.urandom(4).hex()}"
    try:
        fs.pipe_file(probe, b"")
        fs.rm_file(probe)
    except FileNotFoundError:  # s3fs: NoSuchBucket
        raise OutputLocationError(f"{option} {url}: bucket {bucket!r} does not exist; outputs never create "
                                  f"buckets, create it first (or fix the name)") from None
    except PermissionError as exc:
        raise OutputLocationError(f"{option} {url}: cannot write to bucket {bucket!r}: "
                                  f"{_reason(exc)}") from None
    except OSError as exc:
        raise OutputLocationError(f"{option} {url}: the store cannot be written: {_reason(exc)}") from None


def _reason(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:200]


# ---------------------------------------------------------------- which model made a store
# What a store records of the model that made it; two stores scored or searched together must
# agree on every one of these that both record.
MODEL_FIELDS = ("backbone", "checkpoint_hash", "global_dim", "image_size", "tokens")


def model_signature(manifest: dict[str, Any]) -> dict[str, Any]:
    model = manifest.get("model") or {}
    size = (manifest.get("preprocessing") or {}).get("image_size") or manifest.get("image_size")
    return {"backbone": model.get("backbone"), "checkpoint_hash": model.get("checkpoint_hash"),
            "global_dim": manifest.get("global_dim"), "image_size": list(size) if size else None,
            "tokens": manifest.get("tokens")}


def check_same_model(first: tuple[str, str, dict[str, Any]], second: tuple[str, str, dict[str, Any]],
                     fields: Iterable[str] = MODEL_FIELDS) -> None:
    """``(role, url, manifest or signature)`` twice: a ``StoreMismatch`` naming both and the first
    field they disagree on (fields one side does not record are not compared)."""
    (role_a, url_a, a), (role_b, url_b, b) = first, second
    sig_a = model_signature(a) if "model" in a or "layout_version" in a else a
    sig_b = model_signature(b) if "model" in b or "layout_version" in b else b
    for field in fields:
        va, vb = sig_a.get(field), sig_b.get(field)
        if va is not None and vb is not None and va != vb:
            raise StoreMismatch(f"{role_a} {url_a} and {role_b} {url_b} come from different models: {field} "
                                f"{va!r} vs {vb!r}; extract both with the same --backbone, --checkpoint and "
                                f"--image-size")


def extraction_size(manifest: dict[str, Any], default: Iterable[int] | None = None) -> tuple[int, int]:
    """(H, W) the store's images were resized to (RANSAC's pixel scale, the report's thumbnails);
    ``default`` only for a store that records none."""
    size = model_signature(manifest)["image_size"] or (list(default) if default is not None else None)
    if not size:
        raise StoreError("the store's manifest records no image size")
    return int(size[0]), int(size[1])


# ---------------------------------------------------------------- small JSON / Parquet helpers
def write_json(url: str, obj: Any) -> None:
    """Write JSON so that readers never see a half-written file (``write_bytes``)."""
    write_bytes(url, json.dumps(obj, indent=2, sort_keys=True, default=_json_default).encode())


def write_bytes(url: str, data: bytes) -> None:
    """One whole file: temp file + rename on local disks; one PUT on S3 (atomic, and repeating it
    after a lost answer writes the same object again)."""
    fs, path = filesystem(url)
    makedirs(fs, path.rsplit("/", 1)[0])
    if fs.protocol in ("file", "local") or "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)):
        tmp = f"{path}.tmp-{os.getpid()}"
        with fs.open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    else:
        with fs.open(path, "wb") as f:
            f.write(data)


def read_json(url: str) -> Any:
    fs, path = filesystem(url)
    with fs.open(path, "rb") as f:
        return json.loads(f.read())


def exists(url: str) -> bool:
    fs, path = filesystem(url)
    return fs.exists(path)


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def write_parquet(url: str, table: pa.Table, metadata: dict[str, Any] | None = None) -> None:
    fs, path = filesystem(url)
    makedirs(fs, path.rsplit("/", 1)[0])
    if metadata:
        meta = dict(table.schema.metadata or {})
        meta.update({k.encode(): json.dumps(v, default=_json_default).encode() for k, v in metadata.items()})
        table = table.replace_schema_metadata(meta)
    with fs.open(path, "wb") as f:
        pq.write_table(table, f)


def read_parquet(url: str, columns: Iterable[str] | None = None) -> pa.Table:
    fs, path = filesystem(url)
    try:
        with fs.open(path, "rb") as f:
            return pq.read_table(f, columns=list(columns) if columns else None)
    except FileNotFoundError:
        raise StoreError(f"missing Parquet file {url}") from None
    except pa.ArrowInvalid as exc:
        raise StoreError(f"corrupt Parquet file {url}: {exc}") from None


def parquet_metadata(url: str) -> dict[str, Any]:
    fs, path = filesystem(url)
    with fs.open(path, "rb") as f:
        meta = pq.read_schema(f).metadata or {}
    out = {}
    for k, v in meta.items():
        try:
            out[k.decode()] = json.loads(v)
        except (ValueError, UnicodeDecodeError):
            continue
    return out


# ---------------------------------------------------------------- readers used by later stages
def read_manifest(store: str) -> dict[str, Any]:
    """The manifest of a finished extraction; a clear error when the store is unfinished or absent."""
    layout = StoreLayout(store)
    try:
        return read_json(layout.manifest)
    except FileNotFoundError:
        raise StoreError(f"{store} holds no finished extraction (no manifest.json); run `r2f extract` first") from None


def global_part_urls(store: str, manifest: dict[str, Any] | None = None) -> list[str]:
    manifest = manifest or read_manifest(store)
    layout = StoreLayout(store)
    return [layout.global_part(s) for s in manifest["shards"]]


def read_global_part(url: str, columns: Iterable[str] | None = None) -> pa.Table:
    """One global Parquet part, any layout version: a column of ``OPTIONAL_GLOBAL_COLUMNS`` that
    the part predates is returned as all-null (in the asked order, or appended at the end)."""
    fs, path = filesystem(url)
    wanted = list(columns) if columns is not None else None
    try:
        with fs.open(path, "rb") as f:
            part = pq.ParquetFile(f)
            present = set(part.schema_arrow.names)
            absent = [c for c in (wanted if wanted is not None else OPTIONAL_GLOBAL_COLUMNS)
                      if c not in present and c in OPTIONAL_GLOBAL_COLUMNS]
            table = part.read(columns=[c for c in wanted if c not in absent] if wanted is not None else None)
    except FileNotFoundError:
        raise StoreError(f"missing Parquet file {url}") from None
    except pa.ArrowInvalid as exc:
        raise StoreError(f"corrupt Parquet file {url}: {exc}") from None
    for c in absent:
        table = table.append_column(pa.field(c, OPTIONAL_GLOBAL_COLUMNS[c]),
                                    pa.nulls(table.num_rows, OPTIONAL_GLOBAL_COLUMNS[c]))
    return table.select(wanted) if wanted is not None else table


def read_global_table(store: str, columns: Iterable[str] | None = None,
                      manifest: dict[str, Any] | None = None) -> pa.Table:
    """All rows of a finished store (sorted by shard, then position), as one Arrow table; with
    ``manifest`` (a pinned store generation, ``pipeline.index.published``) the rows of that generation.
    Parts of older layouts read with their missing optional columns as nulls."""
    manifest = manifest or read_manifest(store)
    columns = list(columns) if columns is not None else None
    tables = [read_global_part(u, columns) for u in global_part_urls(store, manifest)]
    # Parts with no rows (every image of the shard failed) may carry a default descriptor width.
    tables = [t for t in tables if t.num_rows] or tables[:1]
    if not tables:
        return global_schema(manifest.get("global_dim", GLOBAL_DIM)).empty_table().select(list(columns) if columns else None) \
            if columns else global_schema(manifest.get("global_dim", GLOBAL_DIM)).empty_table()
    return pa.concat_tables(tables)


def descriptors_of(table: pa.Table) -> np.ndarray:
    """(N, D) float32 array from the ``global_descriptor`` column."""
    col = table.column("global_descriptor").combine_chunks()
    if len(col) == 0:
        return np.zeros((0, col.type.list_size), np.float32)
    return col.values.to_numpy(zero_copy_only=False).reshape(len(col), col.type.list_size).astype(np.float32, copy=False)


def read_global_descriptors(store: str) -> tuple[np.ndarray, np.ndarray]:
    """``(image_ids int64 (N,), descriptors float32 (N, D))`` of a finished store."""
    t = read_global_table(store, ["image_id", "global_descriptor"])
    return t.column("image_id").to_numpy().astype(np.int64), descriptors_of(t)


def read_errors(store: str) -> pa.Table:
    fs, path = filesystem(StoreLayout(store).errors_dir)
    if not fs.exists(path):
        return ERROR_SCHEMA.empty_table()
    files = sorted(fs.glob(path + "/part-*.parquet"))
    tables = [read_parquet(_with_protocol(store, f)) for f in files]
    return pa.concat_tables(tables) if tables else ERROR_SCHEMA.empty_table()


def _with_protocol(store: str, path: str) -> str:
    return f"s3://{path}" if store.startswith("s3://") and not path.startswith("s3://") else path


def open_local_tokens(store: str, mode: str = "r"):
    """The Zarr v3 ``local_tokens`` array of a store."""
    import zarr
    url = StoreLayout(store).local_tokens
    return zarr.open_array(url, mode=mode, storage_options=storage_options(url) or None) if url.startswith("s3://") \
        else zarr.open_array(url, mode=mode)


def create_local_tokens(store: str, rows: int, tokens: int, chunk_rows: int):
    import zarr
    url = StoreLayout(store).local_tokens
    kwargs = dict(shape=(rows, tokens, TOKEN_DIM), chunks=(chunk_rows, tokens, TOKEN_DIM), dtype="float16",
                  fill_value=0, zarr_format=3)
    if url.startswith("s3://"):
        return zarr.create_array(store=zarr.storage.FsspecStore.from_url(url, storage_options=storage_options(url)),
                                 overwrite=False, **kwargs)
    return zarr.create_array(store=url, overwrite=False, **kwargs)


def read_local_tokens(store: str, rows: np.ndarray, array=None) -> np.ndarray:
    """Local tokens of the given Zarr rows as float32 (len(rows), T, 131), in the order asked.
    Each distinct row is read once, however often it is asked for."""
    rows = np.asarray(rows, dtype=np.int64)
    arr = array if array is not None else open_local_tokens(store)
    uniq, inverse = np.unique(rows, return_inverse=True)
    if len(uniq) == 0:
        return np.zeros((0, arr.shape[1], arr.shape[2]), np.float32)
    data = np.asarray(arr.get_orthogonal_selection((uniq, slice(None), slice(None))), dtype=np.float32)
    return data[inverse]
