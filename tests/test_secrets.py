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
from pathlib import Path

import yaml

from pipeline import cluster
from pipeline import log as plog

pytest_plugins = ["s3_runs"]  # its session fixtures, shared with test_s3_faults.py (one job for both)

ROOT = Path(__file__).resolve().parents[1]


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
# ``faulty_job`` (tests/s3_runs.py): one process with the secrets planted in its environment and its
# own embedded Ray runs `r2f run` with every path on S3, `r2f reindex`, an extraction job that
# succeeds and one whose dataset URL carries the secret (so it is in the exception, traceback, log
# lines and the job's config), then asks Ray what runtime_env the job and its workers got.
def test_planted_secret_appears_nowhere(faulty_job, s3_inputs):
    import hashlib

    fs = s3_inputs["fs"]
    report, output, tail = faulty_job["report"], faulty_job["output"], faulty_job["tail"]
    key, token, r2f_token = faulty_job["secrets"]

    assert report["codes"] == {"run": 0, "reindex": 0, "job_ok": 0, "job_bad": 1}, tail
    probe = report["probe"]
    # the worker has the credentials (inherited from the driver's environment), yet ...
    assert probe["secret_sha"] == hashlib.sha256(key.encode()).hexdigest()
    assert probe["redacting_handler"]  # workers log through pipeline.log's handler (setup hook)
    # ... the runtime_env holds only the non-secret settings
    for runtime_env in (probe["runtime_env"], report["driver_runtime_env"]):
        names = set(runtime_env.get("env_vars", {}))
        assert {"AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION", "R2F_LOG_LEVEL"} <= names
        assert not names & {"AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID", "R2F_API_TOKEN"}
    assert report["job_configs"] and any("AWS_ENDPOINT_URL" in c for c in report["job_configs"])

    stores = faulty_job["job_stores"]
    summaries = {name: json.loads(fs.cat(f"{stores[name]}/job-extract.json")) for name in ("ok", "bad")}
    assert summaries["ok"]["status"] == "succeeded" and summaries["ok"]["counts"]["num_extracted"] >= 3
    failed = summaries["bad"]
    assert failed["status"] == "failed" and "Traceback" in failed["error"]["traceback"]
    # the secret was there to leak: masked where it stood, in the message, traceback and config
    assert f"missing-{plog.MASK}.csv" in failed["error"]["message"]
    assert f"missing-{plog.MASK}.csv" in failed["error"]["traceback"]
    assert failed["config"]["dataset"].endswith(f"missing-{plog.MASK}.csv")
    assert f"missing-{plog.MASK}.csv" in output  # the failure is logged, redacted

    fs.invalidate_cache()
    objects = {path: fs.cat(path) for path in fs.find(s3_inputs["base"])}
    # images, manifests, the checkpoint, both runs' stores, index, results and report, the jobs' stores
    assert len(objects) > 30 and any(p.endswith("out_faulty/report.html") for p in objects)
    places = {"stdout/stderr": output.encode(), "report (runtime_env, job config)": json.dumps(report).encode(),
              **{f"ray:{p}": b for p, b in faulty_job["ray_files"].items()},
              **{f"s3://{p}": b for p, b in objects.items()}}
    assert any(k.startswith("ray:") and "/logs/" in k for k in places)  # the session's logs were scanned
    for secret in (key, token, r2f_token):
        leaks = [where for where, data in places.items() if secret.encode() in data]
        assert not leaks, f"a planted secret appears in {leaks}"
