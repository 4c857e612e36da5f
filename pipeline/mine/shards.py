"""What runs on the workers of a mining run: query blocks read in tasks, shard actors that answer
a block with their own hardest negatives (soft positives dropped beside the index shard), and
merge tasks that rank the shards' lists exactly and commit the block.

    query part --read_query_block--> block --MiningShard.hardest (one per index shard)-->
        S ranked lists --merge_block--> <output>/blocks/block-00003.parquet, then .done

Ties are broken by image id everywhere, so a rerun writes byte-identical blocks.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from .. import storage
from ..index.search import ShardActor
from ..spatial import PositionIndex, geo_within, positions_of
from .output import hardest_negatives_schema


@dataclass(frozen=True)
class QueryBlock:
    """Rows ``start:stop`` of one query Parquet part, mined (and committed) as one unit."""
    index: int
    part_url: str
    start: int
    stop: int


def block_url(output: str, index: int, suffix: str) -> str:
    """``<output>/blocks/block-NNNNN.<suffix>``: the block's rows (``parquet``) or its marker (``done``)."""
    return storage.join(output, "blocks", f"block-{index:05d}.{suffix}")


def partial_topk(query_desc: np.ndarray, query_pos: np.ndarray, db_ids: np.ndarray, db_desc: np.ndarray,
                 db_pos: np.ndarray, k: int, soft_positive_radius: float, chunk_rows: int = 65536,
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` nearest database rows per query (squared L2), soft positives removed: the plain
    brute-force answer, kept as the test oracle of ``run`` (its dense distance blocks are fine at
    test sizes only).

    Returns ``(ids (Q, k) int64, dists (Q, k) float32)`` padded with id -1 / +inf where fewer than
    ``k`` non-positives exist, ordered by (distance, image id)."""
    q = np.ascontiguousarray(query_desc, dtype=np.float32)
    qn = (q * q).sum(1, keepdims=True)
    r2 = soft_positive_radius * soft_positive_radius
    best_ids = np.full((len(q), 0), -1, np.int64)
    best_d = np.full((len(q), 0), np.inf, np.float32)
    for s in range(0, len(db_desc), chunk_rows):
        x = np.ascontiguousarray(db_desc[s:s + chunk_rows], dtype=np.float32)
        d = qn + (x * x).sum(1)[None, :] - 2.0 * (q @ x.T)
        np.maximum(d, 0.0, out=d)
        geo = ((query_pos[:, None, :] - db_pos[None, s:s + chunk_rows, :]) ** 2).sum(-1)
        d[geo <= r2] = np.inf
        ids = np.where(np.isfinite(d), np.broadcast_to(db_ids[s:s + chunk_rows], d.shape), -1)
        best_ids, best_d = merge_ranked(np.concatenate([best_ids, ids], 1), np.concatenate([best_d, d], 1), k)
    return best_ids, best_d


def merge_ranked(ids: np.ndarray, dists: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Row-wise exact top-``k`` by (distance, id) of candidate lists, vectorised; id -1 (padding,
    removed soft positives) sorts last. Returns (Q, k) arrays padded with -1 / +inf."""
    n, m = ids.shape
    dists = np.where(ids >= 0, dists, np.inf).astype(np.float32, copy=False)
    key_ids = np.where(ids >= 0, ids, np.iinfo(np.int64).max)
    if m > 4 * k:
        # Preselect per row with argpartition; the k-th value's ties are kept whole by the (d, id)
        # sort below only if they all survive, so preselect generously (2k) and sort exactly.
        part = np.argpartition(dists, min(m - 1, 2 * k), axis=1)[:, :2 * k + 1]
        kth = np.take_along_axis(dists, part, 1).max(1, keepdims=True)
        # Rows whose boundary value has ties outside the preselection fall back to a full sort.
        clean = ((dists <= kth).sum(1) <= part.shape[1])
        if clean.all():
            ids, dists, key_ids = (np.take_along_axis(a, part, 1) for a in (ids, dists, key_ids))
    order = np.lexsort((key_ids, dists), axis=1)[:, :k]
    out_ids = np.take_along_axis(np.where(ids >= 0, ids, -1), order, 1)
    out_d = np.take_along_axis(dists, order, 1)
    if out_ids.shape[1] < k:
        pad = k - out_ids.shape[1]
        out_ids = np.concatenate([out_ids, np.full((n, pad), -1, np.int64)], 1)
        out_d = np.concatenate([out_d, np.full((n, pad), np.inf, np.float32)], 1)
    out_d[out_ids < 0] = np.inf
    return out_ids, out_d


def read_query_block(block: QueryBlock) -> dict[str, np.ndarray]:
    """One query block: ids, unit-norm descriptors (the index metric is cosine) and positions."""
    import faiss

    t = storage.read_parquet(block.part_url, ["image_id", "utm_east", "utm_north", "global_descriptor"])
    t = t.slice(block.start, block.stop - block.start)
    desc = np.ascontiguousarray(storage.descriptors_of(t), dtype=np.float32).copy()
    if len(desc):
        faiss.normalize_L2(desc)
    return {"ids": t.column("image_id").to_numpy().astype(np.int64), "desc": desc,
            "pos": positions_of(t, missing="raise", what=f"query part {block.part_url}")}


class MiningShard(ShardActor):
    """One index shard in a Ray actor (``index.search.ShardActor``), with the positions of its
    database images: answers a query block with the block's ``k`` hardest negatives *in this
    shard*, soft positives removed.

    It searches ``k`` plus the largest soft-positive count of the block in this shard (from a
    k-d tree over the shard's positions), so that after removing them exactly ``k`` remain;
    rows still short (an IVF index returns fewer, or a boundary case) are searched again with a
    doubled ``k``. Memory: the shard index and its positions, O(shard); per call O(block x k)."""

    def __init__(self, index_url: str, entry: dict[str, Any], params: dict[str, Any], use_gpu: str, threads: int,
                 part_urls: list[str], radius: float):
        super().__init__(index_url, entry, params, use_gpu, threads)
        if self.error:
            return
        ids, pos = [], []
        for url in part_urls:
            t = storage.read_parquet(url, ["image_id", "utm_east", "utm_north"])
            ids.append(t.column("image_id").to_numpy().astype(np.int64))
            pos.append(positions_of(t, missing="raise", what=f"database part {url}"))
        ids_all, pos_all = np.concatenate(ids), np.concatenate(pos)
        order = np.argsort(ids_all, kind="stable")
        self.sorted_ids, self.sorted_pos = ids_all[order], pos_all[order]
        self.positions = PositionIndex(pos_all)
        self.radius = radius
        self.ntotal = int(self.index.ntotal)

    def _positions_of(self, ids: np.ndarray) -> np.ndarray:
        at = np.clip(np.searchsorted(self.sorted_ids, ids), 0, len(self.sorted_ids) - 1)
        return self.sorted_pos[at]

    def _search(self, desc: np.ndarray, pos: np.ndarray, k_search: int, k: int) -> tuple[np.ndarray, np.ndarray]:
        scores, ids = self.index.search(desc, k_search)
        # Unit descriptors: squared L2 = 2 - 2 cos.
        dists = np.maximum(2.0 - 2.0 * scores, 0.0).astype(np.float32)
        soft = geo_within(pos, self._positions_of(ids), self.radius)
        ids = np.where(soft | (ids < 0), -1, ids)
        return merge_ranked(ids, dists, k)

    def hardest(self, block: dict[str, np.ndarray], k: int) -> tuple[np.ndarray, np.ndarray]:
        desc, pos = block["desc"], block["pos"]
        if len(desc) == 0 or self.ntotal == 0:
            return np.full((len(desc), k), -1, np.int64), np.full((len(desc), k), np.inf, np.float32)
        soft = self.positions.count_within(pos, self.radius)
        k_search = min(self.ntotal, k + int(soft.max()))
        ids, dists = self._search(desc, pos, k_search, k)
        short = np.flatnonzero((ids[:, -1] < 0) & (k_search < self.ntotal))
        while len(short):
            k_search = min(self.ntotal, 2 * k_search)
            ids[short], dists[short] = self._search(desc[short], pos[short], k_search, k)
            short = short[(ids[short, -1] < 0)] if k_search < self.ntotal else short[:0]
        return ids, dists


def _block_table(query_ids: np.ndarray, ids: np.ndarray, dists: np.ndarray) -> pa.Table:
    """Ranked (Q, k) arrays -> the hardest-negatives rows, as Arrow list arrays (no per-row objects)."""
    keep = ids >= 0
    offsets = np.zeros(len(ids) + 1, np.int32)
    np.cumsum(keep.sum(1), out=offsets[1:])
    return pa.table({"query_image_id": pa.array(query_ids, pa.int64()),
                     "hardest_negatives": pa.ListArray.from_arrays(pa.array(offsets), pa.array(ids[keep])),
                     "negative_distances": pa.ListArray.from_arrays(pa.array(offsets),
                                                                    pa.array(dists[keep], pa.float32()))},
                    schema=hardest_negatives_schema())


def merge_block(output: str, block_index: int, k: int, block: dict[str, np.ndarray], *shard_results) -> int:
    """Runs in a Ray task: merges the shards' ranked lists of one query block and commits the block."""
    ids = np.concatenate([r[0] for r in shard_results], 1)
    dists = np.concatenate([r[1] for r in shard_results], 1)
    ids, dists = merge_ranked(ids, dists, k)
    storage.write_parquet(block_url(output, block_index, "parquet"), _block_table(block["ids"], ids, dists))
    # The marker comes after the data: a block with a marker is complete, one without is redone.
    storage.write_json(block_url(output, block_index, "done"), {"rows": int(len(ids))})
    return int(len(ids))
