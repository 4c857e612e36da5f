"""City-scale reranking: memory, throughput and token reads of the streaming rerank job.

    .venv/bin/python bench/bench_city.py [--images 1000000] [--queries 10000,100000] [--tokens 64] \
        [--candidates 100] [--reranker token-similarity] [--adaptive RULE.yaml] [--out /tmp/r2f_bench_city]

Writes a synthetic city with ``bench/city.py`` (street grid, 4 views per place, rows in
extraction order, default ``chunk_rows`` 16, local tokens at T for every image: 1M x 64 tokens
is ~17 GB), indexes it, writes query sets of each size (positions stripped, as real query sets
come), and runs ``pipeline.rerank.run`` once per size in a fresh driver process on an embedded
local Ray. For each run it prints: wall time, pairs/s, peak RSS of the driver and of each kind
of Ray actor (each process's own high-water mark, ``VmHWM``, read every 0.5 s, so a short peak
is not missed), the object store's peak, the token bytes fetched from Zarr against the bytes
of the distinct candidates served, and the stray pairs (scored by the partition owning their
candidate) with the query-token bytes copied for them, with the load average beside them.

``--reranker token-similarity`` (default) is a cheap stand-in that reads the real tokens through
the same chunk cache (mean best cosine similarity of token features); ``ransac`` and ``r2former``
run the real scorers. The stores are reused when they exist with the same parameters.

``--adaptive RULE.yaml`` (``configs/adaptive_city.yaml`` for the stand-in scorer) runs each query
set twice, fixed K then with the rule (pipeline/rerank/adaptive.py), and prints them side by side:
pairs scored, wall time and the peaks, so the fixed run's memory bounds can be checked against
the adaptive one's.

``--smoke`` checks the script at the smallest setting (no figure): 256 images of 8 tokens, 32
queries, K = 10, partitions of 16 queries, in a temporary ``--out``; the runs join the Ray named
by ``RAY_ADDRESS`` when set instead of starting an embedded one each (the actor peaks are then
not sampled: those actors are not the driver's children).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


class Sampler(threading.Thread):
    """Peak RSS of this process and of every Ray worker process by its title (``ray::Class``),
    and the object store's peak use, sampled until stopped."""

    def __init__(self, period: float = 0.5):
        super().__init__(daemon=True)
        import psutil
        self.psutil, self.period = psutil, period
        self.me = psutil.Process()
        self.driver_peak = 0
        self.kinds: dict[str, int] = {}
        self.store_peak = 0
        self._halt = threading.Event()

    def run(self) -> None:
        # The object store is asked in its own thread: a slow answer must not stall process sampling.
        store = threading.Thread(target=self._store_loop, daemon=True)
        store.start()
        while not self._halt.is_set():
            self.driver_peak = max(self.driver_peak, _peak_rss(self.me.pid, self.me.memory_info().rss))
            for p in self._ray_processes():
                cmd = p.info.get("cmdline") or []
                if cmd and cmd[0].startswith("ray::") and p.info.get("memory_info"):
                    # "ray::Class.method" or, for a named actor, "ray::name:Class.method"
                    kind = cmd[0].split()[0][5:].split(".")[0].split(":")[-1]
                    if kind in ("IDLE", ""):
                        continue
                    self.kinds[kind] = max(self.kinds.get(kind, 0), _peak_rss(p.pid, p.info["memory_info"].rss))
            self._halt.wait(self.period)
        store.join()

    def _store_loop(self) -> None:
        while not self._halt.is_set():
            self.store_peak = max(self.store_peak, _object_store_used())
            self._halt.wait(2.0)

    def _ray_processes(self):
        """This driver's embedded Ray (its descendants) only: other Ray sessions on the machine do not count."""
        out = []
        for p in self.me.children(recursive=True):
            try:
                p.info = {"cmdline": p.cmdline(), "memory_info": p.memory_info()}
                out.append(p)
            except self.psutil.Error:
                continue
        return out

    def stop(self) -> None:
        self._halt.set()
        self.join()


def _peak_rss(pid: int, rss: int) -> int:
    """The process's own high-water mark of resident memory (Linux ``VmHWM``): exact, however
    short the peak was between two samples; elsewhere the RSS sampled now."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return max(rss, int(line.split()[1]) * 1024)
    except OSError:
        pass
    return rss


def _object_store_used() -> int:
    try:
        from ray._private.internal_api import memory_summary
        m = re.search(r"Plasma memory usage (\d+) MiB", memory_summary(stats_only=True))
        return int(m.group(1)) * 1024 * 1024 if m else 0
    except Exception:
        return 0


def drive(config: dict) -> None:
    """One rerank run in this (fresh) process: the driver whose memory is measured."""
    from pipeline.cluster import ensure_ray
    from pipeline.log import setup_logging
    from pipeline.rerank import RerankConfig, run

    setup_logging("WARNING")
    ensure_ray(num_cpus=config.pop("_cpus", None))
    sampler = Sampler()
    sampler.start()
    t = time.perf_counter()
    res = run(RerankConfig(**config))
    wall = time.perf_counter() - t
    sampler.stop()
    print("RESULT " + json.dumps({
        "wall_s": wall, "pairs": res.num_pairs, "rerank_s": res.stage_seconds.get("rerank"),
        "pairs_per_s": res.num_pairs / wall if wall else 0.0, "driver_peak_rss": sampler.driver_peak,
        "actor_peak_rss": sampler.kinds, "object_store_peak": sampler.store_peak,
        "fetched_token_bytes": res.fetched_token_bytes, "distinct_candidate_bytes": res.distinct_candidate_bytes,
        "fetched_query_token_bytes": res.fetched_query_token_bytes, "search_s": res.stage_seconds.get("search"),
        "stray_pairs": res.stray_pairs, "stray_query_token_bytes": res.stray_query_token_bytes,
        "failed_partitions": res.failed_partitions, "load": os.getloadavg()[0],
        "pairs_scored": sum(res.pairs_scored.values()), "partitions": res.partitions,
        "job_pairs_per_second": res.pairs_per_second, "scorer_slots": res.scorer_slots}), flush=True)


def direct_rate(results: str, q_store: str, db_store: str, reranker: str, n: int, batch: int = 400) -> tuple[float, int]:
    """The same scorer (``PairScorer``, one thread) in this process on the job's first ``n`` pairs:
    (pairs/s, pairs). Reads the two stores' id -> row maps (O(images), this bench's process only)."""
    import numpy as np

    from bench.bench_rerank import real_pairs
    from pipeline.ransac import RansacConfig
    from pipeline.rerank import PairScorer

    qrows, crows = real_pairs(results, q_store, db_store, n)
    scorer = PairScorer(reranker, "efficientnet-lite0", None, q_store, db_store, RansacConfig(), threads=1)
    t = time.perf_counter()
    for a in range(0, len(qrows), batch):
        scorer({"pair": np.arange(len(qrows[a:a + batch])), "query_row": qrows[a:a + batch],
                "candidate_row": crows[a:a + batch]})
    return len(qrows) / (time.perf_counter() - t), len(qrows)


def _write_once(store: Path, params: dict, write) -> None:
    stamp = store.with_suffix(".params.json")
    if store.exists() and stamp.exists() and json.loads(stamp.read_text()) == params:
        return
    import shutil
    shutil.rmtree(store, ignore_errors=True)
    t = time.perf_counter()
    write()
    stamp.write_text(json.dumps(params))
    print(f"wrote {store.name}: {params} in {time.perf_counter() - t:.0f} s (load {os.getloadavg()[0]:.1f})",
          flush=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=1_000_000)
    p.add_argument("--queries", default="10000,100000", help="query-set sizes, comma-separated")
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--candidates", type=int, default=100)
    p.add_argument("--reranker", default="token-similarity")
    p.add_argument("--partition-queries", type=int, default=4096)
    p.add_argument("--num-actors", type=int, default=None)
    p.add_argument("--cpus", type=int, default=None, help="CPUs of the embedded Ray (default: all)")
    p.add_argument("--adaptive", metavar="RULE.yaml", help="also run each query set with this adaptive rule")
    p.add_argument("--direct-pairs", type=int, default=20000, help="pairs scored directly for the job's efficiency")
    p.add_argument("--out", default="/tmp/r2f_bench_city")
    p.add_argument("--smoke", action="store_true", help="the smallest setting (see above)")
    p.add_argument("--drive", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.drive:
        drive(json.loads(args.drive))
        return 0
    if args.smoke:
        import tempfile
        tmp = tempfile.TemporaryDirectory(prefix="bench-city-")
        args.images, args.queries, args.tokens, args.candidates = 256, "32", 8, 10
        args.partition_queries, args.cpus, args.out, args.direct_pairs = 16, 2, tmp.name, 64
        try:
            return bench(args)
        finally:
            tmp.cleanup()
    return bench(args)


def bench(args) -> int:

    from bench.city import write_city
    from pipeline import index
    from pipeline.cluster import ensure_ray

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    db = out / "database_store"
    _write_once(db, {"images": args.images, "tokens": args.tokens},
                lambda: write_city(str(db), args.images, tokens=args.tokens))
    index_dir = out / "index"
    if not (index_dir / "CURRENT").exists() or db.with_suffix(".params.json").stat().st_mtime > \
            (index_dir / "CURRENT").stat().st_mtime:
        shutil.rmtree(index_dir, ignore_errors=True)
        ensure_ray(num_cpus=args.cpus)
        t = time.perf_counter()
        index.build(index.IndexConfig(store=str(db), index_dir=str(index_dir)))
        print(f"indexed {args.images} descriptors in {time.perf_counter() - t:.0f} s", flush=True)
        import ray
        ray.shutdown()

    rule = None
    if args.adaptive:
        from pipeline.rerank.stage import read_rule
        rule = read_rule(args.adaptive)
    print(f"{'queries':>8} {'mode':>8} {'pairs':>10} {'scored':>10} {'wall s':>8} {'search s':>9} {'pairs/s':>9} "
          f"{'driver MB':>10} {'store MB':>9} {'fetched GB':>11} {'distinct GB':>12} {'ratio':>6} {'query GB':>9} {'strays':>9} "
          f"{'stray GB':>9} {'load':>5}  "
          f"actor peak RSS MB")
    rows = []
    for n in [int(x) for x in args.queries.split(",") if x]:
        q = out / f"queries_{n}"
        _write_once(q, {"queries": n, "of": args.images, "tokens": args.tokens},
                    lambda q=q, n=n: write_city(str(q), n, tokens=args.tokens, queries_of=args.images,
                                                   strip_positions=True))
        pair = []
        for mode, adaptive in [("fixed", None)] + ([("adaptive", rule)] if rule else []):
            results = out / (f"results_{n}" if adaptive is None else f"results_{n}_adaptive")
            shutil.rmtree(results, ignore_errors=True)
            cfg = dict(query_store=str(q), database_store=str(db), index_dir=str(index_dir), results=str(results),
                       backbone="efficientnet-lite0", reranker=args.reranker, candidates=args.candidates,
                       partition_queries=args.partition_queries, num_actors=args.num_actors, _cpus=args.cpus,
                       adaptive=adaptive)
            env = dict(os.environ, PYTHONPATH=str(ROOT))
            if not args.smoke:  # the measured driver starts its own Ray
                env.pop("RAY_ADDRESS", None)
            done = subprocess.run([sys.executable, __file__, "--drive", json.dumps(cfg)], env=env, cwd=ROOT,
                                  capture_output=True, text=True)
            if done.returncode != 0:
                print(done.stderr[-4000:], file=sys.stderr)
                return 1
            r = json.loads(done.stdout.split("RESULT ", 1)[1].splitlines()[0])
            _print_row(n, mode, r)
            pair.append(r)
            if adaptive is None:  # job efficiency: the job's rate against its slots at the direct rate
                direct, k = direct_rate(str(results), str(q), str(db), args.reranker, args.direct_pairs)
                slots = r["scorer_slots"]
                ratio = r["job_pairs_per_second"] / (slots * direct) if direct and slots else float("nan")
                print(f"{n:>8} job efficiency: job {r['job_pairs_per_second']:.0f} pairs/s (pairs / scoring-phase "
                      f"wall) over {slots} scorer slots, direct {direct:.0f} pairs/s (one thread, this process, "
                      f"the job's first {k} pairs), ratio {ratio:.2f}, load {os.getloadavg()[0]:.1f}", flush=True)
        rows.append((n, pair[0]))  # the fixed run: the peaks' growth across query-set sizes
        if len(pair) == 2:
            f, a = pair
            kinds = sorted(set(f["actor_peak_rss"]) & set(a["actor_peak_rss"]))
            print(f"{n:>8} adaptive / fixed: pairs scored {a['pairs_scored']} / {f['pairs_scored']} "
                  f"({100 * a['pairs_scored'] / max(1, f['pairs_scored']):.1f} %), wall {a['wall_s']:.1f} / "
                  f"{f['wall_s']:.1f} s; peaks within the fixed run's: driver "
                  f"x{a['driver_peak_rss'] / max(1, f['driver_peak_rss']):.2f}, "
                  + ", ".join(f"{k} x{a['actor_peak_rss'][k] / max(1, f['actor_peak_rss'][k]):.2f}" for k in kinds),
                  flush=True)
    _growth(rows)
    print(f"(machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f})")
    return 0


def _print_row(n: int, mode: str, r: dict) -> None:
    ratio = r["fetched_token_bytes"] / r["distinct_candidate_bytes"] if r["distinct_candidate_bytes"] else 0
    actors = ", ".join(f"{k} {v / 2**20:.0f}" for k, v in sorted(r["actor_peak_rss"].items()))
    print(f"{n:>8} {mode:>8} {r['pairs']:>10} {r['pairs_scored']:>10} {r['wall_s']:>8.1f} {r['search_s'] or 0:>9.1f} "
          f"{r['pairs_per_s']:>9.0f} {r['driver_peak_rss'] / 2**20:>10.0f} {r['object_store_peak'] / 2**20:>9.0f} "
          f"{r['fetched_token_bytes'] / 1e9:>11.2f} {r['distinct_candidate_bytes'] / 1e9:>12.2f} "
          f"{ratio:>6.2f} {r['fetched_query_token_bytes'] / 1e9:>9.2f} {r['stray_pairs']:>9} "
          f"{r['stray_query_token_bytes'] / 1e9:>9.2f} {r['load']:>5.1f}  {actors}", flush=True)


def _growth(rows: list) -> None:
    """The fixed runs' peaks from the smallest query set to the largest."""
    if len(rows) >= 2:
        (n0, a), (n1, b) = rows[0], rows[-1]
        kinds = sorted(set(a["actor_peak_rss"]) & set(b["actor_peak_rss"]))
        growth = {k: b["actor_peak_rss"][k] / max(1, a["actor_peak_rss"][k]) for k in kinds}
        print(f"{n1} vs {n0} queries: driver peak x{b['driver_peak_rss'] / a['driver_peak_rss']:.2f} "
              f"(+{(b['driver_peak_rss'] - a['driver_peak_rss']) / 2**20:.0f} MB), object store peak "
              f"x{b['object_store_peak'] / max(1, a['object_store_peak']):.2f}, actor peaks "
              + ", ".join(f"{k} x{v:.2f}" for k, v in growth.items())
              + f"; wall per pair x{(b['wall_s'] / b['pairs']) / (a['wall_s'] / a['pairs']):.2f}")


if __name__ == "__main__":
    raise SystemExit(main())
