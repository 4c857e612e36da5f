"""The published state a job pins: one index version and the store generation it was built from.

Readers (``rerank``, ``search``, ``run``, ``mine``, ``evaluate``, the report) never combine a
fresh ``manifest.json`` with a fresh ``CURRENT``: they call ``resolve(store, index_dir)`` once
at start, read everything through the returned ``PublishedState`` for the whole job, and write
``state.metadata()`` into their outputs; later stages reopen the same state with
``from_metadata`` instead of resolving again::

    <index_dir>/CURRENT                 {"version": "v0004", "store_generation": 3, ...}: the one
                                        pointer readers resolve (pipeline.index.layout.read_pointer)
    <index_dir>/reindex/v0004.json      (reindex) v0004's record; older pointers name no generation
                                        and the record supplies it
    <store>/manifests/g0003.json        (reindex) that generation's manifest snapshot
    <store>/manifest.json               plain extraction store: the catalog (informational once reindexed)

A store without an index (or an index built by ``r2f index`` without a reindex record) resolves
to its ``manifest.json`` as before. ``resolve(store)`` without ``index_dir`` still follows
``<store>/index/CURRENT`` when that pointer names a store generation (a reindexed store's
``manifest.json`` is only informational). A job that reads for a while holds a lease on the state
(``pipeline.index.leases.hold_lease``) so garbage collection keeps its files; a reader whose files were
collected anyway fails naming the file: ``read_local_tokens`` checks after reading that the state is
still kept, so it never hands out the fill values of a collected Zarr chunk. Memory: O(shards) (the
manifest), independent of images.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from .. import storage
from . import layout as L


@dataclass(frozen=True)
class PublishedState:
    store: str
    index_dir: str | None = None
    index_version: str | None = None
    store_generation: int | None = None
    manifest: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def metadata(self) -> dict[str, Any]:
        """What outputs record so later stages reopen exactly this state."""
        return {"store": self.store, "index_dir": self.index_dir, "index_version": self.index_version,
                "store_generation": self.store_generation}

    def global_part_urls(self) -> list[str]:
        return storage.global_part_urls(self.store, self.manifest)

    def read_global_table(self, columns: Iterable[str] | None = None) -> pa.Table:
        return storage.read_global_table(self.store, columns, manifest=self.manifest)

    def snapshot_url(self) -> str | None:
        return None if self.store_generation is None else \
            storage.StoreLayout(self.store).manifest_snapshot(self.store_generation)

    def check_kept(self) -> None:
        """Raise ``StoreError`` naming the snapshot when garbage collection has collected this state.
        GC deletes a state's snapshot before any of its data, so data read before a successful
        check is that state's own."""
        url = self.snapshot_url()
        if url is not None and not storage.exists(url):
            raise storage.StoreError(f"{self.describe()} was garbage-collected: {url} is gone (hold a lease, "
                                     f"pipeline.index.leases, while reading a state)")

    def read_local_tokens(self, rows, array=None):
        """``storage.read_local_tokens`` of this state's Zarr rows, then ``check_kept``."""
        out = storage.read_local_tokens(self.store, rows, array=array)
        self.check_kept()
        return out

    def describe(self) -> str:
        gen = "" if self.store_generation is None else f" generation {self.store_generation}"
        ver = "" if self.index_version is None else f", index {self.index_dir} {self.index_version}"
        return f"store {self.store}{gen}{ver}"


def _snapshot(store: str, generation: int) -> dict[str, Any]:
    url = storage.StoreLayout(store).manifest_snapshot(generation)
    try:
        return storage.read_json(url)
    except FileNotFoundError:
        raise storage.StoreError(f"published store generation {generation} of {store} has no snapshot {url} "
                                 f"(collected or never written)") from None


def version_record_url(index_dir: str, version: str) -> str:
    return storage.join(index_dir, "reindex", f"{version}.json")


def _generation_of(index_dir: str, version: str, pointer: dict[str, Any]) -> int | None:
    if pointer.get("store_generation") is not None:
        return int(pointer["store_generation"])
    url = version_record_url(index_dir, version)
    if storage.exists(url):
        return int(storage.read_json(url)["store_generation"])
    return None


def open_state(store: str, index_dir: str | None, version: str | None, generation: int | None) -> PublishedState:
    """The state named by its parts (as recorded in an output's metadata)."""
    manifest = _snapshot(store, generation) if generation is not None else storage.read_manifest(store)
    return PublishedState(store=store, index_dir=index_dir or None, index_version=version,
                          store_generation=generation, manifest=manifest)


def resolve(store: str, index_dir: str | None = None) -> PublishedState:
    """Resolve the published state once: the ``CURRENT`` pointer of ``index_dir`` (read once: the
    version and the store generation it names) and that generation's manifest snapshot; without a
    pointer, the store's ``manifest.json``."""
    if not index_dir:
        default = storage.join(store, "index")
        if storage.exists(L.IndexLayout(default).current) and \
                L.read_pointer(default).get("store_generation") is not None:
            index_dir = default
    if index_dir and storage.exists(L.IndexLayout(index_dir).current):
        pointer = L.read_pointer(index_dir)
        version = pointer["version"]
        return open_state(store, index_dir, version, _generation_of(index_dir, version, pointer))
    return open_state(store, index_dir, None, None)


def from_metadata(meta: dict[str, Any], store: str | None = None) -> PublishedState:
    """Reopen the state an output recorded (``PublishedState.metadata()``); ``store`` overrides
    the recorded store URL (a store moved since)."""
    gen = meta.get("store_generation")
    return open_state(store or meta["store"], meta.get("index_dir"), meta.get("index_version"),
                      None if gen is None else int(gen))
