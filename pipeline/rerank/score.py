"""Scoring pairs: ``PairScorer`` turns (query tokens, candidate tokens) batches into one score
per pair with the model (``r2former``), RANSAC (``ransac``) or a benchmark stand-in, built once
per worker (workers.py) or by a benchmark.

The model is placed through ``pipeline.device.place_model`` and inputs go to the device of its
own parameters; ``rerank_dtype`` ``bfloat16`` is opt-in (top-5 choices are sensitive to it).
"""
from __future__ import annotations

import numpy as np

from ..ransac import RansacConfig
from .tokens import ChunkCache


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
                 cache_chunks: int = 256, caches: tuple[ChunkCache, ChunkCache] | None = None):
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
            # Several scorers of one worker share the caches: tokens are read once per batch.
            self.q_tokens, self.c_tokens = caches or (ChunkCache(query_store, cache_chunks),
                                                      ChunkCache(database_store, cache_chunks))
        if reranker == "r2former":
            from ..device import choose_device, place_model
            from ..weights import build_model

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
