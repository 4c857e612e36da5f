"""Where a query becomes a ranked list: top-K global candidates, reranked, as a streaming Ray job.

``run(RerankConfig)`` (``r2f rerank``, ``python -m jobs.rerank``)::

    queries ──(extract, when a dataset is given)──► query store
    resolve(database_store, index_dir) once ──► pinned state (index version + store generation),
                                                a lease on it, recorded in the manifest
    index shards ──► Ray actors (ShardedSearcher(use_actors=True)); never loaded in the driver
    database table ──► catalog (id -> Zarr row, path, position) built by a Ray task, in the object store
    partitions 0..P-1 (runs of query-store shards; see partitions.py) minus the committed ones
        ──► Ray Data, ActorPoolStrategy(min 1, max = num_actors or the cluster as it grows)
            PartitionWorker (score.py), one partition per call:
                search the shard actors ─► pairs ─► locality order ─► PairScorer batches
                (tokens.py: whole Zarr chunks through a bounded LRU)
                ─► results/part-NNNNN.parquet, then progress/part-NNNNN.json (results.py)
            a partition that fails ``max_attempts`` times ─► failures/part-NNNNN.json, job goes on
    driver: small summaries only ─► manifest.json, written last

Memory: the driver holds O(partitions) (numbers and markers) and one byte per database row for
the distinct-candidate count; each scorer actor one partition's pairs plus its chunk cache; no
process and not the object store holds anything proportional to the query set or the pairs.

Resume, exactly once: ``plan.json`` fixes what the folder is the result of (query store, pinned
state, K, reranker, batch and partition sizes); a rerun skips partitions with a progress marker,
rewrites any part without one, and refuses another plan. Batches are a deterministic function of
the partition, so rescored partitions are bit-equal.

Rerankers: ``r2former`` (the learned transformer; score = softmax(logits)[:, 1]), ``ransac``
(pipeline.ransac: mutual nearest neighbours + a robust homography, score = inlier count),
``none`` (the global order), ``auto`` (r2former when the model's weights include a trained
reranker, otherwise ransac). Candidates are reordered by rerank score; ties keep global order.
"""
from ..extract import extract_into
from .results import RESULTS_SCHEMA, iter_parts, read_results, results_metadata
from .score import PairScorer
from .stage import (RERANKERS, RerankConfig, RerankError, RerankResult, register_cli, reranked_order,
                    resolve_reranker, run)

__all__ = ["RERANKERS", "RESULTS_SCHEMA", "PairScorer", "RerankConfig", "RerankError", "RerankResult",
           "extract_into", "iter_parts", "read_results", "register_cli", "reranked_order", "resolve_reranker",
           "results_metadata", "run"]
