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

from typing import TYPE_CHECKING, Any

import numpy as np

from .. import storage
from ..log import get_logger
from ..timefmt import utc_now
from .layout import ReindexLayout
from .lock import ReindexError

if TYPE_CHECKING:
    from ..index import IndexBuildResult
    from . import ReindexConfig

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


def write_snapshot(layout: ReindexLayout, manifest: dict[str, Any]) -> None:
    """Step 1: the new generation's snapshot. No reader sees it until a pointer names it."""
    storage.write_json(layout.manifest_snapshot(store_generation(manifest)), manifest)


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


def published_base(store: str, index_dir: str) -> tuple[dict[str, Any], str | None]:
    """(manifest of the published store generation, published version). A store made by
    ``r2f extract`` (no generation yet) becomes generation 0."""
    from ..index import published

    state = published.resolve(store, index_dir)
    manifest = dict(state.manifest)
    if state.store_generation is None:
        manifest.setdefault("generation", 0)
        url = storage.StoreLayout(store).manifest_snapshot(store_generation(manifest))
        if not storage.exists(url):
            storage.write_json(url, manifest)
    return manifest, state.index_version


def current_or_none(index_dir: str) -> str | None:
    from ..index import layout as L

    try:
        return L.current_version(index_dir)
    except L.IndexFileError:
        return None


def covers_generation(index_dir: str, version: str | None, manifest: dict[str, Any]) -> bool:
    """Whether ``version`` indexes exactly the extraction shards of ``manifest``'s generation."""
    from ..index import layout as L

    if version is None:
        return False
    infos = L.read_infos(index_dir, version)
    return {int(s) for e in infos["shards"] for s in e["extraction_shards"]} == {int(s) for s in manifest["shards"]}


def build_version(cfg: ReindexConfig, index_dir: str, manifest: dict[str, Any], previous_version: str | None
                  ) -> IndexBuildResult:
    """Step 2: the index version of exactly that snapshot, never touching CURRENT. Unchanged
    index shards are copied from ``previous_version``; past ``cfg.max_index_shards`` every shard
    is rebuilt (compaction)."""
    from ..config import from_dict
    from ..index import IndexConfig, build
    from ..index import layout as L

    use_previous = previous_version
    if use_previous is not None:
        prev_infos = L.read_infos(index_dir, use_previous)
        if prev_infos.get("num_shards", 0) >= cfg.max_index_shards:
            log.info("reindex: %s has %d index shards (max %d): rebuilding every shard", use_previous,
                     prev_infos["num_shards"], cfg.max_index_shards)
            use_previous = None
    icfg_keys = {**cfg.index, "store": cfg.store, "index_dir": index_dir, "make_current": False,
                 "ray_address": cfg.ray_address}
    return build(from_dict(IndexConfig, icfg_keys), previous_version=use_previous, manifest=manifest)


def check_version(store: str, index_dir: str, version: str, manifest: dict[str, Any]) -> int:
    """Step 3: the version's ids equal the generation's, or nothing is published. Returns their count."""
    expected = storage.read_global_table(store, ["image_id"], manifest=manifest).column("image_id").to_numpy()
    got = version_image_ids(index_dir, version)
    if len(got) != len(expected) or not np.array_equal(got, np.sort(expected)):
        raise ReindexError(f"index {index_dir}/{version} holds {len(got)} ids but store generation "
                           f"{store_generation(manifest)} has {len(expected)}; not publishing it")
    return int(len(got))


def version_image_ids(index_dir: str, version: str | None = None) -> np.ndarray:
    """Sorted image ids held by an index version (read from its shard files)."""
    import faiss

    from ..index import layout as L

    infos = L.read_infos(index_dir, version)
    lay = L.IndexLayout(index_dir)
    out = []
    for entry in infos["shards"]:
        index = L.read_index_file(lay.file(infos["version"], entry["file"]), entry)
        out.append(_ids_of(index, faiss))
    return np.sort(np.concatenate(out)) if out else np.zeros(0, np.int64)


def _ids_of(index, faiss) -> np.ndarray:
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        inv = ivf.invlists
        parts = [faiss.rev_swig_ptr(inv.get_ids(c), inv.list_size(c)).copy()
                 for c in range(inv.nlist) if inv.list_size(c)]
        return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)
    for cls in ("IndexIDMap2", "IndexIDMap"):
        downcast = getattr(faiss, cls, None)
        if downcast is not None and isinstance(index, downcast):
            return faiss.vector_to_array(index.id_map).astype(np.int64)
    if hasattr(index, "id_map"):
        return faiss.vector_to_array(index.id_map).astype(np.int64)
    raise ReindexError(f"cannot read the ids of a {type(index).__name__} index")


def list_history(cfg: ReindexConfig) -> list[dict[str, Any]]:
    """Finished index versions, oldest first, with their store generation and counts."""
    from ..index import layout as L

    index_dir = cfg.resolved_index_dir
    layout = ReindexLayout(cfg.store, index_dir)
    current = current_or_none(index_dir)
    out = []
    for v in L.list_versions(index_dir):
        infos = L.read_infos(index_dir, v)
        rec = storage.read_json(layout.version_record(v)) if storage.exists(layout.version_record(v)) else {}
        out.append(dict(version=v, current=v == current, num_vectors=infos.get("num_vectors"),
                        num_shards=infos.get("num_shards"), created=infos.get("created"),
                        store_generation=rec.get("store_generation"), changes=rec.get("changes")))
    return out
