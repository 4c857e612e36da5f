"""The states the service answers from, and the follower that switches between them.

``ServingState`` is one published state (``pipeline.index.published``) opened for answering: its
index version searched in this process, its catalog (id -> Zarr row, path, position;
``pipeline.rerank.catalog``), its database tokens read through the rerank stage's chunk cache,
one ``PairScorer`` per reranker asked for, and a lease that keeps garbage collection off its
files for as long as the service may answer from it::

    query (global descriptor, tokens as stored: float16)
      ──► top-K on the pinned version (ShardedSearcher, shards merged exactly as the batch job)
      ──► candidate ids -> catalog rows ──► tokens (ChunkCache) ──► PairScorer.score
      ──► reranked_order (rerank score, ties in global order) ──► the answer

``StateFollower`` polls ``CURRENT`` every ``poll_s``. A pointer naming another (version, store
generation) is opened (lease first, then the index, the catalog, and the extraction model the
state's store records, loaded by the caller's ``ensure_model`` before anything switches), then
becomes current in one assignment. A request takes the current state when it starts
(``acquire``) and finishes on it; a replaced state stays held until its last request ended and
``keep_previous_s`` passed (so thumbnails of an answer it gave still resolve), then its lease is
released. Memory: per held state its index, its catalog (O(database)) and the chunk cache
(``cache_chunks`` chunks).
"""
from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from .. import storage
from ..index import layout as L
from ..index.leases import Lease
from ..index.published import PublishedState, resolve
from ..index.search import ShardedSearcher
from ..log import get_logger
from ..ransac import RansacConfig
from ..rerank import RERANKERS, PairScorer, RerankConfig, reranked_order, resolve_reranker
from ..rerank.catalog import build_catalog
from ..rerank.tokens import ChunkCache

log = get_logger(__name__)

CONFIDENCE_KIND = {"ransac": "inliers", "r2former": "match_probability", "none": "global_similarity"}


@dataclass(frozen=True)
class ModelKey:
    """The extraction a state's store records: queries must be extracted exactly so."""
    backbone: str
    checkpoint: str | None
    checkpoint_hash: str | None
    image_size: tuple[int, int]

    def as_dict(self) -> dict[str, Any]:
        return {"backbone": self.backbone, "checkpoint": self.checkpoint, "checkpoint_hash": self.checkpoint_hash,
                "image_size": list(self.image_size)}


def model_key(manifest: dict[str, Any], backbone: str | None = None, checkpoint: str | None = None) -> ModelKey:
    """The store's model, or the one given when it is the same model (``storage.check_same_model``):
    another model's descriptors would search the index meaninglessly."""
    from ..weights import checkpoint_hash

    model = manifest.get("model") or {}
    backbone = backbone or model.get("backbone")
    if not backbone:
        raise storage.StoreError("the store records no backbone; give --backbone")
    checkpoint = checkpoint or model.get("checkpoint")
    key = ModelKey(backbone, checkpoint, checkpoint_hash(backbone, checkpoint),
                   tuple(storage.extraction_size(manifest)))
    storage.check_same_model(("database store", "(served)", manifest),
                             ("model", f"--backbone {backbone} --checkpoint {checkpoint}",
                              {"backbone": key.backbone, "checkpoint_hash": key.checkpoint_hash}))
    return key


class ServingState:
    """One published state, opened for answering (see the module docstring)."""

    def __init__(self, state: PublishedState, key: ModelKey, lease: Lease | None, cache_chunks: int = 64,
                 use_gpu: str = "auto"):
        self.state, self.key, self.lease = state, key, lease
        self.searcher = ShardedSearcher(state.index_dir, version=state.index_version, use_actors=False,
                                        use_gpu=use_gpu, use_merged=False)
        self.catalog = build_catalog(state.metadata(), state.store)
        self.tokens = ChunkCache(state.store, cache_chunks)
        self._tokens_lock = threading.Lock()  # the cache's LRU is not thread-safe
        manifest = state.manifest
        # Token x, y are in the extraction's pixels: RANSAC's scale is the store's (as the batch job).
        defaults = RerankConfig()
        self.ransac = RansacConfig(method=defaults.ransac_method, reprojection_threshold=defaults.ransac_threshold_px,
                                   image_scale=float(max(storage.extraction_size(manifest))))
        self._scorers: dict[str, PairScorer] = {}
        self._scorers_lock = threading.Lock()
        self.auto_reranker: str | None = None
        self.in_flight = 0
        self.retired_at: float | None = None

    @property
    def label(self) -> dict[str, Any]:
        return {"index_version": self.state.index_version, "store_generation": self.state.store_generation}

    @property
    def num_images(self) -> int:
        return int(len(self.catalog["image_id"]))

    def resolve_reranker(self, name: str) -> str:
        if name not in RERANKERS:
            raise ValueError(f"unknown reranker {name!r}; choose one of {', '.join(RERANKERS)}")
        if name == "r2former" and not getattr(self.scorer(name).model, "has_trained_reranker", False):
            raise ValueError(f"reranker r2former needs weights with a trained reranker; the weights of "
                             f"{self.key.backbone} from {self.key.checkpoint or '(pretrained backbone)'} have none")
        if name != "auto":
            return name
        if self.auto_reranker is None:
            self.auto_reranker = resolve_reranker("auto", self.key.backbone, self.key.checkpoint)
        return self.auto_reranker

    def scorer(self, name: str) -> PairScorer:
        with self._scorers_lock:
            if name not in self._scorers:
                # The query side comes with the request: the scorer reads only the database cache.
                self._scorers[name] = PairScorer(name, self.key.backbone, self.key.checkpoint, self.state.store,
                                                 self.state.store, self.ransac, threads=1,
                                                 caches=(self.tokens, self.tokens))
            return self._scorers[name]

    def answer(self, global_descriptor: np.ndarray, tokens: np.ndarray, candidates: int, reranker: str,
               timings: dict[str, float]) -> dict[str, Any]:
        """The ranked candidates of one query, as ``r2f run`` ranks them. ``tokens`` are the
        query's local tokens as the store would hold them (float16)."""
        name = self.resolve_reranker(reranker)
        t = time.perf_counter()
        k = min(int(candidates), self.searcher.num_vectors)
        found = self.searcher.search(np.asarray(global_descriptor, np.float32)[None, :], k)
        cat = self.catalog
        ids, gscores = found.ids[0], found.scores[0]
        pos = np.minimum(np.searchsorted(cat["image_id"], ids), len(cat["image_id"]) - 1)
        known = (ids >= 0) & (cat["image_id"][pos] == ids)
        cand, gs = pos[known], gscores[known].astype(np.float32)
        global_rank = np.arange(1, len(cand) + 1, dtype=np.int32)
        timings["search_ms"] = (time.perf_counter() - t) * 1e3
        t = time.perf_counter()
        if name == "none" or len(cand) == 0:
            scores = gs
        else:
            with self._tokens_lock:
                c = self.tokens.read(cat["row"][cand])
            q = np.broadcast_to(np.asarray(tokens, np.float16).astype(np.float32)[None], c.shape)
            scores = self.scorer(name).score(np.ascontiguousarray(q), c)
        order = reranked_order(scores, global_rank)
        timings["rerank_ms"] = (time.perf_counter() - t) * 1e3
        out = []
        for rank, j in enumerate(order, start=1):
            c = cand[j]
            out.append({"rank": rank, "image_id": int(cat["image_id"][c]), "path": cat["path"][c].decode(),
                        "utm_east": _num(cat["east"][c]), "utm_north": _num(cat["north"][c]),
                        "global_score": float(gs[j]), "rerank_score": None if name == "none" else float(scores[j])})
        top = out[0] if out else None
        estimate = {"utm_east": top["utm_east"] if top else None, "utm_north": top["utm_north"] if top else None,
                    "confidence": (top["global_score"] if name == "none" else top["rerank_score"]) if top else None,
                    "confidence_kind": CONFIDENCE_KIND[name]}
        return {"candidates": out, "estimate": estimate, "state": self.label, "reranker": name}

    def thumbnail_path(self, image_id: int) -> str | None:
        cat = self.catalog["image_id"]
        i = int(np.searchsorted(cat, image_id))
        return self.catalog["path"][i].decode() if i < len(cat) and cat[i] == image_id else None

    def positions(self, limit: int = 5000) -> list[list[float]]:
        """Database positions for the page's plot (every ``n``-th one past ``limit``)."""
        xy = np.stack([self.catalog["east"], self.catalog["north"]], axis=1)
        xy = xy[np.isfinite(xy).all(axis=1)]
        step = max(1, -(-len(xy) // max(1, limit)))
        return xy[::step].round(3).tolist()

    def close(self) -> None:
        self.searcher.close()
        if self.lease is not None:
            self.lease.release()
            self.lease = None


def _num(v: float) -> float | None:
    return float(v) if np.isfinite(v) else None


class StateFollower:
    """Follows ``<index_dir>/CURRENT`` (see the module docstring). ``ensure_model(key)`` loads the
    extraction model of a state before it becomes current."""

    def __init__(self, store: str, index_dir: str, backbone: str | None = None, checkpoint: str | None = None,
                 poll_s: float = 2.0, keep_previous_s: float = 60.0, lease_heartbeat_s: float = 30.0,
                 cache_chunks: int = 64, use_gpu: str = "auto",
                 ensure_model: Callable[[ModelKey], None] | None = None, job: str | None = None):
        self.store, self.index_dir = store, index_dir
        self.backbone, self.checkpoint = backbone, checkpoint
        self.poll_s, self.keep_previous_s = float(poll_s), float(keep_previous_s)
        self.lease_heartbeat_s, self.cache_chunks, self.use_gpu = lease_heartbeat_s, cache_chunks, use_gpu
        self.ensure_model = ensure_model or (lambda key: None)
        self.job = job or f"serve-{socket.gethostname()}-{os.getpid()}"
        self._lock = threading.Lock()
        self.current: ServingState | None = None
        self.previous: list[ServingState] = []
        self.switches = 0
        self.last_switch: dict[str, Any] = {}
        self.last_error: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ---------------------------------------------------------------- opening
    def _open(self, pointer_state: PublishedState) -> ServingState:
        key = model_key(pointer_state.manifest, self.backbone, self.checkpoint)
        version = pointer_state.index_version or "none"
        lease = None
        if pointer_state.index_dir:  # the lease first: nothing of the state is read unprotected
            lease = Lease(pointer_state.index_dir, f"{self.job}-{version}-g{pointer_state.store_generation}",
                          pointer_state, self.lease_heartbeat_s).start()
        try:
            pointer_state.check_kept()
            self.ensure_model(key)
            return ServingState(pointer_state, key, lease, self.cache_chunks, self.use_gpu)
        except BaseException:
            if lease is not None:
                lease.release()
            raise

    def start(self) -> StateFollower:
        self.current = self._open(self._resolve())
        self._thread = threading.Thread(target=self._follow, name="serve-state-follower", daemon=True)
        self._thread.start()
        return self

    def _resolve(self) -> PublishedState:
        state = resolve(self.store, self.index_dir)
        if state.index_version is None:
            state = PublishedState(state.store, self.index_dir, L.resolve_version(self.index_dir, None),
                                   state.store_generation, state.manifest)
        return state

    # ---------------------------------------------------------------- following
    def _follow(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                self.poll()
            except Exception as exc:  # keep answering from the state we have; say why once per error
                msg = f"{type(exc).__name__}: {exc}"
                if msg != self.last_error:
                    log.warning("serve: could not follow %s (%s); answering from %s", self.index_dir, msg,
                                self.current.label if self.current else None)
                self.last_error = msg
            self._release_drained()

    def poll(self) -> bool:
        """Switch when ``CURRENT`` names another state; True when it switched."""
        pointer = L.read_pointer(self.index_dir)
        cur = self.current
        if cur is not None and (pointer["version"], pointer.get("store_generation")) == \
                (cur.state.index_version, cur.state.store_generation):
            return False
        t0 = time.perf_counter()
        new = self._open(self._resolve())
        if cur is not None and new.label == cur.label:  # a pointer without generation resolved to the same
            new.close()
            return False
        with self._lock:
            old, self.current = self.current, new
            if old is not None:
                old.retired_at = time.monotonic()
                self.previous.append(old)
        self.switches += 1
        self.last_switch = {"from": old.label if old else None, "to": new.label, "at": time.time(),
                            "load_seconds": round(time.perf_counter() - t0, 3)}
        self.last_error = None
        log.info("serve: switched from %s to %s in %.2f s", self.last_switch["from"], new.label,
                 self.last_switch["load_seconds"])
        return True

    def _release_drained(self) -> None:
        now = time.monotonic()
        with self._lock:
            done = [s for s in self.previous if s.in_flight == 0 and now - s.retired_at >= self.keep_previous_s]
            self.previous = [s for s in self.previous if s not in done]
        for s in done:
            log.info("serve: released %s", s.label)
            s.close()

    @contextlib.contextmanager
    def acquire(self) -> Iterator[ServingState]:
        """The current state for one request; it stays held until the request ends."""
        with self._lock:
            st = self.current
            if st is None:
                raise RuntimeError("no state loaded yet")
            st.in_flight += 1
        try:
            yield st
        finally:
            with self._lock:
                st.in_flight -= 1

    def held(self) -> list[ServingState]:
        with self._lock:
            return ([self.current] if self.current else []) + list(self.previous)

    def find(self, index_version: str | None) -> ServingState | None:
        """A held state by its index version (``None``: the current one)."""
        if index_version is None:
            return self.current
        return next((s for s in self.held() if s.state.index_version == index_version), None)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.poll_s + 5)
        for s in self.held():
            s.close()
        self.current, self.previous = None, []
