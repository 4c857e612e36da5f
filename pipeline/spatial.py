"""Where images are: radius and nearest-position queries over UTM positions (scipy's cKDTree).

Mining (soft positives, partial mining's positives and negative exclusion) and validation ask
"which database images lie within r of this query?". A dense (queries x database) distance
matrix answers it with memory proportional to their product (65 GB per 4,096-query block at 1M
images); a k-d tree over the database positions answers it with memory proportional to the
database plus the pairs actually found::

    positions (N, 2) ──► PositionIndex (cKDTree, O(N))
    query block (B, 2) ──► pairs_within(r)  ──► Neighbours: CSR offsets (B+1,) + rows (pairs,)
                       └─► count_within(r)  ──► (B,) counts (no pair list at all)

Rows in a ``Neighbours`` row are sorted ascending. Distances use the same rule as the rest of
the pipeline: Euclidean on ``(utm_east, utm_north)``, a pair at exactly ``r`` is within.
``positions_of`` reads those positions from a table, the one place that decides what an image
without a position becomes (NaN for evaluation, an error for mining).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import pyarrow as pa
from scipy.spatial import cKDTree


def positions_of(table: pa.Table, prefix: str = "", missing: Literal["nan", "raise"] = "nan",
                 what: str = "table") -> np.ndarray:
    """(N, 2) float64 ``{prefix}utm_east, {prefix}utm_north``. A missing north counts as 0 (a
    sequence described by frame index alone puts it in ``utm_east``). An image without an east
    position is NaN under ``missing="nan"`` (evaluation: such a query cannot be answered right);
    under ``missing="raise"`` it is a ``ValueError`` naming ``what`` (mining cannot place it)."""
    if missing not in ("nan", "raise"):
        raise ValueError(f"missing must be 'nan' or 'raise', got {missing!r}")
    n = table.num_rows
    east_name, north_name = f"{prefix}utm_east", f"{prefix}utm_north"
    if east_name not in table.column_names:
        if missing == "raise":
            raise ValueError(f"{what} has no {east_name} column; image positions are needed")
        return np.full((n, 2), np.nan)
    east = _float_column(table, east_name)
    if missing == "raise" and np.isnan(east).any():
        raise ValueError(f"{what}: {int(np.isnan(east).sum())} image(s) have no position ({east_name} is empty); "
                         f"image positions are needed")
    north = _float_column(table, north_name) if north_name in table.column_names else np.zeros(n)
    north = np.where(np.isnan(north) & ~np.isnan(east), 0.0, north)
    return np.stack([east, north], axis=1)


def _float_column(table: pa.Table, name: str) -> np.ndarray:
    col = table.column(name)
    return np.asarray(col.cast(pa.float64()).to_numpy(zero_copy_only=False), dtype=np.float64)


@dataclass
class Neighbours:
    """CSR list of database rows per query: ``rows[offsets[i]:offsets[i + 1]]`` for query i."""

    offsets: np.ndarray   # (Q + 1,) int64
    rows: np.ndarray      # (pairs,) int64, ascending within each query

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> np.ndarray:
        return self.rows[self.offsets[i]:self.offsets[i + 1]]

    @property
    def counts(self) -> np.ndarray:
        return np.diff(self.offsets)

    def contains(self, query: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Boolean mask of the same shape as ``rows``: is ``rows[..., j]`` a neighbour of
        ``query[...]``? (Vectorised: one binary search per element over that query's slice.)"""
        query = np.asarray(query, np.int64)
        rows = np.asarray(rows, np.int64)
        q = np.broadcast_to(query.reshape(query.shape + (1,) * (rows.ndim - query.ndim)), rows.shape)
        # Key = (query, row) as one sortable integer; rows are < 2^32 in any store we design for.
        keys = (np.repeat(np.arange(len(self), dtype=np.int64), self.counts) << 32) | self.rows
        probe = (q << 32) | np.maximum(rows, 0)
        pos = np.searchsorted(keys, probe)
        found = pos < len(keys)
        found[found] = keys[pos[found]] == probe[found]
        return found & (rows >= 0)


class PositionIndex:
    """A k-d tree over (N, 2) positions. Memory O(N); queries never build (Q x N) arrays."""

    def __init__(self, positions: np.ndarray):
        positions = np.asarray(positions, np.float64).reshape(-1, 2)
        self.size = len(positions)
        self.tree = cKDTree(positions) if self.size else None

    def pairs_within(self, query_positions: np.ndarray, radius: float, block: int = 65536) -> Neighbours:
        """Database rows within ``radius`` of each query (CSR). Memory: the pairs found, plus a
        k-d tree over one ``block`` of queries at a time."""
        query_positions = np.asarray(query_positions, np.float64).reshape(-1, 2)
        n = len(query_positions)
        if self.tree is None or n == 0:
            return Neighbours(np.zeros(n + 1, np.int64), np.zeros(0, np.int64))
        q_parts, r_parts = [], []
        for s in range(0, n, block):
            qt = cKDTree(query_positions[s:s + block])
            pairs = qt.sparse_distance_matrix(self.tree, radius, output_type="ndarray")
            q_parts.append(pairs["i"].astype(np.int64) + s)
            r_parts.append(pairs["j"].astype(np.int64))
        qi, ri = np.concatenate(q_parts), np.concatenate(r_parts)
        order = np.lexsort((ri, qi))
        qi, ri = qi[order], ri[order]
        offsets = np.zeros(n + 1, np.int64)
        np.cumsum(np.bincount(qi, minlength=n), out=offsets[1:])
        return Neighbours(offsets, ri)

    def count_within(self, query_positions: np.ndarray, radius: float) -> np.ndarray:
        """(Q,) number of database rows within ``radius`` of each query."""
        query_positions = np.asarray(query_positions, np.float64).reshape(-1, 2)
        if self.tree is None:
            return np.zeros(len(query_positions), np.int64)
        return np.asarray(self.tree.query_ball_point(query_positions, radius, return_length=True), np.int64)

    def nearest(self, query_positions: np.ndarray, k: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """``(distances (Q, k), rows (Q, k))`` of the ``k`` nearest positions (rows -1 past N)."""
        query_positions = np.asarray(query_positions, np.float64).reshape(-1, 2)
        if self.tree is None:
            return (np.full((len(query_positions), k), np.inf), np.full((len(query_positions), k), -1, np.int64))
        d, r = self.tree.query(query_positions, k=k)
        d, r = np.asarray(d).reshape(len(query_positions), k), np.asarray(r).reshape(len(query_positions), k)
        r = np.where(r >= self.size, -1, r).astype(np.int64)
        return d, r


def within_radius(query_positions: np.ndarray, database_positions: np.ndarray, radius: float) -> Neighbours:
    """Database rows within ``radius`` of each query (one-shot helper over ``PositionIndex``)."""
    return PositionIndex(database_positions).pairs_within(query_positions, radius)


def geo_within(query_positions: np.ndarray, candidate_positions: np.ndarray, radius: float) -> np.ndarray:
    """``(Q, K)`` mask: candidate ``[q, j]`` (positions ``(Q, K, 2)``) lies within ``radius`` of
    query q. For ranked lists (validation, mining): memory O(Q x K), never O(Q x N)."""
    d2 = ((candidate_positions - query_positions[:, None, :]) ** 2).sum(-1)
    return d2 <= radius * radius
