"""Scoring: the pair scorer (model, RANSAC or a cheap stand-in) and the Ray Data worker that turns
one partition of queries into one committed results part.

One call of ``PartitionWorker`` handles one partition, start to end, on one actor::

    query parts of the partition ──► top-K from every index shard actor (merged exactly)
        ──► candidate ids -> database rows through the catalog (an object in Ray's store)
        ──► pairs, queries ordered by their global top-1 candidate's row, pairs by candidate chunk
        ──► batches of ``batch_pairs`` pairs ──► PairScorer (tokens through the chunk cache)
        ──► reranked order per query ──► results part + progress marker (pipeline.rerank.results)

Memory per actor: one partition's pairs (``partition_queries x K``) plus the chunk cache; nothing
proportional to the whole query set. The batches are a deterministic function of the partition
(its queries, the pinned index, K), so a rerun scores the same batches and gets bit-equal scores.
"""
from __future__ import annotations

import os
import time
import traceback
from typing import Any

import numpy as np
import pyarrow as pa

from .. import storage
from ..log import get_logger
from ..ransac import RansacConfig
from .results import RESULTS_SCHEMA, ResultsLayout, write_part
from .tokens import ChunkCache

log = get_logger(__name__)

# A stand-in scorer for benchmarks: it reads the real tokens (the cost this job is about) but
# costs almost no compute. Not a reranker anyone should evaluate.
BENCH_SCORERS = ("token-similarity",)


def token_similarity_scores(q: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Mean over query tokens of the best cosine similarity among candidate tokens' features."""
    qf = q[:, :, 3:] / np.maximum(np.linalg.norm(q[:, :, 3:], axis=2, keepdims=True), 1e-6)
    cf = c[:, :, 3:] / np.maximum(np.linalg.norm(c[:, :, 3:], axis=2, keepdims=True), 1e-6)
    sim = np.einsum("ptd,psd->pts", qf, cf, optimize=True)
    return sim.max(axis=2).mean(axis=1).astype(np.float32)


class PairScorer:
    """One model (or RANSAC) per actor, built once; scores batches of (query_row, candidate_row).

    The model is placed through ``pipeline.device.place_model`` and inputs go to the device of the
    model's own parameters, so the two cannot disagree (a GPU actor runs the model on the GPU)."""

    def __init__(self, reranker: str, backbone: str, checkpoint: str | None, query_store: str,
                 database_store: str, ransac: RansacConfig, threads: int = 1, rerank_dtype: str = "float32",
                 cache_chunks: int = 256):
        import cv2

        from ..device import set_cpu_threads

        set_cpu_threads(threads)
        cv2.setNumThreads(max(1, threads))
        self.reranker, self.ransac, self.rerank_dtype = reranker, ransac, rerank_dtype
        if rerank_dtype not in ("float32", "bfloat16"):
            raise ValueError(f"rerank_dtype must be float32 or bfloat16, got {rerank_dtype!r}")
        self.query_store, self.database_store = query_store, database_store
        self.model = None
        if reranker != "none":
            self.q_tokens = ChunkCache(query_store, cache_chunks)
            self.c_tokens = ChunkCache(database_store, cache_chunks)
        if reranker == "r2former":
            from ..device import choose_device, place_model
            from ..model import build_model

            self.plan = choose_device()
            self.model = place_model(build_model(backbone, checkpoint), self.plan).eval()

    @property
    def input_device(self):
        """Where inputs go: the device of the model's parameters (never a separately kept plan)."""
        return next(self.model.parameters()).device

    def score(self, q: np.ndarray, c: np.ndarray) -> np.ndarray:
        if self.reranker == "ransac":
            from ..ransac import ransac_scores
            return ransac_scores(q, c, self.ransac)
        if self.reranker == "token-similarity":
            return token_similarity_scores(q, c)
        import contextlib
        import inspect

        import torch
        dev = self.input_device
        # float32 unless asked: top-5 choices are sensitive to reduced precision. A model whose
        # rerank_logits takes ``dtype`` runs bf16 itself; otherwise bf16 autocast, only when asked.
        kwargs, ctx = {}, contextlib.nullcontext()
        if self.rerank_dtype == "bfloat16":
            if "dtype" in inspect.signature(self.model.rerank_logits).parameters:
                kwargs["dtype"] = torch.bfloat16
            else:
                ctx = torch.autocast(device_type=dev.type, dtype=torch.bfloat16)
        with torch.inference_mode(), ctx:
            logits = self.model.rerank_logits(torch.from_numpy(q).to(dev), torch.from_numpy(c).to(dev), **kwargs)
        return torch.softmax(logits.float(), dim=1)[:, 1].cpu().numpy().astype(np.float32)

    def read(self, query_rows: np.ndarray, candidate_rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.q_tokens.read(query_rows), self.c_tokens.read(candidate_rows)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        q, c = self.read(batch["query_row"], batch["candidate_row"])
        return {"pair": batch["pair"], "rerank_score": self.score(q, c)}


# ---------------------------------------------------------------- the catalog of database rows
def build_catalog(state_meta: dict[str, Any], database_store: str) -> dict[str, np.ndarray]:
    """Database image id -> (Zarr row, path, position), sorted by id, as plain numpy arrays (paths as
    fixed-width bytes) so every worker on a node maps the one copy in Ray's object store.
    Memory: O(database), never in the driver (built by a Ray task)."""
    from ..published import from_metadata

    state = from_metadata(state_meta, store=database_store)
    t = state.read_global_table(["image_id", "path", "utm_east", "utm_north", "row"])
    if t.num_rows == 0:
        raise ValueError(f"database store {database_store} holds no images")
    ids = t.column("image_id").to_numpy().astype(np.int64)
    order = np.argsort(ids, kind="stable")
    ids = ids[order]
    if len(ids) > 1 and (np.diff(ids) == 0).any():
        raise ValueError(f"database store {database_store} lists an image_id twice")
    from ..evaluate import positions_of
    xy = positions_of(t)[order]
    paths = np.asarray(t.column("path").to_pylist(), dtype=object)[order].astype("S")
    return {"image_id": ids, "row": t.column("row").to_numpy().astype(np.int64)[order],
            "east": np.ascontiguousarray(xy[:, 0]), "north": np.ascontiguousarray(xy[:, 1]), "path": paths}


# ---------------------------------------------------------------- one partition, start to end
def locality_order(top1_rows: np.ndarray) -> np.ndarray:
    """Queries of a partition ordered by their global top-1 candidate's row (stable): neighbouring
    queries then share candidates, which lie in the same chunks. Queries without a candidate last."""
    key = np.where(top1_rows < 0, np.iinfo(np.int64).max, top1_rows)
    return np.argsort(key, kind="stable")


def pair_schedule(query_order_pos: np.ndarray, candidate_rows: np.ndarray, chunk_rows: int) -> np.ndarray:
    """The order pairs are scored in: by candidate chunk, then query (locality order), then row."""
    return np.lexsort((candidate_rows, query_order_pos, candidate_rows // max(1, chunk_rows)))


class PartitionWorker:
    """The Ray Data UDF: ``{"partition": [p]}`` -> one summary row; the part itself goes to storage."""

    def __init__(self, job: dict[str, Any], catalog: list, shard_actors: list):
        import ray

        self.job = job
        self.catalog = ray.get(catalog[0])
        self.shard_actors = shard_actors
        self.layout = ResultsLayout(job["results"])
        self.query_manifest = storage.read_manifest(job["query_store"])
        self.scorer = None
        if job["reranker"] != "none":
            self.scorer = PairScorer(job["reranker"], job["backbone"], job["checkpoint"], job["query_store"],
                                     job["database_store"], RansacConfig(**job["ransac"]), threads=job["threads"],
                                     rerank_dtype=job["rerank_dtype"], cache_chunks=job["cache_chunks"])
        ctx = ray.get_runtime_context()
        self.node_id, self.pid = ctx.get_node_id(), os.getpid()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out: dict[str, list] = {k: [] for k in ("partition", "status", "pairs", "queries", "fetched_bytes",
                                                  "candidate_rows", "node_id", "seconds", "reason")}
        for p in batch["partition"]:
            p = int(p)
            t0 = time.perf_counter()
            attempts = max(1, int(self.job["max_attempts"]))
            status, reason, last_tb = "failed", "", ""
            pairs, queries, fetched, cand_rows = 0, 0, 0, np.zeros(0, np.int64)
            while True:
                tried = self._count_attempt(p)  # before the try: a try that kills this actor counts too
                if tried > attempts:
                    reason = reason or f"{attempts} attempts of this run ended without a result (the scorer died)"
                    break
                try:
                    pairs, queries, fetched, cand_rows = self.run_partition(p)
                    status = "done"
                    break
                except Exception as exc:  # recorded, the job goes on (bad input must not stop a city)
                    reason = f"{type(exc).__name__}: {exc}"
                    last_tb = traceback.format_exc()
                    log.warning("partition %d attempt %d/%d failed: %s", p, tried, attempts, reason)
            if status == "failed":
                self._record_failure(p, reason, last_tb)
            for k, v in (("partition", p), ("status", status), ("pairs", pairs), ("queries", queries),
                         ("fetched_bytes", fetched), ("candidate_rows", cand_rows), ("node_id", self.node_id),
                         ("seconds", time.perf_counter() - t0), ("reason", reason)):
                out[k].append(v)
        return {k: (np.array(v, dtype=object) if k == "candidate_rows" else np.asarray(v)) for k, v in out.items()}

    # -- the steps
    def _query_table(self, p: int) -> pa.Table:
        from .partitions import partition_shards
        layout = storage.StoreLayout(self.job["query_store"])
        tables = [storage.read_parquet(layout.global_part(s), ["image_id", "path", "row", "utm_east", "utm_north",
                                                               "global_descriptor"])
                  for s in partition_shards(self.query_manifest, self.job["partition_queries"], p)]
        tables = [t for t in tables if t.num_rows]
        return pa.concat_tables(tables) if tables else None

    def _search(self, descriptors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        import ray

        from ..index.search import merge_topk, prepare_queries
        idx = self.job["index"]
        q = prepare_queries(descriptors, idx["dim"], idx["normalize"])
        k = min(self.job["candidates"], idx["num_vectors"])
        parts = ray.get([a.search.remote(q, k) for a in self.shard_actors])
        scores, ids = merge_topk(parts, k)
        return ids, scores

    def run_partition(self, p: int):
        qt = self._query_table(p)
        if qt is None:
            write_part(self.job["results"], p, RESULTS_SCHEMA.empty_table(), self._marker(0, 0, 0))
            return 0, 0, 0, np.zeros(0, np.int64)
        ids, gscores = self._search(storage.descriptors_of(qt))
        cat = self.catalog
        pos = np.searchsorted(cat["image_id"], ids)
        pos = np.minimum(pos, len(cat["image_id"]) - 1)
        known = (ids >= 0) & (cat["image_id"][pos] == ids)  # -1 and unknown ids are dropped
        qi, gi = np.nonzero(known)  # row-major: by query, in global rank order
        cand = pos[qi, gi]
        global_rank = ((np.cumsum(known, axis=1) - 1)[qi, gi] + 1).astype(np.int32)
        cand_rows = cat["row"][cand]
        n = len(qi)

        gs = gscores[qi, gi].astype(np.float32)
        fetched_before = self._fetched()
        if self.scorer is None:
            scores = gs
        else:
            # Token locality: queries by their top-1 candidate's row, pairs by candidate chunk.
            top1 = np.full(qt.num_rows, -1, np.int64)
            first = np.r_[True, qi[1:] != qi[:-1]] if n else np.zeros(0, bool)
            top1[qi[first]] = cand_rows[first]
            qpos = np.empty(qt.num_rows, np.int64)
            qpos[locality_order(top1)] = np.arange(qt.num_rows)
            sched = pair_schedule(qpos[qi], cand_rows, self.scorer.c_tokens.chunk_rows)
            q_rows = qt.column("row").to_numpy().astype(np.int64)[qi]
            scores = np.empty(n, np.float32)
            step = max(1, int(self.job["batch_pairs"]))
            for s in range(0, n, step):
                sel = sched[s:s + step]
                qtok, ctok = self.scorer.read(q_rows[sel], cand_rows[sel])
                scores[sel] = self.scorer.score(qtok, ctok)
        fetched = self._fetched() - fetched_before

        # reranked rank within each query: (query, -score, global rank)
        order = np.lexsort((global_rank, -scores.astype(np.float64), qi))
        rank = np.empty(n, np.int32)
        if n:
            starts = np.r_[0, np.flatnonzero(np.diff(qi[order])) + 1]
            counts = np.diff(np.r_[starts, n])
            rank[order] = np.arange(n) - np.repeat(starts, counts) + 1
        from ..evaluate import positions_of
        qxy = positions_of(qt)
        table = pa.table({
            "query_id": qt.column("image_id").to_numpy()[qi],
            "query_path": qt.column("path").take(pa.array(qi)),
            "rank": rank, "global_rank": global_rank,
            "image_id": cat["image_id"][cand],
            "candidate_path": pa.array(cat["path"][cand].astype(str), pa.string()),
            "global_score": gs, "rerank_score": scores.astype(np.float32),
            "query_utm_east": qxy[qi, 0], "query_utm_north": qxy[qi, 1],
            "candidate_utm_east": cat["east"][cand], "candidate_utm_north": cat["north"][cand],
        }, schema=RESULTS_SCHEMA).take(pa.array(order))  # rows in (query, reranked rank) order
        distinct = np.unique(cand_rows) if self.scorer is not None else np.zeros(0, np.int64)
        write_part(self.job["results"], p, table, self._marker(qt.num_rows, n, fetched, len(distinct)))
        return n, qt.num_rows, fetched, distinct

    def _fetched(self) -> int:
        return self.scorer.c_tokens.fetched_bytes if self.scorer is not None else 0

    def _marker(self, queries: int, pairs: int, fetched: int, distinct: int = 0) -> dict[str, Any]:
        return {"queries": queries, "pairs": pairs, "fetched_token_bytes": fetched,
                "distinct_candidates": distinct, "node_id": self.node_id, "pid": self.pid,
                "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}

    def _count_attempt(self, p: int) -> int:
        url = self.layout.attempts(p)
        rec = storage.read_json(url) if storage.exists(url) else {}
        n = int(rec.get("attempts", 0)) + 1 if rec.get("run") == self.job["run_id"] else 1
        storage.write_json(url, {"run": self.job["run_id"], "attempts": n, "node_id": self.node_id, "pid": self.pid})
        return n

    def _record_failure(self, p: int, reason: str, tb: str) -> None:
        try:
            qt = self._query_table(p)
            qids = [] if qt is None else qt.column("image_id").to_pylist()
        except Exception as exc:  # the query parts themselves are unreadable: say so
            qids, reason = [], f"{reason}; query parts unreadable: {exc}"
        storage.write_json(self.layout.failure(p), {"partition": p, "query_ids": qids, "reason": reason,
                                                    "traceback": tb[-4000:]})
