"""The index layout: versions, the CURRENT pointer, shard files and ``infos.json``. Defined here only.

An index folder or URL (local path or ``s3://``) holds::

    <index_dir>/CURRENT                          the pointer: {"version": "v0003", "store_generation": 2, ...}
    <index_dir>/versions/v0003/infos.json        written last: makes the version visible (the manifest)
    <index_dir>/versions/v0003/trained.faiss     the empty trained index every shard was filled from
    <index_dir>/versions/v0003/shard-00000.faiss one FAISS index per index shard (ids = image ids)
    <index_dir>/versions/v0003/merged.faiss      optional: every shard merged into one IVF index whose
    <index_dir>/versions/v0003/merged.ivfdata    inverted lists live on disk (faiss merge_ondisk)

A version is immutable once its ``infos.json`` exists; a new build writes a new version folder and
then replaces ``CURRENT`` atomically, so a reader that resolved the old version keeps reading
complete, unchanged files. Versions without ``infos.json`` are unfinished and never searched.

``CURRENT`` is the published state of a store and its index together (``index.published``
resolves it): the index version, the store generation that version was built from (``None`` for a
plain ``r2f index`` build, whose readers use the store's ``manifest.json``), when it was
published, and the states it replaced (``history``, newest first), so garbage collection
(``index.retention``) can keep whatever was superseded less than a grace period ago. Writing it is
one atomic write (temp file and rename locally, one PUT on S3), so a reader sees the old state or
the new one, never a mix, and a conditional one (``set_current``): it replaces only the pointer it read, so two writers racing
cannot both publish, and the later one cannot silently drop the other's state from ``history``.
"""
from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import faiss
import numpy as np

from .. import storage
from ..storage import join

INDEX_LAYOUT_VERSION = 1
_VERSION_RE = re.compile(r"^v(\d{4,})$")


class IndexFileError(RuntimeError):
    """A shard file (or the pointer, or infos.json) is missing, truncated or unreadable; the
    message names the file."""


@dataclass(frozen=True)
class IndexLayout:
    root: str

    @property
    def current(self) -> str:
        return join(self.root, "CURRENT")

    @property
    def versions_dir(self) -> str:
        return join(self.root, "versions")

    def version_dir(self, version: str) -> str:
        return join(self.versions_dir, version)

    def infos(self, version: str) -> str:
        return join(self.version_dir(version), "infos.json")

    def file(self, version: str, name: str) -> str:
        return join(self.version_dir(version), name)


def version_name(number: int) -> str:
    return f"v{number:04d}"


def shard_file_name(shard: int) -> str:
    return f"shard-{shard:05d}.faiss"


def list_versions(index_dir: str, finished_only: bool = True) -> list[str]:
    """Version names in build order; ``finished_only`` keeps those whose ``infos.json`` exists."""
    layout = IndexLayout(index_dir)
    fs, path = storage.filesystem(layout.versions_dir)
    if not fs.exists(path):
        return []
    names = []
    for entry in fs.ls(path, detail=False):
        name = entry.rstrip("/").rsplit("/", 1)[-1]
        if _VERSION_RE.match(name):
            names.append(name)
    names.sort(key=lambda n: int(n[1:]))
    if finished_only:
        names = [n for n in names if storage.exists(layout.infos(n))]
    return names


def next_version(index_dir: str) -> str:
    """The name after every version folder present, finished or not (an abandoned build's
    folder is never reused, so its leftovers cannot mix with a new build)."""
    existing = list_versions(index_dir, finished_only=False)
    return version_name(int(existing[-1][1:]) + 1 if existing else 1)


POINTER_HISTORY = 32  # superseded states remembered in CURRENT (for the GC grace period)


class PointerChanged(RuntimeError):
    """``CURRENT`` was not what this writer read or expected when it went to replace it: another
    writer published in between. Nothing was written."""


def _checked_pointer(pointer: Any, url: str) -> dict[str, Any]:
    version = pointer.get("version") if isinstance(pointer, dict) else None
    if not isinstance(version, str) or not _VERSION_RE.match(version):
        raise IndexFileError(f"corrupt index pointer {url}: no valid version in {pointer!r}")
    gen = pointer.get("store_generation")
    return {**pointer, "store_generation": None if gen is None else int(gen),
            "history": list(pointer.get("history") or [])}


def read_pointer(index_dir: str) -> dict[str, Any]:
    """The pointer, read once and checked: ``{"version", "store_generation", "published_at",
    "history"}`` (older pointers hold only ``version``; the missing keys read as ``None``/``[]``)."""
    layout = IndexLayout(index_dir)
    try:
        pointer = storage.read_json(layout.current)
    except FileNotFoundError:
        raise IndexFileError(f"{index_dir} holds no built index (no {layout.current}); run `r2f index` first") from None
    except ValueError as exc:
        raise IndexFileError(f"corrupt index pointer {layout.current}: {exc}") from None
    return _checked_pointer(pointer, layout.current)


def current_version(index_dir: str) -> str:
    return read_pointer(index_dir)["version"]


def resolve_version(index_dir: str, version: str | None) -> str:
    return current_version(index_dir) if version is None else version


POINTER_WRITE_RETRY_S = 60.0  # transient storage errors of the pointer write are retried this long
_ANY = object()


def set_current(index_dir: str, version: str, store_generation: int | None = None,
                store: str | None = None, expected_version: Any = _ANY,
                fence: Callable[[], None] | None = None) -> dict[str, Any]:
    """Publish ``version`` (it must be finished), with the store generation it was built from:
    one atomic write of ``CURRENT``; readers see the old pointer or the new one, never a mix.
    The replaced state goes to the front of ``history``. Returns the pointer written.

    The write is conditional on the ``CURRENT`` it read (``pipeline.cas``: S3 If-Match on its ETag,
    If-None-Match when there was none; locally a compare-and-rename), so of two writers racing
    from the same pointer one wins and the other raises ``PointerChanged``, writing nothing.
    ``expected_version`` (a version, or ``None`` for no pointer) also refuses a pointer that moved
    since the caller based its work on it; ``fence`` runs after the read and right before the
    write (the reindex lock's ownership check) and stops the write by raising."""
    from .. import cas

    layout = IndexLayout(index_dir)
    if not storage.exists(layout.infos(version)):
        raise IndexFileError(f"cannot point {index_dir} at {version}: it has no infos.json (unfinished or absent)")
    try:
        raw, tag = cas.retrying(f"reading {layout.current}", lambda: cas.read(layout.current), POINTER_WRITE_RETRY_S)
    except FileNotFoundError:
        raw, tag = None, None
    old = None
    if raw is not None:
        try:
            old = _checked_pointer(json.loads(raw), layout.current)
        except (ValueError, IndexFileError):
            old = None  # a corrupt pointer is replaced (still conditionally: the bytes that were read)
    found = old["version"] if old else None
    if expected_version is not _ANY and found != expected_version:
        raise PointerChanged(f"{layout.current} names {found or 'no version'}, but this publication was based on "
                             f"{expected_version or 'no version'}: another writer published in between; "
                             f"{version} was not published")
    now = time.time()
    history: list[dict[str, Any]] = []
    if old is not None:
        history = [{"version": old["version"], "store_generation": old["store_generation"],
                    "published_at": old.get("published_at"), "superseded_at": now}, *old["history"]]
    pointer = {"version": version, "store_generation": None if store_generation is None else int(store_generation),
               "store": store, "published_at": now, "history": history[:POINTER_HISTORY]}
    data = json.dumps(pointer, indent=2, sort_keys=True).encode()
    if fence is not None:
        fence()
    try:
        cas.retrying(f"writing {layout.current}",
                     lambda: cas.create(layout.current, data) if tag is None else cas.replace(layout.current, data, tag),
                     POINTER_WRITE_RETRY_S)
    except cas.PreconditionFailed:
        raise PointerChanged(f"{layout.current} changed after it was read (it named {found or 'no version'}): "
                             f"another writer published in between; {version} was not published") from None
    return pointer


def read_infos(index_dir: str, version: str | None = None) -> dict[str, Any]:
    version = resolve_version(index_dir, version)
    url = IndexLayout(index_dir).infos(version)
    try:
        infos = storage.read_json(url)
    except FileNotFoundError:
        raise IndexFileError(f"index version {version} is missing or unfinished: no {url}") from None
    except ValueError as exc:
        raise IndexFileError(f"corrupt index infos {url}: {exc}") from None
    infos["version"] = version
    return infos


# ---------------------------------------------------------------- FAISS files through fsspec
def checksum(data: bytes | np.ndarray) -> str:
    return hashlib.blake2b(memoryview(data).cast("B"), digest_size=16).hexdigest()


def write_index_file(url: str, index: faiss.Index) -> dict[str, Any]:
    """Serialise ``index`` to ``url`` (local or s3://); returns ``{"bytes", "checksum"}`` for infos.json."""
    data = faiss.serialize_index(index)
    fs, path = storage.filesystem(url)
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    with fs.open(path, "wb") as f:
        f.write(memoryview(data))
    return {"bytes": int(data.nbytes), "checksum": checksum(data)}


def read_index_file(url: str, expected: dict[str, Any] | None = None) -> faiss.Index:
    """Load a FAISS index file, checking size and checksum against infos.json when given, so a
    truncated or overwritten shard is reported by name instead of failing inside FAISS."""
    fs, path = storage.filesystem(url)
    try:
        with fs.open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise IndexFileError(f"missing index shard file {url}") from None
    if expected:
        if len(raw) != expected.get("bytes", len(raw)):
            raise IndexFileError(f"corrupt index shard file {url}: {len(raw)} bytes, infos.json says "
                                 f"{expected['bytes']}")
        if expected.get("checksum") and checksum(raw) != expected["checksum"]:
            raise IndexFileError(f"corrupt index shard file {url}: checksum does not match infos.json")
    try:
        return faiss.deserialize_index(np.frombuffer(raw, dtype=np.uint8))
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise IndexFileError(f"corrupt index shard file {url}: FAISS cannot read it ({first})") from None


def copy_file(src: str, dst: str) -> None:
    """Copy within one filesystem (server-side on S3)."""
    fs, src_path = storage.filesystem(src)
    _, dst_path = storage.filesystem(dst)
    if not fs.exists(src_path):
        raise IndexFileError(f"missing index shard file {src}")
    fs.makedirs(dst_path.rsplit("/", 1)[0], exist_ok=True)
    fs.copy(src_path, dst_path)
