"""Offline evaluation: Recall@N of ranked lists against positions, as the VG benchmark counts it.

A query counts at N when any of its first N results lies within the positive radius of it.
Queries with no database image within the radius at all (or with no position) cannot be
answered right; they are reported and excluded from the recalls, as the VG benchmark does.
Recall@N for N larger than the number of results K is computed over the K results.

``r2f evaluate`` scores a finished run folder (or a results file plus the database store), and
``--sweep-candidates 20,50,100,200`` prints the paper's candidate-count study: the recalls when
only the top-K global candidates are reranked, for each K.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from . import storage
from .log import get_logger

log = get_logger(__name__)

RECALL_NS = (1, 5, 10, 20, 100)


# ---------------------------------------------------------------- the metric itself
def recall_at(correct: np.ndarray, has_positive: np.ndarray | None = None,
              ns: Iterable[int] = RECALL_NS) -> dict[str, float | None]:
    """Recall@N from ``correct`` (Q, K) bool (result j of query i is within the radius) and
    ``has_positive`` (Q,) bool (the database holds a positive for query i). Queries without a
    positive are excluded; with none left every recall is ``None``."""
    correct = np.asarray(correct, bool)
    if correct.ndim != 2:
        raise ValueError(f"correct must be (queries, results), got shape {correct.shape}")
    keep = np.ones(len(correct), bool) if has_positive is None else np.asarray(has_positive, bool)
    if keep.shape != (len(correct),):
        raise ValueError(f"has_positive must have one entry per query ({len(correct)}), got {keep.shape}")
    c = correct[keep]
    out: dict[str, float | None] = {}
    for n in ns:
        if n < 1:
            raise ValueError(f"recall@N needs N >= 1, got {n}")
        out[f"recall@{n}"] = None if len(c) == 0 else float(c[:, :n].any(axis=1).mean())
    return out


def positions_of(table: pa.Table, prefix: str = "") -> np.ndarray:
    """(N, 2) float64 positions from ``{prefix}utm_east`` / ``{prefix}utm_north``; NaN where unknown.
    A missing north (a sequence described by frame index alone) counts as 0."""
    n = table.num_rows
    east_name, north_name = f"{prefix}utm_east", f"{prefix}utm_north"
    if east_name not in table.column_names:
        return np.full((n, 2), np.nan)
    east = _float_column(table, east_name)
    north = _float_column(table, north_name) if north_name in table.column_names else np.zeros(n)
    north = np.where(np.isnan(north) & ~np.isnan(east), 0.0, north)
    return np.stack([east, north], axis=1)


def _float_column(table: pa.Table, name: str) -> np.ndarray:
    col = table.column(name)
    return np.asarray(col.cast(pa.float64()).to_numpy(zero_copy_only=False), dtype=np.float64)


def has_positive(query_xy: np.ndarray, db_xy: np.ndarray, radius: float) -> np.ndarray:
    """(Q,) bool: some database position lies within ``radius`` of the query (exact nearest
    neighbour in 2-D through FAISS, so city-scale databases stay cheap)."""
    import faiss

    query_xy = np.asarray(query_xy, np.float64)
    db_xy = np.asarray(db_xy, np.float64)
    out = np.zeros(len(query_xy), bool)
    db_ok = ~np.isnan(db_xy).any(axis=1)
    q_ok = ~np.isnan(query_xy).any(axis=1)
    if not db_ok.any() or not q_ok.any():
        return out
    # Centre before going to float32: raw UTM eastings (~5e5 m) would lose centimetres.
    origin = db_xy[db_ok].mean(axis=0)
    index = faiss.IndexFlatL2(2)
    index.add(np.ascontiguousarray(db_xy[db_ok] - origin, dtype=np.float32))
    dist, _ = index.search(np.ascontiguousarray(query_xy[q_ok] - origin, dtype=np.float32), 1)
    # Small slack for float32 rounding of squared distances at exactly the radius.
    out[q_ok] = dist[:, 0] <= radius * radius * (1 + 1e-6) + 1e-6
    return out


# ---------------------------------------------------------------- results tables
def ranked_lists(results: pa.Table, order: str = "rank", max_candidates: int | None = None):
    """Per query: ``(query_ids (Q,), query_xy (Q, 2), candidate_xy (Q, K, 2))`` with the candidates in
    ``order`` ("rank": after reranking, "global_rank": before). ``max_candidates`` keeps only
    candidates whose global rank is within it, reordered by rerank score (the candidate sweep)."""
    import pandas as pd

    cols = ["query_id", "rank", "global_rank", "rerank_score", "query_utm_east", "query_utm_north",
            "candidate_utm_east", "candidate_utm_north"]
    missing = [c for c in cols if c not in results.column_names]
    if missing:
        raise ValueError(f"results table lacks column(s) {missing}")
    df = results.select(cols).to_pandas()
    for c in cols[4:]:
        df[c] = pd.to_numeric(df[c], errors="coerce").astype(float)
    df["candidate_utm_north"] = np.where(df["candidate_utm_north"].isna() & df["candidate_utm_east"].notna(), 0.0,
                                         df["candidate_utm_north"])
    df["query_utm_north"] = np.where(df["query_utm_north"].isna() & df["query_utm_east"].notna(), 0.0,
                                     df["query_utm_north"])
    if max_candidates is not None:
        df = df[df["global_rank"] <= max_candidates]
        df = df.sort_values(["query_id", "rerank_score", "global_rank"], ascending=[True, False, True], kind="stable")
    else:
        df = df.sort_values(["query_id", order], kind="stable")
    query_ids = df["query_id"].drop_duplicates().to_numpy()
    pos_in_query = df.groupby("query_id", sort=False).cumcount().to_numpy()
    qidx = pd.Index(query_ids).get_indexer(df["query_id"].to_numpy())
    k = int(pos_in_query.max()) + 1 if len(df) else 0
    cand = np.full((len(query_ids), k, 2), np.nan)
    cand[qidx, pos_in_query, 0] = df["candidate_utm_east"].to_numpy()
    cand[qidx, pos_in_query, 1] = df["candidate_utm_north"].to_numpy()
    first = df.groupby("query_id", sort=False).first()
    query_xy = first.loc[query_ids, ["query_utm_east", "query_utm_north"]].to_numpy(dtype=float)
    return query_ids, query_xy, cand


def correct_matrix(query_xy: np.ndarray, candidate_xy: np.ndarray, radius: float) -> np.ndarray:
    """(Q, K) bool: candidate within ``radius`` of its query (unknown positions are never right)."""
    d = np.linalg.norm(candidate_xy - query_xy[:, None, :], axis=2)
    return np.nan_to_num(d, nan=np.inf) <= radius * (1 + 1e-9)


def evaluate_results(results: pa.Table, db_positions: np.ndarray, radius: float,
                     ns: Sequence[int] = RECALL_NS, all_query_ids: Sequence[int] | None = None) -> dict:
    """``{"global": {recall@N}, "reranked": {recall@N}, "num_queries", "num_queries_without_positive",
    "queries_without_positive": [ids]}`` for a results table (see pipeline.rerank)."""
    if radius <= 0:
        raise ValueError(f"positive radius must be > 0, got {radius}")
    qids, qxy, cand_global = ranked_lists(results, "global_rank")
    _, _, cand_reranked = ranked_lists(results, "rank")
    pos = has_positive(qxy, db_positions, radius)
    without = [int(q) for q, p in zip(qids, pos) if not p]
    if without:
        log.info("%d of %d queries have no database image within %g; excluded from the recalls",
                 len(without), len(qids), radius)
    return {
        "global": recall_at(correct_matrix(qxy, cand_global, radius), pos, ns),
        "reranked": recall_at(correct_matrix(qxy, cand_reranked, radius), pos, ns),
        "num_queries": int(len(qids)),
        "num_queries_without_positive": len(without),
        "queries_without_positive": without,
    }


def candidate_sweep(results: pa.Table, db_positions: np.ndarray, radius: float, candidates: Sequence[int],
                    ns: Sequence[int] = (1, 5, 10)) -> list[dict]:
    """The paper's candidate-count study: recalls when only the top-K global candidates are
    reranked. Pair scores do not depend on the other candidates, so every K <= the run's K is
    read from one run's scores."""
    have = int(pc.max(results.column("global_rank")).as_py() or 0) if results.num_rows else 0
    qids, qxy, _ = ranked_lists(results, "global_rank")
    pos = has_positive(qxy, db_positions, radius)
    rows = []
    for k in candidates:
        if k < 1:
            raise ValueError(f"candidate counts must be >= 1, got {k}")
        q2, qxy2, cand = ranked_lists(results, max_candidates=k)
        assert np.array_equal(q2, qids)
        row = {"candidates": int(k), "reranked_from": int(min(k, have))}
        row.update(recall_at(correct_matrix(qxy2, cand, radius), pos, ns))
        rows.append(row)
    return rows


# ---------------------------------------------------------------- stage API
@dataclass
class EvaluateConfig:
    out: str | None = None  # a folder written by `r2f run` (results.parquet, database_store)
    results: str | None = None
    database_store: str | None = None
    positive_radius: float = 25.0
    recall_ns: list[int] = field(default_factory=lambda: list(RECALL_NS))
    sweep_candidates: list[int] = field(default_factory=list)


@dataclass
class EvaluateResult:
    metrics: dict
    sweep: list[dict] | None = None


def _resolve(config: EvaluateConfig) -> tuple[str, str]:
    results = config.results or (storage.join(config.out, "results.parquet") if config.out else None)
    db_store = config.database_store or (storage.join(config.out, "database_store") if config.out else None)
    if not results or not db_store:
        raise ValueError("evaluate needs --out RUN_DIR, or both --results and --database-store")
    if not storage.exists(results):
        raise FileNotFoundError(f"results file {results} does not exist (run `r2f run` or `r2f rerank` first)")
    return results, db_store


def database_positions(db_store: str) -> np.ndarray:
    return positions_of(storage.read_global_table(db_store, ["utm_east", "utm_north"]))


def run(config: EvaluateConfig) -> EvaluateResult:
    results_url, db_store = _resolve(config)
    results = storage.read_parquet(results_url)
    db_xy = database_positions(db_store)
    metrics = evaluate_results(results, db_xy, config.positive_radius, config.recall_ns)
    sweep = candidate_sweep(results, db_xy, config.positive_radius, config.sweep_candidates) \
        if config.sweep_candidates else None
    return EvaluateResult(metrics, sweep)


def format_sweep(rows: list[dict], seconds_per_pair: float | None = None) -> str:
    """The candidate-count table as text (recalls in percent)."""
    ns = [k for k in rows[0] if k.startswith("recall@")] if rows else []
    head = ["top-K reranked"] + [n.replace("recall", "R") for n in ns] + (["rerank ms/query"] if seconds_per_pair else [])
    lines = ["  ".join(f"{h:>14}" for h in head)]
    for r in rows:
        k = r["candidates"] if r["reranked_from"] == r["candidates"] else f"{r['candidates']}({r['reranked_from']})"
        cells = [str(k)] + ["-" if r[n] is None else f"{100 * r[n]:.1f}" for n in ns]
        if seconds_per_pair:
            cells.append(f"{1000 * seconds_per_pair * r['reranked_from']:.1f}")
        lines.append("  ".join(f"{c:>14}" for c in cells))
    if any(r["reranked_from"] < r["candidates"] for r in rows):
        lines.append("K(n): the run retrieved only n candidates per query; rerun with --candidates K for the rest")
    return "\n".join(lines)


def _int_list(text: str) -> list[int]:
    try:
        return [int(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def register_cli(subparsers) -> None:
    from .cli import add_image_size_argument

    p = subparsers.add_parser("evaluate", help="Recall@N of a run; --sweep-candidates prints the top-K study")
    p.add_argument("--out", help="a folder written by `r2f run`")
    p.add_argument("--results", help="results Parquet (instead of --out)")
    p.add_argument("--database-store", help="database extraction store (instead of --out)")
    p.add_argument("--database", help="with --queries: run `r2f run` into --out first (K = largest swept count)")
    p.add_argument("--queries")
    p.add_argument("--backbone", default="r2former")
    p.add_argument("--checkpoint")
    p.add_argument("--reranker", default="auto")
    add_image_size_argument(p)
    p.add_argument("--positive-radius", type=float, default=25.0)
    p.add_argument("--sweep-candidates", type=_int_list, default=[], metavar="K1,K2,...")
    p.add_argument("--json", action="store_true", help="print the metrics as JSON")
    p.set_defaults(func=_cli)
    from .benchmarks import register_cli as register_benchmarks
    register_benchmarks(subparsers)


def _cli(args) -> int:
    if args.database or args.queries:
        if not (args.database and args.queries and args.out):
            raise ValueError("--database needs --queries and --out")
        from . import run as run_stage
        rc = run_stage.RunConfig(database=args.database, queries=args.queries, out=args.out,
                                 backbone=args.backbone, checkpoint=args.checkpoint, reranker=args.reranker,
                                 candidates=max(args.sweep_candidates or [100]),
                                 positive_radius=args.positive_radius,
                                 image_size=list(args.image_size) if args.image_size else [480, 640])
        run_stage.run(rc)
    cfg = EvaluateConfig(out=args.out, results=args.results, database_store=args.database_store,
                         positive_radius=args.positive_radius, sweep_candidates=args.sweep_candidates)
    res = run(cfg)
    if args.json:
        print(json.dumps({"metrics": res.metrics, "sweep": res.sweep}, indent=2))
        return 0
    m = res.metrics
    print(f"queries: {m['num_queries']} ({m['num_queries_without_positive']} without a positive, excluded)")
    for kind in ("global", "reranked"):
        print(f"{kind:>9}: " + "  ".join(f"{k.replace('recall', 'R')}={'-' if v is None else f'{100 * v:.1f}'}"
                                         for k, v in m[kind].items()))
    if res.sweep:
        spp = None
        if cfg.out and storage.exists(storage.join(cfg.out, "metrics.json")):
            saved = storage.read_json(storage.join(cfg.out, "metrics.json"))
            pairs = saved.get("settings", {}).get("num_pairs")
            secs = saved.get("stage_seconds", {}).get("rerank")
            if pairs and secs:
                spp = secs / pairs
        print(format_sweep(res.sweep, spp))
    sys.stdout.flush()
    return 0
