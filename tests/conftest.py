"""Shared test fixtures: one local Ray per test session, a real S3 endpoint (moto server on
127.0.0.1), and the real Gardens Point images from ../shared."""
from __future__ import annotations

import os
import socket
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("R2F_SHARED", ROOT.parent / "shared"))
GARDENS_POINT = SHARED / "data" / "gardens_point"
PARITY = SHARED / "parity"

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("R2F_TORCH_THREADS", "2")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def gardens_point() -> Path:
    if not GARDENS_POINT.exists():
        pytest.fail(f"Gardens Point data not found at {GARDENS_POINT} (set R2F_SHARED)")
    return GARDENS_POINT


@pytest.fixture(scope="session")
def parity_dir() -> Path:
    return PARITY


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3 API on 127.0.0.1 (moto server); credentials and endpoint go through env vars,
    which the embedded Ray's workers inherit (the endpoint is also forwarded: pipeline.cluster)."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    url = f"http://127.0.0.1:{port}"
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": url,
        "R2F_S3_ENDPOINT_URL": url,
    }
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield url
    server.stop()
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture()
def s3_bucket(s3_endpoint):
    """A fresh bucket; returns its ``s3://`` URL."""
    import boto3

    name = f"r2f-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1").create_bucket(Bucket=name)
    return f"s3://{name}"


@pytest.fixture(scope="session")
def ray_session(s3_endpoint):
    """One local Ray for the whole test session (started after the S3 env is set, so workers see it)."""
    import ray

    from pipeline.cluster import ensure_ray

    ensure_ray(num_cpus=2, object_store_memory=256 * 1024 * 1024)
    yield ray
    ray.shutdown()


# ---------------------------------------------------------------- Ray hygiene
# Tests that start Ray heads or nodes give them their own --temp-dir, so the machine's
# /tmp/ray/ray_current_cluster (which a later plain ``ray.init()`` joins) and any Ray the user runs
# are left exactly as they were. The session fails if the file changed anyway (and puts it back).
RAY_ADDRESS_FILE = Path("/tmp/ray/ray_current_cluster")
PLANTED_ADDRESS = "127.0.0.1:9"  # port 9 (discard): nothing answers


def _read_address_file() -> str | None:
    try:
        return RAY_ADDRESS_FILE.read_text()
    except FileNotFoundError:
        return None


def pytest_sessionstart(session):
    session.config._ray_address_file = _read_address_file()


def pytest_sessionfinish(session, exitstatus):
    before = getattr(session.config, "_ray_address_file", None)
    after = _read_address_file()
    if after == before or PLANTED_ADDRESS in (before, after):
        return  # unchanged, or another pytest session's planted file that it removes itself
    if before is None:
        RAY_ADDRESS_FILE.unlink(missing_ok=True)
    else:
        RAY_ADDRESS_FILE.write_text(before)
    print(f"\nERROR: the test session changed {RAY_ADDRESS_FILE} ({before!r} -> {after!r}); restored it. "
          "A test started a Ray head without its own --temp-dir.")
    session.exitstatus = 1


@pytest.fixture()
def planted_ray_address_file():
    """A ``/tmp/ray/ray_current_cluster`` naming a dead head (as a user's old ``ray start`` leaves
    it), or the user's own one if present; yields its content, and the test checks it afterwards.
    The planted file is removed again."""
    existing = _read_address_file()
    content = existing if existing is not None else PLANTED_ADDRESS
    if existing is None:
        RAY_ADDRESS_FILE.parent.mkdir(parents=True, exist_ok=True)
        RAY_ADDRESS_FILE.write_text(content)
    yield content
    if existing is None:
        RAY_ADDRESS_FILE.unlink(missing_ok=True)


# ---------------------------------------------------------------- pytest-xdist (make test: -n 2)
# `--dist loadfile` gives each worker whole modules, so module fixtures are made once. Modules
# that share session fixtures go to one worker as one unit, or each worker would make them again:
# the S3 runs of tests/s3_runs.py (one clean `r2f run`, one faulty job in a subprocess).
XDIST_UNITS = {f"tests/{name}.py": "tests/s3_runs" for name in ("test_s3_faults", "test_s3_seams", "test_secrets")}


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    from xdist.scheduler import LoadFileScheduling

    class ModulesSharingFixtures(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = super()._split_scope(nodeid)
            return XDIST_UNITS.get(module, module)

    return ModulesSharingFixtures(config, log)
