"""Credentials stay secret: a secret planted in the environment of a real job run (embedded Ray,
moto S3) appears nowhere the run leaves text: its stdout/stderr, the Ray session's log files,
the objects it wrote to the bucket, its job summaries, and the runtime_env Ray reports for the
job; and the one redaction function (pipeline.log.redact) covers messages, %-arguments,
tracebacks and dict/JSON reprs."""
from __future__ import annotations

import io
import json
import logging
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from pipeline import cluster
from pipeline import log as plog

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "demo" / "gardens_point_sample" / "day_right"


def _secret(tag: str) -> str:
    return f"{tag}{secrets.token_hex(16)}"


# ---------------------------------------------------------------- redact()
def test_redact_masks_names_reprs_json_and_bare_values(monkeypatch):
    key, token = _secret("Sk"), _secret("Tok")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", key)
    monkeypatch.setenv("AWS_SESSION_TOKEN", token)
    samples = [
        f"aws_secret_access_key={key}",
        f"AWS_SESSION_TOKEN: {token}",
        repr({"AWS_SECRET_ACCESS_KEY": key, "region": "us-east-1"}),
        json.dumps({"aws_session_token": token, "endpoint": "http://127.0.0.1:9"}),
        f"Config(secret_key='{key}', password=\"{token}\")",
        f"opening s3://bucket/{key}/a.jpg failed",  # the value alone, with no name before it
        f"https://s3.example/o?X-Amz-Security-Token={token}&X-Amz-Expires=60",
    ]
    for text in samples:
        out = plog.redact(text)
        assert key not in out and token not in out, out
        assert plog.MASK in out
    # names whose value is not a credential are left alone
    kept = "tokens: 500, local_tokens=s3://b/store/tokens.zarr, {'key': 'imgs/a.jpg'}, num_tokens=12"
    assert plog.redact(kept) == kept
    # a short value is not matched on its own (it would mangle ordinary words)
    monkeypatch.setenv("R2F_API_TOKEN", "night")
    assert plog.redact("night_right") == "night_right"

    nested = plog.redact_obj({"error": {"message": f"bad {key}", "traceback": [f"x={token}"]},
                              "Password": "hunter22", "tokens": 500})
    assert json.dumps(nested).count(plog.MASK) == 3 and nested["tokens"] == 500


def test_log_handler_redacts_args_tracebacks_and_reprs(monkeypatch):
    key = _secret("Sk")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", key)
    plog.setup_logging("INFO")
    handler = next(h for h in logging.getLogger().handlers if getattr(h, "_r2f", False))
    stream = io.StringIO()
    old = handler.setStream(stream)
    try:
        logger = plog.get_logger("r2f.test_secrets")
        logger.info("settings %s", {"AWS_SECRET_ACCESS_KEY": "not-in-env-value"})
        try:
            env = {"aws_secret_access_key": key}
            raise RuntimeError(f"connect failed with {env}")
        except RuntimeError:
            logger.error("upload of %s failed", f"s3://b/{key}", exc_info=True, stack_info=True)
    finally:
        handler.setStream(old)
    text = stream.getvalue()
    assert "Traceback (most recent call last)" in text and "Stack (most recent call last)" in text
    assert key not in text and "not-in-env-value" not in text
    assert text.count(plog.MASK) >= 3  # the dict argument, the URL argument, the exception message


def test_only_non_secret_settings_are_forwarded(monkeypatch):
    for name in list(os.environ):
        if name.startswith(("AWS_", "R2F_")):
            monkeypatch.delenv(name)
    kept = {"AWS_ENDPOINT_URL": "http://127.0.0.1:9", "AWS_REGION": "eu-west-1", "AWS_DEFAULT_REGION": "eu-west-1",
            "AWS_RETRY_MODE": "standard", "AWS_MAX_ATTEMPTS": "5", "R2F_S3_RETRY_MODE": "adaptive",
            "R2F_S3_MAX_ATTEMPTS": "7", "R2F_LOG_LEVEL": "INFO"}
    dropped = {"AWS_SECRET_ACCESS_KEY": "s", "AWS_SESSION_TOKEN": "t", "AWS_ACCESS_KEY_ID": "i",
               "AWS_SECURITY_TOKEN": "t", "AWS_PROFILE": "p", "AWS_SOME_FUTURE_SETTING": "x",
               "R2F_API_TOKEN": "t", "R2F_DB_PASSWORD": "p", "R2F_SIGNING_KEY": "k", "R2F_CLIENT_SECRET": "s"}
    for k, v in {**kept, **dropped}.items():
        monkeypatch.setenv(k, v)
    assert cluster.forwarded_env() == kept
    assert cluster.runtime_env()["env_vars"] == kept


def _cluster_specs(doc: dict) -> list[dict]:
    spec = doc.get("spec", {})
    if doc["kind"] == "RayCluster":
        return [spec]
    if doc["kind"] == "RayJob":
        return [spec["rayClusterSpec"]]
    if doc["kind"] == "RayCronJob":
        return [spec["jobTemplate"]["rayClusterSpec"]]
    return []


def test_every_kuberay_pod_gets_credentials_itself():
    """Workers get credentials only from their own pod now, so every head and worker group of
    every manifest must mount the storage secret (or run under a pod role)."""
    groups = 0
    for path in sorted((ROOT / "infra" / "kuberay").glob("*.yaml")):
        for doc in (d for d in yaml.safe_load_all(path.read_text()) if d):
            for spec in _cluster_specs(doc):
                for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
                    pod = group["template"]["spec"]
                    refs = {e.get("secretRef", {}).get("name") for c in pod["containers"] for e in c.get("envFrom", [])}
                    assert "r2f-storage" in refs or pod.get("serviceAccountName"), \
                        f"{path.name}: {group.get('groupName', 'head')} has no S3 credentials"
                    groups += 1
    assert groups >= 8  # raycluster (3), rayjob (2), raycronjob (3)


# ---------------------------------------------------------------- a real run, end to end
# Runs two extraction jobs in one process (one embedded Ray): one that succeeds on S3 images, one
# whose dataset URL carries the secret (so it is in the exception, traceback, log lines and the
# job's config), then asks Ray what runtime_env the job and its workers got.
DRIVER = r"""
import hashlib, json, logging, os, sys
from jobs import extract
out, ok, bad = sys.argv[1:4]
codes = [extract.main(["--config", ok]), extract.main(["--config", bad])]

import ray
from ray._private.state import state
from ray.core.generated import gcs_pb2

@ray.remote
def probe():
    return {"runtime_env": dict(ray.get_runtime_context().runtime_env),
            "secret_sha": hashlib.sha256(os.environ.get("AWS_SECRET_ACCESS_KEY", "").encode()).hexdigest(),
            "redacting_handler": any(getattr(h, "_r2f", False) for h in logging.getLogger().handlers)}

report = ray.get(probe.remote())
report["codes"] = codes
report["driver_runtime_env"] = dict(ray.get_runtime_context().runtime_env)
# the job's config as the GCS holds it (what the dashboard and the state API serve)
table = state._connect_and_get_accessor().get_job_table(
    skip_submission_job_info_field=True, skip_is_running_tasks_field=True)
report["job_configs"] = [str(gcs_pb2.JobTableData.FromString(e).config) for e in table]
with open(out, "w") as f:
    json.dump(report, f, default=str)
"""


def test_planted_secret_appears_nowhere(s3_bucket, tmp_path):
    import hashlib

    import fsspec

    from pipeline import storage

    fs = fsspec.filesystem("s3", **storage.storage_options(s3_bucket))
    images = sorted(SAMPLE.glob("*.jpg"))[:4]
    for p in images:
        fs.put(str(p), f"{s3_bucket}/data/imgs/{p.name}")
    fs.pipe(f"{s3_bucket}/data/manifest.csv",
            ("path,utm_east,utm_north\n" + "".join(f"imgs/{p.name},{i}.0,0.0\n" for i, p in enumerate(images))).encode())

    key, token, r2f_token = _secret("R2fKey"), _secret("R2fTok"), _secret("R2fOwn")
    common = dict(backbone="efficientnet-lite0", image_size=[96, 128], batch_size=4, shard_size=4,
                  chunk_rows=2, progress=False)
    ok, bad = tmp_path / "ok.yaml", tmp_path / "bad.yaml"
    ok.write_text(yaml.safe_dump(dict(dataset=f"{s3_bucket}/data/manifest.csv", store=f"{s3_bucket}/stores/ok",
                                      **common)))
    bad.write_text(yaml.safe_dump(dict(dataset=f"{s3_bucket}/data/missing-{key}.csv",
                                       store=f"{s3_bucket}/stores/bad", **common)))

    # A short path: Ray's unix sockets live under it. Its own temp dir also keeps this Ray away
    # from /tmp/ray (and the ray_current_cluster file there).
    ray_tmp = Path(tempfile.mkdtemp(prefix="r2fs", dir="/tmp"))
    env = dict(os.environ, AWS_SECRET_ACCESS_KEY=key, AWS_SESSION_TOKEN=token, R2F_API_TOKEN=r2f_token,
               RAY_TMPDIR=str(ray_tmp), R2F_LOG_LEVEL="INFO", RAY_USAGE_STATS_ENABLED="0")
    env.pop("RAY_ADDRESS", None)
    report_file = tmp_path / "report.json"
    try:
        proc = subprocess.run([sys.executable, "-c", DRIVER, str(report_file), str(ok), str(bad)], cwd=ROOT,
                              env=env, capture_output=True, text=True, timeout=300)
        output = proc.stdout + proc.stderr
        assert proc.returncode == 0 and report_file.exists(), output[-4000:]
        report = json.loads(report_file.read_text())
        ray_files = {p: p.read_bytes() for p in ray_tmp.rglob("*") if p.is_file() and not p.is_socket()}
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)

    assert report["codes"] == [0, 1], output[-4000:]
    # the worker has the credentials (inherited from the driver's environment), yet ...
    assert report["secret_sha"] == hashlib.sha256(key.encode()).hexdigest()
    assert report["redacting_handler"]  # workers log through pipeline.log's handler (setup hook)
    # ... the runtime_env holds only the non-secret settings
    for runtime_env in (report["runtime_env"], report["driver_runtime_env"]):
        names = set(runtime_env.get("env_vars", {}))
        assert {"AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION", "R2F_LOG_LEVEL"} <= names
        assert not names & {"AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID", "R2F_API_TOKEN"}
    assert report["job_configs"] and any("AWS_ENDPOINT_URL" in c for c in report["job_configs"])

    summaries = {name: json.loads(fs.cat(f"{s3_bucket}/stores/{name}/job-extract.json")) for name in ("ok", "bad")}
    assert summaries["ok"]["status"] == "succeeded" and summaries["ok"]["counts"]["num_extracted"] == 4
    failed = summaries["bad"]
    assert failed["status"] == "failed" and "Traceback" in failed["error"]["traceback"]
    # the secret was there to leak: masked where it stood, in the message, traceback and config
    assert f"missing-{plog.MASK}.csv" in failed["error"]["message"]
    assert f"missing-{plog.MASK}.csv" in failed["error"]["traceback"]
    assert failed["config"]["dataset"].endswith(f"missing-{plog.MASK}.csv")
    assert f"missing-{plog.MASK}.csv" in output  # the failure is logged, redacted

    objects = {path: fs.cat(path) for path in fs.find(s3_bucket)}
    assert len(objects) > 8  # images, manifest, both stores' files and summaries
    places = {"stdout/stderr": output.encode(), "report (runtime_env, job config)": json.dumps(report).encode(),
              **{f"ray:{p.relative_to(ray_tmp)}": b for p, b in ray_files.items()},
              **{f"s3://{p}": b for p, b in objects.items()}}
    assert any(k.startswith("ray:") and "/logs/" in k for k in places)  # the session's logs were scanned
    for secret in (key, token, r2f_token):
        leaks = [where for where, data in places.items() if secret.encode() in data]
        assert not leaks, f"a planted secret appears in {leaks}"
