"""Global hardest-negative mining at city scale, against one plain FAISS Flat search.

    .venv/bin/python bench/bench_mine.py --database 1000000 --queries 10000 100000 [--root /tmp/r2f_bench_mine]
    .venv/bin/python bench/bench_mine.py --validation 10000 100000      # training validation top-K step only
    .venv/bin/python bench/bench_mine.py --smoke    # 512-row city, 64 queries, top 20, and a 50 x 500 validation

On a synthetic city (``bench/city.py``, ``tokens=0``, database parts of ``--part-rows`` 1,024
rows, query sets with positions), for each query count in one run:

- ``r2f mine`` (``pipeline.mine.run``, a driver subprocess joined to this script's Ray): wall
  time, of which building the exact mining index (first run only; later runs reuse it), and the
  peak RSS of the driver and of the Ray workers (largest single worker, and the largest sum);
- one plain FAISS ``IndexFlatIP`` search of the same queries over the same descriptors in one
  process with every core (``k = top_k``): load + add, search, peak RSS;
- the ratios mining / plain search.

``--validation Q N``: ``pipeline.train.recall_at`` (FAISS top-20 + positions, what training
validation runs each epoch) on Q x N synthetic unit descriptors in a subprocess: wall, peak RSS.

Every figure is printed with the 1-minute load average beside it (other jobs share the machine).
Joins the Ray cluster named by ``RAY_ADDRESS`` when set, else starts a local one.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

GB = 1 << 30


def load() -> str:
    return f"load {os.getloadavg()[0]:.1f}"


class RssSampler:
    """Samples, every ``period`` s, the RSS of one driver process and of this process's Ray
    workers (descendants whose command line names a Ray worker)."""

    def __init__(self, driver_pid: int, period: float = 0.2):
        import psutil

        self.psutil, self.driver_pid, self.period = psutil, driver_pid, period
        self.driver_peak = self.worker_peak = self.workers_sum_peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def _rss(self, pid: int) -> int:
        try:
            return self.psutil.Process(pid).memory_info().rss
        except (self.psutil.NoSuchProcess, self.psutil.AccessDenied):
            return 0

    def _run(self) -> None:
        me = self.psutil.Process(os.getpid())
        while not self._stop.is_set():
            self.driver_peak = max(self.driver_peak, self._rss(self.driver_pid))
            total = 0
            for p in me.children(recursive=True):
                try:
                    cmd = " ".join(p.cmdline())
                except (self.psutil.NoSuchProcess, self.psutil.AccessDenied):
                    continue
                if "default_worker.py" in cmd or cmd.startswith("ray::"):
                    rss = self._rss(p.pid)
                    total += rss
                    self.worker_peak = max(self.worker_peak, rss)
            self.workers_sum_peak = max(self.workers_sum_peak, total)
            self._stop.wait(self.period)


MINE_DRIVER = """
import json, resource, sys, time
from pipeline.mine import MineConfig, run
cfg = MineConfig(**json.loads(sys.argv[1]))
t0 = time.perf_counter()
r = run(cfg)
print("RESULT " + json.dumps({"wall": time.perf_counter() - t0, "queries": r.queries, "extra": r.extra,
      "maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}, default=str))
"""

PLAIN_SEARCH = """
import json, resource, sys, time
import faiss, numpy as np
from pipeline import storage
db_store, q_store, k = sys.argv[1], sys.argv[2], int(sys.argv[3])
t0 = time.perf_counter()
x = np.ascontiguousarray(storage.descriptors_of(storage.read_global_table(db_store, ["global_descriptor"])))
q = np.ascontiguousarray(storage.descriptors_of(storage.read_global_table(q_store, ["global_descriptor"])))
index = faiss.IndexFlatIP(x.shape[1])
index.add(x)
del x
t1 = time.perf_counter()
index.search(q, k)
t2 = time.perf_counter()
print("RESULT " + json.dumps({"load": t1 - t0, "search": t2 - t1, "threads": faiss.omp_get_max_threads(),
      "maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""

VALIDATION = """
import json, resource, sys, time
import numpy as np
from pipeline.train import global_recall_at as recall_at
nq, nd, dim = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
rng = np.random.default_rng(0)
db = rng.standard_normal((nd, dim), dtype=np.float32); db /= np.linalg.norm(db, axis=1, keepdims=True)
q = rng.standard_normal((nq, dim), dtype=np.float32); q /= np.linalg.norm(q, axis=1, keepdims=True)
db_pos = rng.uniform(0, 10000, (nd, 2)); q_pos = rng.uniform(0, 10000, (nq, 2))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
t0 = time.perf_counter()
r = recall_at(q, db, q_pos, db_pos, 25.0)
print("RESULT " + json.dumps({"wall": time.perf_counter() - t0, "recall": r, "inputs_rss": before,
      "maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def _result(proc_out: str) -> dict:
    for line in proc_out.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise RuntimeError(f"subprocess printed no result:\n{proc_out[-3000:]}")


def _env(**extra: str) -> dict:
    return dict(os.environ, PYTHONPATH=str(ROOT), **extra)


def run_validation(nq: int, nd: int, dim: int) -> None:
    out = subprocess.run([sys.executable, "-c", VALIDATION, str(nq), str(nd), str(dim)], env=_env(),
                         capture_output=True, text=True, check=True).stdout
    r = _result(out)
    print(f"validation top-K step ({nq} queries x {nd} database, {dim}-d): {r['wall']:.1f} s, peak RSS "
          f"{r['maxrss'] / GB:.2f} GB (inputs alone {r['inputs_rss'] / GB:.2f} GB) [{load()}]  "
          f"recall@1/5/10/20 {[round(v, 2) for v in r['recall'].values()]}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--database", type=int, default=1_000_000)
    p.add_argument("--queries", type=int, nargs="+", default=[10_000, 100_000])
    p.add_argument("--part-rows", type=int, default=1024)
    p.add_argument("--top-k", type=int, default=200)
    p.add_argument("--radius", type=float, default=25.0)
    p.add_argument("--block", type=int, default=4096, help="query_block_size")
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--root", default="/tmp/r2f_bench_mine")
    p.add_argument("--keep", action="store_true", help="reuse cities already written under --root")
    p.add_argument("--validation", type=int, nargs=2, metavar=("Q", "N"),
                   help="only the training-validation top-K step on Q x N synthetic descriptors")
    p.add_argument("--smoke", action="store_true",
                   help="the smallest setting of both modes, in a temporary --root (tests/test_bench_scripts.py)")
    args = p.parse_args()

    if args.smoke:
        import tempfile
        args.database, args.queries, args.part_rows, args.top_k, args.block = 512, [64], 256, 20, 32
        args.keep = False
        smoke_root = tempfile.mkdtemp(prefix="bench_mine_smoke_")
        args.root = smoke_root
        try:
            run_validation(50, 500, args.dim)
            return mine_and_compare(args)
        finally:
            shutil.rmtree(smoke_root, ignore_errors=True)
    if args.validation:
        run_validation(*args.validation, args.dim)
        return 0
    return mine_and_compare(args)


def mine_and_compare(args) -> int:

    import ray
    from city import write_city

    from pipeline.cluster import ensure_ray

    root = Path(args.root)
    if root.exists() and not args.keep:
        shutil.rmtree(root)
    root.mkdir(parents=True, exist_ok=True)
    db_store = root / f"db_{args.database}"
    t0 = time.perf_counter()
    if not (db_store / "manifest.json").exists():
        write_city(str(db_store), args.database, tokens=0, dim=args.dim, part_rows=args.part_rows)
        print(f"city database: {args.database} rows in {args.part_rows}-row parts, "
              f"{time.perf_counter() - t0:.0f} s [{load()}]", flush=True)

    ensure_ray(num_cpus=os.cpu_count())
    address = ray.get_runtime_context().gcs_address
    index_dir = None
    rows = []
    for nq in args.queries:
        q_store = root / f"q_{nq}"
        if not (q_store / "manifest.json").exists():
            write_city(str(q_store), nq, tokens=0, dim=args.dim, part_rows=args.part_rows,
                       queries_of=args.database)
        out = root / f"mined_{nq}"
        shutil.rmtree(out, ignore_errors=True)
        cfg = {"queries": str(q_store), "database": str(db_store), "output": str(out), "top_k": args.top_k,
               "soft_positive_radius": args.radius, "query_block_size": args.block}
        if index_dir:   # the first run built the exact mining index; later runs reuse it
            cfg.update(index_dir=index_dir, index_version="current")
        proc = subprocess.Popen([sys.executable, "-c", MINE_DRIVER, json.dumps(cfg)], env=_env(RAY_ADDRESS=address),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        with RssSampler(proc.pid) as rss:
            text = proc.communicate()[0]
        if proc.returncode:
            print(text[-4000:])
            raise SystemExit(f"mining {nq} queries failed (exit {proc.returncode})")
        mined = _result(text)
        index_dir = index_dir or mined["extra"]["index_dir"]
        la_mine = load()
        plain = _result(subprocess.run([sys.executable, "-c", PLAIN_SEARCH, str(db_store), str(q_store),
                                        str(args.top_k)], env=_env(), capture_output=True, text=True,
                                       check=True).stdout)
        la_plain = load()
        build = float(mined["extra"].get("index_seconds", 0.0))
        row = dict(queries=nq, wall=mined["wall"], build=build, driver=max(rss.driver_peak, mined["maxrss"]),
                   worker=rss.worker_peak, workers=rss.workers_sum_peak, plain_search=plain["search"],
                   plain_load=plain["load"], plain_rss=plain["maxrss"], threads=plain["threads"])
        rows.append(row)
        print(f"mine {nq} queries x {args.database} database (top {args.top_k}, radius {args.radius:g}): "
              f"wall {row['wall']:.1f} s (index build {build:.1f} s, search+merge {row['wall'] - build:.1f} s), "
              f"driver peak RSS {row['driver'] / GB:.2f} GB, largest worker {row['worker'] / GB:.2f} GB, "
              f"all workers {row['workers'] / GB:.2f} GB [{la_mine}]", flush=True)
        print(f"plain FAISS IndexFlatIP, same queries ({row['threads']} threads): search {row['plain_search']:.1f} s, "
              f"load+add {row['plain_load']:.1f} s, peak RSS {row['plain_rss'] / GB:.2f} GB [{la_plain}]", flush=True)
        print(f"ratio mining wall / plain search: {row['wall'] / row['plain_search']:.2f}x "
              f"(without the index build {(row['wall'] - build) / row['plain_search']:.2f}x; "
              f"plain load+search {(row['plain_load'] + row['plain_search']):.1f} s) [{load()}]", flush=True)
    if len(rows) > 1:
        a, b = rows[0], rows[-1]
        print(f"driver peak RSS {b['queries']} vs {a['queries']} queries: {b['driver'] / max(1, a['driver']):.2f}x "
              f"({b['driver'] / GB:.2f} GB vs {a['driver'] / GB:.2f} GB) [{load()}]")
    ray.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
