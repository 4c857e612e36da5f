"""Hard-negative mining: partial mining for training and cluster-wide global hardest negatives.

Two kinds, both in the paper's (and the VG benchmark's) words:

* **Partial mining** (``PartialMiner``), used inside every training step that needs triplets: per
  refresh, sample some training queries and a random subset of the database, compute their
  global descriptors with the *current* model (the caller does that), then give each query its
  best positive (nearest descriptor within ``positive_radius``, 10 m) and its hardest negatives
  (nearest descriptors beyond ``negative_radius``, 25 m). Radii are in the units of the
  dataset's positions, so a frame-aligned sequence such as Gardens Point uses frames.

* **Global hardest negatives** (``run(MineConfig)``, ``r2f mine``): for every training query, the
  ``top_k`` (200) nearest database images over the *whole* database, soft positives (within
  ``soft_positive_radius``) removed, written as Parquet::

      <output>/hardest_negatives.parquet   query_image_id, hardest_negatives (list<int64>),
                                           negative_distances (list<float32>, squared L2, ascending)
      <output>/blocks/block-00003.parquet  the same rows for query block 3
      <output>/blocks/block-00003.done     written after its block file: the block is finished
      <output>/mine.json                   what the blocks were computed from (reruns must match)

  Exact brute force on Ray workers: one task per database Parquet part reads only that part
  through ``pipeline.storage`` and returns a partial top-k for a wave of query blocks; the
  driver merges the partial lists exactly (ties broken by image id, so the result is
  deterministic). No process ever holds all database descriptors. A query block is one query
  Parquet part (split into ``query_block_size`` rows), and finished blocks are skipped on a
  rerun, which then writes a byte-identical final file.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from . import storage
from .config import to_dict
from .log import get_logger

log = get_logger(__name__)

HARDEST_NEGATIVES_FILE = "hardest_negatives.parquet"
MINE_LAYOUT_VERSION = 1


def hardest_negatives_schema() -> pa.Schema:
    return pa.schema([
        ("query_image_id", pa.int64()),
        ("hardest_negatives", pa.list_(pa.int64())),
        ("negative_distances", pa.list_(pa.float32())),
    ])


# ====================================================================== positions
def positions_of(table: pa.Table, what: str) -> np.ndarray:
    """(N, 2) float64 ``utm_east, utm_north``; a missing north is 0 (1-D sequences such as
    Gardens Point put the frame index in ``utm_east``). Missing east is an error naming ``what``."""
    if "utm_east" not in table.column_names:
        raise ValueError(f"{what} has no utm_east column; mining needs image positions")
    east = table.column("utm_east").to_numpy(zero_copy_only=False).astype(np.float64)
    if np.isnan(east).any():
        bad = int(np.isnan(east).sum())
        raise ValueError(f"{what}: {bad} image(s) have no position (utm_east is empty); mining needs positions")
    north = (table.column("utm_north").to_numpy(zero_copy_only=False).astype(np.float64)
             if "utm_north" in table.column_names else np.zeros_like(east))
    north = np.nan_to_num(north, nan=0.0)
    return np.stack([east, north], axis=1)


def within_radius(a: np.ndarray, b: np.ndarray, radius: float, block: int = 4096) -> list[np.ndarray]:
    """For each row of ``a`` (N, 2), the indices of rows of ``b`` within ``radius`` (sorted)."""
    out: list[np.ndarray] = []
    r2 = radius * radius
    for s in range(0, len(a), block):
        d2 = ((a[s:s + block, None, :] - b[None, :, :]) ** 2).sum(-1)
        out.extend(np.flatnonzero(row <= r2) for row in d2)
    return out


# ====================================================================== partial mining
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
        self.hard_positives = within_radius(query_positions, database_positions, positive_radius)
        self.soft_positives = within_radius(query_positions, database_positions, negative_radius)
        self.trainable_queries = np.array([i for i, p in enumerate(self.hard_positives) if len(p)], np.int64)
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
        db_slot = {int(r): i for i, r in enumerate(round_.database)}
        pool_slots = np.array([db_slot[int(r)] for r in round_.negative_pool], np.int64)
        pool_desc = database_descriptors[pool_slots]
        qs, ps, ns = [], [], []
        for qi, q in enumerate(round_.queries):
            qd = query_descriptors[qi]
            pos_rows = self.hard_positives[q]
            pos_slots = np.array([db_slot[int(r)] for r in pos_rows], np.int64)
            pos_d = ((database_descriptors[pos_slots] - qd) ** 2).sum(-1)
            best_pos = int(pos_rows[int(np.argmin(pos_d))])
            neg_d = ((pool_desc - qd) ** 2).sum(-1)
            neg_d[np.isin(round_.negative_pool, self.soft_positives[q])] = np.inf
            order = np.argsort(neg_d, kind="stable")[: self.num_negatives]
            if len(order) < self.num_negatives or not np.isfinite(neg_d[order]).all():
                continue
            qs.append(int(q))
            ps.append(best_pos)
            ns.append(round_.negative_pool[order])
        if not qs:
            return Triplets(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, self.num_negatives), np.int64))
        return Triplets(np.array(qs, np.int64), np.array(ps, np.int64), np.stack(ns).astype(np.int64))


# ====================================================================== global hardest negatives
@dataclass
class MineConfig:
    queries: str = ""                  # extraction store of the training queries
    database: str = ""                 # extraction store of the database ("" = the query store)
    output: str = ""                   # folder or s3:// URL for the blocks and the final Parquet
    soft_positive_radius: float = 25.0
    top_k: int = 200
    query_block_size: int = 4096       # rows per query block (a query Parquet part is split into these)
    blocks_per_wave: int = 8           # query blocks sent together to every database task
    database_chunk_rows: int = 65536   # rows per distance matrix inside a task (memory bound)
    address: str | None = None         # Ray cluster; None = RAY_ADDRESS or a local Ray


@dataclass
class MineResult:
    output: str
    queries: int
    blocks_total: int
    blocks_computed: int
    blocks_skipped: int
    seconds: float
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class _QueryBlock:
    index: int
    part_url: str
    start: int
    stop: int


def _block_url(output: str, index: int, suffix: str) -> str:
    return storage.join(output, "blocks", f"block-{index:05d}.{suffix}")


def _plan_query_blocks(queries_store: str, block_size: int) -> list[_QueryBlock]:
    """Query blocks from the query store's part row counts (reads Parquet footers only)."""
    import pyarrow.parquet as pq

    blocks: list[_QueryBlock] = []
    for url in storage.global_part_urls(queries_store):
        fs, path = storage.filesystem(url)
        with fs.open(path, "rb") as f:
            rows = pq.ParquetFile(f).metadata.num_rows
        for start in range(0, rows, block_size):
            blocks.append(_QueryBlock(len(blocks), url, start, min(rows, start + block_size)))
    return blocks


def _fingerprint(cfg: MineConfig, database: str) -> dict[str, Any]:
    def manifest_hash(store: str) -> str:
        # What identifies the stored descriptors; times and run statistics change on a mere re-run.
        manifest = storage.read_manifest(store)
        ident = {k: manifest.get(k) for k in ("layout_version", "shards", "rows", "keys_digest", "model",
                                                "image_size", "global_dim", "preprocessing")}
        text = json.dumps(ident, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    return {
        "layout_version": MINE_LAYOUT_VERSION,
        "queries": cfg.queries, "queries_manifest": manifest_hash(cfg.queries),
        "database": database, "database_manifest": manifest_hash(database),
        "soft_positive_radius": cfg.soft_positive_radius, "top_k": cfg.top_k,
        "query_block_size": cfg.query_block_size,
    }


def _read_query_block(block: _QueryBlock) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    t = storage.read_parquet(block.part_url, ["image_id", "utm_east", "utm_north", "global_descriptor"])
    t = t.slice(block.start, block.stop - block.start)
    return (t.column("image_id").to_numpy().astype(np.int64), storage.descriptors_of(t),
            positions_of(t, f"query part {block.part_url}"))


def partial_topk(query_desc: np.ndarray, query_pos: np.ndarray, db_ids: np.ndarray, db_desc: np.ndarray,
                 db_pos: np.ndarray, k: int, soft_positive_radius: float, chunk_rows: int = 65536,
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` nearest database rows per query (squared L2), soft positives removed.

    Returns ``(ids (Q, k) int64, dists (Q, k) float32)`` padded with id -1 / +inf where fewer than
    ``k`` non-positives exist. Ordering is by (distance, image id), so merging partial lists of
    disjoint database blocks with the same rule gives exactly the global top-k."""
    nq = len(query_desc)
    best_ids = np.full((nq, 0), -1, np.int64)
    best_d = np.full((nq, 0), np.inf, np.float32)
    q = np.ascontiguousarray(query_desc, dtype=np.float32)
    qn = (q * q).sum(1, keepdims=True)
    r2 = soft_positive_radius * soft_positive_radius
    for s in range(0, len(db_desc), chunk_rows):
        x = np.ascontiguousarray(db_desc[s:s + chunk_rows], dtype=np.float32)
        d = qn + (x * x).sum(1)[None, :] - 2.0 * (q @ x.T)
        np.maximum(d, 0.0, out=d)
        geo = ((query_pos[:, None, :] - db_pos[None, s:s + chunk_rows, :]) ** 2).sum(-1)
        d[geo <= r2] = np.inf
        ids = np.broadcast_to(db_ids[s:s + chunk_rows], d.shape)
        best_ids, best_d = _merge_topk(np.concatenate([best_ids, ids], 1), np.concatenate([best_d, d], 1), k)
    return _pad(best_ids, best_d, k)


def _merge_topk(ids: np.ndarray, dists: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Row-wise exact top-k by (distance, id); infinite distances (soft positives) dropped."""
    out_ids = np.full((len(ids), min(k, ids.shape[1])), -1, np.int64)
    out_d = np.full(out_ids.shape, np.inf, np.float32)
    for i in range(len(ids)):
        row_d, row_i = dists[i], ids[i]
        keep = np.isfinite(row_d) & (row_i >= 0)
        row_d, row_i = row_d[keep], row_i[keep]
        if len(row_d) > 4 * k:  # cheap preselection; the boundary value is kept with all its ties
            kth = np.partition(row_d, k - 1)[k - 1]
            sel = row_d <= kth
            row_d, row_i = row_d[sel], row_i[sel]
        order = np.lexsort((row_i, row_d))[:k]
        out_ids[i, :len(order)] = row_i[order]
        out_d[i, :len(order)] = row_d[order]
    return out_ids, out_d


def _pad(ids: np.ndarray, dists: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    if ids.shape[1] >= k:
        return ids[:, :k], dists[:, :k]
    pad = k - ids.shape[1]
    return (np.concatenate([ids, np.full((len(ids), pad), -1, np.int64)], 1),
            np.concatenate([dists, np.full((len(ids), pad), np.inf, np.float32)], 1))


def _database_task(db_part_url: str, blocks: list[_QueryBlock], k: int, radius: float, chunk_rows: int,
                   ) -> list[tuple[np.ndarray, np.ndarray]]:
    """Runs on a Ray worker: reads ONE database part and the wave's query blocks."""
    import torch

    torch.set_num_threads(1)
    t = storage.read_parquet(db_part_url, ["image_id", "utm_east", "utm_north", "global_descriptor"])
    db_ids = t.column("image_id").to_numpy().astype(np.int64)
    db_desc = storage.descriptors_of(t)
    db_pos = positions_of(t, f"database part {db_part_url}")
    out = []
    for b in blocks:
        _, q_desc, q_pos = _read_query_block(b)
        out.append(partial_topk(q_desc, q_pos, db_ids, db_desc, db_pos, k, radius, chunk_rows))
    return out


def _write_block(output: str, block: _QueryBlock, query_ids: np.ndarray, ids: np.ndarray, dists: np.ndarray) -> None:
    negs, ds = [], []
    for i in range(len(query_ids)):
        keep = ids[i] >= 0
        negs.append(ids[i][keep].tolist())
        ds.append(dists[i][keep].tolist())
    table = pa.table({"query_image_id": pa.array(query_ids, pa.int64()),
                      "hardest_negatives": pa.array(negs, pa.list_(pa.int64())),
                      "negative_distances": pa.array(ds, pa.list_(pa.float32()))},
                     schema=hardest_negatives_schema())
    storage.write_parquet(_block_url(output, block.index, "parquet"), table)
    # The marker comes after the data: a block with a marker is complete, one without is redone.
    storage.write_json(_block_url(output, block.index, "done"), {"rows": len(query_ids)})


def run(config: MineConfig) -> MineResult:
    """Global hardest negatives of every query in ``config.queries`` (see module docstring)."""
    import ray

    from .cluster import ensure_ray

    if not config.queries or not config.output:
        raise ValueError("mine needs `queries` (an extraction store) and `output` (a folder or URL)")
    if config.top_k < 1 or config.query_block_size < 1 or config.blocks_per_wave < 1:
        raise ValueError("top_k, query_block_size and blocks_per_wave must be >= 1")
    t0 = time.perf_counter()
    database = config.database or config.queries
    fingerprint = _fingerprint(config, database)
    info_url = storage.join(config.output, "mine.json")
    if storage.exists(info_url):
        previous = storage.read_json(info_url)
        if previous != fingerprint:
            changed = sorted(k for k in fingerprint if previous.get(k) != fingerprint[k])
            raise ValueError(f"{config.output} holds mining blocks made with different inputs or settings "
                             f"({', '.join(changed)}); use a new output or remove it")
    else:
        storage.write_json(info_url, fingerprint)

    blocks = _plan_query_blocks(config.queries, config.query_block_size)
    todo = [b for b in blocks if not storage.exists(_block_url(config.output, b.index, "done"))]
    skipped = len(blocks) - len(todo)
    if skipped:
        log.info("mine: %d of %d query blocks already done, skipping them", skipped, len(blocks))
    db_parts = storage.global_part_urls(database)
    if todo:
        ensure_ray(config.address)
        task = ray.remote(num_cpus=1)(_database_task)
        for w in range(0, len(todo), config.blocks_per_wave):
            wave = todo[w:w + config.blocks_per_wave]
            refs = [task.remote(u, wave, config.top_k, config.soft_positive_radius, config.database_chunk_rows)
                    for u in db_parts]
            partials = ray.get(refs)
            for bi, block in enumerate(wave):
                ids = np.concatenate([p[bi][0] for p in partials], 1)
                dists = np.concatenate([p[bi][1] for p in partials], 1)
                ids, dists = _pad(*_merge_topk(ids, dists, config.top_k), config.top_k)
                query_ids = _read_query_block(block)[0]
                _write_block(config.output, block, query_ids, ids, dists)
            log.info("mine: %d/%d query blocks done", skipped + min(w + config.blocks_per_wave, len(todo)),
                     len(blocks))

    tables = [storage.read_parquet(_block_url(config.output, b.index, "parquet")) for b in blocks]
    final = pa.concat_tables(tables) if tables else hardest_negatives_schema().empty_table()
    storage.write_parquet(storage.join(config.output, HARDEST_NEGATIVES_FILE), final,
                          metadata={"r2f_mine": fingerprint})
    seconds = time.perf_counter() - t0
    log.info("mine: %d queries, top %d hardest negatives each, %.1f s -> %s", final.num_rows, config.top_k,
             seconds, storage.join(config.output, HARDEST_NEGATIVES_FILE))
    return MineResult(output=storage.join(config.output, HARDEST_NEGATIVES_FILE), queries=final.num_rows,
                      blocks_total=len(blocks), blocks_computed=len(todo), blocks_skipped=skipped, seconds=seconds)


def read_hardest_negatives(url: str) -> dict[int, np.ndarray]:
    """``{query_image_id: hardest negative image ids (nearest first)}`` from a mining output
    (the folder or the Parquet file itself)."""
    if not url.endswith(".parquet"):
        url = storage.join(url, HARDEST_NEGATIVES_FILE)
    t = storage.read_parquet(url, ["query_image_id", "hardest_negatives"])
    qids = t.column("query_image_id").to_pylist()
    negs = t.column("hardest_negatives").to_pylist()
    return {int(q): np.asarray(n, np.int64) for q, n in zip(qids, negs)}


# ====================================================================== CLI
def register_cli(subparsers: argparse._SubParsersAction) -> None:
    from .cli import add_config_arguments

    p = subparsers.add_parser("mine", help="global hardest negatives of every training query (Parquet)")
    add_config_arguments(p)
    p.add_argument("--queries", help="extraction store of the training queries")
    p.add_argument("--database", help="extraction store of the database (default: the query store)")
    p.add_argument("--output", help="output folder or URL")
    p.add_argument("--top-k", type=int)
    p.add_argument("--soft-positive-radius", type=float)
    p.set_defaults(func=_cli)


def _cli(args: argparse.Namespace) -> int:
    from .cli import config_from_args

    cfg = config_from_args(MineConfig, args, ("queries", "database", "output", "top_k", "soft_positive_radius"))
    log.info("mine config: %s", to_dict(cfg))
    result = run(cfg)
    print(json.dumps({"output": result.output, "queries": result.queries, "blocks_total": result.blocks_total,
                      "blocks_computed": result.blocks_computed, "blocks_skipped": result.blocks_skipped,
                      "seconds": round(result.seconds, 2)}))
    return 0
