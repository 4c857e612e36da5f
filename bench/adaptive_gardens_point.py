"""Adaptive candidate counts on Gardens Point: a stop rule fitted on one half of the night
queries, applied by the rerank job to the other half, against reranking a fixed top-K.

    .venv/bin/python bench/adaptive_gardens_point.py [--candidates 20] [--work /tmp/r2f_adaptive_gp]
        [--checkpoint TRAINED.pt]      # also the learned reranker (bench/gardens_point_protocol.py's)

Protocol: EfficientNet-Lite0 at 272x480; database all 200 day_right frames; queries night_right,
frames 0-99 to fit the rule, 100-199 to apply it; a query is right within 2 frames
(ground_truth.csv's positives_tol2: frames are place indices, ``utm_east`` here)::

    day_right 0-199 ──► database store + index
    night_right 0-99    ──► rerank job, fixed K ──► r2f evaluate --sweep-adaptive --write-rule ──► RULE.yaml
    night_right 100-199 ──► rerank job, fixed K                      ──► row "fixed K"
                        ──► rerank job, --adaptive RULE.yaml (same query store) ──► row "adaptive"

Prints, per reranker, both rows (R@1/5/10, pairs scored, mean pairs per query) and the rule.
Target (RANSAC): adaptive R@1 within 1 point of fixed K with at most 40 % of its pairs.
``--checkpoint``: the same two rows for the learned reranker (r2former) of those weights, with the
stores extracted by them; no target.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(Path(os.environ.get("R2F_SHARED", ROOT.parent / "shared")) / "data"
                                         / "gardens_point"))
    p.add_argument("--work", default="/tmp/r2f_adaptive_gp")
    p.add_argument("--candidates", type=int, default=20)
    p.add_argument("--image-size", nargs=2, type=int, default=[272, 480])
    p.add_argument("--radius", type=float, default=2.0, help="frames")
    p.add_argument("--checkpoint", help="weights with a trained reranker: also report r2former")
    p.add_argument("--smoke", action="store_true",
                   help="smallest setting: 16 database frames, 8 + 8 queries, 128x224, K = 5, one scorer actor, "
                        "a temporary --work")
    args = p.parse_args()
    db_frames, fit_frames, test_frames = range(200), range(100), range(100, 200)
    scorers = None  # the rerank job's scorer pool: what the cluster has
    if args.smoke:
        import tempfile
        args.work, args.image_size, args.candidates = tempfile.mkdtemp(prefix="r2f_adaptive_smoke_"), [128, 224], 5
        db_frames, fit_frames, test_frames = range(100, 116), range(100, 108), range(108, 116)
        scorers = 1

    from pipeline import evaluate, index
    from pipeline.cluster import ensure_ray
    from pipeline.datasets import write_frame_manifest
    from pipeline.log import setup_logging
    from pipeline.metrics import percent
    from pipeline.rerank import RerankConfig, extract_into, run

    setup_logging("WARNING")
    data, work = Path(args.data), Path(args.work)
    ensure_ray()
    setups = [("ransac", None)] + ([("r2former", args.checkpoint)] if args.checkpoint else [])
    lines = []
    for reranker, ckpt in setups:
        tag = reranker if ckpt is None else f"{reranker}-{Path(ckpt).stem}"
        base = work / tag
        t0 = time.perf_counter()
        db, idx = str(base / "database_store"), str(base / "index")
        if not (base / "index").exists():
            extract_into(write_frame_manifest(base / "db.csv", data / "day_right", db_frames), db, "efficientnet-lite0",
                         ckpt, args.image_size, {"progress": False})
            index.build(index.IndexConfig(store=db, index_dir=idx))

        def rerank(split: str, frames, results: str, adaptive=None, base=base, db=db, idx=idx, ckpt=ckpt,
                   reranker=reranker):
            q_store = str(base / f"query_store_{split}")
            queries = None if (base / f"query_store_{split}").exists() else \
                write_frame_manifest(base / f"{split}.csv", data / "night_right", frames)
            return run(RerankConfig(queries=queries, query_store=q_store, database_store=db, index_dir=idx,
                                    results=str(base / results), backbone="efficientnet-lite0", checkpoint=ckpt,
                                    image_size=list(args.image_size), reranker=reranker,
                                    candidates=args.candidates, adaptive=adaptive, num_actors=scorers,
                                    extract={"progress": False}))

        def fresh(name: str, base=base) -> None:
            import shutil
            shutil.rmtree(base / name, ignore_errors=True)

        for name in ("fit_fixed", "test_fixed", "test_adaptive"):
            fresh(name)
        fit = rerank("fit", fit_frames, "fit_fixed")
        rule_url = str(base / "RULE.yaml")
        sweep = evaluate.run(evaluate.EvaluateConfig(results=fit.results, database_store=db,
                                                     positive_radius=args.radius, sweep_adaptive=True,
                                                     write_rule=rule_url))
        print(f"{reranker}: rules fitted on night_right 0-99 (fixed K = {args.candidates} results)")
        print(evaluate.format_adaptive_sweep(sweep.adaptive_sweep))
        fixed = rerank("test", test_frames, "test_fixed")
        rule = sweep.rules
        adaptive = rerank("test", test_frames, "test_adaptive", adaptive=rule)
        rows = []
        for label, res in ((f"fixed K = {args.candidates}", fixed), ("adaptive", adaptive)):
            m = evaluate.run(evaluate.EvaluateConfig(results=res.results, database_store=db,
                                                     positive_radius=args.radius)).metrics
            r = m["rerankers"][reranker]
            rows.append((label, r, m["global"]))
        full_pairs = rows[0][1]["pairs_scored"]
        lines.append(f"\n{reranker}{'' if ckpt is None else ' (' + ckpt + ')'}: fitted on night_right 0-99, "
                     f"applied to 100-199 ({time.perf_counter() - t0:.0f} s)")
        lines.append(f"rule: {json.dumps(rule[reranker])}")
        lines.append(f"{'':>16} {'R@1':>6} {'R@5':>6} {'R@10':>6} {'pairs':>7} {'pairs/query':>12} {'of fixed':>9}")
        lines.append(f"{'global only':>16} {percent(rows[0][2]['recall@1']):>6} {percent(rows[0][2]['recall@5']):>6} "
                     f"{percent(rows[0][2]['recall@10']):>6} {0:>7} {0:>12.2f} {'':>9}")
        for label, r, _ in rows:
            ppq = r["pairs_per_query"]
            lines.append(f"{label:>16} {percent(r['recall@1']):>6} {percent(r['recall@5']):>6} "
                         f"{percent(r['recall@10']):>6} {r['pairs_scored']:>7} {ppq['mean']:>12.2f} "
                         f"{100 * r['pairs_scored'] / full_pairs:>8.1f}%")
        d1 = 100 * (rows[1][1]["recall@1"] - rows[0][1]["recall@1"])
        share = rows[1][1]["pairs_scored"] / full_pairs
        if reranker == "ransac":
            met = d1 >= -1.0 - 1e-9 and share <= 0.40
            lines.append(f"target (R@1 within 1 point, <= 40 % of the pairs): R@1 {d1:+.1f} points, "
                         f"{100 * share:.1f} % of the pairs: {'met' if met else 'NOT met'}")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
