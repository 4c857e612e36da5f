"""How far from its query's street the candidates of a rerank run on a ``bench/city.py`` city lie.

    .venv/bin/python bench/city_strays.py RESULTS_DIR [--part 10] [--far-rows 200]
    .venv/bin/python bench/city_strays.py --smoke    # a 512-image city, 64 queries, reranked here first

A candidate whose Zarr row is more than ``--far-rows`` rows from the query's global top-1
candidate's row is a "stray": it lies outside the stretch of database rows its score partition
covers, so it costs a whole token chunk that its partition's other queries rarely share. Prints
the stray fraction of one results part, overall and by global rank, with the token bytes fetched
and the distinct candidates of the score partition of the same number (its phase-3 marker,
``scores/progress/score-NNNNN.json``). (City image names carry the row: ``..._<row>.jpg``.)

``--smoke`` writes a small city (tokens T = 8) in a temporary folder, indexes it and reranks it
with the ``token-similarity`` stand-in (``pipeline.rerank.run`` on the Ray cluster named by
``RAY_ADDRESS``, else a local one; one scorer actor), then reads part 0 with ``--far-rows 8``.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline import storage  # noqa: E402
from pipeline.rerank.results import ResultsLayout  # noqa: E402


def strays(results: str, part: int, far_rows: int) -> None:
    layout = ResultsLayout(results)
    t = storage.read_parquet(layout.part(part), ["query_id", "global_rank", "candidate_path"])
    rank = t.column("global_rank").to_numpy()
    qid = t.column("query_id").to_numpy()
    row = np.array([int(x.rsplit("_", 1)[1].split(".")[0]) for x in t.column("candidate_path").to_pylist()])
    first = rank == 1
    top1 = dict(zip(qid[first].tolist(), row[first].tolist()))
    far = np.abs(row - np.array([top1[q] for q in qid.tolist()])) > far_rows
    late = rank > 90 if (rank > 90).any() else rank > rank.max() // 2

    def pct(mask: np.ndarray) -> str:
        return f"{100 * far[mask].mean():.3f} %" if mask.any() else "-"
    print(f"part {part}: {len(row)} pairs, {len(top1)} queries; candidates > {far_rows} rows from the "
          f"query's top-1 row: {100 * far.mean():.3f} % of pairs; at global ranks {int(rank[late].min())}-"
          f"{int(rank.max())}: {pct(late)}; ranks 1-50: {pct(rank <= 50)}")
    marker = storage.read_json(layout.scores.progress(part))
    print(f"score partition {part}: fetched {marker['fetched_token_bytes'] / 1e9:.6f} GB for "
          f"{marker['distinct_candidates']} distinct candidates (load average {os.getloadavg()[0]:.1f})")


def smoke_results(work: Path) -> str:
    """A real rerank job's results folder on a small city."""
    sys.path.insert(0, str(ROOT / "bench"))
    from city import write_city

    from pipeline import index
    from pipeline.cluster import ensure_ray
    from pipeline.log import setup_logging
    from pipeline.rerank import RerankConfig, run

    setup_logging("WARNING")
    db, q, idx, results = (str(work / n) for n in ("database", "queries", "index", "results"))
    write_city(db, 512, tokens=8, part_rows=128)
    write_city(q, 64, tokens=8, part_rows=64, queries_of=512, strip_positions=True)
    ensure_ray(num_cpus=2)
    index.build(index.IndexConfig(store=db, index_dir=idx))
    run(RerankConfig(query_store=q, database_store=db, index_dir=idx, results=results,
                     backbone="efficientnet-lite0", reranker="token-similarity", candidates=20,
                     partition_queries=32, num_actors=1))
    return results


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", nargs="?")
    p.add_argument("--part", type=int, default=10)
    p.add_argument("--far-rows", type=int, default=200)
    p.add_argument("--smoke", action="store_true", help="the smallest setting (tests/test_bench_scripts.py)")
    args = p.parse_args()
    if args.smoke:
        work = Path(tempfile.mkdtemp(prefix="city_strays_smoke_"))
        try:
            strays(smoke_results(work), 0, 8)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return 0
    if not args.results:
        p.error("RESULTS_DIR is required (or --smoke)")
    strays(args.results, args.part, args.far_rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
