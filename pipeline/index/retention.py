"""Which index versions are kept: the newest few, the published one, those superseded less than a
grace period ago, and those a live lease (``index.leases``) or a kept store state still reads.

Sits above ``layout`` (versions and the pointer) and ``leases`` (who reads what), so the layout
itself never asks about running jobs. ``pipeline.reindex.gc`` runs ``prune_versions`` as part of
its garbage collection; ``r2f index --prune N`` runs it alone.
"""
from __future__ import annotations

import time
from collections.abc import Iterable

from .. import storage
from . import leases
from .layout import IndexFileError, IndexLayout, list_versions, read_pointer


def prune_versions(index_dir: str, keep: int = 3, protect: Iterable[str] = (), grace_s: float = 0.0,
                   dry_run: bool = False) -> list[str]:
    """Delete all but the newest ``keep`` finished versions, plus unfinished folders older than
    the newest finished one. Never deleted: the CURRENT version, ``protect`` (versions a kept
    store state still needs), versions a live lease names, and versions the pointer left less
    than ``grace_s`` seconds ago (a reader may have resolved them just before). Returns the
    deleted (with ``dry_run``: the deletable) names."""
    if keep < 1:
        raise ValueError(f"keep must be at least 1, got {keep}")
    finished = list_versions(index_dir)
    everything = list_versions(index_dir, finished_only=False)
    keep_set = set(finished[-keep:]) | set(protect) | protected_versions(index_dir, grace_s)
    keep_set |= {lease["state"].get("index_version") for lease in leases.live_leases(index_dir, grace_s)}
    newest_finished = int(finished[-1][1:]) if finished else 0
    doomed = [v for v in everything
              if v not in keep_set and (v in finished or int(v[1:]) < newest_finished)]
    layout = IndexLayout(index_dir)
    for v in [] if dry_run else doomed:
        fs, path = storage.filesystem(layout.version_dir(v))
        fs.rm(path, recursive=True)
    return doomed


def protected_versions(index_dir: str, grace_s: float) -> set[str]:
    """The CURRENT version and those it replaced less than ``grace_s`` seconds ago."""
    try:
        pointer = read_pointer(index_dir)
    except IndexFileError:
        return set()
    now = time.time()
    return {pointer["version"]} | {h["version"] for h in pointer["history"]
                                   if now - float(h.get("superseded_at") or 0) < grace_s}
