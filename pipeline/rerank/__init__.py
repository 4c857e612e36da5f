"""Where a query becomes a ranked list: top-K global candidates, reranked, as a streaming Ray job.

One file per step: ``stage`` (``run``, config, result, CLI), ``partitions`` (the plan and the
job the workers get), ``phases`` (the driver, one function per phase), ``workers`` (the Ray
workers of the phases), ``score`` (``PairScorer``), ``rerankers`` (names and the order rule),
``adaptive`` (stop rules and the cascade of rounds),
``catalog``, ``route``, ``strays``, ``tokens`` and ``results`` (the committed layout).

``run(RerankConfig)`` (``r2f rerank``, ``python -m jobs.rerank``)::

    queries ──(extract, when a dataset is given)──► query store
    resolve(database_store, index_dir) once ──► pinned state (index version + store generation),
                                                a lease on it, recorded in the manifest
    index shards ──► Ray actors (ShardedSearcher(use_actors=True)); never loaded in the driver
    database table ──► catalog (id -> Zarr row, path, position) built by a Ray task, in the object store
    phase 1, search partitions 0..S-1 (runs of query-store shards; partitions.py) minus the routed ones
        ──► Ray Data, ActorPoolStrategy(min 1, max = num_actors or the cluster as it grows)
            SearchWorker (workers.py): top-K from the shard actors ─► routes/search-SSSSS.parquet,
            sorted by the global top-1 candidate's Zarr row, + a histogram of route bins (route.py)
    barrier: routes/bounds.json ── score partitions = runs of bins with ~partition_queries queries
    phase 2, search partitions minus the split ones (Ray Data tasks; strays.py):
        route rows ─► pairs whose candidate lies in another score partition's rows (strays)
        ─► strays/search-SSSSS.parquet (with the query's tokens), sorted by the owning partition
    phase 3, score partitions 0..P-1 minus the scored ones
        ──► Ray Data, ActorPoolStrategy(min 1, max = num_actors or the cluster as it grows)
            ScoreWorker (workers.py), one partition per call:
                its own queries' pairs in its rows + the strays it owns ─► candidate-chunk order
                ─► batches; tokens read once per batch (tokens.py: whole Zarr chunks through a
                bounded LRU), scored by every reranker of the run
                ─► scores/score-QQQQQ.parquet (by the query's partition), then its marker
    phase 4, score partitions minus the committed ones (Ray Data tasks; CommitWorker):
        route rows + their scores from the owning partitions' score files ─► ranks
        ─► results/part-NNNNN.parquet, then progress/part-NNNNN.json (results.py)
    adaptive runs (``RerankConfig.adaptive``, adaptive.py): phase 3 scores round 0 (each query's
    first candidates), then per later round i: prefixes (Ray tasks; each query's prefix length per
    reranker from the scores so far and its stop rule) ─► phase 3 over the round's pairs only
    a partition that fails ``max_attempts`` times in any phase ─► its failures/ record, job goes on
    driver: small summaries only ─► manifest.json, written last

Memory: the driver holds O(partitions) (numbers and markers), the bins' histogram (512 KB) and
one byte per database row for the distinct-candidate count; each worker one partition's pairs
plus its chunk cache; no process and not the object store holds anything proportional to the
query set or the pairs.

Token locality: a score partition holds the queries whose top-1 candidate lies in one stretch of
database rows, and scores every pair whose candidate lies in that stretch, its own queries' and
the strays of others: each chunk is fetched about once per job (the summary counts fetched and
distinct bytes, and the stray query tokens copied).

Resume, exactly once: ``plan.json`` fixes what the folder is the result of (query store, pinned
state, K, rerankers, batch and partition sizes); a rerun skips what each phase committed (routes,
strays, scores, parts), rewrites any file without a marker, and refuses another plan. The
bounds are written once, and batches are a deterministic function of the partition, so
rescored partitions are bit-equal.

Rerankers (rerankers.py: names, resolution, the order rule): ``r2former`` (the learned
transformer; score = softmax(logits)[:, 1]), ``ransac`` (pipeline.ransac: mutual nearest
neighbours + a robust homography, score = inlier count), ``none`` (the global order), ``auto``
(r2former when the model's weights include a trained reranker, otherwise ransac). Candidates are
reordered by rerank score; ties keep global order.
A comma list (``ransac,r2former``) runs each over the same candidates in one job: ``rank`` /
``rerank_score`` are the first's, ``rank_<name>`` / ``rerank_score_<name>`` every one's.
"""
from ..extract import extract_into
from .rerankers import RERANKERS, reranked_order, reranker_list, resolve_reranker, resolve_rerankers
from .results import (
                      RESULTS_SCHEMA,
                      iter_parts,
                      rank_column,
                      read_results,
                      rerankers_of,
                      results_metadata,
                      results_schema,
                      score_column,
)
from .score import PairScorer
from .stage import RerankConfig, RerankError, RerankResult, register_cli, run

__all__ = ["RERANKERS", "RESULTS_SCHEMA", "PairScorer", "RerankConfig", "RerankError", "RerankResult",
           "extract_into", "iter_parts", "rank_column", "read_results", "register_cli", "reranked_order",
           "reranker_list", "rerankers_of", "resolve_reranker", "resolve_rerankers", "results_schema", "score_column",
           "results_metadata", "run"]
