"""A query becomes a ranked list: top-K image ids and scores from every index shard, merged exactly.

``open_index(index_dir)`` resolves the version once (the CURRENT pointer, or the one asked for)
and loads its shards either in this process or into Ray actors, one per shard, placed by
their memory so that no single machine has to hold the whole index. ``search(...)`` is the
one-shot form. A job that needs more than top-K beside each shard (mining drops soft positives
in the shard's own actor) subclasses ``ShardActor`` and opens the searcher with it
(``actor_class`` / ``actor_args``); ``ShardedSearcher.actors`` are the handles to call.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import faiss
import numpy as np

from .. import storage
from ..config import parse_use_gpu
from ..log import get_logger
from . import layout as L
from .choose import to_device

log = get_logger(__name__)


@dataclass
class SearchResult:
    ids: np.ndarray     # int64 (Q, k'): image ids, best first; -1 where an approximate index found fewer
    scores: np.ndarray  # float32 (Q, k'): inner products of L2-normalised descriptors; -inf where id is -1


def apply_search_params(index: faiss.Index, params: dict[str, Any]) -> None:
    """Set search-time parameters (nprobe, k_factor) through any wrapper (IDMap, refine, GPU)."""
    params = {k: v for k, v in params.items() if v is not None}
    k_factor = params.pop("k_factor", None)
    if k_factor is not None:
        # ParameterSpace does not reach a refine index inside an IndexIDMap: set it directly
        inner = faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap) else index
        if isinstance(inner, faiss.IndexRefine):
            inner.k_factor = float(k_factor)
    if params:
        space = faiss.GpuParameterSpace() if _on_gpu(index) else faiss.ParameterSpace()
        space.set_index_parameters(index, ",".join(f"{k}={v}" for k, v in params.items()))


def _on_gpu(index: faiss.Index) -> bool:
    return hasattr(faiss, "GpuParameterSpace") and ("Gpu" in type(index).__name__
                                                     or isinstance(index, (faiss.IndexReplicas, faiss.IndexShards)))


def merge_topk(parts: list[tuple[np.ndarray, np.ndarray]], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact merge of per-shard top-k lists (inner product, larger is better): the top ``k`` of
    their union. Missing entries (id -1) sort last."""
    if not parts:
        raise ValueError("no shard results to merge")
    d = np.concatenate([p[0] for p in parts], axis=1).astype(np.float32)
    i = np.concatenate([p[1] for p in parts], axis=1).astype(np.int64)
    d = np.where(i < 0, -np.inf, d).astype(np.float32)
    k = min(k, d.shape[1])
    # stable sort on -score: equal scores keep shard order, so results are deterministic
    order = np.argsort(-d, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(d, order, axis=1), np.take_along_axis(i, order, axis=1)


def recall_against_exact(approx_ids: np.ndarray, exact_ids: np.ndarray, k: int) -> float:
    """How much of exact search's top-k an approximate index returns: the mean over queries of
    |approx top-k ∩ exact top-k| / |exact top-k| (ids -1 ignored). A fraction; not Recall@N of
    places (``pipeline.metrics``), which asks whether a result lies near the query."""
    if len(exact_ids) == 0:
        return float("nan")
    hits = []
    for a, e in zip(approx_ids[:, :k], exact_ids[:, :k]):
        e = e[e >= 0]
        if len(e):
            hits.append(len(np.intersect1d(a[a >= 0], e)) / len(e))
    return float(np.mean(hits)) if hits else float("nan")


def prepare_queries(queries: np.ndarray, dim: int, normalize: bool) -> np.ndarray:
    q = np.asarray(queries)
    if q.ndim == 1:
        q = q[None, :]
    if q.ndim != 2 or q.shape[1] != dim:
        raise ValueError(f"queries must be (Q, {dim}) float32, got shape {np.shape(queries)}")
    q = np.ascontiguousarray(q, dtype=np.float32).copy()
    if not np.isfinite(q).all():
        raise ValueError("queries contain NaN or infinite values")
    if normalize and len(q):
        faiss.normalize_L2(q)
    return q


def load_shard(url: str, expected: dict[str, Any] | None, params: dict[str, Any], use_gpu: str) -> faiss.Index:
    """One shard file, checked against its infos.json entry, on the device ``use_gpu`` allows,
    with the version's search parameters set."""
    index = to_device(L.read_index_file(url, expected), use_gpu)
    apply_search_params(index, params)
    return index


SHARD_RESTARTS = 3  # restarts of one shard actor (node loss) before a search fails


class ShardActor:
    """Holds one index shard in a Ray worker; placed by the shard's memory. A subclass takes the
    ``actor_args(entry)`` of its shard after these and adds its own methods (``self.index`` is
    the loaded shard, ``None`` when ``self.error`` says why not)."""

    def __init__(self, url: str, expected: dict[str, Any], params: dict[str, Any], use_gpu: str, threads: int):
        if threads:
            faiss.omp_set_num_threads(threads)
        self.index, self.error = None, None
        try:
            self.index = load_shard(url, expected, params, use_gpu)
        except L.IndexFileError as exc:  # handed to the driver as is, not as a dead actor
            self.error = str(exc)

    def ready(self) -> str | None:
        return self.error

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        return self.index.search(queries, k)


class ShardedSearcher:
    """Searches one index version. ``use_actors=True`` keeps each shard in a Ray actor (the
    shards may then be larger than this machine's memory together); otherwise shards are
    loaded here, or the single merged file when the version has one and ``use_merged``.

    The version is fixed when the searcher opens: a later build that moves CURRENT does not
    change what an open searcher returns. ``actor_class`` (a ``ShardActor`` subclass) and
    ``actor_args(entry) -> tuple`` (its extra arguments for each shard's infos.json entry) put
    more work beside each shard; ``actors`` are then the handles to call it on."""

    def __init__(self, index_dir: str, version: str | None = None, use_actors: bool = False,
                 use_gpu: str = "auto", use_merged: bool = True, nprobe: int | None = None,
                 ray_address: str | None = None, actor_threads: int = 1,
                 actor_class: type[ShardActor] | None = None,
                 actor_args: Callable[[dict[str, Any]], tuple] | None = None):
        self.index_dir = index_dir
        self.version = L.resolve_version(index_dir, version)
        self.infos = L.read_infos(index_dir, self.version)
        self.dim = int(self.infos["dim"])
        self.num_vectors = int(self.infos["num_vectors"])
        self.normalize = bool(self.infos.get("normalized", True))
        self.params = dict(self.infos.get("search_params") or {})
        if nprobe is not None:
            self.params["nprobe"] = nprobe
        self.use_actors = use_actors
        self._indices: list[faiss.Index] = []
        self._actors: list[Any] = []
        self._tmp: str | None = None
        lay = L.IndexLayout(index_dir)
        shards = self.infos["shards"]
        if use_actors:
            import ray

            from ..cluster import ensure_ray

            ensure_ray(ray_address)
            actor_cls = ray.remote(actor_class or ShardActor)
            from ..cluster import cluster_gpus

            n_gpus = 0 if parse_use_gpu(use_gpu) is False else cluster_gpus()
            gpus = min(1.0, n_gpus / max(1, len(shards))) if n_gpus else 0
            for e in shards:
                # Ray's memory resource packs shards onto nodes that can hold them. A shard actor
                # whose node dies is started again elsewhere (it reloads its shard), and the
                # calls it had not answered are sent again: a search is a pure read.
                self._actors.append(actor_cls.options(
                    num_cpus=0, num_gpus=gpus, memory=max(1, int(e["bytes"] * 1.2)), scheduling_strategy="SPREAD",
                    max_restarts=SHARD_RESTARTS, max_task_retries=SHARD_RESTARTS,
                ).remote(lay.file(self.version, e["file"]), e, self.params, use_gpu, actor_threads,
                         *(actor_args(e) if actor_args else ())))
            errors = [e for e in ray.get([a.ready.remote() for a in self._actors]) if e]
            if errors:  # a missing or corrupt shard: report it by name, now rather than at the first query
                self.close()
                raise L.IndexFileError("; ".join(errors))
        elif use_merged and self.infos.get("merged"):
            self._indices = [self._load_merged(lay, use_gpu)]
        else:
            self._indices = [load_shard(lay.file(self.version, e["file"]), e, self.params, use_gpu) for e in shards]

    @property
    def actors(self) -> list[Any]:
        """The shard actors (``use_actors=True``), one per shard in infos.json order."""
        return list(self._actors)

    def _load_merged(self, lay: L.IndexLayout, use_gpu: str) -> faiss.Index:
        merged = self.infos["merged"]
        url = lay.file(self.version, merged["file"])
        fs, path = storage.filesystem(url)
        if "file" not in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)):
            # FAISS maps the inverted lists from a local file: stage both files once
            self._tmp = tempfile.mkdtemp(prefix="r2f-index-")
            for name in (merged["file"], merged["ivfdata"]):
                src = storage.filesystem(lay.file(self.version, name))[1]
                if not fs.exists(src):
                    raise L.IndexFileError(f"missing merged index file {lay.file(self.version, name)}")
                fs.get(src, os.path.join(self._tmp, name))
            path = os.path.join(self._tmp, merged["file"])
        for name in (merged["file"], merged["ivfdata"]):
            p = os.path.join(os.path.dirname(path), name)
            if not os.path.exists(p):
                raise L.IndexFileError(f"missing merged index file {lay.file(self.version, name)}")
            if os.path.getsize(p) != merged["bytes" if name == merged["file"] else "ivfdata_bytes"]:
                raise L.IndexFileError(f"corrupt merged index file {lay.file(self.version, name)}: size differs "
                                       f"from infos.json")
        try:
            index = faiss.read_index(path, faiss.IO_FLAG_ONDISK_SAME_DIR)
        except RuntimeError as exc:
            raise L.IndexFileError(f"corrupt merged index file {url}: {str(exc).strip().splitlines()[-1]}") from None
        index = to_device(index, use_gpu)
        apply_search_params(index, self.params)
        return index

    def search(self, queries: np.ndarray, k: int = 100) -> SearchResult:
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        q = prepare_queries(queries, self.dim, self.normalize)
        kk = min(k, self.num_vectors)
        if len(q) == 0 or kk == 0:
            return SearchResult(np.zeros((len(q), kk), np.int64), np.zeros((len(q), kk), np.float32))
        if self._actors:
            import ray

            q_ref = ray.put(q)
            parts = ray.get([a.search.remote(q_ref, kk) for a in self._actors])
        else:
            parts = [index.search(q, kk) for index in self._indices]
        scores, ids = merge_topk(parts, kk)
        return SearchResult(ids=ids, scores=scores)

    def close(self) -> None:
        if self._actors:
            import ray

            for a in self._actors:
                ray.kill(a)
        self._actors, self._indices = [], []
        if self._tmp:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    def __enter__(self) -> ShardedSearcher:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_index(index_dir: str, version: str | None = None, **kwargs: Any) -> ShardedSearcher:
    """A searcher over ``version`` (default: the one CURRENT names). See ShardedSearcher."""
    return ShardedSearcher(index_dir, version=version, **kwargs)


def search(index_dir: str, queries: np.ndarray, k: int = 100, version: str | None = None,
           **kwargs: Any) -> SearchResult:
    """Top-``k`` image ids and scores for each query descriptor (k' = min(k, N) columns)."""
    with open_index(index_dir, version=version, **kwargs) as searcher:
        return searcher.search(queries, k)
