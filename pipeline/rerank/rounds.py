"""The rounds of an adaptive run, as files: what a partition's queries still score, and the
scores of a partition's pairs gathered over every round (workers.py's prefix, score and commit
phases use them; adaptive.py decides the prefixes)::

    rounds/round-i/prefix-PPPPP.parquet   (query_id, prefix_<n> per reranker), sorted by query id:
                                          before round i, how many leading candidates each query of
                                          score partition p scores (adaptive.prefix_lengths)
    scores/score-QQQQQ.parquet            round 0's scores by the partition owning the candidates
    rounds/round-i/score-QQQQQ.parquet    round i's (a null score_<n>: that reranker's rule did not
                                          ask for the pair)

Memory: one partition's prefix file or score rows at a time.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

from .. import storage
from .partitions import RerankJob
from .results import ResultsLayout, scores_schema


def round_pairs(job: RerankJob, names: list[str], gi: np.ndarray,
                prefix: dict[str, np.ndarray] | None) -> dict[str, np.ndarray]:
    """Per reranker: which of these pairs (positions ``gi`` in their K lists) round ``job.round``
    scores: in the round's window and, with ``prefix`` (each pair's query's prefix length), below it."""
    lo, hi = job.window(job.round)
    inside = (gi >= lo) & (gi < hi)
    if prefix is None:
        return {n: inside for n in names}
    return {n: inside & (gi < prefix[n]) for n in names}


def own_prefixes(layout: ResultsLayout, job: RerankJob, p: int, qids: np.ndarray,
                 names: list[str]) -> dict[str, np.ndarray] | None:
    """Prefix length per reranker of queries ``qids`` of partition ``p`` (None in round 0 and in
    fixed runs: every query scores the whole window)."""
    if job.round == 0 or not job.rules:
        return None
    return prefixes_of(layout, job.round, p, qids, names)


def stray_prefixes(layout: ResultsLayout, job: RerankJob, st: pa.Table, names: list[str]) -> dict[str, np.ndarray] | None:
    """The same for the strays a score partition owns, from their origin partitions' prefix files
    (one partition's file at a time; only origins with strays in this round's window)."""
    if job.round == 0 or not job.rules:
        return None
    origin, qids = st.column("origin").to_numpy(), st.column("query_id").to_numpy()
    out = {n: np.zeros(len(qids), np.int64) for n in names}
    lo, hi = job.window(job.round)
    gi = st.column("gi").to_numpy()
    for o in np.unique(origin[(gi >= lo) & (gi < hi)]):
        at = np.flatnonzero(origin == o)
        for n, v in prefixes_of(layout, job.round, int(o), qids[at], names).items():
            out[n][at] = v
    return out


def check_prefixes(job: RerankJob, p: int, rt: pa.Table, pairs: dict[str, np.ndarray], scores: dict[str, np.ndarray],
                   seen: np.ndarray) -> None:
    """At commit: a fixed run scored every pair; an adaptive one exactly the pairs below each
    query's final prefix (``adaptive.prefix_lengths`` over all its scores), no more, no fewer."""
    from .adaptive import prefix_lengths
    if not job.rules:
        if not seen.all():
            raise RuntimeError(f"partition {p}: {int((~seen).sum())} pairs have no score in the score files")
        return
    g = score_matrix(rt, pairs, pairs["global_score"])
    for name, values in scores.items():
        length = prefix_lengths(job.rules[name], score_matrix(rt, pairs, values), g, job.candidates)
        want = pairs["gi"] < length[pairs["qi"]]
        if (want != ~np.isnan(values)).any():
            raise RuntimeError(f"partition {p}: reranker {name} scored {int((~np.isnan(values)).sum())} pairs where "
                               f"its rule asks for {int(want.sum())}")


def prefixes_of(layout: ResultsLayout, i: int, p: int, qids: np.ndarray, names: list[str]) -> dict[str, np.ndarray]:
    """Round ``i``'s prefix length per reranker of queries ``qids`` of score partition ``p``."""
    files = layout.prefixes(i)
    if not storage.exists(files.progress(p)):
        raise RuntimeError(f"partition {p} has no prefix lengths for round {i} (see {files.failure(p)})")
    t = storage.read_parquet(files.file(p))
    have = t.column("query_id").to_numpy()
    at = np.minimum(np.searchsorted(have, qids), max(0, len(have) - 1))
    if len(qids) and (not len(have) or (have[at] != qids).any()):
        raise RuntimeError(f"round {i} prefix file of partition {p} lacks queries of its score rows")
    return {n: t.column(f"prefix_{n}").to_numpy()[at].astype(np.int64) for n in names}


def gather_scores(layout: ResultsLayout, bounds: dict[str, Any], results: str, p: int, rt: pa.Table,
                  pairs: dict[str, np.ndarray], scorers: list[str], rounds) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Each pair's score per reranker (NaN: not scored) from the score files of ``rounds`` of the
    partitions owning its candidates (sorted by origin: only p's row groups are read), and which
    pairs have a score row. A pair with two score rows, or a row that is no pair of p, is an error."""
    from .route import owner_of, read_range
    n = len(pairs["qi"])
    out = {name: np.full(n, np.nan, np.float32) for name in scorers}
    seen = np.zeros(n, bool)
    if n == 0:
        return out, seen
    owners = np.unique(owner_of(pairs["row"], bounds)).tolist()
    ids = rt.column("query_id").to_numpy()
    sorter = np.argsort(ids, kind="stable")
    k = len(rt.column("candidate_id")[0])
    slot = np.full(rt.num_rows * k, -1, np.int64)
    slot[pairs["qi"] * k + pairs["gi"]] = np.arange(n)
    schema = scores_schema(scorers)
    for j in rounds:
        files = layout.round_scores(j)
        missing = [o for o in owners if not storage.exists(files.progress(o))]
        if missing:
            raise RuntimeError(f"score partition(s) {missing} scored no pairs in round {j} (see "
                               f"{files.failure(missing[0]).rsplit('/', 1)[0]}/); this partition's candidates in "
                               f"their rows have no score")
        tables = [read_range(files.file(o), "origin", p, p + 1, schema) for o in owners]
        sc = pa.concat_tables([t for t in tables if t.num_rows] or [schema.empty_table()])
        got_ids = sc.column("query_id").to_numpy()
        at = sorter[np.minimum(np.searchsorted(ids[sorter], got_ids), len(ids) - 1)]
        if len(got_ids) and not (ids[at] == got_ids).all():
            raise RuntimeError(f"partition {p}: round {j} score rows of queries outside it in partitions {owners}")
        take = slot[at * k + sc.column("gi").to_numpy()]
        if (take < 0).any() or seen[take].any() or len(np.unique(take)) != len(take):
            raise RuntimeError(f"partition {p}: round {j} score rows in partitions {owners} that are no pair of it, "
                               f"or a pair scored twice")
        seen[take] = True
        for name in scorers:
            out[name][take] = sc.column(f"score_{name}").to_numpy(zero_copy_only=False)
    return out, seen


def score_matrix(rt: pa.Table, pairs: dict[str, np.ndarray], values: np.ndarray) -> np.ndarray:
    """(queries, K) of per-pair ``values`` at their positions in the K lists; NaN where no pair is."""
    k = len(rt.column("candidate_id")[0]) if rt.num_rows else 0
    m = np.full((rt.num_rows, k), np.nan, np.float64)
    m[pairs["qi"], pairs["gi"]] = values
    return m
