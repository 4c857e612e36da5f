"""Where a reindex keeps its state, beside the store's and the index's own files (the layout the
package docstring draws)."""
from __future__ import annotations

from dataclasses import dataclass

from .. import storage


@dataclass(frozen=True)
class ReindexLayout:
    """Where a reindex keeps its state: store-side paths are ``pipeline.storage.StoreLayout``'s."""
    store: str
    index_dir: str

    def manifest_snapshot(self, generation: int) -> str:
        return storage.StoreLayout(self.store).manifest_snapshot(generation)

    @property
    def staging_dir(self) -> str:
        return storage.StoreLayout(self.store).reindex_staging_dir

    def staging(self, digest: str) -> str:
        return storage.join(self.staging_dir, digest)

    @property
    def failures(self) -> str:
        return storage.StoreLayout(self.store).reindex_failures

    @property
    def scan_cache(self) -> str:
        return storage.StoreLayout(self.store).reindex_scan_cache

    def version_record(self, version: str) -> str:
        return storage.join(self.index_dir, "reindex", f"{version}.json")

    @property
    def lock(self) -> str:
        return storage.join(self.index_dir, "reindex.lock")
