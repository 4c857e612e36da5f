"""Descriptors become an index: ``build(config)`` turns a finished extraction store into a new
index version (one FAISS index per index shard, built in parallel Ray tasks).

The build runs in three steps:

1. *sample* (one Ray task per index shard): a held-back sample of database descriptors used as
   queries for the recall figure, and a training sample disjoint from it;
2. *train* (driver, on all GPUs when present): one empty trained index that every shard is
   filled from, so all shards share the IVF quantizer (shards can then be merged into one file,
   and the reindex stage can refill one shard without retraining);
3. *fill* (one Ray task per index shard): add the shard's descriptors, write the shard file and
   search the held-back queries both exactly and through the new index, so the driver can tune
   ``nprobe`` and report recall@K of the merged result without another pass over the data.
"""
from __future__ import annotations

import dataclasses
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Iterable

import faiss
import numpy as np
import pyarrow.parquet as pq

from .. import storage
from ..config import ConfigError, parse_size, parse_use_gpu
from ..log import get_logger
from ..timefmt import utc_now
from . import layout as L
from .choose import IndexChoice, choose_index, gpus_to_use, new_index, to_cpu, to_device
from .search import apply_search_params, merge_topk, recall_against_exact

log = get_logger(__name__)

METRIC = "inner_product"
NPROBE_CANDIDATES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
# Tuning stops at nprobe = nlist / 8: scanning more than an eighth of the data brings little over
# exact search. Where the target recall needs more (uniform high-dimensional data, or K far
# beyond the near duplicates), the reported recall says so instead of hiding a brute-force scan.
MAX_SCAN_FRACTION = 8
DEFAULT_K_FACTOR = 4
SHARD_TARGET_BYTES = 1 << 30  # one index shard should load comfortably on any worker
PARALLEL_MIN_VECTORS = 200_000  # below this one task is quicker than spreading the fill


@dataclass
class IndexConfig:
    store: str = ""                    # extraction store (local path or s3://)
    index_dir: str | None = None       # default: <store>/index
    memory_budget: str = "4G"          # for the whole index, all shards together
    factory: str | None = None         # None: chosen from the vector count and the budget
    num_shards: int | None = None      # None: enough shards of about 1 GiB, at most one per extraction shard
    merged: bool = False               # also write one merged IVF index with on-disk inverted lists
    normalize: bool = True             # L2-normalise descriptors: inner product = cosine similarity
    held_back_queries: int = 1000      # database descriptors used as queries for the build-time recall
    k: int = 100                       # K of the recorded recall@K
    target_recall: float = 0.95        # nprobe is the smallest reaching this recall@K on a tuning half
    nprobe: int | None = None          # force nprobe instead of tuning it
    k_factor: int = DEFAULT_K_FACTOR   # refinement shortlist = k_factor * k (IVF-PQ with RFlat)
    max_training_vectors: int = 262_144
    use_gpu: str = "auto"              # auto | true | false (config.parse_use_gpu)
    ray_address: str | None = None
    seed: int = 0
    make_current: bool = True          # point CURRENT at the new version when it is finished

    @property
    def resolved_index_dir(self) -> str:
        if self.index_dir:
            return self.index_dir
        if not self.store:
            raise ConfigError("IndexConfig needs `store` (the extraction store) or `index_dir`")
        return storage.join(self.store, "index")


@dataclass
class IndexBuildResult:
    version: str
    index_dir: str
    infos: dict[str, Any] = field(repr=False)


# ---------------------------------------------------------------- entry point
def build(config: IndexConfig, previous_version: str | None = None,
          rebuild_extraction_shards: Iterable[int] | None = None,
          manifest: dict[str, Any] | None = None) -> IndexBuildResult:
    """Build a new index version from ``config.store``.

    With ``previous_version`` (a version name, or ``"current"``) the new version keeps that
    version's trained index and shard grouping, copies every index shard whose extraction shards
    are unchanged, and refills only the index shards that cover an extraction shard in
    ``rebuild_extraction_shards``, one that left the store, or new ones (which form a new index
    shard). The previous version stays intact for its readers.

    ``manifest`` (a store generation's snapshot, as ``pipeline.reindex`` passes it) is what gets
    indexed; by default the store's ``manifest.json``.
    """
    t0 = time.perf_counter()
    if not config.store:
        raise ConfigError("IndexConfig.store is empty: name the extraction store to index")
    if config.k < 1 or config.held_back_queries < 0:
        raise ConfigError(f"k must be >= 1 and held_back_queries >= 0 (got k={config.k}, "
                          f"held_back_queries={config.held_back_queries})")
    index_dir = config.resolved_index_dir
    manifest = manifest if manifest is not None else storage.read_manifest(config.store)
    ext_shards = sorted(int(s) for s in manifest["shards"])
    counts, dim = _shard_row_counts(config.store, ext_shards)
    total = sum(counts.values())
    if total == 0:
        raise ConfigError(f"extraction store {config.store} holds no descriptors to index")

    previous = None
    if previous_version is not None:
        prev_name = L.current_version(index_dir) if previous_version == "current" else previous_version
        previous = L.read_infos(index_dir, prev_name)
        if previous["dim"] != dim:
            raise ConfigError(f"previous version {prev_name} has dim {previous['dim']}, the store has {dim}; "
                              f"build from scratch")
        choice = IndexChoice(previous["index_type"], previous["bytes_per_vector"], f"kept from {prev_name}")
        groups, rebuild = _regroup(previous, ext_shards, set(int(s) for s in rebuild_extraction_shards or ()))
    else:
        budget = parse_size(config.memory_budget)
        choice = choose_index(total, dim, budget, config.factory, ivf_only=config.merged)
        groups = _group_shards(ext_shards, counts, config.num_shards or _auto_num_shards(choice, total, len(ext_shards),
                                                                                      config.ray_address))
        rebuild = set(groups)
    log.info("indexing %d vectors (dim %d) from %d extraction shards into %d index shards as %s (%s)",
             total, dim, len(ext_shards), len(groups), choice.factory, choice.reason)

    version = L.next_version(index_dir)
    lay = L.IndexLayout(index_dir)
    _claim_version_dir(lay.version_dir(version))

    from ..cluster import ensure_ray
    import ray

    ensure_ray(config.ray_address)
    gpus = _task_gpus(config, len(groups))

    # 1. samples: held-back queries (never trained on) and training vectors
    template = new_index(choice.factory, dim)
    needs_training = previous is None and not template.is_trained
    group_rows = {g: sum(counts[s] for s in shards) for g, shards in groups.items()}
    q_total = min(config.held_back_queries, max(0, total - 1))
    t_total = _training_size(choice, total - q_total, config.max_training_vectors) if needs_training else 0
    q_per, t_per = _allocate(group_rows, q_total, config.seed), _allocate(group_rows, t_total, config.seed + 1)
    sample_refs = {g: _sample_task.options(num_cpus=1).remote(
        config.store, groups[g], q_per[g], t_per[g], config.normalize, config.seed + g) for g in groups}
    samples = {g: ray.get(ref) for g, ref in sample_refs.items()}
    query_ids = np.concatenate([samples[g][0] for g in groups]).astype(np.int64)
    queries = np.concatenate([samples[g][1] for g in groups]).reshape(-1, dim).astype(np.float32)

    # 2. one trained, empty index shared by every shard
    t_train = time.perf_counter()
    if previous is not None:
        trained_url = lay.file(version, "trained.faiss")
        L.copy_file(L.IndexLayout(index_dir).file(previous["version"], "trained.faiss"), trained_url)
        trained_meta = previous["trained"]
    else:
        if needs_training:
            train = np.concatenate([samples[g][2] for g in groups]).reshape(-1, dim).astype(np.float32)
            log.info("training %s on %d vectors", choice.factory, len(train))
            on_device = to_device(template, config.use_gpu)
            on_device.train(train)
            template = to_cpu(on_device)
            del train
        trained_url = lay.file(version, "trained.faiss")
        trained_meta = L.write_index_file(trained_url, template)
    train_seconds = time.perf_counter() - t_train
    del samples

    # 3. fill the shards (or copy unchanged ones) and search the held-back queries
    is_ivf = faiss.try_extract_index_ivf(template) is not None
    nlist = faiss.extract_index_ivf(template).nlist if is_ivf else None
    nprobes = [config.nprobe] if config.nprobe else (
        [p for p in NPROBE_CANDIDATES if p <= max(1, nlist // MAX_SCAN_FRACTION)] if is_ivf else [])
    k_search = min(config.k + 1, total)
    params_extra = {"k_factor": config.k_factor} if "RFlat" in choice.factory or "Refine" in choice.factory else {}
    queries_ref = ray.put(queries)
    fill_refs = {}
    for g, shards in groups.items():
        out_url = lay.file(version, L.shard_file_name(g))
        reuse = None
        if g not in rebuild:
            prev_shard = next(s for s in previous["shards"] if s["shard"] == g)
            L.copy_file(lay.file(previous["version"], prev_shard["file"]), out_url)
            reuse = {"bytes": prev_shard["bytes"], "checksum": prev_shard["checksum"]}
        fill_refs[g] = _fill_task.options(num_cpus=1, num_gpus=gpus).remote(
            config.store, shards, trained_url, trained_meta, out_url, reuse, queries_ref, k_search,
            nprobes, params_extra, config.normalize, config.use_gpu)
    filled = {g: ray.get(ref) for g, ref in fill_refs.items()}

    # merged exact and approximate results over all shards -> nprobe and recall@K
    search_params, recall = _tune_and_measure(filled, query_ids, nprobes, params_extra, config)

    shard_entries = []
    for g in sorted(groups):
        f = filled[g]
        shard_entries.append({"shard": g, "file": L.shard_file_name(g), "extraction_shards": groups[g],
                              "num_vectors": f["num_vectors"], "bytes": f["bytes"], "checksum": f["checksum"],
                              "rebuilt": g in rebuild})

    merged_entry = None
    if config.merged:
        merged_entry = _merge_on_disk(index_dir, version, trained_url, shard_entries)

    infos = {
        "index_type": choice.factory,
        "choice_reason": choice.reason,
        "num_vectors": int(sum(e["num_vectors"] for e in shard_entries)),
        "dim": dim,
        "metric": METRIC,
        "normalized": config.normalize,
        "bytes_per_vector": choice.bytes_per_vector,
        "memory_bytes": int(sum(e["bytes"] for e in shard_entries)),
        "memory_budget": config.memory_budget,
        "build_seconds": round(time.perf_counter() - t0, 3),
        "train_seconds": round(train_seconds, 3),
        "k": recall["k"],
        "recall_at_k": recall["recall_at_k"],
        "recall_at_1": recall["recall_at_1"],
        "recall_queries": recall["queries"],
        "tuning": recall.get("tuning"),
        "search_params": search_params,
        "num_shards": len(shard_entries),
        "shards": shard_entries,
        "trained": {"file": "trained.faiss", **trained_meta},
        "merged": merged_entry,
        "store": config.store,
        "store_manifest": {k: manifest[k] for k in ("layout_version", "model", "created") if k in manifest},
        "store_generation": manifest.get("generation"),
        "previous_version": previous["version"] if previous else None,
        "gpus": gpus_to_use(config.use_gpu),
        "layout_version": L.INDEX_LAYOUT_VERSION,
        "created": utc_now(),
        "config": dataclasses.asdict(config),
    }
    storage.write_json(lay.infos(version), infos)  # last: the version now exists for readers
    if config.make_current:
        # a generation is named only when its snapshot exists (a reindexed store): plain stores'
        # readers keep using manifest.json
        gen = manifest.get("generation")
        named = gen is not None and storage.exists(storage.StoreLayout(config.store).manifest_snapshot(int(gen)))
        L.set_current(index_dir, version, store_generation=int(gen) if named else None, store=config.store)
    measured = "n/a (no held-back queries)" if recall["recall_at_k"] is None else f"{recall['recall_at_k']:.4f}"
    log.info("index %s/%s: %s, %d vectors, recall@%d %s (%s), %.1fs", index_dir, version, choice.factory,
             infos["num_vectors"], recall["k"], measured, search_params, infos["build_seconds"])
    infos["version"] = version
    return IndexBuildResult(version=version, index_dir=index_dir, infos=infos)


# ---------------------------------------------------------------- planning helpers
def _shard_row_counts(store: str, ext_shards: list[int]) -> tuple[dict[int, int], int]:
    """Rows per extraction shard and the descriptor dimension, from Parquet footers only."""
    counts, dim = {}, None
    lay = storage.StoreLayout(store)
    for s in ext_shards:
        url = lay.global_part(s)
        fs, path = storage.filesystem(url)
        try:
            with fs.open(path, "rb") as f:
                meta = pq.ParquetFile(f).metadata
                schema = meta.schema.to_arrow_schema()
        except FileNotFoundError:
            raise storage.StoreError(f"missing Parquet file {url} (listed in {lay.manifest})") from None
        except Exception as exc:  # pyarrow raises several types for a damaged footer
            raise storage.StoreError(f"corrupt Parquet file {url}: {exc}") from None
        counts[s] = meta.num_rows
        if dim is None:
            dim = schema.field("global_descriptor").type.list_size
    return counts, int(dim or storage.GLOBAL_DIM)


def _auto_num_shards(choice: IndexChoice, total: int, n_ext: int, ray_address: str | None) -> int:
    """Shards of about 1 GiB; from PARALLEL_MIN_VECTORS on, at least one per cluster CPU so the
    fill runs in parallel; never more than there are extraction shards."""
    n = math.ceil(choice.estimated_bytes(total) / SHARD_TARGET_BYTES)
    if total >= PARALLEL_MIN_VECTORS:
        from ..cluster import ensure_ray
        import ray

        ensure_ray(ray_address)
        n = max(n, int(ray.cluster_resources().get("CPU", 1)))
    return max(1, min(n_ext, n))


def _group_shards(ext_shards: list[int], counts: dict[int, int], num_shards: int) -> dict[int, list[int]]:
    """Contiguous runs of extraction shards with about equal row counts, one run per index shard."""
    if num_shards < 1:
        raise ConfigError(f"num_shards must be >= 1, got {num_shards}")
    num_shards = min(num_shards, len(ext_shards))
    total = sum(counts[s] for s in ext_shards)
    groups: dict[int, list[int]] = {g: [] for g in range(num_shards)}
    g, seen = 0, 0
    for i, s in enumerate(ext_shards):
        shards_left = len(ext_shards) - i  # including this one
        if groups[g] and g < num_shards - 1 and (seen >= (g + 1) * total / num_shards
                                                  or shards_left <= num_shards - 1 - g):
            g += 1  # this group has its share, or every later group needs one of the shards left
        groups[g].append(s)
        seen += counts[s]
    return {g: v for g, v in groups.items() if v}


def _regroup(previous: dict[str, Any], ext_shards: list[int], rebuild_ext: set[int]
             ) -> tuple[dict[int, list[int]], set[int]]:
    """Previous grouping, minus extraction shards that left the store, plus one new index shard
    for extraction shards it never covered. Returns (groups, index shards to refill)."""
    present = set(ext_shards)
    groups, rebuild = {}, set()
    covered = set()
    for entry in previous["shards"]:
        old = [int(s) for s in entry["extraction_shards"]]
        covered |= set(old)
        kept = [s for s in old if s in present]
        if kept:
            groups[entry["shard"]] = kept
            if len(kept) != len(old) or rebuild_ext & set(kept):
                rebuild.add(entry["shard"])
    new = sorted(present - covered)
    if new:
        g = max([e["shard"] for e in previous["shards"]], default=-1) + 1
        groups[g] = new
        rebuild.add(g)
    if not groups:
        raise ConfigError("no extraction shards left to index")
    return groups, rebuild


def _training_size(choice: IndexChoice, available: int, cap: int) -> int:
    nlist = choice.nlist or 1
    want = max(64 * nlist, 256 * 64 if "PQ" in choice.factory or "SQ" in choice.factory else 0)
    return int(max(1, min(available, want, cap)))


def _allocate(group_rows: dict[int, int], n: int, seed: int) -> dict[int, int]:
    """Split ``n`` samples among groups in proportion to their rows (largest remainders)."""
    total = sum(group_rows.values())
    if n <= 0 or total == 0:
        return {g: 0 for g in group_rows}
    exact = {g: n * r / total for g, r in group_rows.items()}
    out = {g: min(group_rows[g], int(v)) for g, v in exact.items()}
    order = sorted(group_rows, key=lambda g: exact[g] - int(exact[g]), reverse=True)
    i = 0
    while sum(out.values()) < n and i < 10 * len(order):
        g = order[i % len(order)]
        if out[g] < group_rows[g]:
            out[g] += 1
        i += 1
    return out


def _claim_version_dir(url: str) -> None:
    fs, path = storage.filesystem(url)
    if "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)):
        os.makedirs(path, exist_ok=False)  # atomic: two concurrent builds never share a folder
    # Object stores: no folders to claim (and s3fs's makedirs would create a missing bucket).


def _task_gpus(config: IndexConfig, n_tasks: int) -> float:
    if parse_use_gpu(config.use_gpu) is False:
        return 0
    from ..cluster import cluster_gpus

    n = cluster_gpus()
    return 0 if n == 0 else min(1.0, n / max(1, n_tasks))


# ---------------------------------------------------------------- Ray tasks
def read_shard_vectors(store: str, ext_shards: list[int], normalize: bool) -> tuple[np.ndarray, np.ndarray]:
    """``(image_ids, descriptors)`` of some extraction shards, L2-normalised when asked."""
    lay = storage.StoreLayout(store)
    ids, vecs = [], []
    for s in ext_shards:
        t = storage.read_parquet(lay.global_part(s), ["image_id", "global_descriptor"])
        ids.append(t.column("image_id").to_numpy().astype(np.int64))
        vecs.append(storage.descriptors_of(t))
    x = np.ascontiguousarray(np.concatenate(vecs), dtype=np.float32)
    if normalize and len(x):
        faiss.normalize_L2(x)
    return np.concatenate(ids), x


def _threads() -> None:
    import ray

    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1)
    faiss.omp_set_num_threads(max(1, int(cpus)))


def _sample(store, ext_shards, n_queries, n_train, normalize, seed):
    _threads()
    ids, x = read_shard_vectors(store, ext_shards, normalize)
    perm = np.random.default_rng(seed).permutation(len(ids))
    q = np.sort(perm[:n_queries])
    t = np.sort(perm[n_queries:n_queries + n_train])
    return ids[q], x[q], x[t]


def _fill(store, ext_shards, trained_url, trained_meta, out_url, reuse, queries, k, nprobes, params_extra,
          normalize, use_gpu):
    """Fill one index shard (or load its unchanged copy), write it, and answer the held-back
    queries exactly (brute force over this shard) and through the index at each nprobe."""
    _threads()
    ids, x = read_shard_vectors(store, ext_shards, normalize)
    if reuse is None:
        index = L.read_index_file(trained_url, trained_meta)
        on_device = to_device(index, use_gpu)
        on_device.add_with_ids(x, ids)
        index = to_cpu(on_device)
        meta = L.write_index_file(out_url, index)
    else:
        index = L.read_index_file(out_url, reuse)
        if index.ntotal != len(ids):
            raise L.IndexFileError(f"{out_url} holds {index.ntotal} vectors but its extraction shards "
                                   f"{ext_shards} hold {len(ids)}; rebuild it")
        meta = dict(reuse)
    kk = min(k, len(ids))
    exact = faiss.IndexFlatIP(x.shape[1])
    exact.add(x)
    d_exact, p_exact = exact.search(queries, kk) if len(queries) else (np.zeros((0, kk), np.float32),
                                                                        np.zeros((0, kk), np.int64))
    i_exact = np.where(p_exact >= 0, ids[np.maximum(p_exact, 0)], -1)
    del exact
    approx = {}
    if _is_exact(index):  # brute force again would only repeat the exact search
        return {"num_vectors": int(len(ids)), **meta, "exact": (d_exact, i_exact), "approx": {None: (d_exact, i_exact)}}
    searchable = to_device(index, use_gpu)
    for p in nprobes or [None]:
        params = dict(params_extra)
        if p is not None:
            params["nprobe"] = p
        apply_search_params(searchable, params)
        approx[p] = searchable.search(queries, kk) if len(queries) else (d_exact, i_exact)
    return {"num_vectors": int(len(ids)), **meta, "exact": (d_exact, i_exact), "approx": approx}


def _is_exact(index: faiss.Index) -> bool:
    inner = faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap) else index
    return type(inner) in (faiss.IndexFlat, faiss.IndexFlatIP)


def _remote(fn):
    import ray

    return ray.remote(max_retries=1)(fn)


class _Lazy:
    """Ray remote functions defined on first use, so importing this module never starts Ray."""

    def __init__(self, fn):
        self.fn, self._remote = fn, None

    def options(self, **kw):
        if self._remote is None:
            self._remote = _remote(self.fn)
        return self._remote.options(**kw)


_sample_task = _Lazy(_sample)
_fill_task = _Lazy(_fill)


# ---------------------------------------------------------------- recall and nprobe
def _drop_self(ids: np.ndarray, query_ids: np.ndarray, k: int) -> np.ndarray:
    """Each held-back query is a database vector: remove its own id so the figure measures its
    other neighbours, as for a new photo of a known place."""
    out = np.full((len(ids), k), -1, np.int64)
    for r, (row, q) in enumerate(zip(ids, query_ids)):
        kept = row[row != q][:k]
        out[r, :len(kept)] = kept
    return out


def _tune_and_measure(filled, query_ids, nprobes, params_extra, config):
    n_q = len(query_ids)
    total = sum(f["num_vectors"] for f in filled.values())
    k_fig = max(1, min(config.k, total - 1))
    if n_q == 0:
        params = dict(params_extra)
        if nprobes:
            params["nprobe"] = nprobes[-1] if config.nprobe is None else config.nprobe
        return params, {"k": k_fig, "recall_at_k": None, "recall_at_1": None, "queries": 0}
    k_search = min(config.k + 1, total)
    _, exact = merge_topk([f["exact"] for f in filled.values()], k_search)
    exact = _drop_self(exact, query_ids, k_fig)

    def approx_ids(p):
        _, ids = merge_topk([f["approx"][p] for f in filled.values()], k_search)
        return _drop_self(ids, query_ids, k_fig)

    tuning = None
    if len(nprobes) > 1:
        # tune on the first half of the queries, report on the second: the figure is not tuned on
        half = n_q // 2
        tune, report = slice(0, half), slice(half, n_q)
        tuning = {}
        chosen = nprobes[-1]
        for p in nprobes:
            r = recall_against_exact(approx_ids(p)[tune], exact[tune], k_fig)
            tuning[str(p)] = round(r, 5)
            if r >= config.target_recall:
                chosen = p
                break
        else:
            log.warning("recall@%d %.3f at nprobe=%d (1/%d of the data) stays below target_recall %.3f; "
                        "consider factory=Flat or a larger budget", k_fig, r, chosen, MAX_SCAN_FRACTION,
                        config.target_recall)
    else:
        chosen = nprobes[0] if nprobes else None
        report = slice(0, n_q)
    got = approx_ids(chosen)
    params = dict(params_extra)
    if chosen is not None:
        params["nprobe"] = int(chosen)
    return params, {
        "k": k_fig,
        "recall_at_k": round(recall_against_exact(got[report], exact[report], k_fig), 5),
        "recall_at_1": round(recall_against_exact(got[report], exact[report], 1), 5),
        "queries": int(len(query_ids[report])),
        "tuning": tuning,
    }


# ---------------------------------------------------------------- one merged file
def _merge_on_disk(index_dir: str, version: str, trained_url: str, shard_entries: list[dict]) -> dict[str, Any]:
    """Merge every shard's inverted lists into ``merged.faiss`` + ``merged.ivfdata`` (faiss
    ``merge_ondisk``). FAISS reads and writes local files only, so remote versions are staged
    through a local temporary folder."""
    from faiss.contrib.ondisk import merge_ondisk

    lay = L.IndexLayout(index_dir)
    local = not index_dir.startswith("s3://") and "://" not in index_dir
    work = tempfile.mkdtemp(prefix="r2f-merge-")
    try:
        if local:
            vdir = storage.filesystem(lay.version_dir(version))[1]
            shard_paths = [os.path.join(vdir, e["file"]) for e in shard_entries]
            out_dir = vdir
        else:
            shard_paths = []
            for e in shard_entries:
                p = os.path.join(work, e["file"])
                fs, path = storage.filesystem(lay.file(version, e["file"]))
                fs.get(path, p)
                shard_paths.append(p)
            out_dir = work
        trained = L.read_index_file(trained_url)
        ivfdata = os.path.join(out_dir, "merged.ivfdata")
        merge_ondisk(trained, shard_paths, ivfdata)
        merged_path = os.path.join(out_dir, "merged.faiss")
        faiss.write_index(trained, merged_path)
        sizes = {"bytes": os.path.getsize(merged_path), "ivfdata_bytes": os.path.getsize(ivfdata)}
        if not local:
            for name in ("merged.faiss", "merged.ivfdata"):
                fs, path = storage.filesystem(lay.file(version, name))
                fs.put(os.path.join(work, name), path)
        return {"file": "merged.faiss", "ivfdata": "merged.ivfdata", "num_vectors": int(trained.ntotal), **sizes}
    finally:
        shutil.rmtree(work, ignore_errors=True)
