"""Where descriptors become an index and a query becomes a ranked list.

``build(IndexConfig(store=...))`` writes a new version of a sharded FAISS index next to (or
apart from) an extraction store; ``search(index_dir, queries, k)`` / ``open_index(index_dir)``
answer top-K queries from the version the CURRENT pointer names (read once per searcher; the
pointer also names the store generation that version indexes, see ``layout``). See docs/index.md.
"""
from __future__ import annotations

import argparse
import json
import os

import numpy as np
import pyarrow as pa

from .build import IndexBuildResult, IndexConfig, build, read_shard_vectors
from .choose import IndexChoice, choose_index
from .layout import IndexFileError, IndexLayout, current_version, list_versions, read_infos, set_current
from .retention import prune_versions
from .search import SearchResult, ShardedSearcher, merge_topk, open_index, recall_against_exact, search

__all__ = [
    "IndexConfig", "IndexBuildResult", "build", "SearchResult", "ShardedSearcher", "open_index", "search",
    "IndexFileError", "IndexLayout", "current_version", "list_versions", "prune_versions", "read_infos",
    "set_current", "choose_index", "IndexChoice", "merge_topk", "recall_against_exact", "read_shard_vectors",
    "SEARCH_RESULT_SCHEMA", "search_table", "register_cli",
]

SEARCH_RESULT_SCHEMA = pa.schema([
    ("query", pa.int64()),     # image_id of the query (store input) or its row (.npy input)
    ("rank", pa.int32()),      # 0 = best
    ("image_id", pa.int64()),
    ("score", pa.float32()),
])


def search_table(query_ids: np.ndarray, result: SearchResult) -> pa.Table:
    """Long-format table of a search result; entries an approximate index left empty are dropped."""
    q, k = result.ids.shape
    keep = (result.ids >= 0).ravel()
    return pa.Table.from_pydict({
        "query": np.repeat(np.asarray(query_ids, np.int64), k)[keep],
        "rank": np.tile(np.arange(k, dtype=np.int32), q)[keep],
        "image_id": result.ids.ravel()[keep],
        "score": result.scores.ravel()[keep],
    }, schema=SEARCH_RESULT_SCHEMA)


def read_queries(source: str) -> tuple[np.ndarray, np.ndarray]:
    """``(query ids, descriptors)`` from an extraction store, or from a ``.npy`` (ids = rows)."""
    from .. import storage

    if source.endswith(".npy"):
        fs, path = storage.filesystem(source)
        try:
            with fs.open(path, "rb") as f:
                x = np.load(f, allow_pickle=False)
        except FileNotFoundError:
            raise FileNotFoundError(f"query file {source} does not exist") from None
        except ValueError as exc:
            raise ValueError(f"query file {source} is not a valid .npy array: {exc}") from None
        if x.ndim != 2:
            raise ValueError(f"query file {source} must hold a (Q, D) array, got shape {x.shape}")
        return np.arange(len(x), dtype=np.int64), x.astype(np.float32)
    return storage.read_global_descriptors(source)


# ---------------------------------------------------------------- CLI
def register_cli(subparsers: argparse._SubParsersAction) -> None:
    from ..config import add_config_arguments

    p = subparsers.add_parser("index", help="build a new version of the sharded FAISS index of an extraction store")
    add_config_arguments(p)
    p.add_argument("--store", help="extraction store (same as --set store=...)")
    p.add_argument("--index-dir", help="index folder/URL (default <store>/index)")
    p.add_argument("--previous-version", help="reuse this version's shards ('current' for the current one)")
    p.add_argument("--rebuild-shards", default="", help="extraction shards to refill, comma-separated")
    p.add_argument("--prune", type=int, default=0, metavar="KEEP", help="afterwards keep only the newest KEEP versions")
    p.set_defaults(func=_cli_index)

    s = subparsers.add_parser("search", help="top-K image ids for query descriptors (store or .npy) -> Parquet")
    s.add_argument("--index-dir", required=True)
    s.add_argument("--queries", required=True, help="extraction store URL or .npy file of (Q, D) descriptors")
    s.add_argument("--out", required=True, help="output Parquet: query, rank, image_id, score")
    s.add_argument("--k", type=int, default=100)
    s.add_argument("--version", default=None, help="index version (default: CURRENT)")
    s.add_argument("--nprobe", type=int, default=None, help="override the tuned nprobe")
    s.add_argument("--actors", action="store_true", help="hold shards in Ray actors")
    s.add_argument("--use-gpu", default="auto")
    s.set_defaults(func=_cli_search)


def _cli_index(args: argparse.Namespace) -> int:
    from ..config import load_config

    overrides = list(args.overrides)
    if args.store:
        overrides.append(f"store={args.store}")
    if args.index_dir:
        overrides.append(f"index_dir={args.index_dir}")
    config = load_config(IndexConfig, args.config, overrides)
    rebuild = [int(s) for s in args.rebuild_shards.replace(",", " ").split()] if args.rebuild_shards else None
    result = build(config, previous_version=args.previous_version, rebuild_extraction_shards=rebuild)
    if args.prune:
        prune_versions(result.index_dir, keep=args.prune)
    summary = {k: result.infos[k] for k in ("version", "index_type", "num_vectors", "num_shards", "memory_bytes",
                                             "build_seconds", "k", "recall_at_k", "recall_at_1", "search_params")}
    print(json.dumps({"index_dir": result.index_dir, **summary}, indent=2))
    return 0


def _cli_search(args: argparse.Namespace) -> int:
    from .. import storage
    from .layout import read_pointer
    from .leases import hold_lease

    storage.check_output(args.out, "--out")
    # the published state, resolved once: the version searched and the store generation it indexes
    pointer = read_pointer(args.index_dir) if args.version is None else {"version": args.version}
    if pointer.get("store") and not args.queries.endswith(".npy"):
        storage.check_same_model(("query store", args.queries, storage.read_manifest(args.queries)),
                                 ("indexed store", pointer["store"], storage.read_manifest(pointer["store"])))
    query_ids, queries = read_queries(args.queries)
    state = {"index_dir": args.index_dir, "index_version": pointer["version"],
             "store_generation": pointer.get("store_generation"), "store": pointer.get("store")}
    with hold_lease(args.index_dir, f"search-{os.getpid()}", state), \
            open_index(args.index_dir, version=state["index_version"], use_actors=args.actors, use_gpu=args.use_gpu,
                       nprobe=args.nprobe) as searcher:
        result = searcher.search(queries, args.k)
    storage.write_parquet(args.out, search_table(query_ids, result),
                          {"index_dir": args.index_dir, "index_version": state["index_version"], "k": args.k,
                           "state": state})
    print(json.dumps({"queries": len(query_ids), "k": int(result.ids.shape[1]), "version": state["index_version"],
                      "store_generation": state["store_generation"], "out": args.out}))
    return 0
