"""Latency and throughput of `r2f serve` on the demo data (EfficientNet-Lite0, RANSAC, K = 10).

    python bench/bench_serve.py [--out out/demo] [--clients 1,4,8] [--requests 50] [--rss 100,1000]
    python bench/bench_serve.py --smoke      # the smallest setting: checks that the script works

Starts the service on 127.0.0.1 over ``OUT/database_store`` and ``OUT/index`` (``make demo`` makes
them; missing ones are made by ``r2f run`` on demo/gardens_point_sample), then, each phase bounded:

1. the in-process reference: the same work without HTTP or Ray (decode + extract one image +
   search + rerank K), median over the query images;
2. for each client count, every client sends ``--requests`` night_right frames one after another:
   p50 / p95 / p99 latency, requests/s, errors;
3. memory: the RSS of the service's processes (Serve controller, proxy, replicas) after the first
   and the second ``--rss`` total requests.

Goals (docs/serve.md): p50 at 1 client within 1.3x of the reference; requests/s at 8 clients at
least 1.5x that at 1 client; RSS after 1,000 requests within 1.1x of after 100.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DEMO = ROOT / "demo" / "gardens_point_sample"


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, int(round(q / 100 * len(xs) + 0.5)) - 1))] if xs else float("nan")


def make_out(out: Path, smoke: bool) -> None:
    from pipeline.run import RunConfig, run

    if smoke:  # a few database frames, a small size: the script's plumbing, not a figure
        import csv

        from pipeline import index
        from pipeline.extract import extract_into
        out.mkdir(parents=True, exist_ok=True)
        with open(out.parent / "db.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["path", "utm_east", "utm_north"])
            for i, p in enumerate(sorted((DEMO / "day_right").glob("*.jpg"))):
                if i in range(0, 60, 6):
                    w.writerow([str(p), i, 0])
        # only what the service opens: the database store and its index (no query run)
        extract_into(str(out.parent / "db.csv"), str(out / "database_store"), "efficientnet-lite0", None,
                     [128, 224], {"progress": False})
        index.build(index.IndexConfig(store=str(out / "database_store"), index_dir=str(out / "index")))
    else:  # what `make demo` runs
        run(RunConfig(database=f"sequence:{DEMO}/day_right", queries=f"sequence:{DEMO}/night_right", out=str(out),
                      backbone="efficientnet-lite0", reranker="ransac", candidates=10, positive_radius=2,
                      image_size=[272, 480]))


def reference_ms(store: str, index_dir: str, photos: list[bytes], k: int, repeats: int,
                 threads: int | None = None) -> float:
    """Median ms of the service's work in this process: decode + extract one image + search + rerank K,
    with the extractor's torch threads (None: the service's default)."""
    from pipeline.serve.extractor import ExtractionModels, decode_query
    from pipeline.serve.state import StateFollower

    follower = StateFollower(store, index_dir, poll_s=3600)
    models = ExtractionModels("auto", threads)
    follower.ensure_model = models.load
    follower.current = follower._open(follower._resolve())  # opened once, not followed
    st = follower.current
    times = []
    try:
        for i in range(repeats):
            data = photos[i % len(photos)]
            t = time.perf_counter()
            pixels = decode_query(data, st.key)
            desc, tokens = models.extract(st.key, pixels[None])
            st.answer(desc[0], tokens[0], k, "ransac", {})
            times.append((time.perf_counter() - t) * 1e3)
    finally:
        follower.stop()
    return statistics.median(times[1:] if len(times) > 2 else times)  # the first call warms caches


def load(url: str, photos: list[bytes], clients: int, requests: int) -> dict:
    lat, errors, lock = [], [], threading.Lock()

    def client(c: int) -> None:
        for i in range(requests):
            data = photos[(c * requests + i) % len(photos)]
            req = urllib.request.Request(url + "localize", data=data, method="POST",
                                         headers={"Content-Type": "image/jpeg"})
            t = time.perf_counter()
            try:
                with urllib.request.urlopen(req, timeout=120) as r:
                    r.read()
                    ok = r.status == 200
            except (urllib.error.URLError, OSError) as exc:
                ok = False
                with lock:
                    errors.append(str(exc))
            with lock:
                if ok:
                    lat.append((time.perf_counter() - t) * 1e3)
    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    return {"clients": clients, "requests": clients * requests, "errors": len(errors),
            "p50_ms": percentile(lat, 50), "p95_ms": percentile(lat, 95), "p99_ms": percentile(lat, 99),
            "req_per_s": len(lat) / wall if wall > 0 else float("nan")}


def _descendants(root: int) -> set[int]:
    parent = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    parent[int(d)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (FileNotFoundError, IndexError, ValueError):
                pass
    out, frontier = set(), {root}
    while frontier:
        frontier = {p for p, pp in parent.items() if pp in frontier} - out
        out |= frontier
    return out


def service_rss_bytes() -> int:
    """Summed RSS of the Serve controller, proxy and replica processes of this run's Ray (Linux
    /proc: Ray titles its workers ``ray::ServeReplica:...``, ``ray::ServeController``, ``ray::ProxyActor``)."""
    total = 0
    for pid in _descendants(os.getpid()):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                title = f.read().split(b"\0")[0].decode(errors="replace")
            if not title.startswith(("ray::ServeReplica", "ray::ServeController", "ray::ProxyActor")):
                continue
            with open(f"/proc/{pid}/status") as f:
                total += next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))
        except (FileNotFoundError, StopIteration):
            pass
    return total


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=str(ROOT / "out" / "demo"), help="an r2f run output (database_store, index)")
    p.add_argument("--clients", default="1,4,8")
    p.add_argument("--requests", type=int, default=50, help="per client, per client count")
    p.add_argument("--rss", default="100,1000", help="total requests after which RSS is read")
    p.add_argument("--reference-repeats", type=int, default=21)
    p.add_argument("--extract-threads", type=int, default=None,
                   help="torch threads of the extraction replica and of the reference (default: the service's)")
    p.add_argument("--ingress-replicas", type=int, default=1,
                   help="ingress replicas (decode, search, rerank), each reserving the service's replica CPUs")
    p.add_argument("--smoke", action="store_true", help="the smallest setting (a tiny store, few requests)")
    args = p.parse_args(argv)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    tmp = None
    if args.smoke:
        tmp = tempfile.TemporaryDirectory(prefix="bench-serve-")
        out = Path(tmp.name) / "run"
        args.clients, args.requests, args.rss, args.reference_repeats = "1,2", 1, "1,4", 3
    else:
        out = Path(args.out)
    if not (out / "index").exists():
        make_out(out, args.smoke)
    from pipeline.cluster import ensure_ray
    from pipeline.serve import ServeConfig, start

    store, index_dir = str(out / "database_store"), str(out / "index")
    photos = [p.read_bytes() for p in sorted((DEMO / "night_right").glob("*.jpg"))]
    ensure_ray()
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ref = reference_ms(store, index_dir, photos, 10, args.reference_repeats, args.extract_threads)
    service = start(ServeConfig(database_store=store, index_dir=index_dir, reranker="ransac", candidates=10,
                                port=port, max_queue=64, extract_threads=args.extract_threads,
                                ingress_replicas=args.ingress_replicas))
    rows = []
    try:
        load(service.url, photos, 1, 2)  # warm-up: first batch, first chunks
        for c in [int(x) for x in args.clients.split(",")]:
            rows.append(load(service.url, photos, c, args.requests))
        rss_at = [int(x) for x in args.rss.split(",")]
        rss, sent = {}, 0
        for n in rss_at:
            per = max(0, n - sent)
            if per:
                load(service.url, photos, 4, -(-per // 4))
                sent += 4 * -(-per // 4)
            rss[n] = service_rss_bytes()
    finally:
        service.stop()
        if tmp:
            tmp.cleanup()
    print(f"in-process reference (decode + extract 1 + search + rerank 10): {ref:.1f} ms "
          f"(extraction threads: {args.extract_threads or 'the service default'})")
    print(f"{'clients':>7} {'requests':>8} {'errors':>6} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'req/s':>7}")
    for r in rows:
        print(f"{r['clients']:>7} {r['requests']:>8} {r['errors']:>6} {r['p50_ms']:>8.1f} {r['p95_ms']:>8.1f} "
              f"{r['p99_ms']:>8.1f} {r['req_per_s']:>7.2f}")
    one = next((r for r in rows if r["clients"] == 1), None)
    most = max(rows, key=lambda r: r["clients"])
    if one:
        print(f"p50 at 1 client / reference: {one['p50_ms'] / ref:.2f}x (goal <= 1.3x); req/s at {most['clients']} "
              f"clients / 1 client: {most['req_per_s'] / one['req_per_s']:.2f}x (goal >= 1.5x)")
    a, b = rss_at[0], rss_at[-1]
    print(f"service RSS after {a} requests {rss[a] / 2**20:.0f} MiB, after {b} {rss[b] / 2**20:.0f} MiB: "
          f"{rss[b] / max(1, rss[a]):.3f}x (goal <= 1.1x)")
    print(json.dumps({"reference_ms": ref, "load": rows, "rss_bytes": rss}))
    return 0 if all(r["errors"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
