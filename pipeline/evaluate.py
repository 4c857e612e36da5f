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


class PositiveIndex:
    """Exact 2-D nearest neighbour over the database positions (FAISS, built once). Memory:
    O(database) (8 bytes per image); queries are asked a block at a time."""

    def __init__(self, db_xy: np.ndarray):
        import faiss

        db_xy = np.asarray(db_xy, np.float64).reshape(-1, 2)
        ok = ~np.isnan(db_xy).any(axis=1)
        self.index = None
        # Centre before going to float32: raw UTM eastings (~5e5 m) would lose centimetres.
        self.origin = db_xy[ok].mean(axis=0) if ok.any() else np.zeros(2)
        if ok.any():
            self.index = faiss.IndexFlatL2(2)
            self.index.add(np.ascontiguousarray(db_xy[ok] - self.origin, dtype=np.float32))

    def has_positive(self, query_xy: np.ndarray, radius: float) -> np.ndarray:
        query_xy = np.asarray(query_xy, np.float64).reshape(-1, 2)
        out = np.zeros(len(query_xy), bool)
        q_ok = ~np.isnan(query_xy).any(axis=1)
        if self.index is None or not q_ok.any():
            return out
        dist, _ = self.index.search(np.ascontiguousarray(query_xy[q_ok] - self.origin, dtype=np.float32), 1)
        # Small slack for float32 rounding of squared distances at exactly the radius.
        out[q_ok] = dist[:, 0] <= radius * radius * (1 + 1e-6) + 1e-6
        return out


def has_positive(query_xy: np.ndarray, db_xy: np.ndarray, radius: float) -> np.ndarray:
    """(Q,) bool: some database position lies within ``radius`` of the query (exact nearest
    neighbour in 2-D through FAISS, so city-scale databases stay cheap)."""
    return PositiveIndex(db_xy).has_positive(query_xy, radius)


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


class RecallCounter:
    """Recall@N counts accumulated part by part: O(len(ns)) state, plus the ids of the queries
    without a positive (reported by name)."""

    def __init__(self, ns: Sequence[int]):
        self.ns = list(ns)
        for n in self.ns:
            if n < 1:
                raise ValueError(f"recall@N needs N >= 1, got {n}")
        self.hits = np.zeros(len(self.ns), np.int64)
        self.counted = 0

    def add(self, correct: np.ndarray, pos: np.ndarray) -> None:
        c = np.asarray(correct, bool)[np.asarray(pos, bool)]
        self.counted += len(c)
        for i, n in enumerate(self.ns):
            self.hits[i] += int(c[:, :n].any(axis=1).sum()) if c.size else 0

    def recalls(self) -> dict[str, float | None]:
        return {f"recall@{n}": (None if self.counted == 0 else float(h / self.counted))
                for n, h in zip(self.ns, self.hits)}


def evaluate_parts(parts: Iterable[pa.Table], db_positions: np.ndarray, radius: float,
                   ns: Sequence[int] = RECALL_NS, sweep: Sequence[int] = (),
                   sweep_ns: Sequence[int] = (1, 5, 10)) -> tuple[dict, list[dict] | None]:
    """Metrics (and the candidate sweep) of a result set read part by part. Each part holds whole
    queries (pipeline.rerank.results). Memory: one part plus the database positions' index."""
    if radius <= 0:
        raise ValueError(f"positive radius must be > 0, got {radius}")
    for k in sweep:
        if k < 1:
            raise ValueError(f"candidate counts must be >= 1, got {k}")
    index = PositiveIndex(db_positions)
    glob, rer = RecallCounter(ns), RecallCounter(ns)
    sweeps = [RecallCounter(sweep_ns) for _ in sweep]
    have = 0
    num_queries, without = 0, []
    for part in parts:
        if part.num_rows == 0:
            continue
        qids, qxy, cand_global = ranked_lists(part, "global_rank")
        _, _, cand_reranked = ranked_lists(part, "rank")
        pos = index.has_positive(qxy, radius)
        num_queries += len(qids)
        without.extend(int(q) for q, p in zip(qids, pos) if not p)
        glob.add(correct_matrix(qxy, cand_global, radius), pos)
        rer.add(correct_matrix(qxy, cand_reranked, radius), pos)
        have = max(have, int(pc.max(part.column("global_rank")).as_py() or 0))
        for k, counter in zip(sweep, sweeps):
            q2, qxy2, cand = ranked_lists(part, max_candidates=k)
            assert np.array_equal(q2, qids)
            counter.add(correct_matrix(qxy2, cand, radius), pos)
    if without:
        log.info("%d of %d queries have no database image within %g; excluded from the recalls",
                 len(without), num_queries, radius)
    metrics = {"global": glob.recalls(), "reranked": rer.recalls(), "num_queries": int(num_queries),
               "num_queries_without_positive": len(without), "queries_without_positive": without}
    rows = None
    if sweep:
        rows = [{"candidates": int(k), "reranked_from": int(min(k, have)), **c.recalls()}
                for k, c in zip(sweep, sweeps)]
    return metrics, rows


def evaluate_results(results: pa.Table, db_positions: np.ndarray, radius: float,
                     ns: Sequence[int] = RECALL_NS, all_query_ids: Sequence[int] | None = None) -> dict:
    """``{"global": {recall@N}, "reranked": {recall@N}, "num_queries", "num_queries_without_positive",
    "queries_without_positive": [ids]}`` for a results table (see pipeline.rerank)."""
    return evaluate_parts([results], db_positions, radius, ns)[0]


def candidate_sweep(results: pa.Table, db_positions: np.ndarray, radius: float, candidates: Sequence[int],
                    ns: Sequence[int] = (1, 5, 10)) -> list[dict]:
    """The paper's candidate-count study: recalls when only the top-K global candidates are
    reranked. Pair scores do not depend on the other candidates, so every K <= the run's K is
    read from one run's scores."""
    return evaluate_parts([results], db_positions, radius, RECALL_NS, candidates, ns)[1]


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


def run_results(out: str) -> str:
    """The results of a run folder: ``results/`` (the streaming job) or a legacy ``results.parquet``."""
    folder = storage.join(out, "results")
    return folder if storage.exists(folder) or not storage.exists(storage.join(out, "results.parquet")) \
        else storage.join(out, "results.parquet")


def _resolve(config: EvaluateConfig) -> tuple[str, str | None]:
    results = config.results or (run_results(config.out) if config.out else None)
    db_store = config.database_store or (storage.join(config.out, "database_store") if config.out else None)
    if not results:
        raise ValueError("evaluate needs --out RUN_DIR, or --results (and --database-store for a legacy file)")
    if not storage.exists(results):
        raise FileNotFoundError(f"results {results} do not exist (run `r2f run` or `r2f rerank` first)")
    return results, db_store


def database_positions(db_store: str, state_meta: dict | None = None) -> np.ndarray:
    """Database positions of the state the results recorded (``pipeline.published.from_metadata``:
    the same store generation the job read, never a fresh resolve); of the store's manifest for
    results that recorded none."""
    if state_meta:
        from .published import from_metadata
        table = from_metadata(state_meta, store=db_store).read_global_table(["utm_east", "utm_north"])
    else:
        table = storage.read_global_table(db_store, ["utm_east", "utm_north"])
    return positions_of(table)


def results_state(results_url: str) -> tuple[dict | None, str | None]:
    """``(state metadata, database store)`` recorded by the run that wrote the results."""
    from .rerank.results import results_metadata
    meta = results_metadata(results_url)
    # a finished folder's manifest ("state"), an unfinished one's plan.json ("database"), or none
    state = meta.get("state") or (meta.get("database") if isinstance(meta.get("database"), dict) else None)
    return state, meta.get("database_store") or (state or {}).get("store")


def run(config: EvaluateConfig) -> EvaluateResult:
    from .rerank.results import iter_parts

    results_url, db_store = _resolve(config)
    state, recorded_store = results_state(results_url)
    db_store = db_store or recorded_store
    if not db_store:
        raise ValueError(f"{results_url} records no database store: pass --database-store")
    db_xy = database_positions(db_store, state)
    cols = ["query_id", "rank", "global_rank", "rerank_score", "query_utm_east", "query_utm_north",
            "candidate_utm_east", "candidate_utm_north"]
    metrics, sweep = evaluate_parts(iter_parts(results_url, cols), db_xy, config.positive_radius,
                                    config.recall_ns, config.sweep_candidates)
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
    p.add_argument("--results", help="results folder of `r2f rerank` (or a legacy results Parquet) instead of --out")
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
