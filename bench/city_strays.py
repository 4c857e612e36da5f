"""How far from its query's street the candidates of a rerank run on a ``bench/city.py`` city lie.

    .venv/bin/python bench/city_strays.py RESULTS_DIR [--part 10] [--far-rows 200]

A candidate whose Zarr row is more than ``--far-rows`` rows from the query's global top-1
candidate's row is a "stray": it lies outside the stretch of database rows its score partition
covers, so it costs a whole token chunk that its partition's other queries rarely share. Prints
the stray fraction of one results part, overall and by global rank, with its progress marker's
fetched bytes and distinct candidates. (City image names carry the row: ``..._<row>.jpg``.)
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results")
    p.add_argument("--part", type=int, default=10)
    p.add_argument("--far-rows", type=int, default=200)
    args = p.parse_args()
    root = Path(args.results)
    t = pq.read_table(root / f"part-{args.part:05d}.parquet", columns=["query_id", "global_rank", "candidate_path"])
    rank = t.column("global_rank").to_numpy()
    qid = t.column("query_id").to_numpy()
    row = np.array([int(x.rsplit("_", 1)[1].split(".")[0]) for x in t.column("candidate_path").to_pylist()])
    first = rank == 1
    top1 = dict(zip(qid[first].tolist(), row[first].tolist()))
    far = np.abs(row - np.array([top1[q] for q in qid.tolist()])) > args.far_rows
    marker = json.loads((root / "progress" / f"part-{args.part:05d}.json").read_text())
    print(f"part {args.part}: {len(row)} pairs, {len(top1)} queries; candidates > {args.far_rows} rows from the "
          f"query's top-1 row: {100 * far.mean():.3f} % of pairs; at global ranks 91-100: "
          f"{100 * far[rank > 90].mean():.3f} %; ranks 1-50: {100 * far[rank <= 50].mean():.3f} %")
    print(f"part {args.part}: fetched {marker['fetched_token_bytes'] / 1e9:.2f} GB for "
          f"{marker['distinct_candidates']} distinct candidates (load average {os.getloadavg()[0]:.1f})")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    raise SystemExit(main())
