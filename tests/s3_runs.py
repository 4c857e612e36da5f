"""The S3 runs that tests/test_s3_faults.py, tests/test_s3_seams.py and tests/test_secrets.py
check, made once per test session (the modules name this file in ``pytest_plugins``, so its
session fixtures exist once) because each costs a pipeline run:

``s3_inputs``   a bucket on moto with images, manifests (one with a truncated image) and a
                project checkpoint, written straight to moto.
``clean_run``   ``r2f run`` with every path on S3, in this process on the session's Ray, straight
                to moto: the reference output.
``faulty_job``  one subprocess with its own embedded Ray, a secret planted in its environment and
                every S3 request of its driver and workers sent through the fault proxy
                (tests/s3_fault_proxy.py, started in that process before Ray): the same ``r2f run``,
                then ``r2f reindex`` adding an image to that run's store, then two extraction jobs
                (one failing with the secret in its dataset URL), then a probe asking Ray what
                runtime_env the job and its workers got. One process and one Ray for all of it:
                starting Ray and importing torch is most of what a small command costs.
"""
from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import fsspec
import pytest
import yaml

from pipeline import storage

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
SAMPLE = ROOT / "demo" / "gardens_point_sample"
# A fixed bucket name: the proxy draws each request's fault from its target, so the same requests
# get the same faults on every run.
BUCKET = "r2f-fault-injection"
DB_FRAMES = range(40, 64, 4)      # 6 day_right frames
Q_FRAMES = (42, 50, 58)           # 3 night_right frames, each within 2 frames of database ones
ADDED_FRAME = 72                  # the image the reindex adds
K = 5
# The issue asks for 5-10 % of requests faulted. The run and the reindex make about 900 requests
# (measured: 610 and 309), so about 90 faults, each kind 14 times or more with this seed; the test
# checks every kind occurred rather than assuming it.
FAULT_RATE, SEED = 0.10, 7
IMAGE_SIZE = ("128", "224")


def planted_secret(tag: str) -> str:
    return f"{tag}{secrets.token_hex(16)}"


@pytest.fixture(scope="session")
def s3_inputs(s3_endpoint, tmp_path_factory) -> dict:
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
        base=base, fs=fs, endpoint=s3_endpoint, truncated=truncated, bucket=BUCKET,
        db_frames=list(DB_FRAMES), q_frames=list(Q_FRAMES), added_frame=ADDED_FRAME, k=K, rate=FAULT_RATE, seed=SEED,
        database=manifest("db.csv", db_urls + [truncated], [*DB_FRAMES, 1000]),
        queries=manifest("q.csv", q_urls, Q_FRAMES),
        # the database as it is later: one image added (the truncated one left out: not in the store)
        database_later=manifest("db_later.csv", db_urls + added, [*DB_FRAMES, ADDED_FRAME]),
        checkpoint=f"{base}/models/effnet.pt",
        checkpoint_hash="sha256:" + hashlib.sha256(ckpt.read_bytes()).hexdigest())


def run_args(b: dict, out: str) -> list[str]:
    return ["run", "--database", b["database"], "--queries", b["queries"], "--out", out,
            "--backbone", "efficientnet-lite0", "--checkpoint", b["checkpoint"], "--image-size", *IMAGE_SIZE,
            "--reranker", "ransac", "--candidates", str(K), "--positive-radius", "2"]


def read_out(out: str) -> dict:
    from pipeline.rerank import read_results

    results = read_results(storage.join(out, "results")).to_pylist()
    errors = storage.read_parquet(storage.join(out, "errors.parquet")).to_pylist()
    return dict(rows=sorted(results, key=lambda r: (r["query_id"], r["rank"])),
                errors=sorted(errors, key=lambda r: (r["path"], r["stage"])),
                metrics=storage.read_json(storage.join(out, "metrics.json")),
                report=storage.exists(storage.join(out, "report.html")))


@pytest.fixture(scope="session")
def clean_run(s3_inputs, ray_session) -> dict:
    """``r2f run`` straight to moto, in this process on the session's Ray."""
    from pipeline import cli

    out = f"{s3_inputs['base']}/out_clean"
    t = time.perf_counter()
    code = cli.main(run_args(s3_inputs, out))
    print(f"clean r2f run (in-process, session Ray): exit {code} in {time.perf_counter() - t:.1f} s")
    assert code == 0
    return dict(out=out, **read_out(out))


# The subprocess: its argv[1] is a JSON spec, argv[2] the report file it writes.
DRIVER = r"""
import hashlib, json, logging, os, sys, time
spec = json.load(open(sys.argv[1]))
sys.path.insert(0, spec["tests"])
from s3_fault_proxy import FaultProxy

# Before anything reads the endpoint: the driver, and through it Ray's workers, use the proxy.
proxy = FaultProxy(spec["upstream"], rate=spec["rate"], seed=spec["seed"])
os.environ["AWS_ENDPOINT_URL"] = os.environ["R2F_S3_ENDPOINT_URL"] = proxy.start()
from pipeline import cli, storage
from pipeline.index import list_versions

report = {"codes": {}, "seconds": {}}
def phase(name, argv, main=cli.main):
    t = time.perf_counter()
    report["codes"][name] = main(argv)
    report["seconds"][name] = round(time.perf_counter() - t, 1)
    report[f"faults_{name}"] = proxy.snapshot()
    print(f"@@ {name}: exit {report['codes'][name]} in {report['seconds'][name]} s, "
          f"faults so far {report[f'faults_{name}']}", flush=True)

def index_state():
    proxy.set_rate(0.0)  # the test's own bookkeeping is not part of what must survive faults
    try:
        return {"current": storage.read_json(storage.join(spec["index_dir"], "CURRENT")),
                "versions": list_versions(spec["index_dir"])}
    finally:
        proxy.set_rate(spec["rate"])

try:
    phase("run", spec["run"])
    if report["codes"]["run"] == 0:
        report["index_before"] = index_state()
        phase("reindex", spec["reindex"])
        report["index_after"] = index_state()

    from jobs import extract
    phase("job_ok", ["--config", spec["job_ok"]], extract.main)
    phase("job_bad", ["--config", spec["job_bad"]], extract.main)

    import ray
    from ray._private.state import state
    from ray.core.generated import gcs_pb2

    @ray.remote
    def probe():
        return {"runtime_env": dict(ray.get_runtime_context().runtime_env),
                "secret_sha": hashlib.sha256(os.environ.get("AWS_SECRET_ACCESS_KEY", "").encode()).hexdigest(),
                "redacting_handler": any(getattr(h, "_r2f", False) for h in logging.getLogger().handlers)}

    report["probe"] = ray.get(probe.remote())
    report["driver_runtime_env"] = dict(ray.get_runtime_context().runtime_env)
    # the job's config as the GCS holds it (what the dashboard and the state API serve)
    table = state._connect_and_get_accessor().get_job_table(
        skip_submission_job_info_field=True, skip_is_running_tasks_field=True)
    report["job_configs"] = [str(gcs_pb2.JobTableData.FromString(e).config) for e in table]
finally:
    report["faults"] = proxy.snapshot()
    with open(sys.argv[2], "w") as f:
        json.dump(report, f, default=str)
"""


@pytest.fixture(scope="session")
def faulty_job(s3_inputs, tmp_path_factory) -> dict:
    b = s3_inputs
    tmp = tmp_path_factory.mktemp("faulty_job")
    out = f"{b['base']}/out_faulty"
    key, token, r2f_token = planted_secret("R2fKey"), planted_secret("R2fTok"), planted_secret("R2fOwn")
    common = dict(backbone="efficientnet-lite0", image_size=[int(v) for v in IMAGE_SIZE], batch_size=4,
                  shard_size=4, chunk_rows=2, progress=False)
    job_ok, job_bad = tmp / "ok.yaml", tmp / "bad.yaml"
    job_ok.write_text(yaml.safe_dump(dict(dataset=b["queries"], store=f"{b['base']}/jobs/ok", **common)))
    job_bad.write_text(yaml.safe_dump(dict(dataset=f"{b['base']}/data/missing-{key}.csv",
                                           store=f"{b['base']}/jobs/bad", **common)))
    store, index_dir = storage.join(out, "database_store"), storage.join(out, "index")
    spec = dict(tests=str(TESTS), upstream=b["endpoint"], rate=FAULT_RATE, seed=SEED, index_dir=index_dir,
                run=run_args(b, out),
                reindex=["reindex", "--source", b["database_later"], "--store", store, "--index-dir", index_dir],
                job_ok=str(job_ok), job_bad=str(job_bad))
    spec_file, report_file = tmp / "spec.json", tmp / "report.json"
    spec_file.write_text(json.dumps(spec))

    # A short path: Ray's unix sockets live under it. Its own temp dir also keeps this Ray away
    # from /tmp/ray (and the ray_current_cluster file there), and holds only this job's logs.
    ray_tmp = Path(tempfile.mkdtemp(prefix="r2fs", dir="/tmp"))
    # PYTHONPATH: the driver and its Ray workers import this checkout's pipeline
    env = dict(os.environ, AWS_SECRET_ACCESS_KEY=key, AWS_SESSION_TOKEN=token, R2F_API_TOKEN=r2f_token,
               RAY_TMPDIR=str(ray_tmp), R2F_LOG_LEVEL="INFO", RAY_USAGE_STATS_ENABLED="0",
               PYTHONPATH=os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))
    env.pop("RAY_ADDRESS", None)
    t = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-c", DRIVER, str(spec_file), str(report_file)], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=900)
        ray_files = {str(p.relative_to(ray_tmp)): p.read_bytes()
                     for p in ray_tmp.rglob("*") if p.is_file() and not p.is_socket()}
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    output = proc.stdout + proc.stderr
    print(f"faulty job (run, reindex, 2 extraction jobs; one process, one Ray): exit {proc.returncode} "
          f"in {time.perf_counter() - t:.1f} s")
    print("\n".join(line for line in proc.stdout.splitlines() if line.startswith("@@ ")))
    tail = f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-6000:]}"
    assert proc.returncode == 0 and report_file.exists(), tail
    report = json.loads(report_file.read_text())
    return dict(out=out, store=store, index_dir=index_dir, report=report,
                outputs=read_out(out) if report["codes"].get("run") == 0 else None,
                output=output, tail=tail, ray_files=ray_files, secrets=(key, token, r2f_token),
                job_stores={"ok": f"{b['base']}/jobs/ok", "bad": f"{b['base']}/jobs/bad"})
