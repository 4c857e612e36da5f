"""Glue shared by the Ray job entrypoints (``python -m jobs.<name> --config X.yaml [--set k=v]``).

A job is a stage's ``run(config)`` (or the index's ``build``) wrapped for unattended runs on a
cluster: join the Ray cluster the job was submitted to, load the typed config, time the stage,
log its counts, and leave ``job-<name>.json`` next to the stage's outputs, so that an operator (or
the next scheduled run) can see what happened without the driver's log. Failures exit non-zero
and name the input that failed.

Submitted from the repository root::

    ray job submit --address http://HEAD:8265 --working-dir . \\
        --runtime-env-json '{"excludes": [".venv", ".git", "out", "data", "demo", "bench", "tests"]}' \\
        -- python -m jobs.extract --config configs/jobs/extract.yaml --set dataset=s3://city/images
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import socket
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

from pipeline.config import jsonable
from pipeline.log import get_logger, redact, redact_obj, setup_logging
from pipeline.timefmt import utc_stamp

log = get_logger("jobs")

# What `--runtime-env-json` must exclude so the uploaded working dir stays small (Ray caps it at
# 500 MiB and uploads it to every node): virtualenvs, data, outputs, caches.
RUNTIME_ENV_EXCLUDES = [".venv", ".git", "out", "data", "demo", "bench", "tests", "*.egg-info",
                        "__pycache__", ".pytest_cache"]

# Config fields named in failure messages (the inputs a stage reads).
INPUT_FIELDS = ("source", "dataset", "database", "queries", "store", "index_dir", "checkpoint",
                "database_store", "query_store", "negatives", "results")

EXIT_OK, EXIT_FAILED, EXIT_CONFIG, EXIT_STOPPED = 0, 1, 2, 143


class JobStopped(BaseException):
    """SIGTERM (``ray job stop``, a pod eviction): unwinds the stage like Ctrl-C, so locks are
    released and the summary says "stopped" before the process exits."""


@dataclass(frozen=True)
class JobSpec:
    """One job: the stage's config class and the function that runs it (``jobs.specs.JOBS``)."""
    name: str
    config_class: type
    function: Callable[[Any], Any]
    # config fields (or properties) naming where the stage writes, first non-empty one wins: the
    # JSON summary goes inside that folder, or beside that file
    output_fields: tuple[str, ...] = ("out", "output", "store")

    @property
    def stage(self) -> str:
        """``module.function`` of the stage, as summaries and logs name it."""
        return f"{self.function.__module__}.{self.function.__qualname__}"

    def main(self, argv: list[str] | None = None) -> int:
        return main(self, argv)

    def entrypoint(self) -> None:
        sys.exit(main(self))


def submit_command(job: str, config: str, address: str = "http://127.0.0.1:8265",
                   overrides: list[str] | None = None) -> list[str]:
    """The ``ray job submit`` command line for ``job`` (what OPERATIONS.md documents)."""
    cmd = ["ray", "job", "submit", "--address", address, "--working-dir", ".",
           "--runtime-env-json", json.dumps({"excludes": RUNTIME_ENV_EXCLUDES}),
           "--", "python", "-m", f"jobs.{job}", "--config", config]
    for o in overrides or []:
        cmd += ["--set", o]
    return cmd


def build_parser(spec: JobSpec) -> argparse.ArgumentParser:
    from pipeline.config import add_config_arguments

    p = argparse.ArgumentParser(prog=f"python -m jobs.{spec.name}",
                                description=f"Ray job: {spec.stage}(config)")
    add_config_arguments(p)
    p.add_argument("--summary", default=None,
                   help="where to write the JSON summary (default: job-<name>.json next to the outputs)")
    p.add_argument("--address", default=None,
                   help="Ray address (default: RAY_ADDRESS, which `ray job submit` sets; else a local Ray)")
    p.add_argument("--log-level", default=None)
    return p


def main(spec: JobSpec, argv: list[str] | None = None) -> int:
    """Parse arguments, run the job, return its exit code."""
    args = build_parser(spec).parse_args(argv)
    setup_logging(args.log_level)
    return run_job(spec, args.config, args.overrides, summary=args.summary, address=args.address)


def run_job(spec: JobSpec, config_path: str | None, overrides: list[str] | None = None,
            summary: str | None = None, address: str | None = None) -> int:
    from pipeline.cluster import ensure_ray
    from pipeline.config import ConfigError, load_config

    _stop_on_sigterm()
    started = time.time()
    record: dict[str, Any] = {
        "job": spec.name, "stage": spec.stage, "status": "running",
        "started_at": utc_stamp(started), "host": socket.gethostname(),
        "ray_job_submission_id": submission_id(),
        "config_file": config_path, "overrides": list(overrides or []),
    }
    timings: dict[str, float] = {}
    cfg = None
    try:
        t = time.perf_counter()
        cfg = load_config(spec.config_class, config_path, overrides or [])
        record["config"] = jsonable(dataclasses.asdict(cfg), summarise=True)
        timings["load_config"] = time.perf_counter() - t

        t = time.perf_counter()
        ensure_ray(address)
        record["ray"] = _ray_info()
        timings["connect_ray"] = time.perf_counter() - t

        log.info("job %s: running %s (inputs: %s)", spec.name, spec.stage, _describe_inputs(cfg) or "-")
        t = time.perf_counter()
        result = spec.function(cfg)
        step = spec.function.__name__
        timings[step] = time.perf_counter() - t

        record["result"] = jsonable(dataclasses.asdict(result), summarise=True) if dataclasses.is_dataclass(result) \
            else jsonable(result, summarise=True)
        record["counts"] = counts_of(result)
        inner = getattr(result, "stage_seconds", None)
        if isinstance(inner, dict):
            timings.update({f"{step}.{k}": float(v) for k, v in inner.items()})
        failed = (getattr(result, "ok", True) is False or bool(getattr(result, "too_many_failures", False))
                  or int(getattr(result, "exit_code", 0) or 0) != 0)
        record["status"] = "failed" if failed else "succeeded"
        code = EXIT_FAILED if failed else EXIT_OK
        if failed:
            message = getattr(result, "message", "") or (result.summary() if hasattr(result, "summary") else "")
            record["error"] = {"type": "StageReportedFailure", "message": str(message),
                               "inputs": _describe_inputs(cfg)}
            log.error("job %s: the stage reported failure on input %s: %s", spec.name, _describe_inputs(cfg), message)
    except JobStopped as exc:
        code = EXIT_STOPPED
        record["status"] = "stopped"
        record["error"] = {"type": "JobStopped", "message": str(exc),
                           "inputs": _describe_inputs(cfg) if cfg is not None else config_path}
        log.error("job %s stopped (%s); resubmit it to resume", spec.name, exc)
    except ConfigError as exc:
        code = EXIT_CONFIG
        record["status"] = "failed"
        record["error"] = {"type": type(exc).__name__, "message": str(exc), "inputs": config_path}
        log.error("job %s: bad config %s: %s", spec.name, config_path or "(none)", exc)
    except Exception as exc:  # a job reports every failure in its summary, then exits non-zero
        code = EXIT_FAILED
        inputs = _describe_inputs(cfg) if cfg is not None else config_path
        record["status"] = "failed"
        record["error"] = {"type": type(exc).__name__, "message": str(exc), "inputs": inputs,
                           "traceback": redact(traceback.format_exc(limit=20))}
        log.error("job %s failed on input %s: %s: %s", spec.name, inputs, type(exc).__name__, exc,
                  exc_info=True)

    finished = time.time()
    timings["total"] = finished - started
    record["finished_at"] = utc_stamp(finished)
    record["stage_seconds"] = {k: round(v, 3) for k, v in timings.items()}
    record["exit_code"] = code
    log.info("job %s %s in %.1f s; timings %s; counts %s", spec.name, record["status"], timings["total"],
             json.dumps(record["stage_seconds"]), json.dumps(record.get("counts", {})))

    where = summary or (summary_path(spec.name, cfg, spec.output_fields) if cfg is not None else None)
    if where:
        try:
            from pipeline.storage import write_json
            # the summary outlives the run and is read by people: no credential in any field
            write_json(where, redact_obj(record))
            log.info("job %s: summary written to %s", spec.name, where)
        except Exception as exc:  # the summary never hides the stage's own outcome
            log.warning("job %s: could not write summary %s: %s", spec.name, where, exc)
            code = code or EXIT_FAILED
    return code


def _stop_on_sigterm() -> None:
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return

    def stop(signum, frame):
        raise JobStopped(f"signal {signum}")

    signal.signal(signal.SIGTERM, stop)


def submission_id() -> str | None:
    """The ``ray job submit`` id of this driver: the job server passes it in the job config it
    hands the entrypoint (``RAY_JOB_CONFIG_JSON_ENV_VAR``); None outside a submitted job."""
    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if raw:
        try:
            return json.loads(raw).get("metadata", {}).get("job_submission_id")
        except (ValueError, AttributeError):
            pass
    return os.environ.get("RAY_JOB_SUBMISSION_ID")


def summary_path(job: str, cfg: Any, fields: tuple[str, ...] = ("out", "output", "store")) -> str | None:
    """``job-<name>.json`` inside the stage's output folder, or beside its output file."""
    for name in fields:
        try:
            value = getattr(cfg, name, None)
        except Exception:  # a property that cannot resolve (e.g. no store given)
            value = None
        if isinstance(value, str) and value:
            leaf = PurePosixPath(value.rstrip("/")).name
            if "." in leaf and not leaf.endswith((".zarr",)):
                # an output file (negatives.parquet): put the summary beside it
                return f"{value.rsplit('/', 1)[0] if '/' in value else '.'}/{leaf}.job-{job}.json"
            return f"{value.rstrip('/')}/job-{job}.json"
    return None


def counts_of(result: Any) -> dict[str, Any]:
    """The integer fields of a stage result (images, shards, failures, vectors ...)."""
    if not dataclasses.is_dataclass(result):
        return {}
    out = {}
    for f in dataclasses.fields(result):
        v = getattr(result, f.name)
        if isinstance(v, bool):
            continue
        if isinstance(v, int):
            out[f.name] = v
        elif isinstance(v, (list, tuple, set, frozenset)) and f.name not in ("stage_seconds",):
            out[f"{f.name}_count"] = len(v)
    return out


def _describe_inputs(cfg: Any) -> str:
    parts = []
    for name in INPUT_FIELDS:
        v = getattr(cfg, name, None)
        if v not in (None, "", [], ()):
            parts.append(f"{name}={v}")
    return ", ".join(parts)


def _ray_info() -> dict[str, Any]:
    import ray

    if not ray.is_initialized():  # never let a status query start or join a cluster
        return {}
    try:
        ctx = ray.get_runtime_context()
        res = ray.cluster_resources()
        return {"job_id": ctx.get_job_id(), "nodes": len([n for n in ray.nodes() if n.get("Alive")]),
                "cpus": res.get("CPU", 0), "gpus": res.get("GPU", 0)}
    except Exception:  # informational only
        return {}
