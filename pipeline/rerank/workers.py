"""The Ray workers of the rerank job's four phases, one partition per call, each committed by a
marker written after its file; phases.py streams the partitions through them:

``SearchWorker`` (phase 1, search partition s; see route.py)::

    query parts of s ──► top-K from every index shard actor (merged exactly)
        ──► candidate ids -> database rows through the catalog (an object in Ray's store)
        ──► routes/search-SSSSS.parquet, sorted by the top-1 candidate's row

``SplitWorker`` (phase 2, search partition s; Ray tasks; strays.py)::

    route rows of s ──► pairs whose candidate lies in another score partition's rows
        ──► strays/search-SSSSS.parquet (with the query's tokens), sorted by the owning partition

``ScoreWorker`` (phase 3, score partition q)::

    route rows of q's bins from every search part ──► own pairs whose candidate is in q's rows
        + the strays q owns from every search part ──► pairs by candidate chunk ──► batches of
        ``batch_pairs`` ──► tokens read once per batch (chunk caches) ──► every reranker of the run
        scores the batch (PairScorer each) ──► scores/score-QQQQQ.parquet by origin + marker

``CommitWorker`` (phase 4, score partition p; Ray tasks)::

    route rows of p (no tokens) + their scores from the owning partitions' score files
        ──► reranked order per query and reranker ──► results part + progress marker

Memory per scorer actor: one partition's pairs (about ``partition_queries x K``), its queries'
tokens, one copy of the tokens of each distinct query among the strays it owns (at most its stray
pairs, about the stray fraction x ``partition_queries x K``, and in a city a few per query) and
the chunk cache; nothing proportional to the whole query set.
Batches are a deterministic function of the partition (its route rows and owned strays, fixed by
the bounds), so a rerun scores the same batches and gets bit-equal scores.
"""
from __future__ import annotations

import os
import time
import traceback
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .. import storage
from ..log import get_logger, redact
from ..spatial import positions_of
from ..timefmt import utc_now
from .partitions import RerankJob
from .rerankers import reranked_ranks
from .results import SCORES_ROW_GROUP, ResultsLayout, results_schema, scores_schema, write_part
from .rounds import check_prefixes, gather_scores, own_prefixes, round_pairs, score_matrix, stray_prefixes
from .score import PairScorer

log = get_logger(__name__)


# ---------------------------------------------------------------- every phase: attempts and failures
def locality_order(top1_rows: np.ndarray) -> np.ndarray:
    """Queries of a partition ordered by their global top-1 candidate's row (stable): neighbouring
    queries then share candidates, which lie in the same chunks. Queries without a candidate last."""
    key = np.where(top1_rows < 0, np.iinfo(np.int64).max, top1_rows)
    return np.argsort(key, kind="stable")


def pair_schedule(query_order_pos: np.ndarray, candidate_rows: np.ndarray, chunk_rows: int) -> np.ndarray:
    """The order pairs are scored in: by candidate chunk, then query (locality order), then row."""
    return np.lexsort((candidate_rows, query_order_pos, candidate_rows // max(1, chunk_rows)))


class PartitionWorker:
    """One phase's worker: ``{"partition": [n]}`` -> one summary row per partition, its work
    committed to storage by ``work(n)`` (which returns the row's counters). A subclass names its
    ``phase`` (its ``PartitionFiles`` in ``ResultsLayout``), the counters of a failed partition
    (``empty``) and, where its partitions are not score partitions, how to list a partition's
    queries (``_query_ids``).

    Tries of one partition are counted before each try (a try that kills the actor counts too),
    ``max_attempts`` per run, then a failure record (query ids, reason) and the job goes on."""

    kind = "part"
    phase = "parts"
    empty: dict[str, Any] = {}

    def __init__(self, job: RerankJob, catalog: list):
        import ray

        from .route import read_bounds
        self.job = job
        self.layout = ResultsLayout(job.results)
        self.files = self.layout.phase_files(self.phase, job.round)
        ctx = ray.get_runtime_context()
        self.node_id, self.pid = ctx.get_node_id(), os.getpid()
        self.catalog = ray.get(catalog[0])
        self.bounds = read_bounds(job.results)  # None in phase 1 (written after it)

    def work(self, p: int) -> dict[str, Any]:
        raise NotImplementedError

    def _query_ids(self, p: int) -> list[int]:
        """The queries of score partition ``p`` (phases 3 and 4; phases 1 and 2 number search
        partitions and say their own)."""
        from .route import partition_routes
        return partition_routes(self.job.results, self.bounds, p, ["query_id"]).column("query_id").to_pylist()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = []
        for p in batch["partition"]:
            t0 = time.perf_counter()
            status, reason, got = self.attempt(int(p))
            rows.append({"partition": int(p), "status": status, "reason": reason, "node_id": self.node_id,
                         "seconds": time.perf_counter() - t0, **(self.empty if got is None else got)})
            pa.default_memory_pool().release_unused()  # the partition's tables go back to the OS
        # Array values (a partition's candidate rows) become one object per row.
        return {k: (np.array([r[k] for r in rows], dtype=object) if isinstance(rows[0][k], np.ndarray)
                    else np.asarray([r[k] for r in rows])) for k in rows[0]}

    def attempt(self, p: int) -> tuple[str, str, Any]:
        attempts = max(1, int(self.job.max_attempts))
        reason, tb = "", ""
        while True:
            tried = self._count_attempt(p)
            if tried > attempts:
                reason = reason or f"{attempts} attempts of this run ended without a result (the worker died)"
                break
            try:
                return "done", "", self.work(p)
            except Exception as exc:  # recorded, the job goes on (bad input must not stop a city)
                reason, tb = redact(f"{type(exc).__name__}: {exc}"), redact(traceback.format_exc())
                log.warning("%s %d attempt %d/%d failed: %s", self.kind, p, tried, attempts, reason)
        self._record_failure(p, reason, tb)
        return "failed", reason, None

    def _count_attempt(self, p: int) -> int:
        url = self.files.attempts(p)
        rec = storage.read_json(url) if storage.exists(url) else {}
        n = int(rec.get("attempts", 0)) + 1 if rec.get("run") == self.job.run_id else 1
        storage.write_json(url, {"run": self.job.run_id, "attempts": n, "node_id": self.node_id, "pid": self.pid})
        return n

    def _record_failure(self, p: int, reason: str, tb: str) -> None:
        try:
            qids = self._query_ids(p)
        except Exception as exc:  # the inputs themselves are unreadable: say so
            qids, reason = [], f"{reason}; its queries are unreadable: {exc}"
        storage.write_json(self.files.failure(p), {self.kind: p, "query_ids": qids, "reason": reason,
                                                   "traceback": tb[-4000:]})


# ---------------------------------------------------------------- phase 1: search and route
class SearchWorker(PartitionWorker):
    """Search partition s -> its route part (route.py); an actor that calls the index shard actors."""

    kind = "search partition"
    phase = "routes"
    empty = {"queries": 0, "fetched_query_bytes": 0}

    def __init__(self, job: RerankJob, catalog: list, shard_actors: list):
        super().__init__(job, catalog)
        self.shard_actors = shard_actors
        self.query_manifest = storage.read_manifest(job.query_store)
        self.q_tokens = None
        if job.scorers:
            from .tokens import ChunkCache
            self.q_tokens = ChunkCache(job.query_store, 1)

    def _query_ids(self, s: int) -> list[int]:
        qt = self._query_table(s, ["image_id"])
        return [] if qt is None else qt.column("image_id").to_pylist()

    def _query_table(self, s: int, columns: list[str]) -> pa.Table | None:
        from .partitions import partition_shards
        layout = storage.StoreLayout(self.job.query_store)
        tables = []
        for shard in partition_shards(self.query_manifest, self.job.partition_queries, s):
            tables.append(storage.read_global_part(layout.global_part(shard), columns))  # old layouts: tag null
        tables = [t for t in tables if t.num_rows]
        return pa.concat_tables(tables, promote_options="default") if tables else None

    def _search(self, descriptors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        import ray

        from ..index.search import merge_topk, prepare_queries
        idx = self.job.index
        q = prepare_queries(descriptors, idx.dim, idx.normalize)
        k = min(self.job.candidates, idx.num_vectors)
        parts = ray.get([a.search.remote(q, k) for a in self.shard_actors])
        scores, ids = merge_topk(parts, k)
        return ids, scores

    def work(self, s: int) -> dict[str, int]:
        from .route import ROUTE_SCHEMA, route_bin, tokens_column, write_route

        qt = self._query_table(s, ["image_id", "path", "row", "utm_east", "utm_north", "global_descriptor", "tag"])
        if qt is None:
            write_route(self.job.results, s, ROUTE_SCHEMA.empty_table(),
                        {"node_id": self.node_id, "database_rows": self.job.database_rows})
            return dict(self.empty)
        ids, gscores = self._search(storage.descriptors_of(qt))
        cat = self.catalog
        pos = np.minimum(np.searchsorted(cat["image_id"], ids), len(cat["image_id"]) - 1)
        known = (ids >= 0) & (cat["image_id"][pos] == ids)
        first = np.where(known.any(axis=1), known.argmax(axis=1), -1)
        top1 = np.where(first >= 0, cat["row"][pos[np.arange(len(ids)), np.maximum(first, 0)]], -1)
        bins = route_bin(top1, self.job.database_rows)
        key = np.where(top1 < 0, np.iinfo(np.int64).max, top1)
        order = np.lexsort((key, bins))  # stable: ties keep query-store order
        qxy = positions_of(qt)
        k = ids.shape[1]
        tag = qt.column("tag") if "tag" in qt.column_names else pa.nulls(qt.num_rows, pa.string())
        fetched = 0
        tokens = None
        if self.q_tokens is not None:
            before = self.q_tokens.fetched_bytes
            tokens = self.q_tokens.read_rows_once(qt.column("row").to_numpy().astype(np.int64))
            fetched = self.q_tokens.fetched_bytes - before
        table = pa.table({
            "query_id": qt.column("image_id"), "query_path": qt.column("path"), "query_row": qt.column("row"),
            "query_utm_east": qxy[:, 0], "query_utm_north": qxy[:, 1], "query_tag": tag.cast(pa.string()),
            "top1_row": top1.astype(np.int64), "route_bin": bins,
            "candidate_id": pa.ListArray.from_arrays(np.arange(0, len(ids) * k + 1, k, dtype=np.int32),
                                                     pa.array(ids.astype(np.int64).ravel())),
            "global_score": pa.ListArray.from_arrays(np.arange(0, len(ids) * k + 1, k, dtype=np.int32),
                                                     pa.array(gscores.astype(np.float32).ravel())),
            "query_tokens": tokens_column(tokens, qt.num_rows),
        }, schema=ROUTE_SCHEMA).take(pa.array(order))
        write_route(self.job.results, s, table, {"node_id": self.node_id, "pid": self.pid,
                                                    "database_rows": self.job.database_rows,
                                                    "fetched_query_token_bytes": fetched})
        return {"queries": qt.num_rows, "fetched_query_bytes": fetched}


# ---------------------------------------------------------------- phase 2: split off the strays
class SplitWorker(PartitionWorker):
    """Search partition s -> its stray pairs (strays.py). Stateless apart from the catalog: run as
    Ray tasks (``split_batch``)."""

    kind = "stray split"
    phase = "strays"
    empty = {"stray_pairs": 0, "stray_bytes": 0}

    def _query_ids(self, s: int) -> list[int]:
        from .route import read_route_rows
        rt = read_route_rows(self.layout.routes.file(s), 0, self.bounds["bins"], ["query_id"])
        return rt.column("query_id").to_pylist()

    def work(self, s: int) -> dict[str, int]:
        from .strays import split_strays
        tokens = self.job.query_tokens  # shape and dtype of the query store's tokens
        got = split_strays(self.job.results, s, self.bounds, self.catalog, tokens.shape, np.dtype(tokens.dtype), {"node_id": self.node_id, "pid": self.pid})
        return {"stray_pairs": got["stray_pairs"], "stray_bytes": got["stray_query_token_bytes"]}


def split_batch(batch: dict[str, np.ndarray], job: RerankJob, catalog: list) -> dict[str, np.ndarray]:
    return SplitWorker(job, catalog)(batch)


# ---------------------------------------------------------------- phase 3: score one partition's rows
class ScoreWorker(PartitionWorker):
    """``{"partition": [q]}`` -> one summary row; the scores go to storage.

    Score partition q scores the pairs whose candidate lies in its stretch of database rows: its
    own queries' pairs there and the strays other partitions sent it (strays.py), in one pass in
    candidate-chunk order, and writes every score under the partition of its query (``origin``):
    ``scores/score-QQQQQ.parquet`` sorted by (origin, query, position), then its marker."""

    kind = "score partition"
    phase = "scores"
    empty = {"pairs": 0, "fetched_bytes": 0, "candidate_rows": np.zeros(0, np.int64), "started": 0.0,
             "finished": 0.0}

    def __init__(self, job: RerankJob, catalog: list):
        from .tokens import ChunkCache

        super().__init__(job, catalog)
        self.scorers: dict[str, PairScorer] = {}
        self.caches = (ChunkCache(job.query_store, job.cache_chunks),
                       ChunkCache(job.database_store, job.cache_chunks))
        for name in job.scorers:
            self.scorers[name] = PairScorer(name, job.backbone, job.checkpoint, job.query_store,
                                            job.database_store, job.ransac,
                                            threads=job.threads, rerank_dtype=job.rerank_dtype,
                                            caches=self.caches)

    def work(self, q: int) -> dict[str, Any]:
        from .route import TokenRows, candidate_pairs, owner_of, partition_routes
        from .strays import owned_strays, stray_query_tokens

        started = time.time()
        qc, cc = self.caches
        shape, dtype = qc.array.shape[1:], qc.array.dtype
        rt = partition_routes(self.job.results, self.bounds, q)
        pairs = candidate_pairs(rt, self.catalog)
        local = np.flatnonzero(owner_of(pairs["row"], self.bounds) == q)
        st = owned_strays(self.job.results, self.bounds["searched"], q)
        nq = rt.num_rows
        # Query tokens stay in the tables' buffers (route rows: own queries; strays: one copy per
        # distinct stray query); each batch gathers the rows it needs (float32), nothing else is copied.
        own = TokenRows(rt.column("query_tokens"), shape, dtype)
        stray, stray_at = stray_query_tokens(st, shape, dtype)
        # This round's pairs: positions in its window, below the query's prefix for some reranker.
        qids = rt.column("query_id").to_numpy()
        names = list(self.scorers)
        own_prefix = own_prefixes(self.layout, self.job, q, qids, names)
        own_active = round_pairs(self.job, names, pairs["gi"][local], None if own_prefix is None else
                                 {n: v[pairs["qi"][local]] for n, v in own_prefix.items()})
        st_active = round_pairs(self.job, names, st.column("gi").to_numpy(),
                                stray_prefixes(self.layout, self.job, st, names))
        keep_own = np.any(list(own_active.values()), axis=0) if own_active else np.zeros(len(local), bool)
        keep_st = np.flatnonzero(np.any(list(st_active.values()), axis=0) if st_active else np.zeros(st.num_rows, bool))
        local = local[keep_own]
        active = {n: np.r_[own_active[n][keep_own], st_active[n][keep_st]] for n in self.scorers}
        ns = len(keep_st)
        # Token locality: own queries by their top-1 candidate's row, then the strays (sorted by
        # candidate row already); pairs by candidate chunk.
        qpos = np.empty(nq, np.int64)
        qpos[locality_order(rt.column("top1_row").to_numpy())] = np.arange(nq)
        tok_idx = np.r_[pairs["qi"][local], nq + stray_at[keep_st]]
        rows = np.r_[pairs["row"][local], st.column("candidate_row").to_numpy()[keep_st]].astype(np.int64)
        sched = pair_schedule(np.r_[qpos[pairs["qi"][local]], nq + np.arange(ns)], rows, cc.chunk_rows)
        n = len(rows)
        before = cc.fetched_bytes
        scores = {name: np.full(n, np.nan, np.float32) for name in self.scorers}
        seconds = {name: 0.0 for name in self.scorers}
        step = max(1, int(self.job.batch_pairs))
        t_setup = time.time() - started
        t_tokens = 0.0
        for a in range(0, n, step):
            t = time.perf_counter()
            sel = sched[a:a + step]
            ti = tok_idx[sel]
            mine = ti < nq
            qtok = np.empty((len(sel),) + tuple(shape), np.float32)
            own.gather_into(qtok, np.flatnonzero(mine), ti[mine])
            stray.gather_into(qtok, np.flatnonzero(~mine), ti[~mine] - nq)
            ctok = cc.read(rows[sel])
            t_tokens += time.perf_counter() - t
            for name, scorer in self.scorers.items():
                on = active[name][sel]
                if not on.any():
                    continue
                t = time.perf_counter()
                if on.all():
                    scores[name][sel] = scorer.score(qtok, ctok)
                else:
                    scores[name][sel[on]] = scorer.score(qtok[on], ctok[on])
                seconds[name] += time.perf_counter() - t
        fetched = cc.fetched_bytes - before
        origin = np.r_[np.full(len(local), q, np.int32), st.column("origin").to_numpy()[keep_st]].astype(np.int32)
        qid = np.r_[qids[pairs["qi"][local]], st.column("query_id").to_numpy()[keep_st]]
        gi = np.r_[pairs["gi"][local], st.column("gi").to_numpy()[keep_st]].astype(np.int32)
        order = np.lexsort((gi, qid, origin))
        schema = scores_schema(list(self.scorers))
        table = pa.table({"origin": origin, "query_id": qid.astype(np.int64), "gi": gi,
                          **{f"score_{name}": pa.array(v, pa.float32(), mask=np.isnan(v))
                             for name, v in scores.items()}}, schema=schema).take(pa.array(order))
        files = self.files
        fs, path = storage.filesystem(files.file(q))
        storage.makedirs(fs, path.rsplit("/", 1)[0])
        with fs.open(path, "wb") as f:
            pq.write_table(table, f, row_group_size=SCORES_ROW_GROUP)
        distinct = np.unique(rows)
        finished = time.time()
        storage.write_json(files.progress(q), {
            "score_partition": q, "round": self.job.round, "queries": nq, "pairs": n, "own_pairs": int(len(local)),
            "stray_pairs": ns, "stray_queries": int(len(stray)),
            "pairs_scored": {name: int(v.sum()) for name, v in active.items()},
            "fetched_token_bytes": fetched, "distinct_candidates": int(len(distinct)), "rerank_seconds": seconds,
            "setup_seconds": t_setup, "token_seconds": t_tokens,
            "started": started, "finished": finished,
            "node_id": self.node_id, "pid": self.pid, "finished_at": utc_now()})
        return {"pairs": n, "fetched_bytes": fetched, "candidate_rows": distinct, "started": started,
                "finished": finished}


class PrefixWorker(PartitionWorker):
    """Before round i of an adaptive run, score partition p: each query's prefix length per
    reranker (``adaptive.prefix_lengths`` over the scores of rounds < i) ─►
    ``rounds/round-i/prefix-PPPPP.parquet`` (query id, ``prefix_<n>``; sorted by query id), then
    its marker. Ray tasks (``prefix_batch``)."""

    kind = "prefix partition"
    phase = "prefixes"
    empty = {"queries": 0}

    def work(self, p: int) -> dict[str, int]:
        from .adaptive import prefix_lengths
        from .route import candidate_pairs, partition_routes

        i, k = self.job.round, self.job.candidates
        rt = partition_routes(self.job.results, self.bounds, p, ["query_id", "candidate_id", "global_score"])
        pairs = candidate_pairs(rt, self.catalog)
        scorers = list(self.job.scorers)
        scores, _ = gather_scores(self.layout, self.bounds, self.job.results, p, rt, pairs, scorers, range(i))
        known = self.job.window(i)[0]
        g = score_matrix(rt, pairs, pairs["global_score"])
        cols = {"query_id": rt.column("query_id").to_numpy().astype(np.int64)}
        for name in scorers:
            cols[f"prefix_{name}"] = prefix_lengths(self.job.rules[name], score_matrix(rt, pairs, scores[name]), g,
                                                    k, known=known).astype(np.int32)
        table = pa.table(cols)
        table = table.take(pa.array(np.argsort(cols["query_id"], kind="stable")))
        storage.write_parquet(self.files.file(p), table)
        storage.write_json(self.files.progress(p), {
            "prefix_partition": p, "round": i, "queries": rt.num_rows,
            "continuing": {n: int((cols[f"prefix_{n}"] > known).sum()) for n in scorers},
            "node_id": self.node_id, "pid": self.pid})
        return {"queries": rt.num_rows}


def prefix_batch(batch: dict[str, np.ndarray], job: RerankJob, catalog: list) -> dict[str, np.ndarray]:
    return PrefixWorker(job, catalog)(batch)


# ---------------------------------------------------------------- phase 4: commit one results part
class CommitWorker(PartitionWorker):
    """``{"partition": [p]}`` -> one summary row; partition p's results part goes to storage.
    Stateless apart from the catalog: run as Ray tasks (``commit_batch``).

    The part holds p's queries and their K candidates (route rows, without tokens), with the
    scores of every reranker gathered from the score files of the partitions that own them
    (sorted by origin, so only p's row groups are read). Every pair must have exactly one score."""

    kind = "partition"
    phase = "parts"
    empty = {"pairs": 0, "queries": 0}

    def _gather(self, p: int, rt: pa.Table, pairs: dict[str, np.ndarray], scorers: list[str]) -> dict[str, np.ndarray]:
        """Each pair's score per reranker (NaN where the run did not score it), from every round's
        score files of the partitions owning its candidates. A fixed run scores every pair once; an
        adaptive one exactly the pairs below the query's final prefix (``adaptive.prefix_lengths``
        over all its scores), no more, no fewer."""
        scores, seen = gather_scores(self.layout, self.bounds, self.job.results, p, rt, pairs, scorers,
                                     range(len(self.job.rounds)))
        check_prefixes(self.job, p, rt, pairs, scores, seen)
        return scores

    def work(self, p: int) -> dict[str, int]:
        from .route import ROUTE_SCHEMA, candidate_pairs, partition_routes

        names = self.job.rerankers
        schema = results_schema(names)
        columns = [f for f in ROUTE_SCHEMA.names if f != "query_tokens"]
        rt = partition_routes(self.job.results, self.bounds, p, columns)
        pairs = candidate_pairs(rt, self.catalog)
        nq, n = rt.num_rows, len(pairs["qi"])
        if n == 0:
            write_part(self.job.results, p, schema.empty_table(), self._marker(nq, 0))
            return {"pairs": 0, "queries": nq}
        qi, cand, global_rank, gs = pairs["qi"], pairs["cand"], pairs["global_rank"], pairs["global_score"]
        scorers = list(self.job.scorers)
        scores = self._gather(p, rt, pairs, scorers) if scorers else {}
        if "none" in names:
            scores["none"] = gs
        ranks = {name: reranked_ranks(qi, scores[name], global_rank) for name in names}
        first = names[0]
        order = np.lexsort((ranks[first], qi))  # rows in (query, first reranker's rank) order
        cat = self.catalog
        cols = {
            "query_id": rt.column("query_id").to_numpy()[qi],
            "query_path": rt.column("query_path").take(pa.array(qi)),
            "rank": ranks[first], "global_rank": global_rank,
            "image_id": cat["image_id"][cand],
            "candidate_path": pa.array(cat["path"][cand].astype(str), pa.string()),
            "global_score": gs, "rerank_score": scores[first].astype(np.float32),
            "query_utm_east": rt.column("query_utm_east").to_numpy(zero_copy_only=False)[qi],
            "query_utm_north": rt.column("query_utm_north").to_numpy(zero_copy_only=False)[qi],
            "candidate_utm_east": cat["east"][cand], "candidate_utm_north": cat["north"][cand],
            "query_tag": rt.column("query_tag").take(pa.array(qi)),
        }
        for name in names:
            cols[f"rank_{name}"] = ranks[name]
            cols[f"rerank_score_{name}"] = _nullable(scores[name])
        cols["rerank_score"] = _nullable(scores[first])
        table = pa.table(cols, schema=schema).take(pa.array(order))
        scored = {name: int((~np.isnan(scores[name])).sum()) for name in scorers}
        write_part(self.job.results, p, table, self._marker(nq, n, scored))
        return {"pairs": n, "queries": nq}

    def _marker(self, queries: int, pairs: int, scored: dict[str, int] | None = None) -> dict[str, Any]:
        # Token bytes and scoring seconds are the score partitions' (scores/progress/).
        return {"queries": queries, "pairs": pairs, "pairs_scored": scored or {}, "node_id": self.node_id,
                "pid": self.pid, "finished_at": utc_now()}


def _nullable(values: np.ndarray) -> pa.Array:
    """Scores as float32, null where the pair was not scored (NaN)."""
    v = np.asarray(values, np.float32)
    return pa.array(v, pa.float32(), mask=np.isnan(v))


def commit_batch(batch: dict[str, np.ndarray], job: RerankJob, catalog: list) -> dict[str, np.ndarray]:
    return CommitWorker(job, catalog)(batch)
