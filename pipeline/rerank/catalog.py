"""The catalog of database rows: image id -> (Zarr row, path, position), sorted by id.

Built once per job by a Ray task (never in the driver) and kept in Ray's object store, where
every worker on a node maps the one copy; the search workers turn candidate ids into rows with
it, the commit workers into paths and positions. Memory: O(database), in the object store.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from ..spatial import positions_of


def build_catalog(state_meta: dict[str, Any], database_store: str) -> dict[str, np.ndarray]:
    """Database image id -> (Zarr row, path, position), sorted by id, as plain numpy arrays (paths as
    fixed-width bytes) so every worker on a node maps the one copy in Ray's object store.
    Memory: O(database), never in the driver (built by a Ray task)."""
    from ..index.published import from_metadata

    state = from_metadata(state_meta, store=database_store)
    t = state.read_global_table(["image_id", "path", "utm_east", "utm_north", "row"])
    if t.num_rows == 0:
        raise ValueError(f"database store {database_store} holds no images")
    ids = t.column("image_id").to_numpy().astype(np.int64)
    order = np.argsort(ids, kind="stable")
    ids = ids[order]
    if len(ids) > 1 and (np.diff(ids) == 0).any():
        raise ValueError(f"database store {database_store} lists an image_id twice")
    xy = positions_of(t)[order]
    paths = np.asarray(t.column("path").to_pylist(), dtype=object)[order].astype("S")
    return {"image_id": ids, "row": t.column("row").to_numpy().astype(np.int64)[order],
            "east": np.ascontiguousarray(xy[:, 0]), "north": np.ascontiguousarray(xy[:, 1]), "path": paths}
