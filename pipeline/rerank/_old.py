"""Where a query becomes a ranked list: global retrieval of the top-K candidates, then reranking.

``run(RerankConfig)``:

1. extract the queries into a query store (the same extraction stage as the database);
2. retrieve the top-K database candidates of every query from the index (K capped at the
   database size);
3. score every (query, candidate) pair on a Ray actor pool, in batches of ``batch_pairs`` pairs
   ordered by query, so a batch covers a few whole queries; each batch reads its query and
   candidate local tokens from Zarr once (``storage.read_local_tokens`` reads each distinct row
   once, however many queries share a candidate);
4. write one Parquet row per (query, candidate): see ``RESULTS_SCHEMA``.

Rerankers: ``r2former`` (the learned transformer; score = softmax(logits)[:, 1]), ``ransac``
(pipeline.ransac: mutual nearest neighbours + a robust homography, score = inlier count),
``none`` (the global order), ``auto`` (r2former when the model's weights include a trained
reranker, otherwise ransac). Candidates are reordered by rerank score; ties keep global order.
"""
from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from . import storage
from .log import get_logger
from .ransac import RansacConfig

log = get_logger(__name__)

RERANKERS = ("auto", "r2former", "ransac", "none")

RESULTS_SCHEMA = pa.schema([
    ("query_id", pa.int64()),
    ("query_path", pa.string()),
    ("rank", pa.int32()),            # 1-based, after reranking
    ("global_rank", pa.int32()),     # 1-based, global retrieval order
    ("image_id", pa.int64()),        # the candidate
    ("candidate_path", pa.string()),
    ("global_score", pa.float32()),  # as the index returns it (similarity: higher is better)
    ("rerank_score", pa.float32()),  # r2former: match probability; ransac: inliers; none: global_score
    ("query_utm_east", pa.float64()),
    ("query_utm_north", pa.float64()),
    ("candidate_utm_east", pa.float64()),
    ("candidate_utm_north", pa.float64()),
])


@dataclass
class RerankConfig:
    query_store: str = ""
    database_store: str = ""
    index_dir: str = ""
    results: str = ""                        # output Parquet URL
    queries: str | None = None               # dataset description; extracted into query_store first
    backbone: str = "r2former"
    checkpoint: str | None = None
    image_size: list[int] = field(default_factory=lambda: [480, 640])
    reranker: str = "auto"
    candidates: int = 100
    batch_pairs: int = 400                   # pairs per actor call (tokens read once per batch)
    num_actors: int | None = None            # default: one per GPU, else one per CPU
    threads_per_actor: int = 1
    ransac_method: str = "magsac"
    ransac_threshold_px: float = 24.0
    extract: dict[str, Any] = field(default_factory=dict)  # extra ExtractConfig fields for the queries


@dataclass
class RerankResult:
    results: str
    reranker: str
    num_queries: int
    num_pairs: int
    candidates: int
    num_failed_queries: int
    stage_seconds: dict[str, float]
    pairs_per_second: float


# ---------------------------------------------------------------- helpers shared with pipeline.run
def resolve_reranker(name: str, backbone: str, checkpoint: str | None, model=None) -> str:
    """``auto`` -> ``r2former`` when the loaded weights include a trained reranker, else ``ransac``."""
    if name not in RERANKERS:
        raise ValueError(f"unknown reranker {name!r}; choose one of {RERANKERS}")
    if name != "auto":
        return name
    if model is None:
        from .model import build_model
        model = build_model(backbone, checkpoint)
    trained = bool(getattr(model, "has_trained_reranker", False))
    chosen = "r2former" if trained else "ransac"
    log.info("reranker auto -> %s (%s)", chosen,
             "weights include a trained reranker" if trained else "no trained reranker in these weights")
    return chosen


def extract_into(dataset: str, store: str, backbone: str, checkpoint: str | None, image_size: list[int],
                 extra: dict[str, Any] | None = None):
    """Run the extraction stage on ``dataset`` into ``store`` (resumes a partial store)."""
    from . import extract

    cfg = extract.ExtractConfig(dataset=dataset, store=store, backbone=backbone, checkpoint=checkpoint,
                                image_size=list(image_size), **(extra or {}))
    return extract.run(cfg)


def reranked_order(rerank_score: np.ndarray, global_rank: np.ndarray) -> np.ndarray:
    """Indices that sort one query's candidates by rerank score, ties broken by global rank."""
    return np.lexsort((global_rank, -np.asarray(rerank_score, np.float64)))


# ---------------------------------------------------------------- the actor
class PairScorer:
    """One model (or RANSAC) per actor, built once; called on batches of (query_row, candidate_row)."""

    def __init__(self, reranker: str, backbone: str, checkpoint: str | None, query_store: str,
                 database_store: str, ransac: RansacConfig, threads: int = 1):
        import cv2
        from .device import choose_device, set_cpu_threads

        set_cpu_threads(threads)
        cv2.setNumThreads(max(1, threads))
        self.reranker = reranker
        self.ransac = ransac
        self.query_store, self.database_store = query_store, database_store
        self.q_tokens = storage.open_local_tokens(query_store)
        self.c_tokens = storage.open_local_tokens(database_store)
        self.model = None
        if reranker == "r2former":
            from .model import build_model
            self.plan = choose_device()
            self.model = build_model(backbone, checkpoint).to(self.plan.device).eval()

    def score(self, q: np.ndarray, c: np.ndarray) -> np.ndarray:
        if self.reranker == "ransac":
            from .ransac import ransac_scores
            return ransac_scores(q, c, self.ransac)
        import torch
        from .device import autocast
        dev = self.plan.device
        with torch.inference_mode(), autocast(self.plan):
            logits = self.model.rerank_logits(torch.from_numpy(q).to(dev), torch.from_numpy(c).to(dev))
        return torch.softmax(logits.float(), dim=1)[:, 1].cpu().numpy().astype(np.float32)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        q = storage.read_local_tokens(self.query_store, batch["query_row"], self.q_tokens)
        c = storage.read_local_tokens(self.database_store, batch["candidate_row"], self.c_tokens)
        return {"pair": batch["pair"], "rerank_score": self.score(q, c)}


def score_pairs(pairs: pa.Table, reranker: str, config: RerankConfig) -> np.ndarray:
    """Scores of all pairs (in ``pairs["pair"]`` order) from a Ray Data actor pool."""
    import ray

    from .cluster import cluster_gpus, ensure_ray

    ensure_ray()
    n = pairs.num_rows
    if n == 0:
        return np.zeros(0, np.float32)
    step = max(1, config.batch_pairs)
    blocks = [pairs.slice(s, step) for s in range(0, n, step)]
    gpus = cluster_gpus() if reranker == "r2former" else 0
    cpus = int(ray.cluster_resources().get("CPU", 1))
    default = gpus if gpus else max(1, cpus // max(1, config.threads_per_actor))
    actors = max(1, min(config.num_actors or default, len(blocks)))
    ransac = RansacConfig(method=config.ransac_method, reprojection_threshold=config.ransac_threshold_px,
                          image_scale=float(max(config.image_size)))
    ds = ray.data.from_arrow(blocks).map_batches(
        PairScorer,
        fn_constructor_kwargs=dict(reranker=reranker, backbone=config.backbone, checkpoint=config.checkpoint,
                                   query_store=config.query_store, database_store=config.database_store,
                                   ransac=ransac, threads=config.threads_per_actor),
        batch_size=step, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=actors),
        num_cpus=config.threads_per_actor, num_gpus=1 if gpus else 0)
    out = pa.concat_tables(ray.get(ds.to_arrow_refs()))
    scores = np.full(n, np.nan, np.float32)
    scores[out.column("pair").to_numpy()] = out.column("rerank_score").to_numpy()
    if np.isnan(scores).any():
        raise RuntimeError(f"{int(np.isnan(scores).sum())} of {n} pairs came back without a score")
    return scores


# ---------------------------------------------------------------- the stage
def _positions(table: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    from .evaluate import positions_of
    xy = positions_of(table)
    return xy[:, 0], xy[:, 1]


def run(config: RerankConfig) -> RerankResult:
    from . import index

    for name in ("query_store", "database_store", "index_dir", "results"):
        if not getattr(config, name):
            raise ValueError(f"RerankConfig.{name} is required")
    if config.candidates < 1:
        raise ValueError(f"candidates must be >= 1, got {config.candidates}")
    seconds: dict[str, float] = {}
    reranker = resolve_reranker(config.reranker, config.backbone, config.checkpoint)

    t = time.perf_counter()
    if config.queries:
        extract_into(config.queries, config.query_store, config.backbone, config.checkpoint, config.image_size,
                     config.extract)
    seconds["extract_queries"] = time.perf_counter() - t
    qt = storage.read_global_table(config.query_store)
    failed = storage.read_errors(config.query_store).num_rows
    db = storage.read_global_table(config.database_store,
                                   ["image_id", "path", "utm_east", "utm_north", "row"])
    if db.num_rows == 0:
        raise ValueError(f"database store {config.database_store} holds no images")
    k = min(config.candidates, db.num_rows)
    if k < config.candidates:
        log.info("candidates capped at the database size: %d", k)

    if qt.num_rows == 0:
        log.warning("no query could be extracted (%d failed; see %s errors)", failed, config.query_store)
        storage.write_parquet(config.results, RESULTS_SCHEMA.empty_table(), metadata={"reranker": reranker})
        return RerankResult(config.results, reranker, 0, 0, k, int(failed), seconds, 0.0)

    t = time.perf_counter()
    found = index.search(config.index_dir, storage.descriptors_of(qt), k)
    seconds["search"] = time.perf_counter() - t
    ids = np.asarray(found.ids, np.int64).reshape(qt.num_rows, -1)
    gscores = np.asarray(found.scores, np.float32).reshape(qt.num_rows, -1)

    # Candidate image ids -> database rows; -1 (FAISS's "no result") and unknown ids are dropped.
    import pandas as pd
    db_index = pd.Index(db.column("image_id").to_numpy())
    if not db_index.is_unique:
        raise ValueError(f"database store {config.database_store} lists an image_id twice")
    cand = db_index.get_indexer(ids.ravel()).reshape(ids.shape)
    qi, gi = np.nonzero(cand >= 0)  # row-major: grouped by query, in global rank order
    cand_db = cand[qi, gi]
    global_rank = (np.cumsum(cand >= 0, axis=1) - 1)[qi, gi] + 1
    q_rows = qt.column("row").to_numpy()
    db_rows = db.column("row").to_numpy()
    num_pairs = len(qi)

    t = time.perf_counter()
    if reranker == "none":
        rerank_score = gscores[qi, gi]
    else:
        pairs = pa.table({"pair": np.arange(num_pairs, dtype=np.int64),
                          "query_row": q_rows[qi].astype(np.int64),
                          "candidate_row": db_rows[cand_db].astype(np.int64)})
        rerank_score = score_pairs(pairs, reranker, config)
    seconds["rerank"] = time.perf_counter() - t

    # Reranked rank within each query: sort by (query, -score, global rank).
    order = np.lexsort((global_rank, -rerank_score.astype(np.float64), qi))
    rank = np.empty(num_pairs, np.int32)
    starts = np.r_[0, np.flatnonzero(np.diff(qi[order])) + 1]
    counts = np.diff(np.r_[starts, num_pairs])
    rank[order] = np.concatenate([np.arange(1, c + 1) for c in counts]) if num_pairs else []

    qe, qn = _positions(qt)
    de, dn = _positions(db)
    table = pa.table({
        "query_id": qt.column("image_id").to_numpy()[qi],
        "query_path": pa.array(np.asarray(qt.column("path").to_pylist(), dtype=object)[qi], pa.string()),
        "rank": rank,
        "global_rank": global_rank.astype(np.int32),
        "image_id": db.column("image_id").to_numpy()[cand_db],
        "candidate_path": pa.array(np.asarray(db.column("path").to_pylist(), dtype=object)[cand_db], pa.string()),
        "global_score": gscores[qi, gi].astype(np.float32),
        "rerank_score": np.asarray(rerank_score, np.float32),
        "query_utm_east": qe[qi], "query_utm_north": qn[qi],
        "candidate_utm_east": de[cand_db], "candidate_utm_north": dn[cand_db],
    }, schema=RESULTS_SCHEMA)
    table = table.take(pa.array(order))  # rows in (query, reranked rank) order
    storage.write_parquet(config.results, table, metadata={
        "reranker": reranker, "candidates": k, "backbone": config.backbone,
        "database_store": config.database_store, "query_store": config.query_store, "index_dir": config.index_dir})
    pps = num_pairs / seconds["rerank"] if reranker != "none" and seconds["rerank"] > 0 else 0.0
    log.info("reranked %d queries x %d candidates with %s: %d pairs in %.1f s (%.0f pairs/s)",
             qt.num_rows, k, reranker, num_pairs, seconds["rerank"], pps)
    return RerankResult(results=config.results, reranker=reranker, num_queries=qt.num_rows, num_pairs=num_pairs,
                        candidates=k, num_failed_queries=int(failed), stage_seconds=seconds, pairs_per_second=pps)


def register_cli(subparsers) -> None:
    from .cli import add_config_arguments, add_image_size_argument

    p = subparsers.add_parser("rerank", help="retrieve top-K candidates per query and rerank them")
    add_config_arguments(p)
    p.add_argument("--queries", help="query dataset (extracted into --query-store first)")
    p.add_argument("--query-store")
    p.add_argument("--database-store")
    p.add_argument("--index", dest="index_dir")
    p.add_argument("--results", help="output Parquet")
    p.add_argument("--backbone")
    p.add_argument("--checkpoint")
    p.add_argument("--reranker", choices=RERANKERS)
    p.add_argument("--candidates", type=int)
    add_image_size_argument(p)
    p.set_defaults(func=_cli)


def _cli(args: argparse.Namespace) -> int:
    from .cli import config_from_args

    cfg = config_from_args(RerankConfig, args, ("queries", "query_store", "database_store", "index_dir", "results",
                                                "backbone", "checkpoint", "reranker", "candidates", "image_size"))
    res = run(cfg)
    print(f"{res.num_queries} queries x {res.candidates} candidates reranked with {res.reranker}: "
          f"{res.num_pairs} pairs, {res.pairs_per_second:.0f} pairs/s -> {res.results}")
    return 0
