"""Training validation at scale: the two steps every epoch runs, each in its own process.

    .venv/bin/python bench/bench_validation.py [--rerank 300 50000] [--retrieval 10000 100000] [--threads 1]
    .venv/bin/python bench/bench_validation.py --smoke    # 4 x 64 rerank (T = 8), 50 x 500 retrieval

- ``--rerank Q N``: rerank-stage validation, ``pipeline.train.rerank_recall_at`` (what
  ``r2f train --stage rerank`` runs with ``val`` stores), on a synthetic city from
  ``bench/city.py`` (``write_city(store, N, tokens=64)`` and Q queries viewing the same places,
  with positions), global top ``--candidates`` (20) reranked by a randomly initialised R²Former
  reranker behind the training step module (identity token adapter, as the stored-token path
  trains it). Prints wall time, pairs per second, the process's peak RSS (``getrusage``) and the
  RSS before the call (interpreter, torch, model), next to what the database's tokens would take
  as float32 if they were read at once.
- ``--retrieval Q N``: the retrieval validation top-K step, ``pipeline.train.recall_at`` (FAISS
  top-20 + positions) on Q x N synthetic unit descriptors (256-d), as ``bench/bench_mine.py
  --validation`` runs it.

Every figure is printed with the 1-minute load average beside it (other jobs share the machine).
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_mine import GB, VALIDATION, _env, _result, load  # noqa: E402

RERANK_VALIDATION = """
import json, resource, sys, time
import torch
from pipeline.model import R2Former
from pipeline.train import _Step, rerank_recall_at, token_adapter
q_store, db_store, k, threads = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
torch.set_num_threads(threads)
torch.manual_seed(0)
model = R2Former(img_size=(128, 160)).eval()
step = _Step.module(model, token_adapter(model)).eval()
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
t0 = time.perf_counter()
r = rerank_recall_at(lambda q, c: step("rerank_tokens", q, c), q_store, db_store, radius=25.0, candidates=k)
print("RESULT " + json.dumps({"wall": time.perf_counter() - t0, "recall": r, "before_rss": before,
      "maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def run_rerank(nq: int, nd: int, tokens: int, candidates: int, root: Path, threads: int) -> None:
    from city import write_city

    db, q = root / f"db_{nd}_t{tokens}", root / f"q_{nq}_of_{nd}_t{tokens}"
    t0 = time.perf_counter()
    for store, n, of in ((db, nd, None), (q, nq, nd)):
        if not (store / "manifest.json").exists():
            shutil.rmtree(store, ignore_errors=True)
            write_city(str(store), n, tokens=tokens, part_rows=1024, queries_of=of)
    print(f"city: {nd} database + {nq} query rows, T = {tokens}, written in {time.perf_counter() - t0:.0f} s "
          f"[{load()}]", flush=True)
    out = subprocess.run([sys.executable, "-c", RERANK_VALIDATION, str(q), str(db), str(candidates), str(threads)],
                         env=_env(OMP_NUM_THREADS=str(threads)), capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"rerank validation failed:\n{out.stderr[-4000:]}")
    r = _result(out.stdout)
    pairs = nq * candidates
    all_tokens = nd * tokens * 131 * 4
    print(f"rerank-stage validation ({nq} queries x {candidates} candidates, database {nd} x T = {tokens}, "
          f"{threads} threads): {r['wall']:.1f} s ({pairs / r['wall']:.0f} pairs/s), peak RSS "
          f"{r['maxrss'] / GB:.2f} GB (before the call {r['before_rss'] / GB:.2f} GB; the database's tokens "
          f"as float32 would be {all_tokens / GB:.2f} GB) [{load()}]  "
          f"recall@1/5/10/20 {[round(v, 2) for v in r['recall'].values()]}", flush=True)


def run_retrieval(nq: int, nd: int, dim: int, threads: int) -> None:
    out = subprocess.run([sys.executable, "-c", VALIDATION, str(nq), str(nd), str(dim)],
                         env=_env(OMP_NUM_THREADS=str(threads)),
                         capture_output=True, text=True, check=True).stdout
    r = _result(out)
    print(f"retrieval validation top-K step ({nq} queries x {nd} database, {dim}-d, {threads} threads): "
          f"{r['wall']:.1f} s, peak RSS "
          f"{r['maxrss'] / GB:.2f} GB (inputs alone {r['inputs_rss'] / GB:.2f} GB) [{load()}]  "
          f"recall@1/5/10/20 {[round(v, 2) for v in r['recall'].values()]}", flush=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rerank", type=int, nargs=2, metavar=("Q", "N"), default=[300, 50_000])
    p.add_argument("--retrieval", type=int, nargs=2, metavar=("Q", "N"), default=[10_000, 100_000])
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--candidates", type=int, default=20)
    p.add_argument("--dim", type=int, default=256)
    # 1 = TrainConfig.threads_per_worker's default, what a Ray Train worker validates with (and on a
    # shared, oversubscribed machine 2 OpenMP threads ran the reranker ~30x slower than 1).
    p.add_argument("--threads", type=int, default=1, help="torch / FAISS (OpenMP) threads of each step")
    p.add_argument("--skip", choices=["rerank", "retrieval"], action="append", default=[])
    p.add_argument("--root", default="/tmp/r2f_bench_validation")
    p.add_argument("--smoke", action="store_true",
                   help="the smallest setting, in a temporary --root (tests/test_bench_scripts.py)")
    args = p.parse_args()
    if args.smoke:
        import tempfile
        args.rerank, args.retrieval, args.tokens, args.candidates = [4, 64], [50, 500], 8, 5
        args.root = tempfile.mkdtemp(prefix="bench_validation_smoke_")
    root = Path(args.root)
    root.mkdir(parents=True, exist_ok=True)
    try:
        if "rerank" not in args.skip:
            run_rerank(*args.rerank, args.tokens, args.candidates, root, args.threads)
        if "retrieval" not in args.skip:
            run_retrieval(*args.retrieval, args.dim, args.threads)
    finally:
        if args.smoke:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
