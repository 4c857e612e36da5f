"""The published state a job pins: one index version and the store generation it was built from.

Readers (``rerank``, ``search``, ``run``, ``mine``, ``evaluate``, the report) never combine a
fresh ``manifest.json`` with a fresh ``CURRENT``: they call ``resolve(store, index_dir)`` once
at start, read everything through the returned ``PublishedState`` for the whole job, and write
``state.metadata()`` into their outputs; later stages reopen the same state with
``from_metadata`` instead of resolving again::

    <index_dir>/CURRENT                 {"version": "v0004", ...}: the one pointer readers resolve
    <index_dir>/reindex/v0004.json      (reindex) the store generation v0004 was built from
    <store>/manifests/g0003.json        (reindex) that generation's manifest snapshot
    <store>/manifest.json               plain extraction store: the catalog (informational once reindexed)

A store without an index (or an index built by ``r2f index`` without a reindex record) resolves
to its ``manifest.json`` as before. Memory: O(shards) (the manifest), independent of images.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

import pyarrow as pa

from . import storage


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
    """Resolve the published state once: the ``CURRENT`` pointer of ``index_dir`` (when there is
    one) and the store generation its version was built from; otherwise the store's manifest."""
    from .index import layout as L

    if index_dir and storage.exists(L.IndexLayout(index_dir).current):
        version = L.current_version(index_dir)
        pointer = storage.read_json(L.IndexLayout(index_dir).current)
        return open_state(store, index_dir, version, _generation_of(index_dir, version, pointer))
    return open_state(store, index_dir, None, None)


def from_metadata(meta: dict[str, Any], store: str | None = None) -> PublishedState:
    """Reopen the state an output recorded (``PublishedState.metadata()``); ``store`` overrides
    the recorded store URL (a store moved since)."""
    gen = meta.get("store_generation")
    return open_state(store or meta["store"], meta.get("index_dir"), meta.get("index_version"),
                      None if gen is None else int(gen))
