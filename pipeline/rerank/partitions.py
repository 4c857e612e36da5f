"""What work a rerank job has (partitions of the query set) and what of it is done.

A search partition (phase 1, route.py) is a run of consecutive query-store shards holding about
``partition_queries`` queries: search partition ``s`` is shards ``[s * S, (s + 1) * S)`` of the
query manifest, with ``S = max(1, partition_queries // shard_size)``. A score partition (phase 2)
is a run of route bins (``routes/bounds.json``). Both are described by their number alone, so
the driver's state is O(partitions) (a list of numbers and the markers' small dicts), never
O(queries) or O(pairs).

The job's identity is ``plan.json`` (``job_plan``): the query store's key digest and shards, the
pinned database/index state, K, the reranker and everything else that changes a score or a row.
A rerun with the same plan skips committed partitions; a rerun with another plan refuses to mix
its parts with the old ones and names what changed.
"""
from __future__ import annotations

import math
from typing import Any

from .. import storage
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


def job_plan(config, rerankers: list[str], k: int, state, query_manifest: dict[str, Any], ransac: dict) -> dict[str, Any]:
    """Everything a results row depends on. ``config`` is a RerankConfig."""
    plan = {
        "query_store": config.query_store,
        "query_keys_digest": query_manifest.get("keys_digest"),
        "query_shards": [int(s) for s in query_manifest["shards"]],
        "query_rows": query_manifest.get("rows"),
        "database": state.metadata(),
        "candidates": int(k),
        "reranker": rerankers[0],
        "rerankers": list(rerankers),
        "backbone": config.backbone,
        "checkpoint": config.checkpoint,
        "batch_pairs": int(config.batch_pairs),
        "partition_queries": int(config.partition_queries),
        "rerank_dtype": config.rerank_dtype,
    }
    if "ransac" in rerankers:
        plan["ransac"] = ransac
    return plan


def check_plan(results: str, plan: dict[str, Any]) -> bool:
    """Write ``plan.json`` for a new folder; for an existing one, refuse another plan. Returns
    True when resuming."""
    lay = ResultsLayout(results)
    if not storage.exists(lay.plan):
        storage.write_json(lay.plan, plan)
        return False
    old = storage.read_json(lay.plan)
    changed = sorted(k for k in set(old) | set(plan) if old.get(k) != plan.get(k))
    if changed:
        detail = "; ".join(f"{k}: {_short(old.get(k))} -> {_short(plan.get(k))}" for k in changed)
        raise PlanMismatch(f"{results} holds results of another run ({detail}); its parts would mix with "
                           f"this run's. Write to a new --results folder, or delete {results} to start over")
    return True


def _short(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 80 else text[:77] + "..."


def pending_partitions(results: str, total: int) -> tuple[list[int], dict[int, dict[str, Any]]]:
    """Partitions with no progress marker yet, and the markers of the committed ones."""
    done = committed_partitions(results)
    return [p for p in range(total) if p not in done], done
