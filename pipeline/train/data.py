"""Training data on a worker: images and stored local tokens by table row, dataset positions, a
dataset's rows aligned to a store's, and global descriptors of rows computed split across workers.

Everything here runs inside a Ray Train worker; torch and the image decoder load when first used.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from .. import storage

if TYPE_CHECKING:
    import torch


class ImageSource:
    """Decoded, resized images of a dataset table by row, with a small in-memory cache (the
    same images come back at every mining refresh)."""

    def __init__(self, table, image_size: list[int], cache_limit: int = 4096):
        self.paths = table.column("path").to_pylist()
        self.size = (int(image_size[0]), int(image_size[1]))
        self.cache: dict[int, np.ndarray] = {}
        self.cache_limit = cache_limit

    def batch(self, rows) -> torch.Tensor:
        import torch

        from ..images import load_image
        from ..model import normalize_images

        pix = []
        for r in np.asarray(rows).reshape(-1):
            r = int(r)
            img = self.cache.get(r)
            if img is None:
                img = load_image(self.paths[r], self.size).pixels
                if len(self.cache) < self.cache_limit:
                    self.cache[r] = img
            pix.append(img)
        return normalize_images(torch.from_numpy(np.stack(pix)))


class TokenSource:
    """Local tokens of a store by table row (rerank training): a store whose tokens fit in
    ``preload_bytes`` as float32 is read once, a bigger one per batch (memory: one batch)."""

    def __init__(self, store: str, zarr_rows: np.ndarray, preload_bytes: int = 512 << 20):
        self.store, self.zarr_rows = store, np.asarray(zarr_rows, np.int64)
        self.array = storage.open_local_tokens(store)
        size = len(self.zarr_rows) * self.array.shape[1] * self.array.shape[2] * 4
        self.all = storage.read_local_tokens(store, self.zarr_rows, self.array) if size <= preload_bytes else None

    def get(self, rows: np.ndarray) -> np.ndarray:
        rows = np.asarray(rows, np.int64)
        if self.all is not None:
            return self.all[rows]
        return storage.read_local_tokens(self.store, self.zarr_rows[rows], self.array)


def dataset_positions(table) -> np.ndarray:
    """(N, 2) positions of a dataset or store table; an image without one is an error (training
    cannot place it)."""
    from ..spatial import positions_of

    return positions_of(table, missing="raise", what="dataset")


def align_to_store(dataset_table, image_ids: np.ndarray, spec: str):
    """Dataset rows in the order of a store's ``image_ids`` (stores may be sorted differently)."""
    ids = dataset_table.column("image_id").to_numpy()
    where = {int(i): r for r, i in enumerate(ids)}
    missing = [int(i) for i in image_ids if int(i) not in where]
    if missing:
        raise ValueError(f"dataset {spec} lacks {len(missing)} image(s) of the extraction store (first id {missing[0]})")
    return dataset_table.take(np.array([where[int(i)] for i in image_ids]))


def item_images(q_src: ImageSource, db_src: ImageSource, qi: np.ndarray, pi: np.ndarray, ni: np.ndarray, device):
    """Images of items (query, positive, negatives...) in the official collate order."""
    import torch

    b, K = len(qi), ni.shape[1]
    q, p, n = q_src.batch(qi), db_src.batch(pi), db_src.batch(ni.reshape(-1))
    items = torch.cat([q[:, None], p[:, None], n.view(b, K, *n.shape[1:])], dim=1)
    return items.reshape(b * (2 + K), *q.shape[1:]).to(device)


def allgather_rows(local: dict[int, np.ndarray], world: int) -> dict[int, np.ndarray]:
    """Every worker's ``{row: value}`` merged on every worker (as is on one process)."""
    import torch.distributed as dist

    if world == 1 or not dist.is_initialized():
        return local
    parts: list[Any] = [None] * world
    dist.all_gather_object(parts, local)
    merged: dict[int, np.ndarray] = {}
    for p in parts:
        merged.update(p)
    return merged


def describe_rows(model, source: ImageSource, rows: np.ndarray, rank: int, world: int, device, batch: int = 16,
                  ) -> np.ndarray:
    """Global descriptors of ``rows`` (in that order), computed split across workers, in eval mode."""
    import torch

    from ..model.training import describe

    rows = np.asarray(rows, np.int64)
    uniq = np.unique(rows)
    mine = uniq[rank::world]
    was_training = model.training
    model.eval()
    local: dict[int, np.ndarray] = {}
    with torch.no_grad():
        for s in range(0, len(mine), batch):
            chunk = mine[s:s + batch]
            g = describe(model, source.batch(chunk).to(device)).global_descriptor.float().cpu().numpy()
            local.update({int(r): g[i] for i, r in enumerate(chunk)})
    model.train(was_training)
    merged = allgather_rows(local, world)
    return np.stack([merged[int(r)] for r in rows]) if len(rows) else np.zeros((0, 1), np.float32)
