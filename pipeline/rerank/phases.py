"""The driver side of the rerank job's phases: one function per phase, each streaming the
partitions not committed yet through a Ray pool of the workers in workers.py::

    search_and_route   search partitions not routed ─► routes/    SearchWorker actor pool (Ray Data),
                                                                 calling the index shard actors
    barrier            route histograms ─► routes/bounds.json     the score partitions, fixed once
    split_strays       searched partitions not split ─► strays/   Ray Data tasks
    score              score partitions not scored ─► scores/     ScoreWorker actor pool (Ray Data)
    (adaptive runs, rounds i = 1, 2, ...: the candidates at positions [b[i-1], b[i]) of K)
    prefixes           partitions without round i's prefixes ─► rounds/round-i/prefix-*   Ray Data tasks:
                       each query's prefix length per reranker from the scores of rounds < i
    score              round i's pairs (positions in the window, below the query's prefix)
                       ─► rounds/round-i/score-*                  ScoreWorker actor pool
    commit             partitions without a marker ─► parts       Ray Data tasks

Every worker gets the same ``RerankJob`` (partitions.py) and the catalog's reference; each
answers one summary row per partition, which ``RerankSummary`` folds into counters. A pool that
loses an actor for good is rebuilt on the partitions left (``Pools.max_pool_restarts``).

Memory: the driver holds partition numbers and markers (O(partitions)), the summary's one byte
per database row, and references; nothing proportional to the queries or the pairs.
"""
from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from .. import storage
from ..log import get_logger
from .partitions import IndexInfo, RerankJob, pending_partitions
from .results import PartitionFiles, ResultsLayout

log = get_logger(__name__)


@contextlib.contextmanager
def timed(seconds: dict[str, float], step: str) -> Iterator[None]:
    t = time.perf_counter()
    try:
        yield
    finally:
        seconds[step] = time.perf_counter() - t


@dataclass
class RerankSummary:
    """What the driver keeps of this run's partition summary rows: counters and the
    distinct-candidate bitmap (one byte per database row), never anything per query or pair."""

    nodes: set[str] = field(default_factory=set)  # where score partitions ran
    pairs: int = 0                                # pairs scored
    fetched_bytes: int = 0                        # candidate tokens read by the scorers (whole chunks)
    fetched_query_bytes: int = 0                  # query tokens read in phase 1 (whole chunks)
    stray_pairs: int = 0
    stray_bytes: int = 0                          # query tokens copied beside the strays
    seen: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))  # database rows served
    scoring_seconds: float = 0.0                  # per round: first partition's start to last one's end
    _span: list[float] = field(default_factory=list)  # this round's [first start, last end] (epoch s)

    def end_round(self) -> None:
        if self._span:
            self.scoring_seconds += self._span[1] - self._span[0]
        self._span = []

    def add(self, phase: str, row: dict[str, Any]) -> None:
        """One partition's summary row of ``phase``."""
        if phase == "search":
            self.fetched_query_bytes += int(row["fetched_query_bytes"])
        elif phase == "split":
            self.stray_pairs += int(row["stray_pairs"])
            self.stray_bytes += int(row["stray_bytes"])
        elif phase == "score":
            self.nodes.add(str(row["node_id"]))
            self.pairs += int(row["pairs"])
            self.fetched_bytes += int(row["fetched_bytes"])
            if int(row["pairs"]):
                a, b = float(row["started"]), float(row["finished"])
                self._span = [min(self._span[0], a), max(self._span[1], b)] if self._span else [a, b]
            rows = np.asarray(row["candidate_rows"], np.int64)
            if len(rows):
                if rows.max() >= len(self.seen):
                    self.seen = np.concatenate([self.seen, np.zeros(int(rows.max()) + 1 - len(self.seen), bool)])
                self.seen[rows] = True

    @property
    def distinct_candidates(self) -> int:
        return int(self.seen.sum())


class _Catalog:
    """The catalog (database image id -> Zarr row, path, position) as one object in Ray's store,
    built by a Ray task when a phase first needs it: the driver holds its reference only."""

    def __init__(self, state, database_store: str):
        self.state, self.database_store, self._ref = state, database_store, None

    def ref(self):
        import ray

        from .catalog import build_catalog
        if self._ref is None:
            self._ref = ray.remote(num_cpus=0)(build_catalog).remote(self.state.metadata(), self.database_store)
        return self._ref

    def rows(self) -> int:
        """The number of database rows (the route key's range), counted where the catalog is."""
        import ray
        return ray.get(ray.remote(num_cpus=0)(_catalog_rows).remote(self.ref()))


def _catalog_rows(catalog: dict) -> int:
    return int(catalog["row"].max()) + 1 if len(catalog["row"]) else 1


@dataclass(frozen=True)
class Pools:
    """How the driver runs the phases (not handed to the workers): the index its search actors
    load and the bounds of the actor pools."""

    index_dir: str
    index_version: str
    num_actors: int | None            # actor pool maximum; None: what the cluster has, as it grows
    max_pool_restarts: int            # pools rebuilt after losing an actor, per phase and run
    scorer_slots: int = 1             # scorers started at once (the partitions were cut for them)


@dataclass
class PhasesOutcome:
    """What the phases did this run, for the job's result (partition numbers and the summary)."""

    summary: RerankSummary
    partitions: int                   # score partitions (= results parts) of the job
    skipped_partitions: int           # parts committed by an earlier run
    skipped_score_partitions: int     # score partitions scored by an earlier run
    failed_partitions: list[int]
    failed_search_partitions: list[int]
    failed_score_partitions: list[int]


def run_phases(job: RerankJob, pools: Pools, state, searches: int, resuming: bool,
               seconds: dict[str, float]) -> PhasesOutcome:
    """Phase 1, the barrier, phases 2 to 4, in order, each over what is not committed yet;
    ``seconds`` gets ``search``, ``rerank`` (phases 2 and 3) and ``commit``."""
    from .route import read_bounds

    lay = ResultsLayout(job.results)
    summary, catalog = RerankSummary(), _Catalog(state, job.database_store)
    with timed(seconds, "search"):
        failed_searches: list[int] = []
        bounds = read_bounds(job.results)
        if bounds is None:
            failed_searches = search_and_route(job, pools, catalog, searches, resuming, summary)
            bounds = barrier(job.results, job.score_partition_queries or job.partition_queries)
        failed_searches = sorted(set(failed_searches) | {s for s in range(searches) if s not in bounds["searched"]
                                                         and storage.exists(lay.routes.failure(s))})

    total = int(bounds["partitions"])
    pending, done_before = pending_partitions(job.results, total)
    if resuming and done_before:
        log.info("resuming %s: %d of %d results parts already committed", job.results, len(done_before), total)
    failed_scores: list[int] = []
    scored_before: dict[int, dict] = {}
    with timed(seconds, "rerank"):
        if pending and job.scorers:
            split_strays(job, pools, catalog, bounds, summary)
            scored_before = lay.scores.committed()
            if resuming and scored_before:
                log.info("resuming %s: %d of %d score partitions already scored", job.results, len(scored_before),
                         total)
            failed_scores = score(job, pools, catalog, [q for q in range(total) if q not in scored_before], summary)
            summary.end_round()
            for i in range(1, len(job.rounds)):  # adaptive runs: the later rounds, each over what it lacks
                rjob = replace(job, round=i)
                failed_scores += prefixes(rjob, pools, catalog, total, summary)
                done = lay.round_scores(i).committed()
                failed_scores += score(rjob, pools, catalog, [q for q in range(total) if q not in done], summary)
                summary.end_round()
    with timed(seconds, "commit"):
        failed = commit(job, pools, catalog, pending, summary)
    return PhasesOutcome(summary=summary, partitions=total, skipped_partitions=len(done_before),
                         skipped_score_partitions=len(scored_before), failed_partitions=sorted(failed),
                         failed_search_partitions=failed_searches, failed_score_partitions=sorted(failed_scores))


def search_and_route(job: RerankJob, pools: Pools, catalog: _Catalog, searches: int, resuming: bool,
                     summary: RerankSummary) -> list[int]:
    """Phase 1: the search partitions not routed yet ─► routes/ (SearchWorker actors calling the
    index shard actors). Returns the partitions that failed every attempt."""
    from ..index.search import ShardedSearcher

    done = ResultsLayout(job.results).routes.committed()
    pending = [s for s in range(searches) if s not in done]
    if resuming:
        log.info("resuming %s: %d of %d search partitions already routed", job.results, len(done), searches)
    if not pending:
        return []
    job = replace(job, database_rows=catalog.rows())
    searcher = ShardedSearcher(pools.index_dir, version=pools.index_version, use_actors=True)
    try:
        job = replace(job, index=IndexInfo(dim=searcher.dim, normalize=searcher.normalize,
                                           num_vectors=searcher.num_vectors))
        return _run_pool(job, pools, "search", pending, lambda todo: _search_pool(
            job, pools, catalog.ref(), searcher, todo), summary)
    finally:
        searcher.close()


def barrier(results: str, partition_queries: int) -> dict[str, Any]:
    """Between phases 1 and 2: the routed partitions' histograms ─► routes/bounds.json, the score
    partitions of the whole job (written once; a rerun reads them back)."""
    from .route import write_bounds
    return write_bounds(results, ResultsLayout(results).routes.committed(), partition_queries)


def split_strays(job: RerankJob, pools: Pools, catalog: _Catalog, bounds: dict[str, Any],
                 summary: RerankSummary) -> list[int]:
    """Phase 2: the searched partitions not split yet ─► strays/ (Ray Data tasks). A partition
    that fails here fails the score partitions that own its strays, which say so."""
    done = ResultsLayout(job.results).strays.committed()
    todo = [s for s in bounds["searched"] if s not in done]
    if not todo:
        return []
    return _run_pool(job, pools, "split", todo, lambda rest: _task_pool("split", job, catalog.ref(), rest), summary)


def score(job: RerankJob, pools: Pools, catalog: _Catalog, pending: list[int], summary: RerankSummary) -> list[int]:
    """Phase 3: the score partitions not scored yet ─► scores/ (ScoreWorker actors, each holding
    its models and chunk caches across partitions). Returns the partitions that failed."""
    from ..cluster import cluster_gpus

    if not pending:
        return []
    gpus = cluster_gpus() if "r2former" in job.rerankers else 0
    return _run_pool(job, pools, "score", pending, lambda todo: _score_pool(job, pools, catalog.ref(), todo, gpus),
                     summary)


def prefixes(job: RerankJob, pools: Pools, catalog: _Catalog, total: int, summary: RerankSummary) -> list[int]:
    """Before round ``job.round`` of an adaptive run: each partition's queries' prefix lengths
    from the scores of the rounds before (Ray Data tasks). Returns the partitions that failed."""
    done = ResultsLayout(job.results).prefixes(job.round).committed()
    todo = [p for p in range(total) if p not in done]
    if not todo:
        return []
    return _run_pool(job, pools, "prefix", todo, lambda rest: _task_pool("prefix", job, catalog.ref(), rest),
                     summary)


def commit(job: RerankJob, pools: Pools, catalog: _Catalog, pending: list[int], summary: RerankSummary) -> list[int]:
    """Phase 4: the partitions without a progress marker ─► part-NNNNN.parquet, then the marker
    (Ray Data tasks). Returns the partitions that failed."""
    if not pending:
        return []
    return _run_pool(job, pools, "commit", pending, lambda todo: _task_pool("commit", job, catalog.ref(), todo),
                     summary)


# ---------------------------------------------------------------- the pools the phases stream through
# Each phase's partitions and where their files are in the results folder (ResultsLayout).
PHASE_FILES = {"search": "routes", "split": "strays", "score": "scores", "prefix": "prefixes", "commit": "parts"}


def _phase_files(job: RerankJob, phase: str) -> PartitionFiles:
    return ResultsLayout(job.results).phase_files(PHASE_FILES[phase], job.round)


def _run_pool(job: RerankJob, pools: Pools, phase: str, pending: list[int], make: Callable[[list[int]], Any],
              summary: RerankSummary) -> list[int]:
    """Stream ``pending`` partitions through the pool ``make(todo)`` builds; a pool that loses an
    actor for good (ray.kill, a node gone) is rebuilt on what is left, up to max_pool_restarts.
    The partition that was in flight counted an attempt, so one that kills its actor every time
    ends up recorded as failed instead of looping. Returns the failed partitions."""
    import ray

    from ..cluster import pools_start_whole

    files = _phase_files(job, phase)
    failed: list[int] = []
    restarts = 0
    while pending:
        try:
            # An actor pool's initial actors all start before its first partition (the scorer
            # slots the partitions were cut for score together from the first one).
            with pools_start_whole():
                for row in make(pending).iter_rows():
                    p = int(row["partition"])
                    if row["status"] != "done":
                        failed.append(p)
                        log.error("%s partition %d failed every attempt and is recorded in %s: %s", phase, p,
                                  files.failure(p), row["reason"])
                        continue
                    summary.add(phase, row)
            pending = []
        except ray.exceptions.RayError as exc:
            restarts += 1
            if restarts > pools.max_pool_restarts:
                raise
            done = files.committed()
            pending = [p for p in pending if p not in done and p not in failed]
            log.warning("%s pool lost an actor (%s); restarting it on %d remaining partition(s) (%d/%d)", phase,
                        type(exc).__name__, len(pending), restarts, pools.max_pool_restarts)
    return failed


def _partitions(pending: list[int]):
    import ray
    return ray.data.from_items([{"partition": p} for p in pending], override_num_blocks=len(pending))


def _search_pool(job: RerankJob, pools: Pools, catalog, searcher, pending: list[int]):
    """Phase 1's Ray Data map: an autoscaling actor pool whose workers call the index shard actors
    (the search itself runs there)."""
    import ray

    from .workers import SearchWorker

    return _partitions(pending).map_batches(
        SearchWorker, batch_size=1, batch_format="numpy",
        fn_constructor_kwargs=dict(job=job, catalog=[catalog], shard_actors=searcher.actors),
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=pools.num_actors), num_cpus=1)


def _score_pool(job: RerankJob, pools: Pools, catalog, pending: list[int], gpus: int):
    """Phase 3's Ray Data map over an autoscaling actor pool (the scorers keep their models and
    chunk caches across partitions). Its actors are of class ``MapWorker(MapBatches(ScoreWorker))``
    (``ray.util.state.list_actors`` finds them by that ``class_name``)."""
    import ray

    from .workers import ScoreWorker

    # Pool bounds: the scorer slots the partitions were cut for start together (one started
    # alone would take the first partitions while the autoscaler adds the rest); at most
    # num_actors, else unbounded, so Ray Data's actor pool autoscaler grows it to whatever
    # CPUs/GPUs the cluster has as the job runs.
    start = max(1, min(pools.scorer_slots, len(pending)))
    return _partitions(pending).map_batches(
        ScoreWorker, batch_size=1, batch_format="numpy",
        fn_constructor_kwargs=dict(job=job, catalog=[catalog]),
        compute=ray.data.ActorPoolStrategy(min_size=start, max_size=pools.num_actors),
        num_cpus=job.threads, num_gpus=1 if gpus else 0)


# Queries one pooled worker handles in phases 2 and 4 before Ray replaces it (``max_calls``): a
# task worker's peak memory grows with the partitions it has run, so recycling bounds it by a
# fixed number of queries instead of the job's, at one worker start per that many queries
# (docs/rerank.md gives the measurements that chose it).
WORKER_QUERIES = 8192


def tasks_per_worker(partition_queries: int) -> int:
    return max(2, -(-WORKER_QUERIES // max(1, int(partition_queries))))


def _task_pool(phase: str, job: RerankJob, catalog, pending: list[int]):
    """Phases 2 and 4 (split the strays, commit the parts): file work without a model, as Ray Data
    tasks (Ray's pooled workers, as many at once as the cluster has CPUs, each recycled after
    tasks_per_worker(partition_queries) partitions)."""
    from .workers import commit_batch, prefix_batch, split_batch

    fn = {"split": split_batch, "prefix": prefix_batch, "commit": commit_batch}[phase]
    return _partitions(pending).map_batches(
        fn, batch_size=1, batch_format="numpy", fn_kwargs=dict(job=job, catalog=[catalog]), num_cpus=1,
        max_calls=tasks_per_worker(job.partition_queries if phase == "split"
                                   else job.score_partition_queries or job.partition_queries))
