"""Transient S3 faults survived end to end: `r2f run` with every path on S3 (images, manifests, a
project checkpoint, stores, index, results, report) once straight to moto and once through a proxy
that answers a seeded 8 % of requests with 503 SlowDown or 500 InternalError, or drops the
connection before forwarding or after the server applied the request (tests/s3_fault_proxy.py).
Both runs must give exactly the same result rows, error records and metrics (timing fields aside).
Then a reindex through the proxy adds an image to the clean run's store and must publish exactly
once. Each command runs as its own process with its own embedded Ray, so the driver and every
worker reach S3 through the endpoint that process was given."""
from __future__ import annotations

import copy
import os
import subprocess
import sys
import time
from pathlib import Path

import fsspec
import pytest

from pipeline import storage

sys.path.insert(0, str(Path(__file__).resolve().parent))
from s3_fault_proxy import KINDS, FaultProxy

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "demo" / "gardens_point_sample"
# A fixed bucket name: the proxy draws each request's fault from its target, so the same requests
# get the same faults on every run of this test.
BUCKET = "r2f-fault-injection"
DB_FRAMES = range(40, 72, 4)      # 8 day_right frames
Q_FRAMES = (42, 50, 58, 66)       # 4 night_right frames, each within 2 frames of database ones
ADDED_FRAME = 72                  # the image the reindex adds
FAULT_RATE, SEED = 0.08, 7
# metrics.json fields that measure time (pipeline/run.py): everything else must match exactly.
TIMING_SETTINGS = ("rerank_seconds", "pairs_per_second")


def _without_timing(metrics: dict) -> dict:
    m = copy.deepcopy(metrics)
    m.pop("stage_seconds")
    for k in TIMING_SETTINGS:
        m["settings"].pop(k)
    return m


def _r2f(args: list[str], endpoint: str, timeout: float = 300) -> subprocess.CompletedProcess:
    # PYTHONPATH: the driver and its Ray workers import this checkout's pipeline
    env = {**os.environ, "AWS_ENDPOINT_URL": endpoint, "R2F_S3_ENDPOINT_URL": endpoint,
           "R2F_TORCH_THREADS": "2", "RAY_USAGE_STATS_ENABLED": "0",
           "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", *args], env=env, capture_output=True, text=True,
                          check=False, timeout=timeout, cwd=ROOT)
    print(f"r2f {args[0]} via {endpoint}: exit {proc.returncode} in {time.perf_counter() - t:.1f} s")
    return proc


def _tail(proc: subprocess.CompletedProcess) -> str:
    return f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-6000:]}"


@pytest.fixture(scope="module")
def bucket(s3_endpoint, tmp_path_factory):
    """Images, manifests and a project checkpoint on S3, written straight to moto (no faults)."""
    import boto3

    from pipeline.model import EfficientNetLite0VPR

    boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1").create_bucket(Bucket=BUCKET)
    fs = fsspec.filesystem("s3", **storage.storage_options(f"s3://{BUCKET}"))
    base = f"s3://{BUCKET}"

    def put_frames(folder: str, frames) -> list[str]:
        urls = []
        for i in frames:
            url = f"{base}/imgs/{folder}/Image{i:03d}.jpg"
            fs.pipe(url, (SAMPLE / folder / f"Image{i:03d}.jpg").read_bytes())
            urls.append(url)
        return urls

    def manifest(name: str, urls: list[str], frames) -> str:
        url = f"{base}/data/{name}"
        fs.pipe(url, ("path,utm_east,utm_north\n" + "".join(f"{u},{f},0\n" for u, f in zip(urls, frames))).encode())
        return url

    db_urls = put_frames("day_right", DB_FRAMES)
    q_urls = put_frames("night_right", Q_FRAMES)
    added = put_frames("day_right", [ADDED_FRAME])
    truncated = f"{base}/imgs/bad/truncated.jpg"  # a bad input: the runs must record the same error
    fs.pipe(truncated, (SAMPLE / "day_right" / "Image050.jpg").read_bytes()[:400])
    ckpt = tmp_path_factory.mktemp("ckpt") / "effnet.pt"
    EfficientNetLite0VPR.pretrained().save_checkpoint(ckpt)
    fs.put(str(ckpt), f"{base}/models/effnet.pt")
    return dict(
        base=base, fs=fs,
        database=manifest("db.csv", db_urls + [truncated], [*DB_FRAMES, 1000]),
        queries=manifest("q.csv", q_urls, Q_FRAMES),
        # the database as it is later: one image added (the truncated one left out: not in the store)
        database_later=manifest("db_later.csv", db_urls + added, [*DB_FRAMES, ADDED_FRAME]),
        checkpoint=f"{base}/models/effnet.pt")


def _run_args(b: dict, out: str) -> list[str]:
    return ["run", "--database", b["database"], "--queries", b["queries"], "--out", out,
            "--backbone", "efficientnet-lite0", "--checkpoint", b["checkpoint"], "--image-size", "128", "224",
            "--reranker", "ransac", "--candidates", "5", "--positive-radius", "2"]


def _read_out(out: str) -> dict:
    from pipeline.rerank import read_results

    results = read_results(storage.join(out, "results")).to_pylist()
    errors = storage.read_parquet(storage.join(out, "errors.parquet")).to_pylist()
    return dict(rows=sorted(results, key=lambda r: (r["query_id"], r["rank"])),
                errors=sorted(errors, key=lambda r: (r["path"], r["stage"])),
                metrics=storage.read_json(storage.join(out, "metrics.json")),
                report=storage.exists(storage.join(out, "report.html")))


def _current(index_dir: str) -> dict:
    return storage.read_json(storage.join(index_dir, "CURRENT"))


@pytest.mark.slow  # two whole runs and a reindex, each its own process and Ray: minutes on 2 cores
def test_run_and_reindex_through_s3_faults_match_the_clean_run(s3_endpoint, bucket):
    t0 = time.perf_counter()
    b = bucket
    clean_out, faulty_out = f"{b['base']}/out_clean", f"{b['base']}/out_faulty"

    proc = _r2f(_run_args(b, clean_out), s3_endpoint)
    assert proc.returncode == 0, _tail(proc)
    clean = _read_out(clean_out)

    with FaultProxy(s3_endpoint, rate=FAULT_RATE, seed=SEED) as proxy:
        proc = _r2f(_run_args(b, faulty_out), proxy.url)
        in_run = proxy.snapshot()
        print(f"faults injected during `r2f run`: {in_run}")
        assert proc.returncode == 0, f"faults {in_run}\n{_tail(proc)}"
        faulty = _read_out(faulty_out)

        # exactly the clean run's output
        assert clean["rows"] and len(clean["rows"]) == len(Q_FRAMES) * 5
        assert faulty["rows"] == clean["rows"]
        assert [e["path"] for e in clean["errors"]] == [f"{b['base']}/imgs/bad/truncated.jpg"]
        assert faulty["errors"] == clean["errors"]
        assert _without_timing(faulty["metrics"]) == _without_timing(clean["metrics"])
        assert faulty["metrics"]["num_queries"] == len(Q_FRAMES)
        assert clean["report"] and faulty["report"]

        # a reindex through the proxy: the clean run's store gains one image, published exactly once
        store, index_dir = storage.join(clean_out, "database_store"), storage.join(clean_out, "index")
        before = _current(index_dir)
        from pipeline.index import list_versions
        versions_before = list_versions(index_dir)
        proc = _r2f(["reindex", "--source", b["database_later"], "--store", store, "--index-dir", index_dir],
                    proxy.url)
        counts = proxy.snapshot()
        in_reindex = {k: counts[k] - in_run[k] for k in counts}
        print(f"faults injected during `r2f reindex`: {in_reindex}")
        assert proc.returncode == 0, f"faults {in_reindex}\n{_tail(proc)}"

    fs = b["fs"]
    fs.invalidate_cache()  # this process listed the index before the reindex changed it
    after = _current(index_dir)
    versions_after = list_versions(index_dir)
    number = int(before["version"].lstrip("v"))
    assert after["version"] == f"v{number + 1:04d}", (before, after)
    assert versions_after == versions_before + [after["version"]], (versions_before, versions_after)
    history = after.get("history") or []
    assert len(history) == len(before.get("history") or []) + 1 and history[0]["version"] == before["version"], \
        (before, after)
    from pipeline import reindex
    ids = reindex.version_image_ids(index_dir, after["version"]).tolist()
    added_id = storage.image_id_for(f"{BUCKET}/imgs/day_right/Image{ADDED_FRAME:03d}.jpg")
    assert added_id in ids and len(ids) == len(DB_FRAMES) + 1, ids
    assert not fs.exists(storage.join(index_dir, "reindex.lock")), "the reindex left its lock behind"

    total = {k: counts[k] for k in KINDS}
    print(f"faults injected in all: {total} of {counts['requests']} requests "
          f"(rate {FAULT_RATE}, seed {SEED}); test took {time.perf_counter() - t0:.1f} s")
    assert all(total[k] >= 1 for k in KINDS), f"every fault kind must be injected at least once: {total}"
