"""What work a rerank job has (partitions of the query set) and what of it is done.

A search partition (phase 1, route.py) is a run of consecutive query-store shards holding about
``partition_queries`` queries: search partition ``s`` is shards ``[s * S, (s + 1) * S)`` of the
query manifest, with ``S = max(1, partition_queries // shard_size)``. A score partition (phase 2)
is a run of route bins (``routes/bounds.json``). Both are described by their number alone, so
the driver's state is O(partitions) (a list of numbers and the markers' small dicts), never
O(queries) or O(pairs).

Two typed objects describe a job. ``RerankPlan`` is its identity, written once as ``plan.json``:
the query store's key digest and shards, the pinned database/index state, K, the rerankers and
everything else that changes a score or a row. A rerun with the same plan skips committed
partitions; a rerun with another plan refuses to mix its parts with the old ones and names what
changed. ``RerankJob`` is what every worker of the four phases is handed: the same settings plus
the run's id and the sizes the workers need, O(1) in the queries (it is pickled into every task).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

from .. import storage
from ..ransac import RansacConfig
from .results import ResultsLayout, committed_partitions


class PlanMismatch(RuntimeError):
    pass


def shards_per_partition(query_manifest: dict[str, Any], partition_queries: int) -> int:
    return max(1, int(partition_queries) // max(1, int(query_manifest.get("shard_size") or 1)))


def num_partitions(query_manifest: dict[str, Any], partition_queries: int) -> int:
    return math.ceil(len(query_manifest["shards"]) / shards_per_partition(query_manifest, partition_queries))


def partition_shards(query_manifest: dict[str, Any], partition_queries: int, p: int) -> list[int]:
    s = shards_per_partition(query_manifest, partition_queries)
    return [int(x) for x in sorted(query_manifest["shards"])[p * s:(p + 1) * s]]


@dataclass(frozen=True)
class RerankPlan:
    """Everything a results row depends on; ``plan.json`` holds ``to_json()``. The file's keys are
    these fields' names (``ransac`` only when a ransac reranker runs), so folders written before
    this class resume unchanged."""

    query_store: str
    query_keys_digest: str | None
    query_shards: list[int]
    query_rows: int | None
    database: dict[str, Any]              # the pinned state (``PublishedState.metadata()``)
    candidates: int
    reranker: str
    rerankers: list[str]
    backbone: str
    checkpoint: str | None
    batch_pairs: int
    partition_queries: int
    rerank_dtype: str
    ransac: dict[str, Any] | None = None  # method, reprojection_threshold, image_scale
    adaptive: dict[str, Any] | None = None  # the rules per reranker (adaptive.py); None: every candidate
    rounds: list[int] | None = None         # the job's round boundaries (adaptive runs)
    score_partition_queries: int | None = None  # queries per score partition, fixed at the first start

    @classmethod
    def of(cls, config, rerankers: list[str], k: int, state, query_manifest: dict[str, Any],
           ransac: dict[str, Any], rules=None, score_partition_queries: int | None = None) -> RerankPlan:
        """The plan of ``config`` (a RerankConfig) over this query store and pinned ``state``."""
        from .adaptive import job_bounds, rules_json
        return cls(query_store=config.query_store, query_keys_digest=query_manifest.get("keys_digest"),
                   query_shards=[int(s) for s in query_manifest["shards"]], query_rows=query_manifest.get("rows"),
                   database=state.metadata(), candidates=int(k), reranker=rerankers[0], rerankers=list(rerankers),
                   backbone=config.backbone, checkpoint=config.checkpoint, batch_pairs=int(config.batch_pairs),
                   partition_queries=int(config.partition_queries), rerank_dtype=config.rerank_dtype,
                   ransac=dict(ransac) if "ransac" in rerankers else None, adaptive=rules_json(rules),
                   rounds=job_bounds(rules, k) if rules else None, score_partition_queries=score_partition_queries)

    def to_json(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        for key in ("ransac", "adaptive", "rounds", "score_partition_queries"):
            if out[key] is None:  # absent, as in folders written before these fields
                del out[key]
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RerankPlan:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise PlanMismatch(f"plan.json has fields this version does not know: {unknown}")
        return cls(**data)


def check_plan(results: str, plan: RerankPlan) -> RerankPlan | None:
    """Write ``plan.json`` for a new folder (returns None); for an existing one, refuse another
    plan, else return the folder's plan (resuming). The comparison is of the files' content, so a
    key only one side has is named as a change too. The score partitions' size is the first
    start's (it followed that cluster's parallelism): a resume elsewhere keeps it."""
    lay = ResultsLayout(results)
    new = plan.to_json()
    if not storage.exists(lay.plan):
        storage.write_json(lay.plan, new)
        return None
    old = storage.read_json(lay.plan)
    new.pop("score_partition_queries", None)
    if "score_partition_queries" in old:
        new["score_partition_queries"] = old["score_partition_queries"]
    changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    if changed:
        detail = "; ".join(f"{k}: {_describe(k, old.get(k))} -> {_describe(k, new.get(k))}" for k in changed)
        raise PlanMismatch(f"{results} holds results of another run ({detail}); its parts would mix with "
                           f"this run's. Write to a new --results folder, or delete {results} to start over")
    return RerankPlan.from_json(old)


def _describe(key: str, v: Any) -> str:
    """A plan value as the refusal names it; a rule in full (both rules must be readable)."""
    if key == "adaptive":
        if not v:
            return "none (every candidate)"
        from .adaptive import AdaptiveRule
        return "{" + ", ".join(f"{n}: {AdaptiveRule.from_json(r, n).describe()}" for n, r in v.items()) + "}"
    return _short(v)


@dataclass(frozen=True)
class TokenShape:
    """One row of a store's ``local_tokens``: (T, 131) and the stored dtype (``np.dtype.str``)."""

    shape: tuple[int, ...]
    dtype: str


@dataclass(frozen=True)
class IndexInfo:
    """What a search worker needs of the pinned index to prepare queries and merge shard results."""

    dim: int
    normalize: bool
    num_vectors: int


@dataclass(frozen=True)
class RerankJob:
    """What every worker of the four phases is handed (pickled into each task and actor): the
    job's settings, the run's id (attempts are counted per run) and a few sizes. O(1) in the
    queries and the database: ``database_rows`` is the number of database rows (the route key's
    range), not the rows themselves."""

    results: str
    query_store: str
    database_store: str
    rerankers: tuple[str, ...]
    backbone: str
    checkpoint: str | None
    candidates: int                        # K, capped at the database size
    batch_pairs: int
    partition_queries: int
    threads: int                           # CPU threads per scorer
    rerank_dtype: str
    cache_chunks: int
    max_attempts: int
    ransac: RansacConfig
    run_id: str
    query_tokens: TokenShape | None = None  # None when no reranker reads tokens
    database_rows: int = 1                  # phase 1 only: known once the catalog is built
    index: IndexInfo | None = None          # phase 1 only
    rules: dict | None = None               # {reranker: AdaptiveRule} of an adaptive run, else None
    bounds: tuple[int, ...] = ()            # the rounds' boundaries (``adaptive.job_bounds``); () = (K,)
    round: int = 0                          # the round a scoring or prefix phase works on
    score_partition_queries: int = 0        # queries per score partition (plan.json); 0: partition_queries

    @property
    def rounds(self) -> tuple[int, ...]:
        return self.bounds or (self.candidates,)

    def window(self, i: int) -> tuple[int, int]:
        """Round ``i`` scores the candidates at positions [lo, hi) of each K list."""
        b = self.rounds
        return (b[i - 1] if i else 0), b[i]

    @property
    def scorers(self) -> tuple[str, ...]:
        """The rerankers that score pairs (``none`` is the global order: nothing to score)."""
        return tuple(r for r in self.rerankers if r != "none")


def _short(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 80 else text[:77] + "..."


def pending_partitions(results: str, total: int) -> tuple[list[int], dict[int, dict[str, Any]]]:
    """Partitions with no progress marker yet, and the markers of the committed ones."""
    done = committed_partitions(results)
    return [p for p in range(total) if p not in done], done
