"""Reranking throughput: the rerank job's pairs/s against the same scorer called directly.

    .venv/bin/python bench/bench_rerank.py [--queries 200] [--candidates 20] [--image-size 272 480]
        [--rerankers ransac,r2former] [--out /tmp/r2f_bench_rerank]
    .venv/bin/python bench/bench_rerank.py --smoke   # checks the script: 16 database frames, 4 queries

``--smoke``: RANSAC only, the database day_right frames 0-15, queries night_right 0-3, K = 2,
128x224, a temporary ``--out`` (tests/test_bench_scripts.py); no figure.

On the real Gardens Point images (day_right database, night_right queries, EfficientNet-Lite0):
extracts and indexes the database once, then for each reranker runs the rerank job (query
extraction, top-K search, pair scoring on Ray's scorer pool, commit) and prints

- job pairs/s: ``RerankResult.pairs_per_second``, pairs over the scorers' wall time (first pair
  scored to last, per round);
- direct pairs/s: the same scorer (``PairScorer``, one thread) in this process on the job's first
  ``--direct-pairs`` pairs;
- ratio = job / (scorer slots x direct): 1.0 is every slot scoring at the direct rate; the job's
  partitions follow its slots (``stage.score_partition_size``);
- threads per scorer, scorer slots, score partitions, the load average (the machine may be
  shared: the figures are only comparable at the same load), queries/s end to end.

The r2former reranker runs the transformer over EfficientNet tokens (untrained weights: the
timing is real, the ranking is not meaningful).
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def real_pairs(results: str, q_store: str, db_store: str, n: int):
    """Zarr rows of the first ``n`` (query, candidate) pairs the job scored (its results folder)."""
    import pandas as pd

    from pipeline import storage
    from pipeline.rerank import read_results
    r = read_results(results, max_rows=n).select(["query_id", "image_id"]).slice(0, n).to_pandas()
    q = storage.read_global_table(q_store, ["image_id", "row"]).to_pandas().set_index("image_id")["row"]
    d = storage.read_global_table(db_store, ["image_id", "row"]).to_pandas().set_index("image_id")["row"]
    return (pd.Series(r["query_id"]).map(q).to_numpy("int64"), pd.Series(r["image_id"]).map(d).to_numpy("int64"))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(Path(os.environ.get("R2F_SHARED", ROOT.parent / "shared")) / "data" / "gardens_point"))
    p.add_argument("--queries", type=int, default=200, help="night_right frames 0..N-1 (at most 200)")
    p.add_argument("--candidates", type=int, default=20)
    p.add_argument("--direct-pairs", type=int, default=800)
    p.add_argument("--image-size", nargs=2, type=int, default=[272, 480])
    p.add_argument("--batch-pairs", type=int, default=400)
    p.add_argument("--rerankers", default="ransac,r2former")
    p.add_argument("--out", default="/tmp/r2f_bench_rerank")
    p.add_argument("--smoke", action="store_true", help="the smallest setting (see above)")
    args = p.parse_args()
    database_frames = 200  # every day_right frame
    tmp = None
    if args.smoke:
        import tempfile
        tmp = tempfile.TemporaryDirectory(prefix="bench-rerank-")
        database_frames, args.out = 16, str(Path(tmp.name) / "rerank")
        args.queries, args.candidates, args.image_size, args.batch_pairs = 4, 2, [128, 224], 8
        args.direct_pairs, args.rerankers = 8, "ransac"
    # the scorer pool's size; None: what the cluster has (one scorer is enough to check the script)
    args.num_actors = 1 if args.smoke else None
    try:
        return bench(args, database_frames)
    finally:
        if tmp:
            tmp.cleanup()


def bench(args, database_frames: int) -> int:

    import numpy as np

    from pipeline import index
    from pipeline.cluster import ensure_ray
    from pipeline.datasets import write_frame_manifest
    from pipeline.log import setup_logging
    from pipeline.ransac import RansacConfig
    from pipeline.rerank import PairScorer, RerankConfig, extract_into, run

    setup_logging("WARNING")
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    ensure_ray()
    db_store, index_dir = str(out / "database_store"), str(out / "index")
    t = time.perf_counter()
    database = f"sequence:{args.data}/day_right"
    if database_frames < 200:
        out.mkdir(parents=True, exist_ok=True)
        database = write_frame_manifest(out / "database.csv", f"{args.data}/day_right", range(database_frames))
    extract_into(database, db_store, "efficientnet-lite0", None, args.image_size, {"progress": False})
    index.build(index.IndexConfig(store=db_store, index_dir=index_dir))
    print(f"database: {database_frames} images extracted and indexed in {time.perf_counter() - t:.1f} s")
    # the first --queries night_right frames, the frame as position
    queries = write_frame_manifest(out / "queries.csv", f"{args.data}/night_right", range(min(200, args.queries)))
    print(f"{'reranker':>9} {'K':>4} {'pairs':>6} {'job pairs/s':>12} {'direct pairs/s':>15} {'slots':>6} "
          f"{'ratio':>6} {'threads':>8} {'partitions':>11} {'load avg':>9} {'extract s':>10} {'rerank s':>9} "
          f"{'queries/s e2e':>14}")
    for reranker in args.rerankers.split(","):
        q_store = str(out / f"query_store_{reranker}")
        t = time.perf_counter()
        res = run(RerankConfig(queries=queries, query_store=q_store, database_store=db_store, index_dir=index_dir,
                               results=str(out / f"results_{reranker}"), backbone="efficientnet-lite0",
                               image_size=list(args.image_size), reranker=reranker, candidates=args.candidates,
                               batch_pairs=args.batch_pairs, num_actors=args.num_actors, extract={"progress": False},
                               allow_untrained_reranker=True))
        e2e = time.perf_counter() - t
        load = os.getloadavg()[0]
        # The same scorer, in this process, on the job's first pairs: the rate without Ray.
        scorer = PairScorer(reranker, "efficientnet-lite0", None, q_store, db_store,
                            RansacConfig(image_scale=float(max(args.image_size))), threads=1)
        qrows, crows = real_pairs(res.results, q_store, db_store, args.direct_pairs)
        n = len(qrows)
        t = time.perf_counter()
        for a in range(0, n, args.batch_pairs):
            scorer({"pair": np.arange(len(qrows[a:a + args.batch_pairs])), "query_row": qrows[a:a + args.batch_pairs],
                    "candidate_row": crows[a:a + args.batch_pairs]})
        direct = n / (time.perf_counter() - t)
        ratio = res.pairs_per_second / (res.scorer_slots * direct) if direct and res.scorer_slots else float("nan")
        s = res.stage_seconds
        print(f"{reranker:>9} {res.candidates:>4} {res.num_pairs:>6} {res.pairs_per_second:>12.1f} {direct:>15.1f} "
              f"{res.scorer_slots:>6} {ratio:>6.2f} {1:>8} {res.partitions:>11} {load:>9.1f} "
              f"{s['extract_queries']:>10.1f} {s['rerank']:>9.1f} {res.num_queries / e2e:>14.2f}")
    print(f"(machine: {os.cpu_count()} CPUs; scorers: 1 CPU and 1 torch/OpenCV thread each; load average: "
          f"1-minute, read after each job)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
