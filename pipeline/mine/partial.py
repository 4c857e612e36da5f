"""Partial mining for training: per refresh, some training queries and a random subset of the
database, described by the caller with the *current* model, give each query its best positive
(nearest descriptor within ``positive_radius``, 10 m) and its hardest negatives (nearest
descriptors beyond ``negative_radius``, 25 m), in the paper's (and the VG benchmark's) words.

Radii are in the units of the dataset's positions, so a frame-aligned sequence such as Gardens
Point uses frames. Positives and soft positives come from a k-d tree (``pipeline.spatial``), never
a dense distance matrix. No model and no Ray here: the training loop owns both.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..spatial import PositionIndex


@dataclass
class MiningRound:
    """One cache refresh: which query / database rows need descriptors, and the negative pool."""

    queries: np.ndarray          # query rows sampled this refresh
    database: np.ndarray         # database rows to describe (positives of those queries ∪ negative pool)
    negative_pool: np.ndarray    # the random database subset negatives are drawn from


@dataclass
class Triplets:
    queries: np.ndarray          # (M,) query rows
    positives: np.ndarray        # (M,) database rows
    negatives: np.ndarray        # (M, num_negatives) database rows


class PartialMiner:
    """The VG benchmark's partial mining, as a reusable object (no model inside: the caller
    describes the rows a round asks for with its current model and hands the descriptors back).

    Queries with no database image within ``positive_radius`` cannot form a triplet and are
    left out, as the benchmark does."""

    def __init__(self, query_positions: np.ndarray, database_positions: np.ndarray, *,
                 positive_radius: float = 10.0, negative_radius: float = 25.0,
                 cache_queries: int = 1000, database_subset: int = 1000, num_negatives: int = 2,
                 seed: int = 0):
        if negative_radius < positive_radius:
            raise ValueError(f"negative_radius ({negative_radius}) must be >= positive_radius ({positive_radius})")
        self.positive_radius = positive_radius
        self.negative_radius = negative_radius
        self.cache_queries = cache_queries
        self.database_subset = database_subset
        self.num_negatives = num_negatives
        self.seed = seed
        self.num_database = len(database_positions)
        # CSR neighbour lists from a k-d tree: memory O(pairs within the radius), not O(Q x N).
        where = PositionIndex(database_positions)
        self.hard_positives = where.pairs_within(query_positions, positive_radius)
        self.soft_positives = where.pairs_within(query_positions, negative_radius)
        self.trainable_queries = np.flatnonzero(self.hard_positives.counts > 0).astype(np.int64)
        if len(self.trainable_queries) == 0:
            raise ValueError(f"no training query has a database image within positive_radius={positive_radius}")

    def sample(self, refresh: int) -> MiningRound:
        """Round ``refresh`` (same on every worker for the same seed: workers agree without talking)."""
        rng = np.random.default_rng([self.seed, refresh])
        n_q = min(self.cache_queries, len(self.trainable_queries))
        queries = np.sort(rng.choice(self.trainable_queries, n_q, replace=False))
        pool = np.sort(rng.choice(self.num_database, min(self.database_subset, self.num_database), replace=False))
        positives = np.concatenate([self.hard_positives[q] for q in queries])
        database = np.union1d(positives, pool)
        return MiningRound(queries=queries, database=database, negative_pool=pool)

    def triplets(self, round_: MiningRound, query_descriptors: np.ndarray, database_descriptors: np.ndarray,
                 ) -> Triplets:
        """``query_descriptors`` rows follow ``round_.queries``, ``database_descriptors`` rows follow
        ``round_.database``. Best positive = nearest hard positive; negatives = the nearest pool
        images outside the soft-positive radius. Queries whose pool lacks enough negatives are
        dropped."""
        # round_.database is sorted (np.union1d): a row's slot is a binary search away.
        pool_desc = database_descriptors[np.searchsorted(round_.database, round_.negative_pool)]
        qs, ps, ns = [], [], []
        for qi, q in enumerate(round_.queries):   # one refresh: cache_queries rows, not the dataset
            qd = query_descriptors[qi]
            pos_rows = self.hard_positives[q]
            pos_d = ((database_descriptors[np.searchsorted(round_.database, pos_rows)] - qd) ** 2).sum(-1)
            best_pos = int(pos_rows[int(np.argmin(pos_d))])
            neg_d = ((pool_desc - qd) ** 2).sum(-1)
            neg_d[np.isin(round_.negative_pool, self.soft_positives[q], assume_unique=True)] = np.inf
            order = np.argsort(neg_d, kind="stable")[: self.num_negatives]
            if len(order) < self.num_negatives or not np.isfinite(neg_d[order]).all():
                continue
            qs.append(int(q))
            ps.append(best_pos)
            ns.append(round_.negative_pool[order])
        if not qs:
            return Triplets(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, self.num_negatives), np.int64))
        return Triplets(np.array(qs, np.int64), np.array(ps, np.int64), np.stack(ns).astype(np.int64))
