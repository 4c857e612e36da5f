"""Hard-negative mining: partial mining for training and cluster-wide global hardest negatives.

Two kinds, both in the paper's (and the VG benchmark's) words:

* **Partial mining** (``PartialMiner``), used inside every training step that needs triplets: per
  refresh, sample some training queries and a random subset of the database, compute their
  global descriptors with the *current* model (the caller does that), then give each query its
  best positive (nearest descriptor within ``positive_radius``, 10 m) and its hardest negatives
  (nearest descriptors beyond ``negative_radius``, 25 m). Radii are in the units of the
  dataset's positions, so a frame-aligned sequence such as Gardens Point uses frames. Positives
  and soft positives come from a k-d tree (``pipeline.spatial``), never a dense distance matrix.

* **Global hardest negatives** (``run(MineConfig)``, ``r2f mine``): for every training query, the
  ``top_k`` (200) nearest database images over the *whole* database, soft positives (within
  ``soft_positive_radius``) removed, by top-K search over a sharded FAISS index built for
  mining (exact ``Flat`` by default, in ``<output>/index``)::

      query part ──► query block (query_block_size rows) ── read task ──► block ref
                                                   │
                       ┌───────────────────────────┼───────────────────────────┐
                  shard actor 0               shard actor 1        ...    shard actor S-1
          (index.search's ShardActor: index shard + k-d tree of its positions: search k + soft
           count, drop soft positives)
                       └───────────────────────────┼───────────────────────────┘
                                                   ▼
                           merge task (vectorised (distance, id) top-k of S lists)
                                                   ▼
              <output>/blocks/block-00003.parquet, then block-00003.done   (resume per block)
                                                   ▼
              driver: blocks streamed one at a time into <output>/hardest_negatives.parquet

  Output rows: ``query_image_id``, ``hardest_negatives`` (list<int64>, nearest first),
  ``negative_distances`` (list<float32>, squared L2 of the unit descriptors = 2 - 2 cos,
  ascending); ``mine.json`` records what the blocks were computed from (reruns must match) and
  ``mine-index.json`` the index version built for them. The driver never holds candidate
  lists: it keeps references to ``blocks_in_flight`` blocks. FAISS threads per shard actor are
  fixed for the run (``search_threads``; 0 = cluster CPUs / shards, so the same on a rerun on the
  same cluster) and ties are broken by image id, so a rerun (after a kill, finished blocks
  skipped) writes a byte-identical final file.
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
from .index import layout as L
from .index.leases import hold_lease
from .index.search import ShardActor, ShardedSearcher
from .spatial import PositionIndex, geo_within, positions_of

log = get_logger(__name__)

HARDEST_NEGATIVES_FILE = "hardest_negatives.parquet"
MINE_LAYOUT_VERSION = 2  # 2: FAISS top-K mining (distances 2 - 2 cos)


def hardest_negatives_schema() -> pa.Schema:
    return pa.schema([
        ("query_image_id", pa.int64()),
        ("hardest_negatives", pa.list_(pa.int64())),
        ("negative_distances", pa.list_(pa.float32())),
    ])


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


# ====================================================================== global hardest negatives
@dataclass
class MineConfig:
    queries: str = ""                  # extraction store of the training queries
    database: str = ""                 # extraction store of the database ("" = the query store)
    output: str = ""                   # folder or s3:// URL for the blocks and the final Parquet
    soft_positive_radius: float = 25.0
    top_k: int = 200
    query_block_size: int = 4096       # rows per query block (a query Parquet part is split into these)
    index_dir: str = ""                # mining index; "" = <output>/index, built here
    index_version: str = ""            # "" = build (or reuse) a mining version; "current" / "vNNNN" = use one
    index_factory: str = "Flat"        # exact by default (choose_index would pick IVF above 50k vectors)
    index_shards: int | None = None    # None: the index build's choice (>= one per cluster CPU from 200k)
    index_memory_budget: str = "64G"   # only for index_factory "auto"
    search_threads: int = 0            # FAISS threads per shard actor (0: cluster CPUs / shards); fixed per run
    blocks_in_flight: int = 4          # query blocks searched / merged at once (bounds object-store use)
    use_gpu: str = "auto"              # shard actors search on GPU where FAISS sees one
    ray_address: str | None = None     # Ray cluster; None = RAY_ADDRESS or a local Ray


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


def _plan_query_blocks(part_urls: list[str], block_size: int) -> list[_QueryBlock]:
    """Query blocks from the query store's part row counts (reads Parquet footers only)."""
    import pyarrow.parquet as pq

    blocks: list[_QueryBlock] = []
    for url in part_urls:
        fs, path = storage.filesystem(url)
        with fs.open(path, "rb") as f:
            rows = pq.ParquetFile(f).metadata.num_rows
        for start in range(0, rows, block_size):
            blocks.append(_QueryBlock(len(blocks), url, start, min(rows, start + block_size)))
    return blocks


def _manifest_hash(manifest: dict[str, Any]) -> str:
    # What identifies the stored descriptors; times and run statistics change on a mere re-run.
    ident = {k: manifest.get(k) for k in ("layout_version", "shards", "rows", "keys_digest", "model",
                                            "image_size", "global_dim", "preprocessing")}
    return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _fingerprint(cfg: MineConfig, database: str, q_manifest: dict, db_manifest: dict) -> dict[str, Any]:
    return {
        "layout_version": MINE_LAYOUT_VERSION,
        "queries": cfg.queries, "queries_manifest": _manifest_hash(q_manifest),
        "database": database, "database_manifest": _manifest_hash(db_manifest),
        "soft_positive_radius": cfg.soft_positive_radius, "top_k": cfg.top_k,
        "query_block_size": cfg.query_block_size,
        "index": cfg.index_version or cfg.index_factory,
    }


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


def _read_query_block(block: _QueryBlock) -> dict[str, np.ndarray]:
    """One query block: ids, unit-norm descriptors (the index metric is cosine) and positions."""
    import faiss

    t = storage.read_parquet(block.part_url, ["image_id", "utm_east", "utm_north", "global_descriptor"])
    t = t.slice(block.start, block.stop - block.start)
    desc = np.ascontiguousarray(storage.descriptors_of(t), dtype=np.float32).copy()
    if len(desc):
        faiss.normalize_L2(desc)
    return {"ids": t.column("image_id").to_numpy().astype(np.int64), "desc": desc,
            "pos": positions_of(t, missing="raise", what=f"query part {block.part_url}")}


class _MiningShard(ShardActor):
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


def _merge_block(output: str, block_index: int, k: int, block: dict[str, np.ndarray], *shard_results) -> int:
    """Runs in a Ray task: merges the shards' ranked lists of one query block and commits the block."""
    ids = np.concatenate([r[0] for r in shard_results], 1)
    dists = np.concatenate([r[1] for r in shard_results], 1)
    ids, dists = merge_ranked(ids, dists, k)
    storage.write_parquet(_block_url(output, block_index, "parquet"), _block_table(block["ids"], ids, dists))
    # The marker comes after the data: a block with a marker is complete, one without is redone.
    storage.write_json(_block_url(output, block_index, "done"), {"rows": int(len(ids))})
    return int(len(ids))


def _mining_index(cfg: MineConfig, database: str, fingerprint: dict[str, Any], pinned: str | None,
                  ) -> tuple[str, str]:
    """``(index_dir, version)`` to mine with: a named version (``current`` = the version pinned
    when the job resolved its state), the one this output built before, or a new exact
    (``Flat``) version built now and recorded in ``<output>/mine-index.json``."""
    from .index.build import IndexConfig, build

    index_dir = cfg.index_dir or storage.join(cfg.output, "index")
    if cfg.index_version == "current" and pinned:
        return index_dir, pinned
    if cfg.index_version:
        return index_dir, L.resolve_version(index_dir, None if cfg.index_version == "current" else cfg.index_version)
    record_url = storage.join(cfg.output, "mine-index.json")
    if storage.exists(record_url):
        record = storage.read_json(record_url)
        if record.get("database_manifest") == fingerprint["database_manifest"] and \
                record["version"] in L.list_versions(record["index_dir"]):
            return record["index_dir"], record["version"]
    factory = None if cfg.index_factory == "auto" else cfg.index_factory
    result = build(IndexConfig(store=database, index_dir=index_dir, factory=factory, num_shards=cfg.index_shards,
                               memory_budget=cfg.index_memory_budget, normalize=True, held_back_queries=0,
                               use_gpu=cfg.use_gpu, ray_address=cfg.ray_address, make_current=not cfg.index_dir))
    storage.write_json(record_url, {"index_dir": index_dir, "version": result.version,
                                    "database_manifest": fingerprint["database_manifest"]})
    return index_dir, result.version


def _open_shards(index_dir: str, version: str, db_store: str, db_manifest: dict, cfg: MineConfig):
    """The mining index's shards in ``_MiningShard`` actors, opened through ``index.search``
    (placement by shard memory, GPU share, restarts); each actor also reads the positions of the
    extraction shards its index shard covers."""
    import ray

    infos = L.read_infos(index_dir, version)
    threads = cfg.search_threads or max(1, int(ray.cluster_resources().get("CPU", 1)) // len(infos["shards"]))
    log.info("mine: %d index shard actor(s) of %s %s, %d FAISS thread(s) each", len(infos["shards"]), index_dir,
             version, threads)
    store_lay = storage.StoreLayout(db_store)
    in_store = {int(s) for s in db_manifest["shards"]}
    for e in infos["shards"]:
        missing = [s for s in e["extraction_shards"] if int(s) not in in_store]
        if missing:
            raise ValueError(f"index {index_dir} {version} shard {e['shard']} covers extraction shards {missing} "
                             f"that the database store {db_store} does not hold; rebuild the mining index")
    return ShardedSearcher(index_dir, version=version, use_actors=True, use_gpu=cfg.use_gpu, ray_address=cfg.ray_address,
                           actor_threads=threads, actor_class=_MiningShard,
                           actor_args=lambda e: ([store_lay.global_part(int(s)) for s in e["extraction_shards"]],
                                                 cfg.soft_positive_radius))


def _write_final(output: str, blocks: list[_QueryBlock], metadata: dict[str, Any]) -> int:
    """Concatenate the committed blocks into the final file one block at a time (memory O(block)):
    written beside it and moved into place, so readers never see a partial file."""
    import pyarrow.parquet as pq

    url = storage.join(output, HARDEST_NEGATIVES_FILE)
    fs, path = storage.filesystem(url)
    schema = hardest_negatives_schema().with_metadata({k: json.dumps(v, sort_keys=True) for k, v in metadata.items()})
    rows = 0
    with fs.open(path + ".partial", "wb") as f:
        with pq.ParquetWriter(f, schema) as writer:
            for b in blocks:
                t = storage.read_parquet(_block_url(output, b.index, "parquet")).replace_schema_metadata(schema.metadata)
                writer.write_table(t)
                rows += t.num_rows
    fs.mv(path + ".partial", path)
    return rows


def run(config: MineConfig) -> MineResult:
    """Global hardest negatives of every query in ``config.queries`` (see the module docstring).

    Memory: the driver holds the block plan (O(query parts)) and object references of at most
    ``blocks_in_flight`` blocks; each shard actor holds one index shard; each merge task one
    query block's candidate lists (block x shards x top_k)."""
    import ray

    from .cluster import ensure_ray
    from .index.published import resolve

    if not config.queries or not config.output:
        raise ValueError("mine needs `queries` (an extraction store) and `output` (a folder or URL)")
    if config.top_k < 1 or config.query_block_size < 1 or config.blocks_in_flight < 1:
        raise ValueError("top_k, query_block_size and blocks_in_flight must be >= 1")
    storage.check_output(config.output, "--output")
    t0 = time.perf_counter()
    database = config.database or config.queries
    # The published state is resolved once; everything below reads through these manifests.
    db_state = resolve(database, config.index_dir or None)
    q_state = db_state if database == config.queries else resolve(config.queries)
    storage.check_same_model(("query store", config.queries, q_state.manifest),
                             ("database store", database, db_state.manifest))
    fingerprint = _fingerprint(config, database, q_state.manifest, db_state.manifest)
    info_url = storage.join(config.output, "mine.json")
    if storage.exists(info_url):
        previous = storage.read_json(info_url)
        if previous != fingerprint:
            changed = sorted(k for k in fingerprint if previous.get(k) != fingerprint[k])
            raise ValueError(f"{config.output} holds mining blocks made with different inputs or settings "
                             f"({', '.join(changed)}); use a new output or remove it")
    else:
        storage.write_json(info_url, fingerprint)

    blocks = _plan_query_blocks(q_state.global_part_urls(), config.query_block_size)
    todo = [b for b in blocks if not storage.exists(_block_url(config.output, b.index, "done"))]
    skipped = len(blocks) - len(todo)
    if skipped:
        log.info("mine: %d of %d query blocks already done, skipping them", skipped, len(blocks))
    extra: dict[str, Any] = {"published": db_state.metadata()}
    if todo:
        ensure_ray(config.ray_address)
        t_index = time.perf_counter()
        index_dir, version = _mining_index(config, database, fingerprint, db_state.index_version)
        extra.update(index_dir=index_dir, index_version=version, index_seconds=time.perf_counter() - t_index)
        # A named index's version is leased while mining reads it; the private <output>/index needs none.
        with hold_lease(config.index_dir or None, "mine", db_state):
            searcher = _open_shards(index_dir, version, database, db_state.manifest, config)
            read_task = ray.remote(num_cpus=1)(_read_query_block)
            merge_task = ray.remote(num_cpus=1, max_retries=2)(_merge_block)
            pending: list = []
            done = skipped
            try:
                for block in todo:
                    if len(pending) >= config.blocks_in_flight:
                        ready, pending = ray.wait(pending, num_returns=1)
                        ray.get(ready)
                        done += 1
                        if done % 16 == 0:
                            log.info("mine: %d/%d query blocks done", done, len(blocks))
                    q_ref = read_task.remote(block)
                    parts = [a.hardest.remote(q_ref, config.top_k) for a in searcher.actors]
                    pending.append(merge_task.remote(config.output, block.index, config.top_k, q_ref, *parts))
                ray.get(pending)
            finally:
                searcher.close()

    rows = _write_final(config.output, blocks, {"r2f_mine": fingerprint, "r2f_published": db_state.metadata()})
    seconds = time.perf_counter() - t0
    out = storage.join(config.output, HARDEST_NEGATIVES_FILE)
    log.info("mine: %d queries, top %d hardest negatives each, %.1f s -> %s", rows, config.top_k, seconds, out)
    return MineResult(output=out, queries=rows, blocks_total=len(blocks), blocks_computed=len(todo),
                      blocks_skipped=skipped, seconds=seconds, extra=extra)


# ====================================================================== readers
def _negatives_url(url: str) -> str:
    return url if url.endswith(".parquet") else storage.join(url, HARDEST_NEGATIVES_FILE)


def iter_hardest_negatives(url: str, top: int | None = None, batch_rows: int = 65536):
    """Stream a mining output as ``(query_ids (B,), negatives (B, top) int64 padded with -1)``
    batches, nearest first. Memory O(batch_rows x top); no Python object per row."""
    import pyarrow.parquet as pq

    fs, path = storage.filesystem(_negatives_url(url))
    with fs.open(path, "rb") as f:
        pf = pq.ParquetFile(f)
        width = top
        for batch in pf.iter_batches(batch_size=batch_rows, columns=["query_image_id", "hardest_negatives"]):
            qids = batch.column(0).to_numpy().astype(np.int64)
            lists = batch.column(1)
            offsets = lists.offsets.to_numpy().astype(np.int64)
            values = lists.values.to_numpy().astype(np.int64)
            offsets = offsets - offsets[0]
            counts = np.diff(offsets)
            w = width if width is not None else int(counts.max(initial=0))
            out = np.full((len(qids), w), -1, np.int64)
            col = np.arange(w)[None, :]
            take = col < np.minimum(counts, w)[:, None]
            src = offsets[:-1, None] + col
            out[take] = values[src[take]]
            yield qids, out


@dataclass
class HardestNegatives:
    """A mining output as arrays: ``query_ids`` (Q,) sorted, ``negatives`` (Q, top) padded with -1.
    Memory O(Q x top) int64 (the training worker's pools); ``[query_id]`` gives one row."""

    query_ids: np.ndarray
    negatives: np.ndarray

    def rows_of(self, query_ids: np.ndarray) -> np.ndarray:
        """Row of each query id, -1 where the output has none (vectorised)."""
        query_ids = np.asarray(query_ids, np.int64)
        at = np.clip(np.searchsorted(self.query_ids, query_ids), 0, max(0, len(self.query_ids) - 1))
        found = (len(self.query_ids) > 0) & (self.query_ids[at] == query_ids) if len(self.query_ids) else \
            np.zeros(len(query_ids), bool)
        return np.where(found, at, -1)

    def __len__(self) -> int:
        return len(self.query_ids)

    def __contains__(self, query_id: int) -> bool:
        return int(self.rows_of(np.array([query_id]))[0]) >= 0

    def __getitem__(self, query_id: int) -> np.ndarray:
        r = int(self.rows_of(np.array([query_id]))[0])
        if r < 0:
            raise KeyError(query_id)
        row = self.negatives[r]
        return row[row >= 0]

    def get(self, query_id: int, default=None):
        return self[query_id] if query_id in self else default


def read_hardest_negatives(url: str, top: int | None = None) -> HardestNegatives:
    """A mining output (the folder or the Parquet file itself) as ``HardestNegatives``, read in
    streamed batches; ``top`` keeps the nearest ``top`` negatives per query."""
    ids, negs = [], []
    for q, n in iter_hardest_negatives(url, top):
        ids.append(q)
        negs.append(n)
    if not ids:
        return HardestNegatives(np.zeros(0, np.int64), np.zeros((0, top or 0), np.int64))
    width = max(n.shape[1] for n in negs)
    negs = [np.pad(n, ((0, 0), (0, width - n.shape[1])), constant_values=-1) for n in negs]
    q, n = np.concatenate(ids), np.concatenate(negs)
    order = np.argsort(q, kind="stable")
    return HardestNegatives(q[order], n[order])


# ====================================================================== CLI
def register_cli(subparsers: argparse._SubParsersAction) -> None:
    from .config import add_config_arguments

    p = subparsers.add_parser("mine", help="global hardest negatives of every training query (Parquet)")
    add_config_arguments(p)
    p.add_argument("--queries", help="extraction store of the training queries")
    p.add_argument("--database", help="extraction store of the database (default: the query store)")
    p.add_argument("--output", help="output folder or URL")
    p.add_argument("--top-k", type=int)
    p.add_argument("--soft-positive-radius", type=float)
    p.add_argument("--index-dir", help="mining index folder (default <output>/index, built as an exact Flat index)")
    p.add_argument("--index-factory", help="FAISS factory of a mining index built here (Flat; IVF...; auto)")
    p.add_argument("--index-version", help="mine with this existing version of --index-dir (or 'current')")
    p.set_defaults(func=_cli)


def _cli(args: argparse.Namespace) -> int:
    from .config import config_from_args

    cfg = config_from_args(MineConfig, args, ("queries", "database", "output", "top_k", "soft_positive_radius",
                                                   "index_dir", "index_factory", "index_version"))
    log.info("mine config: %s", to_dict(cfg))
    result = run(cfg)
    print(json.dumps({"output": result.output, "queries": result.queries, "blocks_total": result.blocks_total,
                      "blocks_computed": result.blocks_computed, "blocks_skipped": result.blocks_skipped,
                      "seconds": round(result.seconds, 2)}))
    return 0
