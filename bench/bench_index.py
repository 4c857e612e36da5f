"""Index benchmark: the default index choice against exact search, side by side.

For 100k and 1M descriptors of dimension 256, uniformly random and clustered (many near
duplicates, as views of one place are), builds through ``pipeline.index.build`` (Ray tasks,
a real extraction store on disk) both the default index and an exact ``Flat`` index, then
searches fresh queries (not in the database) with k=100 and prints build time, index memory,
queries/s and recall@1 / recall@100 of each against the exact index's answers.

    nice .venv/bin/python bench/bench_index.py [--sizes 100000,1000000] [--queries 1000] [--workdir /tmp]
    .venv/bin/python bench/bench_index.py --smoke    # 2,000 descriptors in 2 shards, 20 queries: a few seconds

Joins the Ray cluster named by ``RAY_ADDRESS`` when set, else starts a local one.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

from helpers_store import clustered, write_tiny_store  # noqa: E402

from pipeline import index as I  # noqa: E402
from pipeline.cluster import ensure_ray  # noqa: E402
from pipeline.log import setup_logging  # noqa: E402

DIM = 256


def make(kind: str, n: int, seed: int) -> np.ndarray:
    if kind == "uniform":
        return np.random.default_rng(seed).standard_normal((n, DIM), dtype=np.float32)
    # ~20 views per place, noise comparable to the spread between views of one place
    return clustered(n, DIM, n_places=max(1, n // 20), noise=0.35, seed=seed)


def fresh_queries(kind: str, n_db: int, q: int) -> np.ndarray:
    if kind == "uniform":
        return np.random.default_rng(10_000).standard_normal((q, DIM), dtype=np.float32)
    return clustered(q, DIM, n_places=max(1, n_db // 20), noise=0.35, seed=10_000)


def qps(searcher: I.ShardedSearcher, queries: np.ndarray, k: int) -> tuple[float, I.SearchResult]:
    t = time.perf_counter()
    res = searcher.search(queries, k)
    return len(queries) / (time.perf_counter() - t), res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="100000,1000000")
    ap.add_argument("--kinds", default="uniform,clustered")
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--shard-rows", type=int, default=100_000, help="rows per extraction shard")
    ap.add_argument("--memory-budget", default="4G")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--smoke", action="store_true", help="the smallest setting (tests/test_bench_scripts.py)")
    args = ap.parse_args()
    if args.smoke:
        args.sizes, args.queries, args.shard_rows = "2000", 20, 1000
    setup_logging("WARNING")
    ensure_ray()
    rows = []
    for n in [int(s) for s in args.sizes.split(",")]:
        for kind in args.kinds.split(","):
            work = tempfile.mkdtemp(prefix="r2f-bench-index-", dir=args.workdir)
            try:
                x = make(kind, n, seed=1)
                store = os.path.join(work, "store")
                write_tiny_store(store, [x[i:i + args.shard_rows] for i in range(0, n, args.shard_rows)])
                del x
                queries = fresh_queries(kind, n, args.queries)
                results = {}
                for label, factory in (("exact", "Flat"), ("default", None)):
                    cfg = I.IndexConfig(store=store, index_dir=os.path.join(work, f"index-{label}"), factory=factory,
                                        memory_budget=args.memory_budget, k=100)
                    built = I.build(cfg)
                    with I.open_index(built.index_dir) as searcher:
                        speed, res = qps(searcher, queries, 100)
                    results[label] = (built.infos, speed, res)
                truth = results["exact"][2].ids
                for label in ("exact", "default"):
                    infos, speed, res = results[label]
                    rows.append({
                        "n": n, "data": kind, "index": label, "factory": infos["index_type"],
                        "shards": infos["num_shards"], "params": ",".join(f"{k}={v}" for k, v in
                                                                          infos["search_params"].items()) or "-",
                        "build_s": infos["build_seconds"], "memory_mb": infos["memory_bytes"] / 2 ** 20,
                        "qps": speed, "r1": I.recall_against_exact(res.ids, truth, 1),
                        "r100": I.recall_against_exact(res.ids, truth, 100),
                        "built_r100": infos["recall_at_k"],
                    })
                    print_row(rows[-1], header=len(rows) == 1)
            finally:
                shutil.rmtree(work, ignore_errors=True)
    print("\nmarkdown:\n")
    print("| N | data | index | factory | shards | search params | build s | memory MiB | queries/s | "
          "recall@1 | recall@100 | build-time recall@100 |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['n']:,} | {r['data']} | {r['index']} | `{r['factory']}` | {r['shards']} | {r['params']} | "
              f"{r['build_s']:.1f} | {r['memory_mb']:.0f} | {r['qps']:.0f} | {r['r1']:.4f} | {r['r100']:.4f} | "
              f"{r['built_r100']:.4f} |")


def print_row(r: dict, header: bool) -> None:
    if header:
        print(f"{'N':>9} {'data':>9} {'index':>8} {'factory':>22} {'shards':>6} {'build_s':>8} {'mem_MiB':>8} "
              f"{'q/s':>8} {'R@1':>7} {'R@100':>7} {'built R@100':>11}")
    print(f"{r['n']:>9} {r['data']:>9} {r['index']:>8} {r['factory']:>22} {r['shards']:>6} {r['build_s']:>8.1f} "
          f"{r['memory_mb']:>8.0f} {r['qps']:>8.0f} {r['r1']:>7.4f} {r['r100']:>7.4f} {r['built_r100']:>11.4f}",
          flush=True)


if __name__ == "__main__":
    main()
