"""Descriptors become an index: ``build(config)`` turns a finished extraction store into a new
index version (one FAISS index per index shard, built in parallel Ray tasks).

The build reads as its dataflow (``build``):

1. *plan*: the index choice (from the vector count and the memory budget, or kept from a previous
   version) and the grouping of extraction shards into index shards;
2. *sample* (one Ray task per index shard): a held-back sample of database descriptors used as
   queries for the recall figure, and a training sample disjoint from it;
3. *train* (driver, on all GPUs when present): one empty trained index that every shard is
   filled from, so all shards share the IVF quantizer (shards can then be merged into one file,
   and the reindex stage can refill one shard without retraining);
4. *fill* (one Ray task per index shard): add the shard's descriptors, write the shard file and
   answer the held-back queries both exactly and through the new index (``tune``), so the
   driver needs no other pass over the data;
5. *merge* (only with ``merged=true``): one IVF index with on-disk inverted lists;
6. *tune* (``tune``): ``nprobe`` and the recall@K of the merged per-shard results;
7. *publish*: ``infos.json`` last (the version then exists for readers), then ``CURRENT``.

The module is longer than one step per file would make it because the Ray tasks, the shard
grouping and the merged-file writer are the steps' own halves (what runs on a worker beside what
the driver plans); tuning and recall, which are a topic of their own, live in ``tune``.
"""
from __future__ import annotations

import dataclasses
import math
import os
import shutil
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import faiss
import numpy as np
import pyarrow.parquet as pq

from .. import storage
from ..config import ConfigError, parse_size, parse_use_gpu
from ..log import get_logger
from ..timefmt import utc_now
from . import layout as L
from . import tune
from .choose import IndexChoice, choose_index, gpus_to_use, new_index, to_cpu, to_device

log = get_logger(__name__)

METRIC = "inner_product"
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
@dataclass
class _BuildPlan:
    """What a build indexes and how: the extraction shards, the index choice and the grouping."""
    index_dir: str
    manifest: dict[str, Any]
    ext_shards: list[int]
    counts: dict[int, int]             # rows per extraction shard
    dim: int
    choice: IndexChoice
    groups: dict[int, list[int]]       # index shard -> its extraction shards
    rebuild: set[int]                  # index shards to fill (the others are copied from previous)
    previous: dict[str, Any] | None    # the previous version's infos.json

    @property
    def total(self) -> int:
        return sum(self.counts.values())


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
    storage.check_output(config.index_dir or config.store, "--index-dir")  # before any work
    plan = _plan(config, previous_version, rebuild_extraction_shards, manifest)
    version = L.next_version(plan.index_dir)
    lay = L.IndexLayout(plan.index_dir)
    _claim_version_dir(lay.version_dir(version))

    from ..cluster import ensure_ray

    ensure_ray(config.ray_address)
    gpus = _task_gpus(config, len(plan.groups))
    template = new_index(plan.choice.factory, plan.dim)
    needs_training = plan.previous is None and not template.is_trained
    query_ids, queries, train = _sample_shards(config, plan, needs_training)
    t_train = time.perf_counter()
    trained_url, trained_meta, template = _trained_index(config, plan, lay, version, template, train)
    train_seconds = time.perf_counter() - t_train
    del train

    nprobes = tune.nprobe_candidates(template, config.nprobe)
    params_extra = tune.fixed_search_params(plan.choice.factory, config.k_factor)
    filled = _fill_shards(config, plan, lay, version, trained_url, trained_meta, queries, nprobes, params_extra,
                          gpus)
    shard_entries = [{"shard": g, "file": L.shard_file_name(g), "extraction_shards": plan.groups[g],
                      "num_vectors": filled[g]["num_vectors"], "bytes": filled[g]["bytes"],
                      "checksum": filled[g]["checksum"], "rebuilt": g in plan.rebuild} for g in sorted(plan.groups)]
    merged_entry = _merge_on_disk(plan.index_dir, version, trained_url, shard_entries) if config.merged else None
    search_params, recall = tune.tune_and_measure(filled, query_ids, nprobes, params_extra, config.k,
                                                  config.target_recall, config.nprobe)

    infos = _infos(config, plan, shard_entries, trained_meta, merged_entry, search_params, recall,
                   build_seconds=time.perf_counter() - t0, train_seconds=train_seconds)
    _publish(config, plan, version, infos)
    measured = "n/a (no held-back queries)" if recall["recall_at_k"] is None else f"{recall['recall_at_k']:.4f}"
    log.info("index %s/%s: %s, %d vectors, recall@%d %s (%s), %.1fs", plan.index_dir, version,
             plan.choice.factory, infos["num_vectors"], recall["k"], measured, search_params, infos["build_seconds"])
    infos["version"] = version
    return IndexBuildResult(version=version, index_dir=plan.index_dir, infos=infos)


# ---------------------------------------------------------------- the build's steps
def _plan(config: IndexConfig, previous_version: str | None, rebuild_extraction_shards: Iterable[int] | None,
          manifest: dict[str, Any] | None) -> _BuildPlan:
    """Check the config, read the store's row counts, and choose the index and its shards: kept
    from ``previous_version`` when there is one, from the vector count and the budget otherwise."""
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
    return _BuildPlan(index_dir, manifest, ext_shards, counts, dim, choice, groups, rebuild, previous)


def _sample_shards(config: IndexConfig, plan: _BuildPlan, needs_training: bool
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """``(query ids, held-back queries, training vectors)``, one Ray task per index shard; the
    queries are never trained on. No training vectors when the index needs no training."""
    import ray

    dim, total, groups = plan.dim, plan.total, plan.groups
    group_rows = {g: sum(plan.counts[s] for s in shards) for g, shards in groups.items()}
    q_total = min(config.held_back_queries, max(0, total - 1))
    t_total = _training_size(plan.choice, total - q_total, config.max_training_vectors) if needs_training else 0
    q_per, t_per = _allocate(group_rows, q_total, config.seed), _allocate(group_rows, t_total, config.seed + 1)
    refs = {g: _sample_task.options(num_cpus=1).remote(
        config.store, groups[g], q_per[g], t_per[g], config.normalize, config.seed + g) for g in groups}
    samples = {g: ray.get(ref) for g, ref in refs.items()}
    query_ids = np.concatenate([samples[g][0] for g in groups]).astype(np.int64)
    queries = np.concatenate([samples[g][1] for g in groups]).reshape(-1, dim).astype(np.float32)
    train = (np.concatenate([samples[g][2] for g in groups]).reshape(-1, dim).astype(np.float32)
             if needs_training else None)
    return query_ids, queries, train


def _trained_index(config: IndexConfig, plan: _BuildPlan, lay: L.IndexLayout, version: str,
                   template: faiss.Index, train: np.ndarray | None
                   ) -> tuple[str, dict[str, Any], faiss.Index]:
    """Write the one trained, empty index every shard is filled from: the previous version's
    copied, or ``template`` trained on ``train`` (on all GPUs when present). Returns its URL,
    its file entry and the template (trained when it was trained here)."""
    trained_url = lay.file(version, "trained.faiss")
    if plan.previous is not None:
        L.copy_file(lay.file(plan.previous["version"], "trained.faiss"), trained_url)
        return trained_url, plan.previous["trained"], template
    if train is not None:
        log.info("training %s on %d vectors", plan.choice.factory, len(train))
        on_device = to_device(template, config.use_gpu)
        on_device.train(train)
        template = to_cpu(on_device)
    return trained_url, L.write_index_file(trained_url, template), template


def _fill_shards(config: IndexConfig, plan: _BuildPlan, lay: L.IndexLayout, version: str, trained_url: str,
                 trained_meta: dict[str, Any], queries: np.ndarray, nprobes: list[int],
                 params_extra: dict[str, Any], gpus: float) -> dict[int, dict[str, Any]]:
    """Fill each index shard to rebuild (copy the others from the previous version), one Ray task
    per shard, each also answering the held-back queries for ``tune``."""
    import ray

    k_search = min(config.k + 1, plan.total)
    queries_ref = ray.put(queries)
    refs = {}
    for g, shards in plan.groups.items():
        out_url = lay.file(version, L.shard_file_name(g))
        reuse = None
        if g not in plan.rebuild:
            prev_shard = next(s for s in plan.previous["shards"] if s["shard"] == g)
            L.copy_file(lay.file(plan.previous["version"], prev_shard["file"]), out_url)
            reuse = {"bytes": prev_shard["bytes"], "checksum": prev_shard["checksum"]}
        refs[g] = _fill_task.options(num_cpus=1, num_gpus=gpus).remote(
            config.store, shards, trained_url, trained_meta, out_url, reuse, queries_ref, k_search,
            nprobes, params_extra, config.normalize, config.use_gpu)
    return {g: ray.get(ref) for g, ref in refs.items()}


def _infos(config: IndexConfig, plan: _BuildPlan, shard_entries: list[dict[str, Any]], trained_meta: dict[str, Any],
           merged_entry: dict[str, Any] | None, search_params: dict[str, Any], recall: dict[str, Any],
           build_seconds: float, train_seconds: float) -> dict[str, Any]:
    """The version's ``infos.json``: how it was built and the recall it reached (docs/index.md)."""
    manifest, previous = plan.manifest, plan.previous
    return {
        "index_type": plan.choice.factory,
        "choice_reason": plan.choice.reason,
        "num_vectors": int(sum(e["num_vectors"] for e in shard_entries)),
        "dim": plan.dim,
        "metric": METRIC,
        "normalized": config.normalize,
        "bytes_per_vector": plan.choice.bytes_per_vector,
        "memory_bytes": int(sum(e["bytes"] for e in shard_entries)),
        "memory_budget": config.memory_budget,
        "build_seconds": round(build_seconds, 3),
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


def _publish(config: IndexConfig, plan: _BuildPlan, version: str, infos: dict[str, Any]) -> None:
    """Write ``infos.json`` (last: the version now exists for readers), then point CURRENT at it."""
    storage.write_json(L.IndexLayout(plan.index_dir).infos(version), infos)
    if config.make_current:
        # a generation is named only when its snapshot exists (a reindexed store): plain stores'
        # readers keep using manifest.json
        gen = plan.manifest.get("generation")
        named = gen is not None and storage.exists(storage.StoreLayout(config.store).manifest_snapshot(int(gen)))
        L.set_current(plan.index_dir, version, store_generation=int(gen) if named else None, store=config.store)


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
        import ray

        from ..cluster import ensure_ray

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
    return {"num_vectors": int(len(ids)), **meta,
            **tune.search_held_back(index, ids, x, queries, k, nprobes, params_extra, use_gpu)}


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
