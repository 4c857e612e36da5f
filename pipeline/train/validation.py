"""Validation during training: Recall@N of the global descriptor over validation images, and of
the reranker over the global top candidates of validation stores.

Counting goes through ``pipeline.metrics`` (fractions) and ``pipeline.spatial.geo_within`` (a
result is right within ``radius``); the figures these functions return, and the run's
``val_recall@N`` metrics, are in percent, as the training logs and docs report them. A query
without a right image among the database counts as a miss here (the training splits are built so
that every query has one).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from .. import storage
from ..metrics import RecallCounter
from ..metrics import recall_at as recall_fractions
from .data import ImageSource, allgather_rows, dataset_positions, describe_rows

if TYPE_CHECKING:
    from .config import TrainConfig

RECALL_KS = (1, 5, 10, 20)


def _percent(recalls: dict[str, float | None]) -> dict[str, float]:
    """Fractions as reported during training: percent, NaN where no query was counted."""
    return {k: float("nan") if v is None else 100.0 * v for k, v in recalls.items()}


def global_recall_at(query_desc: np.ndarray, db_desc: np.ndarray, query_pos: np.ndarray, db_pos: np.ndarray,
                     radius: float, ks=RECALL_KS, block: int = 4096) -> dict[str, float]:
    """Recall@k in percent: a query is found at k when one of its k nearest descriptors lies within
    ``radius`` of it. FAISS top-``max(ks)`` search (exact, GPU where present) in query blocks:
    memory is the index (database x D float32) plus block x k, never queries x database."""
    from ..spatial import geo_within

    counter = RecallCounter(ks)
    q = np.ascontiguousarray(query_desc, dtype=np.float32)
    k = min(max(ks), len(db_desc))
    if len(q) and k:
        index = _flat_index(db_desc)
        for s in range(0, len(q), block):
            _, rows = index.search(q[s:s + block], k)
            hit = geo_within(query_pos[s:s + block], db_pos[np.maximum(rows, 0)], radius) & (rows >= 0)
            counter.add(hit, np.ones(len(hit), bool))
    return _percent(counter.recalls())


def _flat_index(db_desc: np.ndarray):
    """Exact L2 FAISS index of ``db_desc`` (on the GPU where present)."""
    import faiss

    from ..index.choose import to_device

    db = np.ascontiguousarray(db_desc, dtype=np.float32)
    index = faiss.IndexFlatL2(db.shape[1])
    index.add(db)
    return to_device(index)


def nearest_rows(query_desc: np.ndarray, db_desc: np.ndarray, k: int, block: int = 4096) -> np.ndarray:
    """(Q, k) database rows nearest each query (exact FAISS search in query blocks; memory: the
    index plus block x k)."""
    index = _flat_index(db_desc)
    q = np.ascontiguousarray(query_desc, dtype=np.float32)
    return np.concatenate([index.search(q[s:s + block], k)[1] for s in range(0, len(q), block)]) \
        if len(q) else np.zeros((0, k), np.int64)


def rerank_recall_at(logits_of, queries_store: str, database_store: str, radius: float, candidates: int = 20, *,
                     rank: int = 0, world: int = 1, query_batch: int = 8, device="cpu",
                     ks=RECALL_KS) -> dict[str, float]:
    """Recall@k in percent after reranking each query's global top ``candidates`` by
    ``logits_of(query_tokens (P, T, 131), candidate_tokens (P, T, 131)) -> (P, 2)`` (match score
    ``softmax[:, 1]``). Rank ``rank`` of ``world`` scores queries ``rank::world``; the orders are
    all-gathered, so every rank returns the same figures.

    Dataflow::

        validation stores' global tables (row, UTM, global_descriptor)
            ──► FAISS top-``candidates`` of every query (``nearest_rows``, exact, in query blocks)
        this rank's queries, ``query_batch`` at a time:
            Zarr read of the batch's query tokens and its candidates' tokens (each distinct row once)
            ──► logits_of ──► the batch's candidates reordered by score
        all-gather of the (queries, candidates) orders ──► positions of the reordered lists ──► recall@k

    Memory per process: the two global tables and the FAISS index (N x D float32), the
    (Q, candidates) rows, and ONE batch of token pairs, query_batch x candidates x 2 x T x 131
    float32 (about 84 MB at 8 queries, 20 candidates and T = 500; the reranker's activations
    besides): never the stores' tokens, so it does not grow with the validation database."""
    import torch

    from ..spatial import geo_within

    cols = ["row", "utm_east", "utm_north", "global_descriptor"]
    q = storage.read_global_table(queries_store, cols)
    db = storage.read_global_table(database_store, cols)
    q_pos, db_pos = dataset_positions(q), dataset_positions(db)
    k = min(candidates, db.num_rows)
    cand = nearest_rows(storage.descriptors_of(q), storage.descriptors_of(db), k)
    q_zarr, db_zarr = q.column("row").to_numpy().astype(np.int64), db.column("row").to_numpy().astype(np.int64)
    del q, db   # only rows and positions are needed from here on
    q_tokens, db_tokens = storage.open_local_tokens(queries_store), storage.open_local_tokens(database_store)
    mine = np.arange(len(cand))[rank::world]
    order = np.empty((len(mine), k), np.int64)
    with torch.no_grad():
        for s in range(0, len(mine), query_batch):
            qi = mine[s:s + query_batch]
            c = cand[qi]                                    # (b, k) database table rows
            qt = torch.from_numpy(storage.read_local_tokens(queries_store, q_zarr[qi], q_tokens))
            ct = torch.from_numpy(storage.read_local_tokens(database_store, db_zarr[c.reshape(-1)], db_tokens))
            qt = qt.to(device).repeat_interleave(k, dim=0)  # pair p = (query p // k, its candidate p % k)
            score = logits_of(qt, ct.to(device)).float().softmax(1)[:, 1].cpu().numpy().reshape(len(qi), k)
            order[s:s + len(qi)] = np.take_along_axis(c, np.argsort(-score, axis=1, kind="stable"), 1)
    gathered = allgather_rows({rank: np.column_stack([mine, order])}, world)
    merged = np.concatenate([gathered[r] for r in sorted(gathered)])
    reranked = np.empty((len(cand), k), np.int64)
    reranked[merged[:, 0]] = merged[:, 1:]
    ns = [n for n in ks if n <= k]
    if not len(reranked) or not k:
        return {f"recall@{n}": float("nan") for n in ns}
    return _percent(recall_fractions(geo_within(q_pos, db_pos[reranked], radius), ns=ns))


def _triplet_loss(q, p, n, margin: float):
    """Mean over triplets and negatives of max(0, |q-p| - |q-n| + margin): the official loss's
    triplet part for a (B, K) batch, as a held-out measure (training uses ``step.losses``)."""
    import torch.nn.functional as F

    B, K, D = n.shape
    return F.triplet_margin_loss(q.unsqueeze(1).expand(-1, K, -1).reshape(-1, D),
                                 p.unsqueeze(1).expand(-1, K, -1).reshape(-1, D), n.reshape(-1, D), margin=margin)


class _Step:
    """``_Step.module(model, adapter)``: the model as one module with a mode argument
    (``pipeline.model.training.StepModule``), for validation and benchmarks."""

    @staticmethod
    def module(model, adapter=None):
        from ..model.training import StepModule

        return StepModule(model, adapter)


# ---------------------------------------------------------------- the validation of each kind of training data
class ImageValidation:
    """Recall of the global descriptor over the validation images (``val.queries``, ``val.database``)."""

    @staticmethod
    def configured(cfg: TrainConfig) -> bool:
        return bool(cfg.val.queries and cfg.val.database)

    def __init__(self, cfg: TrainConfig, rank: int, world: int, device):
        from ..datasets import load_dataset

        self.cfg, self.rank, self.world, self.device = cfg, rank, world, device
        q, db = load_dataset(cfg.val.queries), load_dataset(cfg.val.database)
        self.q_src, self.db_src = ImageSource(q, cfg.image_size), ImageSource(db, cfg.image_size)
        self.q_pos, self.db_pos = dataset_positions(q), dataset_positions(db)

    def __call__(self, model, adapter) -> dict[str, float]:
        qd = describe_rows(model, self.q_src, np.arange(len(self.q_src.paths)), self.rank, self.world, self.device)
        dd = describe_rows(model, self.db_src, np.arange(len(self.db_src.paths)), self.rank, self.world, self.device)
        return global_recall_at(qd, dd, self.q_pos, self.db_pos, self.cfg.val_radius)


class RerankValidation:
    """Recall after reranking the global top ``val_candidates`` of the validation stores with the
    current reranker (``rerank_recall_at``: tokens streamed per query batch)."""

    @staticmethod
    def configured(cfg: TrainConfig) -> bool:
        return bool(cfg.val.queries_store and cfg.val.database_store)

    def __init__(self, cfg: TrainConfig, rank: int, world: int, device):
        self.cfg, self.rank, self.world, self.device = cfg, rank, world, device

    def __call__(self, model, adapter) -> dict[str, float]:
        cfg = self.cfg
        module = _Step.module(model, adapter)
        module.eval()
        return rerank_recall_at(lambda q, c: module("rerank_tokens", q, c), cfg.val.queries_store,
                                cfg.val.database_store, cfg.val_radius, cfg.val_candidates,
                                rank=self.rank, world=self.world, device=self.device)
