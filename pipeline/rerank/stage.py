"""``run(RerankConfig)``: the streaming rerank job (the package docstring draws its dataflow).

The driver describes the job and each phase in one function (phases.py); the work runs in Ray
(workers.py), and every phase skips what an earlier run with the same plan committed::

    run: checks, query extraction, pinned state ─► RerankPlan (plan.json) ─► RerankJob, a lease
    search_and_route   search partitions not routed ─► routes/          (SearchWorker actor pool)
    barrier            route histograms ─► routes/bounds.json           (the score partitions, once)
    split_strays       searched partitions not split ─► strays/         (Ray Data tasks)
    score              score partitions not scored ─► scores/           (ScoreWorker actor pool)
    (adaptive runs)    per later round: prefixes ─► rounds/round-i/, then score again (adaptive.py)
    commit             partitions without a marker ─► part-NNNNN.parquet (Ray Data tasks)
    RerankSummary of the summary rows ─► RerankResult, manifest.json (written last)
"""
from __future__ import annotations

import argparse
import hashlib
import uuid
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .. import storage
from ..log import get_logger
from ..ransac import RansacConfig
from ..timefmt import utc_now
from ..weights import checkpoint_hash
from .adaptive import job_bounds, rules_of
from .partitions import RerankJob, RerankPlan, TokenShape, check_plan, num_partitions
from .phases import PhasesOutcome, Pools, run_phases, timed
from .rerankers import RERANKERS, resolve_rerankers
from .results import ResultsLayout, committed_partitions, is_single_file

log = get_logger(__name__)


@dataclass
class RerankConfig:
    query_store: str = ""
    database_store: str = ""
    index_dir: str = ""
    results: str = ""                        # output folder: results/part-NNNNN.parquet + manifest.json
    queries: str | None = None               # dataset description; extracted into query_store first
    backbone: str = "r2former"
    checkpoint: str | None = None
    image_size: list[int] = field(default_factory=lambda: [480, 640])
    reranker: str = "auto"
    candidates: int = 100
    batch_pairs: int = 400                   # pairs per scorer call, in candidate-chunk order
    partition_queries: int = 4096            # queries per partition (unit of commit, resume and retry)
    num_actors: int | None = None            # scorer pool maximum; default: what the cluster has, as it grows
    threads_per_actor: int = 1
    cache_chunks: int = 256                  # decoded Zarr chunks kept per scorer actor (per store)
    max_attempts: int = 3                    # tries of one partition per run before it is recorded as failed
    max_pool_restarts: int = 3               # scorer pools rebuilt after losing an actor, per run
    rerank_dtype: str = "float32"            # "bfloat16": opt-in reduced precision for r2former
    ransac_method: str = "magsac"
    ransac_threshold_px: float = 24.0
    extract: dict[str, Any] = field(default_factory=dict)  # extra ExtractConfig fields for the queries
    allow_untrained_reranker: bool = False   # throughput benchmarks only: r2former scores of untrained weights
    # Adaptive candidate counts (adaptive.py): {reranker: {rounds: [5, 20], stop: {score, margin},
    # gate: {global_margin}}}, one rule per reranker of the run; None: every query scores all K.
    adaptive: dict[str, Any] | None = None


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
    partitions: int = 0
    skipped_partitions: int = 0              # committed by an earlier run (resume)
    failed_partitions: list[int] = field(default_factory=list)
    fetched_token_bytes: int = 0             # whole Zarr chunks read by the scorers (this run)
    distinct_candidate_bytes: int = 0        # bytes of the distinct candidates they served (this run)
    scorer_nodes: list[str] = field(default_factory=list)
    state: dict[str, Any] = field(default_factory=dict)
    rerankers: list[str] = field(default_factory=list)       # every reranker of the run, first = ``reranker``
    rerank_seconds: dict[str, float] = field(default_factory=dict)  # scoring time per reranker (committed parts)
    failed_search_partitions: list[int] = field(default_factory=list)  # phase 1 partitions that failed
    fetched_query_token_bytes: int = 0       # query tokens read in phase 1 (whole chunks, each once) this run
    stray_pairs: int = 0                     # pairs scored by the partition owning their candidate (this run)
    stray_query_token_bytes: int = 0         # query tokens copied beside those pairs (strays/, this run)
    skipped_score_partitions: int = 0        # score partitions scored by an earlier run (resume)
    failed_score_partitions: list[int] = field(default_factory=list)
    scoring_seconds: float = 0.0             # this run's scoring wall time: first pair to last, per round, summed
    scorer_slots: int = 0                    # scorers the cluster ran at once (the partitions follow them)
    pairs_scored: dict[str, int] = field(default_factory=dict)  # per reranker, every committed part

    @property
    def ok(self) -> bool:
        """False when a partition failed every attempt (the job's exit code is then 1)."""
        return not self.failed_partitions and not self.failed_search_partitions and not self.failed_score_partitions

    @property
    def message(self) -> str:
        if self.ok:
            return ""
        return (f"score partitions {self.failed_partitions} and search partitions {self.failed_search_partitions} "
                f"failed every attempt; their query ids and reasons are in {self.results}/failures/ and "
                f"{self.results}/routes/failures/")

    @property
    def token_ratio(self) -> float | None:
        return self.fetched_token_bytes / self.distinct_candidate_bytes if self.distinct_candidate_bytes else None


class RerankError(RuntimeError):
    pass


def read_rule(path: str) -> dict[str, Any]:
    """RULE.yaml: exactly the ``adaptive`` block of a config (one rule per reranker name)."""
    import yaml

    if not storage.exists(path):
        raise FileNotFoundError(f"adaptive rule {path} does not exist")
    fs, local = storage.filesystem(path)
    with fs.open(local, "rb") as f:
        data = yaml.safe_load(f.read().decode())
    if not isinstance(data, dict) or not data:
        raise ValueError(f"{path} holds no adaptive rule (a mapping of reranker names to rules)")
    return data


def _model_signature(config) -> dict[str, Any]:
    """What stores extracted by this config's model record (``storage.model_signature``)."""
    return {"backbone": config.backbone, "checkpoint_hash": checkpoint_hash(config.backbone, config.checkpoint),
            "image_size": list(config.image_size)}


# ---------------------------------------------------------------- the stage
def run(config: RerankConfig) -> RerankResult:
    """Rerank every query of ``config.query_store`` against the pinned index; resumable.

    Driver memory: O(partitions) (partition numbers, their markers) plus one byte per database
    row for the distinct-candidate count (10 MB at 10^7 images); queries, pairs, results and the
    index live in Ray actors and tasks, one partition per scorer actor at a time."""
    from ..cluster import ensure_ray
    from ..extract import extract_into
    from ..index import layout as L
    from ..index.leases import hold_lease
    from ..index.published import resolve

    for name in ("query_store", "database_store", "index_dir", "results"):
        if not getattr(config, name):
            raise ValueError(f"RerankConfig.{name} is required")
    if config.candidates < 1:
        raise ValueError(f"candidates must be >= 1, got {config.candidates}")
    if config.partition_queries < 1 or config.batch_pairs < 1:
        raise ValueError("partition_queries and batch_pairs must be >= 1")
    if storage.exists(config.results) and is_single_file(config.results):
        raise RerankError(f"{config.results} is a single results file of an older run; the streaming job writes "
                          f"a folder: name a new --results folder")
    # Before Ray starts or a model loads: outputs that cannot be written are one line each.
    storage.check_output(config.results, "--results")
    if config.queries:
        storage.check_output(config.query_store, "--query-store")
    database_manifest = storage.read_manifest(config.database_store)
    if config.queries:  # the queries are extracted with this model: it must be the database's
        storage.check_same_model(("database store", config.database_store, database_manifest),
                                 ("model", f"--backbone {config.backbone} --checkpoint {config.checkpoint}",
                                  _model_signature(config)))
    seconds: dict[str, float] = {}
    rerankers = resolve_rerankers(config.reranker, config.backbone, config.checkpoint,
                                  allow_untrained=config.allow_untrained_reranker)

    with timed(seconds, "extract_queries"):
        if config.queries:
            extract_into(config.queries, config.query_store, config.backbone, config.checkpoint, config.image_size,
                         config.extract)
    query_manifest = storage.read_manifest(config.query_store)
    storage.check_same_model(("query store", config.query_store, query_manifest),
                             ("database store", config.database_store, database_manifest))
    if "r2former" in rerankers:  # the learned reranker scores the stores' tokens with these weights
        storage.check_same_model(("database store", config.database_store, database_manifest),
                                 ("reranker weights", config.checkpoint or config.backbone,
                                  {"checkpoint_hash": checkpoint_hash(config.backbone, config.checkpoint)}))
    failed_queries = int((query_manifest.get("counts") or {}).get("failed", 0))

    state = resolve(config.database_store, config.index_dir)  # once: the whole job reads this state
    ensure_ray()
    # Token x, y are in the extraction's pixels: the scale is the store's, whatever the config says.
    ransac = dict(method=config.ransac_method, reprojection_threshold=config.ransac_threshold_px,
                  image_scale=float(max(storage.extraction_size(database_manifest, config.image_size))))
    lease_job = "rerank-" + hashlib.sha256(config.results.encode()).hexdigest()[:12]
    version = state.index_version or L.resolve_version(config.index_dir, None)
    num_vectors = int(L.read_infos(config.index_dir, version)["num_vectors"])
    k = min(config.candidates, num_vectors)
    if k < config.candidates:
        log.info("candidates capped at the database size: %d", k)
    rules = rules_of(config.adaptive, rerankers)
    slots = scorer_slots(config.num_actors, config.threads_per_actor, "r2former" in rerankers)
    # Refuse a changed plan before any actor starts.
    plan = RerankPlan.of(config, rerankers, k, state, query_manifest, ransac, rules,
                         score_partition_size(int(query_manifest.get("rows") or 0), config.partition_queries, slots))
    kept = check_plan(config.results, plan)
    resuming = kept is not None
    job = _job(config, rerankers, k, ransac, rules, (kept or plan).score_partition_queries)
    searches = num_partitions(query_manifest, config.partition_queries)
    pools = Pools(index_dir=config.index_dir, index_version=version, num_actors=config.num_actors,
                  max_pool_restarts=config.max_pool_restarts, scorer_slots=slots)
    with hold_lease(config.index_dir, lease_job, state):
        outcome = run_phases(job, pools, state, searches, resuming, seconds)
    res = _result(job, state, seconds, outcome)
    res.scorer_slots = slots
    _write_manifest(config, res, plan, state, res.partitions)
    res.num_failed_queries += failed_queries  # queries that could not be extracted count too
    return res


# Score partitions per scorer slot, at least: a small query set still keeps every scorer busy, and
# the last partitions do not leave all but one idle.
PARTITIONS_PER_SLOT = 6


def scorer_slots(num_actors: int | None, threads: int, learned: bool) -> int:
    """Scorers the cluster runs at once: ``num_actors``, else its GPUs (the learned reranker) or
    its CPUs / threads per scorer."""
    import ray

    if num_actors:
        return int(num_actors)
    res = ray.cluster_resources() if ray.is_initialized() else {}
    if learned and res.get("GPU", 0) >= 1:
        return int(res["GPU"])
    return max(1, int(res.get("CPU", 1) // max(1, threads)))


def score_partition_size(queries: int, partition_queries: int, slots: int) -> int:
    """Queries per score partition: ``partition_queries`` (the memory bound), or fewer, so that the
    query set makes at least PARTITIONS_PER_SLOT partitions per scorer slot."""
    if queries <= 0:
        return int(partition_queries)
    return max(1, min(int(partition_queries), -(-queries // (PARTITIONS_PER_SLOT * max(1, slots)))))


def _job(config: RerankConfig, rerankers: list[str], k: int, ransac: dict[str, Any], rules,
         score_partition_queries: int | None) -> RerankJob:
    """What the workers are handed; a fresh ``run_id`` counts this run's attempts apart from earlier runs'."""
    tokens = None
    if any(r != "none" for r in rerankers):  # what phase 2 copies for the strays (metadata only)
        arr = storage.open_local_tokens(config.query_store)
        tokens = TokenShape(shape=tuple(int(d) for d in arr.shape[1:]), dtype=arr.dtype.str)
    return RerankJob(results=config.results, query_store=config.query_store, database_store=config.database_store,
                     rerankers=tuple(rerankers), backbone=config.backbone, checkpoint=config.checkpoint, candidates=k,
                     batch_pairs=config.batch_pairs, partition_queries=config.partition_queries,
                     threads=config.threads_per_actor, rerank_dtype=config.rerank_dtype,
                     cache_chunks=config.cache_chunks, max_attempts=config.max_attempts,
                     ransac=RansacConfig(**ransac), run_id=uuid.uuid4().hex, query_tokens=tokens,
                     rules=rules, bounds=tuple(job_bounds(rules, k)) if rules else (),
                     score_partition_queries=int(score_partition_queries or config.partition_queries))


def _result(job: RerankJob, state, seconds: dict[str, float], outcome: PhasesOutcome) -> RerankResult:
    """The job's result from the committed markers (every run's) and this run's summary."""
    summary = outcome.summary
    lay = ResultsLayout(job.results)
    markers = lay.parts.committed()
    scored = lay.scores.committed() if job.scorers else {}
    row_bytes = _row_bytes(job.database_store) if job.scorers else 0
    num_queries = sum(int(m.get("queries", 0)) for m in markers.values())
    num_pairs = sum(int(m.get("pairs", 0)) for m in markers.values())
    # Pairs over the scorers' own wall time (first pair to last, per round): the pool's start-up
    # and the file phases are in stage_seconds, not in the scoring rate.
    pps = summary.pairs / summary.scoring_seconds if summary.pairs and summary.scoring_seconds > 0 else 0.0
    rerank_seconds = {r: sum(float((m.get("rerank_seconds") or {}).get(r, 0.0)) for m in scored.values())
                      for r in job.rerankers}
    res = RerankResult(results=job.results, reranker=job.rerankers[0], num_queries=num_queries, num_pairs=num_pairs,
                       candidates=job.candidates, num_failed_queries=0, stage_seconds=seconds, pairs_per_second=pps,
                       partitions=outcome.partitions, skipped_partitions=outcome.skipped_partitions,
                       failed_partitions=outcome.failed_partitions,
                       fetched_token_bytes=summary.fetched_bytes,
                       distinct_candidate_bytes=summary.distinct_candidates * row_bytes,
                       scorer_nodes=sorted(summary.nodes), state=state.metadata(), rerankers=list(job.rerankers),
                       rerank_seconds=rerank_seconds, failed_search_partitions=outcome.failed_search_partitions,
                       fetched_query_token_bytes=summary.fetched_query_bytes, stray_pairs=summary.stray_pairs,
                       stray_query_token_bytes=summary.stray_bytes,
                       skipped_score_partitions=outcome.skipped_score_partitions,
                       failed_score_partitions=outcome.failed_score_partitions,
                       scoring_seconds=summary.scoring_seconds,
                       pairs_scored={r: sum(int((m.get("pairs_scored") or {}).get(r, m.get("pairs", 0)))
                                            for m in markers.values()) for r in job.scorers})
    ratio = f"{res.token_ratio:.2f}x" if res.token_ratio else "-"
    log.info("reranked %d queries x %d candidates with %s: %d pairs this run in %.1f s (%.0f pairs/s); "
             "tokens fetched %.1f MB for %.1f MB of distinct candidates (%s), %d stray pairs (%.1f MB of query "
             "tokens copied); %d partition(s) failed", num_queries, job.candidates, ",".join(job.rerankers),
             summary.pairs, seconds["rerank"], pps, summary.fetched_bytes / 1e6, res.distinct_candidate_bytes / 1e6,
             ratio, summary.stray_pairs, summary.stray_bytes / 1e6,
             len(outcome.failed_partitions) + len(outcome.failed_search_partitions))
    return res


def _row_bytes(store: str) -> int:
    arr = storage.open_local_tokens(store)
    return int(np.prod(arr.shape[1:])) * arr.dtype.itemsize


def _write_manifest(config: RerankConfig, res: RerankResult, plan: RerankPlan, state, total: int) -> None:
    """Written last: lists the committed parts; evaluate and the report read exactly these."""
    lay = ResultsLayout(config.results)
    parts = sorted(committed_partitions(config.results))
    failures = [p for p in range(total) if p not in parts]
    storage.write_json(lay.manifest, {
        "parts": parts, "partitions": total, "failed_partitions": failures,
        "failed_search_partitions": res.failed_search_partitions,
        "failed_score_partitions": res.failed_score_partitions,
        "complete": not failures and not res.failed_search_partitions,
        "state": state.metadata(), "plan": plan.to_json(), "reranker": res.reranker, "rerankers": res.rerankers,
        "rerank_seconds": res.rerank_seconds, "candidates": res.candidates, "adaptive": plan.adaptive,
        "pairs_scored": res.pairs_scored,
        "backbone": config.backbone, "database_store": config.database_store, "query_store": config.query_store,
        "index_dir": config.index_dir, "num_queries": res.num_queries, "num_pairs": res.num_pairs,
        "finished_at": utc_now(),
    })
    res.failed_partitions = failures
    res.num_failed_queries = sum(len(storage.read_json(url).get("query_ids", []))
                                 for url in [lay.parts.failure(p) for p in failures]
                                 + [lay.routes.failure(s) for s in res.failed_search_partitions]
                                 if storage.exists(url))


def register_cli(subparsers) -> None:
    from ..config import add_config_arguments, add_image_size_argument

    p = subparsers.add_parser("rerank", help="retrieve top-K candidates per query and rerank them (resumable)")
    add_config_arguments(p)
    p.add_argument("--queries", help="query dataset (extracted into --query-store first)")
    p.add_argument("--query-store")
    p.add_argument("--database-store")
    p.add_argument("--index", dest="index_dir")
    p.add_argument("--results", help="output folder (parts, progress markers, manifest)")
    p.add_argument("--backbone")
    p.add_argument("--checkpoint")
    p.add_argument("--reranker", help=f"one of {', '.join(RERANKERS)}, or a comma list run over the same "
                   "candidates (ransac,r2former); results get rank_<name> / rerank_score_<name> per reranker")
    p.add_argument("--candidates", type=int)
    p.add_argument("--partition-queries", type=int)
    p.add_argument("--rerank-dtype", choices=("float32", "bfloat16"))
    p.add_argument("--adaptive", metavar="RULE.yaml", help="adaptive candidate counts: one rule per reranker "
                   "(rounds, stop, gate; as `r2f evaluate --sweep-adaptive --write-rule` writes it)")
    add_image_size_argument(p)
    p.set_defaults(func=_cli)


def _cli(args: argparse.Namespace) -> int:
    from ..config import config_from_args

    cfg = config_from_args(RerankConfig, args, ("queries", "query_store", "database_store", "index_dir", "results",
                                                "backbone", "checkpoint", "reranker", "candidates", "image_size",
                                                "partition_queries", "rerank_dtype"))
    if args.adaptive:
        cfg.adaptive = read_rule(args.adaptive)
    res = run(cfg)
    ratio = f"{res.token_ratio:.2f}x" if res.token_ratio else "-"
    scored = ", ".join(f"{n} {v}" for n, v in res.pairs_scored.items())
    print(f"{res.num_queries} queries x {res.candidates} candidates reranked with {res.reranker}: "
          f"{res.num_pairs} pairs ({'adaptive: ' if cfg.adaptive else ''}scored {scored or 0}), "
          f"{res.pairs_per_second:.0f} pairs/s, token bytes fetched/distinct {ratio}, "
          f"{len(res.failed_partitions)} failed partition(s) -> {res.results}")
    return 0 if res.ok else 1
