"""Offline evaluation: Recall@N of ranked lists against positions, as the VG benchmark counts it.

A query counts at N when any of its first N results lies within the positive radius of it.
Queries with no database image within the radius at all (or with no position) cannot be
answered right; they are reported and excluded from the recalls, as the VG benchmark does.
Recall@N for N larger than the number of results K is computed over the K results.

Every reranker of a run is scored from its own columns of the same candidates::

    results parts (one at a time) ──► global_rank        ──► "global"
                                  ──► rank_<n>, per n    ──► "rerankers": {n: recall@N}  ("reranked" = first n)
                                  ──► query_tag groups   ──► "by_tag": {tag: global + rerankers}
                                  ──► rerank_score_<n> within the global top-K ──► sweep rows (n, K)

Results written before per-reranker columns have one reranker, in ``rank`` / ``rerank_score``.

Pairs scored: a query's pairs for reranker ``n`` are its rows with a non-null ``rerank_score_<n>``
(an adaptive run leaves the candidates it did not score null; ``none`` scores nothing).
``rerankers.<n>`` carries ``pairs_scored`` (total) and ``pairs_per_query`` (mean, p50, p99) beside
the recalls, for fixed-K runs too.

``--sweep-adaptive`` fits the adaptive stop rule (``pipeline.rerank.adaptive``) on results that
scored the full top-K: for a grid of rules it replays the cascade on the recorded scores (no
rescoring) and prints R@1/5/10 against mean pairs per query, marking the Pareto front;
``--write-rule RULE.yaml`` writes, per reranker, the rule with the fewest mean pairs whose R@1 is
within 1 point of the full top-K's. It holds (queries x K) scores per reranker in memory.

The metric itself (Recall@N, fractions inside, percent only when printed) is
``pipeline.metrics``; positions come from ``pipeline.spatial.positions_of`` (NaN where unknown).

``r2f evaluate`` scores a finished run folder (or a results file plus the database store); ``r2f
run`` is what extracts, indexes, reranks and then evaluates. ``--sweep-candidates 20,50,100,200`` prints the paper's candidate-count study (table 2): one block
per reranker, the recalls when only the top-K global candidates are reranked, for each K, and the
rerank milliseconds per query. Those come from one run at the largest K (the manifest's
``rerank_seconds[n] / num_queries``) and are scaled by K / K_run for a smaller K, since scoring
costs the same per pair whatever K is.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from . import storage
from .log import get_logger
from .metrics import RECALL_NS, RecallCounter, percent
from .spatial import PositionIndex, positions_of

log = get_logger(__name__)


# ---------------------------------------------------------------- positives
class PositiveIndex:
    """Does a query have a database image within the radius? Nearest database position through
    ``pipeline.spatial.PositionIndex`` (a k-d tree over the UTM positions, float64, built once).
    Memory: O(database); queries are asked a part at a time, never a (queries x database) array."""

    def __init__(self, db_xy: np.ndarray):
        db_xy = np.asarray(db_xy, np.float64).reshape(-1, 2)
        self.index = PositionIndex(db_xy[~np.isnan(db_xy).any(axis=1)])

    def has_positive(self, query_xy: np.ndarray, radius: float) -> np.ndarray:
        query_xy = np.asarray(query_xy, np.float64).reshape(-1, 2)
        out = np.zeros(len(query_xy), bool)
        q_ok = ~np.isnan(query_xy).any(axis=1)
        if self.index.size == 0 or not q_ok.any():
            return out
        dist, _ = self.index.nearest(query_xy[q_ok], 1)
        out[q_ok] = dist[:, 0] <= radius
        return out


def has_positive(query_xy: np.ndarray, db_xy: np.ndarray, radius: float) -> np.ndarray:
    """(Q,) bool: some database position lies within ``radius`` of the query (exact nearest
    neighbour through a k-d tree, so city-scale databases stay cheap)."""
    return PositiveIndex(db_xy).has_positive(query_xy, radius)


# ---------------------------------------------------------------- results tables
# A results row carries the positions of its query and of its candidate (pipeline.rerank.results).
RESULT_POSITION_COLUMNS = [f"{side}_{axis}" for side in ("query", "candidate") for axis in ("utm_east", "utm_north")]


def reranker_columns(rerankers: Sequence[str], columns: Sequence[str]) -> dict[str, tuple[str, str]]:
    """``{reranker: (rank column, score column)}`` of a results part: ``rank_<n>`` /
    ``rerank_score_<n>``, or ``rank`` / ``rerank_score`` for the one reranker of results written
    before per-reranker columns (pipeline.rerank.results)."""
    from .rerank.results import rank_column, score_column

    cols = list(columns)
    return {n: (rank_column(n, list(rerankers), cols), score_column(n, list(rerankers), cols)) for n in rerankers}


def rerankers_in(columns: Sequence[str]) -> list[str]:
    """The rerankers a part's columns name (``rank_<n>``, in column order); ``["reranked"]`` for
    results of one unnamed reranker (only ``rank``)."""
    names = [c[len("rank_"):] for c in columns if c.startswith("rank_")]
    return names or ["reranked"]


class QueryLists:
    """One results part as per-query ranked lists: converted once, then ordered by the global
    rank, by each reranker's rank, or re-sorted by a reranker's score within the global top-K
    (the candidate sweep). Memory: the part's rows (O(queries x K))."""

    def __init__(self, part: pa.Table, extra: Sequence[str] = ()):
        import pandas as pd

        cols = ["query_id", "global_rank", *RESULT_POSITION_COLUMNS]
        want = list(dict.fromkeys(cols + [c for c in extra if c in part.column_names]))
        missing = [c for c in cols + list(extra) if c not in part.column_names and c != "query_tag"]
        if missing:
            raise ValueError(f"results table lacks column(s) {missing}")
        df = part.select(want).to_pandas()
        for c in RESULT_POSITION_COLUMNS:
            df[c] = pd.to_numeric(df[c], errors="coerce").astype(float)
        for kind in ("candidate", "query"):  # a missing north (frame index only) counts as 0
            east, north = f"{kind}_utm_east", f"{kind}_utm_north"
            df[north] = np.where(df[north].isna() & df[east].notna(), 0.0, df[north])
        self.df = df
        first = df.sort_values("query_id", kind="stable").groupby("query_id", sort=True).first()
        self.query_ids = first.index.to_numpy()
        self.query_xy = first[["query_utm_east", "query_utm_north"]].to_numpy(dtype=float)
        tags = first["query_tag"].tolist() if "query_tag" in first.columns else [None] * len(first)
        self.tags = np.array([None if t is None or pd.isna(t) else str(t) for t in tags], dtype=object)
        self._qindex = pd.Index(self.query_ids)

    def _candidates(self, df) -> np.ndarray:
        pos_in_query = df.groupby("query_id", sort=False).cumcount().to_numpy()
        qidx = self._qindex.get_indexer(df["query_id"].to_numpy())
        k = int(pos_in_query.max()) + 1 if len(df) else 0
        cand = np.full((len(self.query_ids), k, 2), np.nan)
        cand[qidx, pos_in_query, 0] = df["candidate_utm_east"].to_numpy()
        cand[qidx, pos_in_query, 1] = df["candidate_utm_north"].to_numpy()
        return cand

    def ordered_by(self, rank: str) -> np.ndarray:
        """(Q, K, 2) candidate positions in the order of column ``rank`` (1-based)."""
        return self._candidates(self.df.sort_values(["query_id", rank], kind="stable"))

    def reranked_within(self, k: int, score: str) -> np.ndarray:
        """(Q, k, 2) candidate positions when only the global top-``k`` are reranked by ``score``
        (higher first, ties in global order, as the rerank job orders them)."""
        df = self.df[self.df["global_rank"] <= k]
        return self._candidates(df.sort_values(["query_id", score, "global_rank"], ascending=[True, False, True],
                                               kind="stable"))


def ranked_lists(results: pa.Table, order: str = "rank", max_candidates: int | None = None,
                 score: str = "rerank_score"):
    """Per query: ``(query_ids (Q,), query_xy (Q, 2), candidate_xy (Q, K, 2))`` with the candidates in
    ``order`` ("rank": after reranking, "global_rank": before, "rank_<n>": reranker n). ``max_candidates``
    keeps only candidates whose global rank is within it, reordered by ``score`` (the candidate sweep)."""
    lists = QueryLists(results, [order, score] if max_candidates is not None else [order])
    cand = lists.ordered_by(order) if max_candidates is None else lists.reranked_within(max_candidates, score)
    return lists.query_ids, lists.query_xy, cand


def correct_matrix(query_xy: np.ndarray, candidate_xy: np.ndarray, radius: float) -> np.ndarray:
    """(Q, K) bool: candidate within ``radius`` of its query (unknown positions are never right)."""
    d = np.linalg.norm(candidate_xy - query_xy[:, None, :], axis=2)
    return np.nan_to_num(d, nan=np.inf) <= radius * (1 + 1e-9)


class PairCounter:
    """Pairs scored per query, accumulated part by part: a histogram of the counts (exact
    quantiles; O(K) state)."""

    def __init__(self):
        self.hist = np.zeros(0, np.int64)

    def add(self, per_query: np.ndarray) -> None:
        c = np.bincount(np.asarray(per_query, np.int64))
        if len(c) > len(self.hist):
            self.hist = np.r_[self.hist, np.zeros(len(c) - len(self.hist), np.int64)]
        self.hist[:len(c)] += c

    def summary(self) -> dict:
        n = int(self.hist.sum())
        total = int((self.hist * np.arange(len(self.hist))).sum())
        cum = np.cumsum(self.hist)
        q = lambda f: int(np.searchsorted(cum, f * n, side="left")) if n else None  # noqa: E731
        return {"pairs_scored": total, "pairs_per_query": {"mean": total / n if n else None, "p50": q(0.5),
                                                           "p99": q(0.99)}}


def pairs_per_query(lists: QueryLists, score: str | None) -> np.ndarray:
    """(Q,) pairs each query of a part had scored: its rows with a non-null ``score`` (0 for none)."""
    if score is None or score not in lists.df:
        return np.zeros(len(lists.query_ids), np.int64)
    df = lists.df
    return (df[score].notna().groupby(df["query_id"]).sum().reindex(lists.query_ids).fillna(0)
            .to_numpy().astype(np.int64))


class _Counters:
    """Global and per-reranker recall counters of one group of queries (all, or one tag)."""

    def __init__(self, rerankers: Sequence[str], ns: Sequence[int]):
        self.glob = RecallCounter(ns)
        self.rerankers = {n: RecallCounter(ns) for n in rerankers}
        self.num_queries = 0
        self.without = 0

    def add(self, correct_global, correct_by: dict[str, np.ndarray], pos, keep=None) -> None:
        keep = np.ones(len(pos), bool) if keep is None else keep
        self.num_queries += int(keep.sum())
        self.without += int((keep & ~pos).sum())
        self.glob.add(correct_global[keep], pos[keep])
        for n, c in correct_by.items():
            self.rerankers[n].add(c[keep], pos[keep])


def _check_radius_and_sweep(radius: float, sweep: Sequence[int]) -> None:
    if radius <= 0:
        raise ValueError(f"positive radius must be > 0, got {radius}")
    bad = [k for k in sweep if k < 1]
    if bad:
        raise ValueError(f"candidate counts must be >= 1, got {bad[0]}")


def evaluate_parts(parts: Iterable[pa.Table], db_positions: np.ndarray, radius: float,
                   ns: Sequence[int] = RECALL_NS, sweep: Sequence[int] = (),
                   sweep_ns: Sequence[int] = (1, 5, 10),
                   rerankers: Sequence[str] | None = None) -> tuple[dict, list[dict] | None]:
    """Metrics (and the candidate sweep) of a result set read part by part. Each part holds whole
    queries (pipeline.rerank.results). Memory: one part plus the database positions' index.

    ``rerankers`` (first = the run's "reranked"; default: the ``rank_<n>`` columns of the first
    part, or the one unnamed reranker of older results) are each scored from their own rank
    column. Metrics::

        {"global": {recall@N}, "reranked": {recall@N} (first reranker), "rerankers": {name: {recall@N}},
         "by_tag": {tag: {"global", "rerankers", "num_queries", "num_queries_without_positive"}}
                   (only when some part's ``query_tag`` is not null; untagged queries are in no group),
         "num_queries", "num_queries_without_positive", "queries_without_positive": [ids]}

    Sweep rows, reranker by reranker then K: ``{"reranker", "candidates", "reranked_from" (K, or the
    run's K when smaller), "run_candidates", recall@N...}``."""
    _check_radius_and_sweep(radius, sweep)
    index = PositiveIndex(db_positions)
    names = list(rerankers) if rerankers else None
    total: _Counters | None = None
    by_tag: dict[str, _Counters] = {}
    sweeps: dict[str, list[RecallCounter]] = {}
    pair_counts: dict[str, PairCounter] = {}
    have = 0
    without: list[int] = []
    for part in parts:
        if part.num_rows == 0:
            continue
        if names is None:
            names = rerankers_in(part.column_names)
        if total is None:
            total = _Counters(names, ns)
            sweeps = {n: [RecallCounter(sweep_ns) for _ in sweep] for n in names}
        columns = reranker_columns(names, part.column_names)
        lists = QueryLists(part, [c for pair in columns.values() for c in pair] + ["query_tag"])
        qxy = lists.query_xy
        pos = index.has_positive(qxy, radius)
        without.extend(int(q) for q, p in zip(lists.query_ids, pos) if not p)
        correct_global = correct_matrix(qxy, lists.ordered_by("global_rank"), radius)
        correct_by = {n: correct_matrix(qxy, lists.ordered_by(rank), radius) for n, (rank, _) in columns.items()}
        total.add(correct_global, correct_by, pos)
        for n, (_, score) in columns.items():
            pair_counts.setdefault(n, PairCounter()).add(pairs_per_query(lists, None if n == "none" else score))
        for tag in sorted({t for t in lists.tags if t is not None}):
            group = by_tag.setdefault(tag, _Counters(names, ns))
            group.add(correct_global, correct_by, pos, keep=lists.tags == tag)
        have = max(have, int(pc.max(part.column("global_rank")).as_py() or 0))
        for n, (_, score) in columns.items():
            for k, counter in zip(sweep, sweeps[n]):
                counter.add(correct_matrix(qxy, lists.reranked_within(k, score), radius), pos)
    names = names or ["reranked"]
    total = total or _Counters(names, ns)
    num_queries = total.num_queries
    if without:
        log.info("%d of %d queries have no database image within %g; excluded from the recalls",
                 len(without), num_queries, radius)
    per_reranker = {n: c.recalls() for n, c in total.rerankers.items()}
    reranked = dict(per_reranker[names[0]])
    for n in per_reranker:
        per_reranker[n].update((pair_counts.get(n) or PairCounter()).summary())
    metrics: dict = {"global": total.glob.recalls(), "reranked": reranked, "rerankers": per_reranker}
    if by_tag:
        metrics["by_tag"] = {tag: {"global": g.glob.recalls(), "rerankers": {n: c.recalls() for n, c in g.rerankers.items()},
                                   "num_queries": g.num_queries, "num_queries_without_positive": g.without}
                             for tag, g in sorted(by_tag.items())}
    metrics.update({"num_queries": int(num_queries), "num_queries_without_positive": len(without),
                    "queries_without_positive": without})
    rows = None
    if sweep:
        rows = [{"reranker": n, "candidates": int(k), "reranked_from": int(min(k, have)), "run_candidates": have,
                 **c.recalls()}
                for n in names for k, c in zip(sweep, sweeps.get(n) or [RecallCounter(sweep_ns) for _ in sweep])]
    return metrics, rows


def evaluate_results(results: pa.Table, db_positions: np.ndarray, radius: float,
                     ns: Sequence[int] = RECALL_NS, all_query_ids: Sequence[int] | None = None,
                     rerankers: Sequence[str] | None = None) -> dict:
    """The metrics of ``evaluate_parts`` for one results table (see pipeline.rerank)."""
    return evaluate_parts([results], db_positions, radius, ns, rerankers=rerankers)[0]


def candidate_sweep(results: pa.Table, db_positions: np.ndarray, radius: float, candidates: Sequence[int],
                    ns: Sequence[int] = (1, 5, 10), rerankers: Sequence[str] | None = None) -> list[dict]:
    """The paper's candidate-count study (table 2): per reranker, the recalls when only the top-K
    global candidates are reranked. Pair scores do not depend on the other candidates, so every
    K <= the run's K is read from one run's scores."""
    return evaluate_parts([results], db_positions, radius, RECALL_NS, candidates, ns, rerankers)[1]


# ---------------------------------------------------------------- adaptive rules, fitted on recorded scores
FIXED_KS = (1, 5, 10, 20, 50, 100)  # the fixed candidate counts the paper's Table 2 and the report compare
SWEEP_NS = (1, 5, 10)
FIRST_ROUNDS = (1, 2, 3, 5, 10)
LATER_ROUNDS = (5, 10, 20, 50)       # optional middle rounds (one or two) before K
SCORE_QUANTILES = tuple(np.round(np.arange(0.05, 1.0, 0.05), 2))
MARGIN_QUANTILES = (0.25, 0.5, 0.75)
GATE_QUANTILES = (0.25, 0.5)  # gates: the global top-1 leads its top-2 by less than these quantiles of the lead
R1_TOLERANCE = 0.01  # --write-rule: R@1 within 1 point of the full top-K's
STUDY_MAX_PAIRS = 1_000_000  # r2f run computes the pairs study for the report up to this many pairs


@dataclass
class ScoredLists:
    """What a rule replay needs, in global order, (Q, K) each: every reranker's scores (NaN: no
    candidate there, or not scored), the global scores (NaN: no candidate), whether each candidate
    is right; and which queries have a positive. Memory: O(queries x K) per reranker."""

    scores: dict[str, np.ndarray]
    global_scores: np.ndarray
    correct: np.ndarray
    has_positive: np.ndarray
    query_ids: np.ndarray

    @property
    def k(self) -> int:
        return int(self.global_scores.shape[1])


def scored_lists(parts: Iterable[pa.Table], db_positions: np.ndarray, radius: float, rerankers: Sequence[str],
                 query_ids: Sequence[int] | None = None) -> ScoredLists:
    """Read a result set (part by part) into ``ScoredLists``; ``query_ids`` keeps only those queries
    (a validation split of the results)."""
    index = PositiveIndex(db_positions)
    keep = None if query_ids is None else set(int(q) for q in query_ids)
    names = [n for n in rerankers if n != "none"]
    blocks: list[tuple] = []
    for part in parts:
        if part.num_rows == 0:
            continue
        if keep is not None:
            part = part.filter(pa.array(np.isin(part.column("query_id").to_numpy(), list(keep))))
            if part.num_rows == 0:
                continue
        columns = reranker_columns(names, part.column_names)
        lists = QueryLists(part, [sc for _, sc in columns.values()] + ["global_score"])
        df = lists.df
        qi = lists._qindex.get_indexer(df["query_id"].to_numpy())
        gi = df["global_rank"].to_numpy().astype(np.int64) - 1
        k = int(gi.max()) + 1
        mats = {}
        for n, (_, sc) in columns.items():
            m = np.full((len(lists.query_ids), k), np.nan)
            m[qi, gi] = df[sc].to_numpy(dtype=float)
            mats[n] = m
        g = np.full((len(lists.query_ids), k), np.nan)
        g[qi, gi] = df["global_score"].to_numpy(dtype=float)
        correct = correct_matrix(lists.query_xy, lists.ordered_by("global_rank"), radius)
        blocks.append((mats, g, correct, index.has_positive(lists.query_xy, radius), lists.query_ids))
    k = max([b[1].shape[1] for b in blocks] or [0])

    def pad(m, fill):
        return np.pad(m, ((0, 0), (0, k - m.shape[1])), constant_values=fill)
    return ScoredLists(scores={n: np.concatenate([pad(b[0][n], np.nan) for b in blocks]) if blocks else np.zeros((0, 0))
                               for n in names},
                       global_scores=np.concatenate([pad(b[1], np.nan) for b in blocks]) if blocks else np.zeros((0, 0)),
                       correct=np.concatenate([pad(b[2], False) for b in blocks]) if blocks else np.zeros((0, 0), bool),
                       has_positive=np.concatenate([b[3] for b in blocks]) if blocks else np.zeros(0, bool),
                       query_ids=np.concatenate([b[4] for b in blocks]) if blocks else np.zeros(0, np.int64))


def replay(lists: ScoredLists, name: str, lengths: np.ndarray, ns: Sequence[int] = SWEEP_NS) -> tuple[dict, np.ndarray]:
    """Recalls and pairs per query when each query scores its first ``lengths`` candidates: the
    scored ones by score (ties in global order), then the rest in global order, as the job ranks."""
    from .metrics import recall_at
    s = lists.scores[name]
    scored = (np.arange(lists.k)[None, :] < np.asarray(lengths)[:, None]) & ~np.isnan(s)
    order = np.argsort(np.where(scored, -np.nan_to_num(s), np.inf), axis=1, kind="stable")
    correct = np.take_along_axis(lists.correct, order, axis=1)
    return recall_at(correct, lists.has_positive, ns), scored.sum(axis=1)


def _round4(v: float) -> float:
    return float(f"{v:.4g}")


def rule_grid(lists: ScoredLists, name: str) -> list:
    """Rules to try for reranker ``name``: first rounds FIRST_ROUNDS, then K, or one or two middle
    rounds of LATER_ROUNDS, then K; stop thresholds at quantiles of these results' own best scores
    and margins after the first round, alone and together; the single thresholds also with a
    global gate (a query whose global top-1 leads its top-2 by less than a quantile of that lead
    starts at the second round) where the rule has a second round before K. Some 4,500 rules at
    K = 100; each replay is O(queries x K), so the sweep is for a validation split, not a city."""
    from .rerank.adaptive import AdaptiveRule, best_two
    k, s = lists.k, lists.scores[name]
    g_best, g_second = best_two(lists.global_scores[:, :min(2, k)])
    g_lead = (g_best - g_second)[np.isfinite(g_best) & np.isfinite(g_second)]
    gates = sorted({_round4(v) for v in np.quantile(g_lead, GATE_QUANTILES)}) if len(g_lead) else []
    rules = []
    for k1 in (r for r in FIRST_ROUNDS if r < k):
        best, second = best_two(s[:, :k1])
        fin = np.isfinite(best)
        lead = (best - second)[fin & np.isfinite(second)]
        scores = sorted({_round4(v) for v in np.quantile(best[fin], SCORE_QUANTILES)}) if fin.any() else []
        margins = sorted({_round4(v) for v in np.quantile(lead, MARGIN_QUANTILES)}) if len(lead) else []
        stops = ([(v, None) for v in scores] + [(None, m) for m in margins]
                 + [(v, m) for v in scores for m in margins])
        later = [m for m in LATER_ROUNDS if k1 < m < k]
        for rounds in [(k1,)] + [(k1, m) for m in later] + [(k1, a, b) for a in later for b in later if a < b]:
            rules += [AdaptiveRule(rounds=rounds, score=v, margin=m) for v, m in stops]
            if len(rounds) > 1:
                rules += [AdaptiveRule(rounds=rounds, score=v, margin=m, gate_margin=g) for v, m in stops
                          if v is None or m is None for g in gates]
    return rules


def oracle_lengths(lists: ScoredLists, name: str) -> np.ndarray:
    """(Q,) a bound, not a rule: each query scores the shortest prefix whose reranked top-1 is the
    full top-K's right answer (1 where the full top-K's top-1 is wrong: no rule can do better
    than being wrong cheaply). Its mean is the fewest pairs per query any prefix cascade on these
    scores could spend at the full top-K's R@1; the sweep prints it so that a target a rule misses
    can be told apart from a target the data rules out."""
    s = np.nan_to_num(lists.scores[name], nan=-np.inf)
    q, k = s.shape
    lengths = np.ones(q, np.int64)
    if q == 0 or k == 0:
        return lengths
    # the reranked top-1 of each prefix length L (ties in global order: the first maximum)
    running = np.maximum.accumulate(s, axis=1)
    new_best = np.concatenate([np.ones((q, 1), bool), s[:, 1:] > running[:, :-1]], axis=1)
    top_at = np.maximum.accumulate(np.where(new_best, np.arange(k)[None, :], 0), axis=1)
    right = np.take_along_axis(lists.correct, top_at, axis=1)
    full_right = right[:, -1]
    first = np.argmax(right, axis=1) + 1
    lengths[full_right] = first[full_right]
    return lengths


def _pareto(rows: list[dict]) -> None:
    """Mark ``pareto`` on the rows no other row beats on both mean pairs (fewer) and R@1 (higher)."""
    for r in rows:
        r["pareto"] = not any(o["pairs_per_query"] <= r["pairs_per_query"] and o["recall@1"] >= r["recall@1"]
                              and (o["pairs_per_query"] < r["pairs_per_query"] or o["recall@1"] > r["recall@1"])
                              for o in rows)


def sweep_adaptive(lists: ScoredLists, rerankers: Sequence[str]) -> tuple[list[dict], dict[str, dict]]:
    """Per reranker: the fixed counts (FIXED_KS below K, and K: the full top-K) and the grid of
    rules, each with R@1/5/10 and mean pairs per query, the Pareto front marked; and the chosen
    rule per reranker (fewest mean pairs with R@1 within R1_TOLERANCE of the full top-K's)."""
    from .rerank.adaptive import prefix_lengths
    rows: list[dict] = []
    chosen: dict[str, dict] = {}
    k = lists.k
    q = len(lists.query_ids)
    for name in [n for n in rerankers if n != "none"]:
        if np.isnan(lists.scores[name][~np.isnan(lists.global_scores)]).any():
            raise ValueError(f"reranker {name} did not score every candidate of these results (an adaptive run?); "
                             f"the sweep replays rules on the full top-K's scores")
        group = []
        for kk in sorted({x for x in FIXED_KS if x < k} | {k}):
            rec, pairs = replay(lists, name, np.full(q, kk))
            group.append({"reranker": name, "kind": "fixed", "candidates": kk, "rule": None, **rec,
                          "pairs_per_query": float(pairs.mean()) if q else 0.0})
        for rule in rule_grid(lists, name):
            rec, pairs = replay(lists, name, prefix_lengths(rule, lists.scores[name], lists.global_scores, k))
            group.append({"reranker": name, "kind": "rule", "candidates": k, "rule": rule.to_json(),
                          "describe": rule.describe(), **rec, "pairs_per_query": float(pairs.mean()) if q else 0.0})
        _pareto(group)
        rec, pairs = replay(lists, name, oracle_lengths(lists, name))
        group.append({"reranker": name, "kind": "bound", "candidates": k, "rule": None, "pareto": False,
                      "describe": "bound: shortest right prefix", **rec,
                      "pairs_per_query": float(pairs.mean()) if q else 0.0})
        full = next(r for r in group if r["kind"] == "fixed" and r["candidates"] == k)
        ok = [r for r in group if r["kind"] == "rule" and r["recall@1"] is not None and full["recall@1"] is not None
              and r["recall@1"] >= full["recall@1"] - R1_TOLERANCE - 1e-12]
        if ok:
            best = min(ok, key=lambda r: (r["pairs_per_query"], -r["recall@1"]))
            best["chosen"] = True
            chosen[name] = best["rule"]
        rows += group
    return rows, chosen


def format_adaptive_sweep(rows: list[dict], every_rule: bool = False) -> str:
    """The rule sweep as text: one block per reranker, rows by mean pairs per query; ``*`` on the
    Pareto front, ``<`` the rule --write-rule chooses. Without ``every_rule``, the fixed counts,
    the front and the chosen rule (a line counts the rest; ``--json`` lists every rule)."""
    lines: list[str] = []
    blocks: dict[str, list[dict]] = {}
    for r in rows:
        blocks.setdefault(r["reranker"], []).append(r)
    for name, group in blocks.items():
        shown = [r for r in group if every_rule or r["kind"] != "rule" or r.get("pareto") or r.get("chosen")]
        lines.append(f"reranker {name}: {sum(r['kind'] == 'rule' for r in group)} rules"
                     + ("" if every_rule else f", {len(group) - len(shown)} off the Pareto front not shown"))
        lines.append(f"{'':>2} {'rule':<44} {'R@1':>6} {'R@5':>6} {'R@10':>6} {'pairs/query':>12}")
        for r in sorted(shown, key=lambda r: (r["pairs_per_query"], -(r["recall@1"] or 0))):
            label = f"fixed K = {r['candidates']}" if r["kind"] == "fixed" else r["describe"]
            mark = ("*" if r.get("pareto") else " ") + ("<" if r.get("chosen") else " ")
            lines.append(f"{mark} {label:<44} {percent(r['recall@1']):>6} {percent(r['recall@5']):>6} "
                         f"{percent(r['recall@10']):>6} {r['pairs_per_query']:>12.2f}")
    lines.append(f"*: on the Pareto front of R@1 against mean pairs per query; <: the fewest mean pairs with R@1 "
                 f"within {100 * R1_TOLERANCE:g} point of the full top-K (--write-rule); bound: no rule, each query "
                 f"stops at its shortest prefix whose top-1 is right (the floor of any cascade on these scores)")
    return "\n".join(lines)


def write_rule(url: str, rules: Mapping[str, dict]) -> None:
    """RULE.yaml: exactly the ``adaptive`` block of a rerank config (one rule per reranker)."""
    import yaml
    storage.write_bytes(url, yaml.safe_dump({n: dict(r) for n, r in rules.items()}, sort_keys=False).encode())


def pairs_study(lists: ScoredLists, rerankers: Sequence[str]) -> dict:
    """For the report: per reranker, the fixed counts and the rules on the Pareto front (R@1, 5,
    10 and mean pairs per query each), and the chosen rule."""
    rows, chosen = sweep_adaptive(lists, rerankers)
    out: dict = {}
    for r in rows:
        d = out.setdefault(r["reranker"], {"fixed": [], "rules": [], "chosen": chosen.get(r["reranker"])})
        entry = {k: r[k] for k in ("recall@1", "recall@5", "recall@10", "pairs_per_query")}
        if r["kind"] == "fixed":
            d["fixed"].append({"candidates": r["candidates"], **entry})
        elif r["pareto"] or r.get("chosen"):
            d["rules"].append({"rule": r["rule"], "describe": r["describe"], "chosen": bool(r.get("chosen")), **entry})
    return out


def adaptive_of(results_url: str) -> dict | None:
    """The adaptive rules the results were made with (None: every query scored its K candidates)."""
    from .rerank.results import results_metadata
    meta = results_metadata(results_url)
    return meta.get("adaptive") or (meta.get("plan") or {}).get("adaptive")


# ---------------------------------------------------------------- stage API
@dataclass
class EvaluateConfig:
    out: str | None = None  # a folder written by `r2f run` (results.parquet, database_store)
    results: str | None = None
    database_store: str | None = None
    positive_radius: float | None = None  # None: frames 2 for a sequence database, 25 metres otherwise
    recall_ns: list[int] = field(default_factory=lambda: list(RECALL_NS))
    sweep_candidates: list[int] = field(default_factory=list)
    sweep_adaptive: bool = False             # fit stop rules on these (full top-K) results
    write_rule: str | None = None            # with sweep_adaptive: write the chosen rules here (RULE.yaml)
    pairs_study: bool = False                # metrics["pairs_study"] for the report (fixed K and Pareto rules)


@dataclass
class EvaluateResult:
    metrics: dict
    sweep: list[dict] | None = None
    # {reranker: ms per query spent scoring pairs, measured at the run's K}; None when not recorded
    rerank_ms: dict[str, float] | None = None
    adaptive_sweep: list[dict] | None = None
    rules: dict[str, dict] | None = None     # the chosen rule per reranker (sweep_adaptive)


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
    """Database positions of the state the results recorded (``pipeline.index.published.from_metadata``:
    the same store generation the job read, never a fresh resolve); of the store's manifest for
    results that recorded none."""
    if state_meta:
        from .index.published import from_metadata
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


def results_rerankers(results_url: str) -> list[str]:
    """The rerankers recorded with the results, first one first ([] when none is recorded)."""
    from .rerank.results import rerankers_of

    return list(rerankers_of(results_url))


def _part_columns(results_url: str) -> list[str]:
    """Column names of the result set's parts (every part of a run has the same), [] without parts."""
    import pyarrow.parquet as pq

    from .rerank.results import part_urls
    urls = part_urls(results_url)
    if not urls:
        return []
    fs, path = storage.filesystem(urls[0])
    with fs.open(path, "rb") as f:
        return list(pq.read_schema(f).names)


def rerank_ms_per_query(results_url: str, num_queries: int, rerankers: Sequence[str],
                        out: str | None = None) -> dict[str, float] | None:
    """``{reranker: ms per query}`` spent scoring pairs at the run's K: the manifest's
    ``rerank_seconds[name] / num_queries``; for runs made before it, the whole rerank stage's
    seconds of ``OUT/metrics.json``, counted to the one reranker."""
    from .rerank.results import results_metadata
    meta = results_metadata(results_url)
    n = meta.get("num_queries") or num_queries
    secs = meta.get("rerank_seconds")
    if not secs and out and storage.exists(storage.join(out, "metrics.json")) and rerankers:
        stage = (storage.read_json(storage.join(out, "metrics.json")).get("stage_seconds") or {}).get("rerank")
        secs = {rerankers[0]: stage} if stage else None
    if not secs or not n:
        return None
    return {name: 1000.0 * float(v) / n for name, v in secs.items() if v is not None}


def run(config: EvaluateConfig) -> EvaluateResult:
    from .rerank.results import iter_parts

    results_url, db_store = _resolve(config)
    state, recorded_store = results_state(results_url)
    db_store = db_store or recorded_store
    if not db_store:
        raise ValueError(f"{results_url} records no database store: pass --database-store")
    radius, unit = radius_of(db_store, config.positive_radius)
    db_xy = database_positions(db_store, state)
    adaptive = adaptive_of(results_url)
    if adaptive and (config.sweep_candidates or config.sweep_adaptive):
        what = "--sweep-candidates" if config.sweep_candidates else "--sweep-adaptive"
        raise ValueError(f"{what} needs every candidate's score, but {results_url} is of an adaptive run "
                         f"({', '.join(sorted(adaptive))}): the candidates it stopped before have no score. Rerank "
                         f"with a fixed --candidates K (no --adaptive) to study K or fit a rule")
    if config.write_rule and not config.sweep_adaptive:
        raise ValueError("--write-rule writes the rule --sweep-adaptive chooses: give both")
    available = _part_columns(results_url)
    names = results_rerankers(results_url) or rerankers_in(available)
    cols = ["query_id", "global_rank", *RESULT_POSITION_COLUMNS]
    cols += [c for pair in reranker_columns(names, available).values() for c in pair]
    cols += ["query_tag"] if "query_tag" in available else []
    metrics, sweep = evaluate_parts(iter_parts(results_url, list(dict.fromkeys(cols))), db_xy,
                                    radius, config.recall_ns, config.sweep_candidates,
                                    rerankers=names)
    ms = rerank_ms_per_query(results_url, metrics["num_queries"], names, config.out) if sweep else None
    metrics["positive_radius"] = radius
    metrics["positive_radius_unit"] = unit
    res = EvaluateResult(metrics, sweep, ms)
    scorers = [n for n in names if n not in ("none", "reranked")]
    want_study = config.pairs_study and not adaptive and scorers and \
        metrics["num_queries"] * max(1, _run_k(results_url)) <= STUDY_MAX_PAIRS
    if config.sweep_adaptive or want_study:
        cols = ["query_id", "global_rank", "global_score", *RESULT_POSITION_COLUMNS]
        cols += [c for pair in reranker_columns(scorers, available).values() for c in pair]
        lists = scored_lists(iter_parts(results_url, list(dict.fromkeys(cols))), db_xy, radius, scorers)
        if config.sweep_adaptive:
            res.adaptive_sweep, res.rules = sweep_adaptive(lists, scorers)
            if config.write_rule:
                missing = [n for n in scorers if n not in res.rules]
                if missing:
                    raise ValueError(f"no rule of the grid keeps R@1 within {100 * R1_TOLERANCE:g} point of the full "
                                     f"top-K for {missing}; nothing written")
                write_rule(config.write_rule, res.rules)
        if want_study:
            metrics["pairs_study"] = pairs_study(lists, scorers)
    return res


def _run_k(results_url: str) -> int:
    from .rerank.results import results_metadata
    return int(results_metadata(results_url).get("candidates") or 0)


def radius_of(db_store: str, given: float | None) -> tuple[float, str | None]:
    """``(radius, unit)``: ``given``, or the radius the database's dataset kind implies
    (``datasets.default_radius``); the unit (``frames`` or ``metres``) from the dataset the store
    was extracted from, None when the store does not record it. One manifest read."""
    from .datasets import DEFAULT_RADIUS_M, default_radius, radius_unit
    source = storage.read_manifest(db_store).get("dataset")
    if given is None:
        given = default_radius(source) if source else DEFAULT_RADIUS_M
    return given, (radius_unit(source) if source else None)


def format_sweep(rows: list[dict], rerank_ms: Mapping[str, float] | None = None) -> str:
    """Table 2's layout as text: one block per reranker, one row per candidate count K, R@N in
    percent, and with ``rerank_ms`` ({reranker: ms per query measured at the run's K}) the
    rerank ms per query at each K, estimated as ``rerank_ms * min(K, run K) / run K``: a pair
    costs the same whatever K is, so a smaller K costs its share of the measured pairs."""
    blocks: dict[str, list[dict]] = {}
    for r in rows:
        blocks.setdefault(r.get("reranker", "reranked"), []).append(r)
    lines: list[str] = []
    scaled = False
    for name, group in blocks.items():
        ns = [k for k in group[0] if k.startswith("recall@")]
        run_k = max(int(r.get("run_candidates") or r["reranked_from"]) for r in group)
        ms = (rerank_ms or {}).get(name)
        head = ["top-K reranked"] + [n.replace("recall", "R") for n in ns] + (["rerank ms/query"] if ms else [])
        lines.append(f"reranker {name}")
        lines.append("  ".join(f"{h:>14}" for h in head))
        for r in group:
            k = r["candidates"] if r["reranked_from"] == r["candidates"] else f"{r['candidates']}({r['reranked_from']})"
            cells = [str(k)] + [percent(r[n]) for n in ns]
            if ms:
                cells.append(f"{ms * r['reranked_from'] / run_k:.1f}" if run_k else "-")
                scaled = scaled or r["reranked_from"] < run_k
            lines.append("  ".join(f"{c:>14}" for c in cells))
    if any(r["reranked_from"] < r["candidates"] for r in rows):
        lines.append("K(n): the run retrieved only n candidates per query; rerun with --candidates K for the rest")
    if rerank_ms and any(n in rerank_ms for n in blocks):
        run_k = max(int(r.get("run_candidates") or r["reranked_from"]) for r in rows)
        lines.append(f"rerank ms/query: that reranker's pair-scoring seconds / queries of one run at K = {run_k}"
                     + (f"; smaller K scaled by K/{run_k} (the cost is per pair)" if scaled else ""))
    return "\n".join(lines)


def _int_list(text: str) -> list[int]:
    try:
        return [int(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def register_cli(subparsers) -> None:
    p = subparsers.add_parser("evaluate", help="Recall@N of a run; --sweep-candidates prints the top-K study")
    p.add_argument("--out", help="a folder written by `r2f run`")
    p.add_argument("--results", help="results folder of `r2f rerank` (or a legacy results Parquet) instead of --out")
    p.add_argument("--database-store", help="database extraction store (instead of --out)")
    # Datasets belong to `r2f run` (which evaluates when it is done): refused with that advice.
    p.add_argument("--database", help=argparse.SUPPRESS)
    p.add_argument("--queries", help=argparse.SUPPRESS)
    p.add_argument("--positive-radius", type=float, default=None,
                   help="frames for a sequence: database (default 2), metres otherwise (default 25)")
    p.add_argument("--sweep-candidates", type=_int_list, default=[], metavar="K1,K2,...")
    p.add_argument("--sweep-adaptive", action="store_true",
                   help="replay a grid of adaptive stop rules on these full top-K results: R@1/5/10 against "
                        "mean pairs per query, the Pareto front marked")
    p.add_argument("--write-rule", metavar="RULE.yaml",
                   help="with --sweep-adaptive: write the rule with the fewest mean pairs whose R@1 is within "
                        "1 point of the full top-K's (for r2f run/rerank --adaptive)")
    p.add_argument("--json", action="store_true", help="print the metrics as JSON")
    p.set_defaults(func=_cli)
    from .benchmarks import register_cli as register_benchmarks
    register_benchmarks(subparsers)


def _recall_line(label: str, recalls: dict) -> str:
    return f"{label:>9}: " + "  ".join(f"{k.replace('recall', 'R')}={percent(v)}" for k, v in recalls.items()
                                       if k.startswith("recall@"))


def _cli(args) -> int:
    if args.database or args.queries:
        k = max(args.sweep_candidates or [100])
        raise ValueError(f"r2f evaluate scores a finished run; to extract, index, rerank and evaluate datasets use "
                         f"`r2f run --database D --queries Q --out OUT --candidates {k}`, then "
                         f"`r2f evaluate --out OUT` (e.g. with --sweep-candidates)")
    cfg = EvaluateConfig(out=args.out, results=args.results, database_store=args.database_store,
                         positive_radius=args.positive_radius, sweep_candidates=args.sweep_candidates,
                         sweep_adaptive=args.sweep_adaptive, write_rule=args.write_rule)
    res = run(cfg)
    if args.json:
        out = {"metrics": res.metrics, "sweep": res.sweep, "rerank_ms_per_query": res.rerank_ms}
        if args.sweep_adaptive:
            out.update({"adaptive_sweep": res.adaptive_sweep, "rules": res.rules})
        print(json.dumps(out, indent=2))
        return 0
    m = res.metrics
    print(f"queries: {m['num_queries']} ({m['num_queries_without_positive']} without a positive, excluded)")
    print(_recall_line("global", m["global"]))
    for name, recalls in m["rerankers"].items():
        print(_recall_line(name, recalls))
    for tag, group in (m.get("by_tag") or {}).items():
        print(f"tag {tag}: {group['num_queries']} queries ({group['num_queries_without_positive']} without a positive)")
        print(_recall_line("global", group["global"]))
        for name, recalls in group["rerankers"].items():
            print(_recall_line(name, recalls))
    for name, r in m["rerankers"].items():
        if "pairs_scored" in r and name != "none":
            ppq = r["pairs_per_query"]
            mean = "-" if ppq["mean"] is None else f"{ppq['mean']:.2f}"
            print(f"{name:>9}: {r['pairs_scored']} pairs scored, per query mean {mean} p50 {ppq['p50']} "
                  f"p99 {ppq['p99']}")
    if res.sweep:
        print(format_sweep(res.sweep, res.rerank_ms))
    if res.adaptive_sweep:
        print(format_adaptive_sweep(res.adaptive_sweep))
        if args.write_rule:
            print(f"rule written to {args.write_rule}: " + "; ".join(f"{n}: {r}" for n, r in res.rules.items()))
    sys.stdout.flush()
    return 0
