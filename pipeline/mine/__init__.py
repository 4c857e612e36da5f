"""Hard-negative mining: the cluster-wide global hardest negatives job (``run(MineConfig)``,
``r2f mine``); partial mining for training lives in ``partial`` (``PartialMiner``).

Global hardest negatives: for every training query, the ``top_k`` (200) nearest database images
over the *whole* database, soft positives (within ``soft_positive_radius``) removed, by top-K
search over a sharded FAISS index built for mining (exact ``Flat`` by default, in
``<output>/index``)::

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

The workers' side is ``shards``, the output file and its readers ``output``. ``mine.json``
records what the blocks were computed from (reruns must match) and ``mine-index.json`` the index
version built for them. The driver never holds candidate lists: it keeps references to
``blocks_in_flight`` blocks. FAISS threads per shard actor are fixed for the run
(``search_threads``; 0 = cluster CPUs / shards, so the same on a rerun on the same cluster) and
ties are broken by image id, so a rerun (after a kill, finished blocks skipped) writes a
byte-identical final file.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import time
from dataclasses import dataclass, field
from typing import Any

from .. import storage
from ..config import to_dict
from ..index import layout as L
from ..index.leases import hold_lease
from ..index.search import ShardedSearcher
from ..log import get_logger
from .output import (
    HARDEST_NEGATIVES_FILE,
    HardestNegatives,
    hardest_negatives_schema,
    iter_hardest_negatives,
    read_hardest_negatives,
)
from .partial import MiningRound, PartialMiner, Triplets
from .shards import MiningShard, QueryBlock, block_url, merge_block, merge_ranked, partial_topk, read_query_block

__all__ = ["MineConfig", "MineResult", "run", "register_cli", "PartialMiner", "MiningRound", "Triplets",
           "partial_topk", "merge_ranked", "HARDEST_NEGATIVES_FILE", "hardest_negatives_schema",
           "iter_hardest_negatives", "read_hardest_negatives", "HardestNegatives", "MINE_LAYOUT_VERSION"]

log = get_logger(__name__)

MINE_LAYOUT_VERSION = 2  # 2: FAISS top-K mining (distances 2 - 2 cos)


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


def _plan_query_blocks(part_urls: list[str], block_size: int) -> list[QueryBlock]:
    """Query blocks from the query store's part row counts (reads Parquet footers only)."""
    import pyarrow.parquet as pq

    blocks: list[QueryBlock] = []
    for url in part_urls:
        fs, path = storage.filesystem(url)
        with fs.open(path, "rb") as f:
            rows = pq.ParquetFile(f).metadata.num_rows
        for start in range(0, rows, block_size):
            blocks.append(QueryBlock(len(blocks), url, start, min(rows, start + block_size)))
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


def _mining_index(cfg: MineConfig, database: str, fingerprint: dict[str, Any], pinned: str | None,
                  ) -> tuple[str, str]:
    """``(index_dir, version)`` to mine with: a named version (``current`` = the version pinned
    when the job resolved its state), the one this output built before, or a new exact
    (``Flat``) version built now and recorded in ``<output>/mine-index.json``."""
    from ..index.build import IndexConfig, build

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
    """The mining index's shards in ``MiningShard`` actors, opened through ``index.search``
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
                           actor_threads=threads, actor_class=MiningShard,
                           actor_args=lambda e: ([store_lay.global_part(int(s)) for s in e["extraction_shards"]],
                                                 cfg.soft_positive_radius))


def _write_final(output: str, blocks: list[QueryBlock], metadata: dict[str, Any]) -> int:
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
                t = storage.read_parquet(block_url(output, b.index, "parquet")).replace_schema_metadata(schema.metadata)
                writer.write_table(t)
                rows += t.num_rows
    fs.mv(path + ".partial", path)
    return rows


def run(config: MineConfig) -> MineResult:
    """Global hardest negatives of every query in ``config.queries`` (see the module docstring).

    Memory: the driver holds the block plan (O(query parts)) and object references of at most
    ``blocks_in_flight`` blocks; each shard actor holds one index shard; each merge task one
    query block's candidate lists (block x shards x top_k)."""
    from ..cluster import ensure_ray
    from ..index.published import resolve

    _check(config)
    storage.check_output(config.output, "--output")
    t0 = time.perf_counter()
    database = config.database or config.queries
    # The published state is resolved once; everything below reads through these manifests.
    db_state = resolve(database, config.index_dir or None)
    q_state = db_state if database == config.queries else resolve(config.queries)
    storage.check_same_model(("query store", config.queries, q_state.manifest),
                             ("database store", database, db_state.manifest))
    fingerprint = _fingerprint(config, database, q_state.manifest, db_state.manifest)
    _claim_output(config.output, fingerprint)

    blocks = _plan_query_blocks(q_state.global_part_urls(), config.query_block_size)
    todo = [b for b in blocks if not storage.exists(block_url(config.output, b.index, "done"))]
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
            try:
                _mine_blocks(config, searcher, todo, skipped, len(blocks))
            finally:
                searcher.close()

    rows = _write_final(config.output, blocks, {"r2f_mine": fingerprint, "r2f_published": db_state.metadata()})
    seconds = time.perf_counter() - t0
    out = storage.join(config.output, HARDEST_NEGATIVES_FILE)
    log.info("mine: %d queries, top %d hardest negatives each, %.1f s -> %s", rows, config.top_k, seconds, out)
    return MineResult(output=out, queries=rows, blocks_total=len(blocks), blocks_computed=len(todo),
                      blocks_skipped=skipped, seconds=seconds, extra=extra)


def _check(config: MineConfig) -> None:
    if not config.queries or not config.output:
        raise ValueError("mine needs `queries` (an extraction store) and `output` (a folder or URL)")
    if config.top_k < 1 or config.query_block_size < 1 or config.blocks_in_flight < 1:
        raise ValueError("top_k, query_block_size and blocks_in_flight must be >= 1")


def _claim_output(output: str, fingerprint: dict[str, Any]) -> None:
    """Record what the blocks are computed from, or check that an earlier run's record matches:
    finished blocks are only reused for the same inputs and settings."""
    info_url = storage.join(output, "mine.json")
    if storage.exists(info_url):
        previous = storage.read_json(info_url)
        if previous != fingerprint:
            changed = sorted(k for k in fingerprint if previous.get(k) != fingerprint[k])
            raise ValueError(f"{output} holds mining blocks made with different inputs or settings "
                             f"({', '.join(changed)}); use a new output or remove it")
    else:
        storage.write_json(info_url, fingerprint)


def _mine_blocks(config: MineConfig, searcher: ShardedSearcher, todo: list[QueryBlock], done: int,
                 total: int) -> None:
    """The dataflow of the module docstring over the blocks still to do: per block one read task,
    one search call on every shard actor and one merge task that commits it; at most
    ``blocks_in_flight`` blocks at once."""
    import ray

    read_task = ray.remote(num_cpus=1)(read_query_block)
    merge_task = ray.remote(num_cpus=1, max_retries=2)(merge_block)
    pending: list = []
    for block in todo:
        if len(pending) >= config.blocks_in_flight:
            ready, pending = ray.wait(pending, num_returns=1)
            ray.get(ready)
            done += 1
            if done % 16 == 0:
                log.info("mine: %d/%d query blocks done", done, total)
        q_ref = read_task.remote(block)
        parts = [a.hardest.remote(q_ref, config.top_k) for a in searcher.actors]
        pending.append(merge_task.remote(config.output, block.index, config.top_k, q_ref, *parts))
    ray.get(pending)


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    from ..config import add_config_arguments

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
    from ..config import config_from_args

    cfg = config_from_args(MineConfig, args, ("queries", "database", "output", "top_k", "soft_positive_radius",
                                                   "index_dir", "index_factory", "index_version"))
    log.info("mine config: %s", to_dict(cfg))
    result = run(cfg)
    print(json.dumps({"output": result.output, "queries": result.queries, "blocks_total": result.blocks_total,
                      "blocks_computed": result.blocks_computed, "blocks_skipped": result.blocks_skipped,
                      "seconds": round(result.seconds, 2)}))
    return 0
