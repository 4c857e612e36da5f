"""Publish: store generation snapshot, index version, checks, then the one pointer write.

    1. <store>/manifests/g0004.json     the new store generation (written by the adopt step; no reader
                                         looks at it until a pointer names it)
    2. <index_dir>/versions/v0007/       the index version built from exactly that snapshot
    3. checks                            the version's ids equal the generation's ids; the lock is still ours
    4. <index_dir>/CURRENT               {"version": "v0007", "store_generation": 4, ...}: THE switch
    5. <store>/manifest.json             the same snapshot, informational (plain readers, humans)

A crash before 4 leaves every reader on the previous state (the pointer is all they resolve), and the
next run finds the unpublished generation (``pending_generation``) and indexes it instead of adopting
the same images again. Rollback is step 4 alone (then 5) for a kept version. Numbers of shards and
generations are never reused (``<store>/reindex/numbers.json`` keeps the high-water marks, also
across garbage collection), so no file a kept or collected state named is ever rewritten with other
content.
"""
from __future__ import annotations

import time
from typing import Any

from .. import storage
from ..log import get_logger
from .lock import ReindexError
from ..timefmt import utc_now

log = get_logger(__name__)


def store_generation(manifest: dict[str, Any]) -> int:
    return int(manifest.get("generation", 0))


def numbers_url(store: str) -> str:
    return storage.join(store, "reindex", "numbers.json")


def snapshot_generations(store: str) -> list[int]:
    """Every store generation whose snapshot exists, ascending."""
    fs, path = storage.filesystem(storage.join(store, "manifests"))
    try:
        entries = fs.ls(path, detail=False)
    except FileNotFoundError:
        return []
    out = []
    for e in entries:
        name = e.rstrip("/").rsplit("/", 1)[-1]
        if name.startswith("g") and name.endswith(".json"):
            try:
                out.append(int(name[1:-5]))
            except ValueError:
                continue
    return sorted(out)


def read_snapshot(store: str, generation: int) -> dict[str, Any]:
    url = storage.StoreLayout(store).manifest_snapshot(generation)
    try:
        return storage.read_json(url)
    except FileNotFoundError:
        raise ReindexError(f"store generation {generation} of {store} has no snapshot {url} (collected?)") from None


def read_numbers(store: str) -> dict[str, int]:
    url = numbers_url(store)
    return {k: int(v) for k, v in storage.read_json(url).items()} if storage.exists(url) else {}


def reserve_numbers(store: str, next_shard: int, shards_needed: int) -> tuple[int, int]:
    """``(first new shard number, new generation number)``, above every number ever used, recorded
    before any file with those numbers is written."""
    seen = read_numbers(store)
    gens = snapshot_generations(store)
    first = max(next_shard, seen.get("next_shard", 0))
    generation = max([seen.get("next_generation", 0), *[g + 1 for g in gens]])
    storage.write_json(numbers_url(store), {"next_shard": first + shards_needed, "next_generation": generation + 1})
    return first, generation


def indexed_generations(index_dir: str) -> set[int]:
    """Store generations some version was built from (records) or the pointer ever named."""
    from ..index import layout as L

    out: set[int] = set()
    fs, path = storage.filesystem(storage.join(index_dir, "reindex"))
    try:
        entries = fs.ls(path, detail=False)
    except FileNotFoundError:
        entries = []
    for e in entries:
        if e.endswith(".json") and e.rstrip("/").rsplit("/", 1)[-1].startswith("v"):
            url = f"s3://{e}" if index_dir.startswith("s3://") and not e.startswith("s3://") else e
            try:
                rec = storage.read_json(url)
            except FileNotFoundError:
                continue
            if rec.get("store_generation") is not None:
                out.add(int(rec["store_generation"]))
    try:
        pointer = L.read_pointer(index_dir)
        out |= {int(h["store_generation"]) for h in [pointer, *pointer["history"]]
                if h.get("store_generation") is not None}
    except L.IndexFileError:
        pass
    return out


def pending_generation(store: str, index_dir: str, published_generation: int) -> dict[str, Any] | None:
    """The newest snapshot an interrupted run wrote on top of the published generation and never
    indexed (a generation left by a rollback is not pending: a version was built from it)."""
    done = indexed_generations(index_dir)
    for g in reversed(snapshot_generations(store)):
        if g <= published_generation or g in done:
            continue
        snap = read_snapshot(store, g)
        if snap.get("previous_generation") == published_generation:
            return snap
    return None


def publish_pointer(store: str, index_dir: str, version: str, manifest: dict[str, Any], lock: Any = None,
                    expected_version: Any = ...) -> dict[str, Any]:
    """Step 4 (the one write readers see), then step 5 (informational).

    The pointer write is fenced: right before it, ``lock.check()`` proves the reindex lock is
    still this run's (one conditional write of the lock), and the write itself is conditional on
    the ``CURRENT`` it replaces (and on it naming ``expected_version``, the version this run built
    on, when given). Either failing publishes nothing and raises (``ReindexBusy`` /
    ``ReindexError``)."""
    from ..index import layout as L

    generation = store_generation(manifest)
    fence = {} if expected_version is ... else {"expected_version": expected_version}
    try:
        pointer = L.set_current(index_dir, version, store_generation=generation, store=store,
                                fence=None if lock is None else lock.check, **fence)
    except L.PointerChanged as exc:
        raise ReindexError(f"not published: {exc}") from None
    try:
        storage.write_json(storage.StoreLayout(store).manifest, manifest)
    except Exception as exc:  # informational only: the pointer already switched every reader
        log.warning("reindex: published %s, but %s/manifest.json was not updated (%s)", version, store, exc)
    return pointer


def write_version_record(index_dir: str, version: str, manifest: dict[str, Any], **fields: Any) -> None:
    storage.write_json(storage.join(index_dir, "reindex", f"{version}.json"), dict(
        version=version, store_generation=store_generation(manifest),
        created=utc_now(), **fields))


def version_generation(index_dir: str, version: str) -> int | None:
    url = storage.join(index_dir, "reindex", f"{version}.json")
    if not storage.exists(url):
        return None
    gen = storage.read_json(url).get("store_generation")
    return None if gen is None else int(gen)
