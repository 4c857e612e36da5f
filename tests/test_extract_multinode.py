"""Extraction on a two-node Ray cluster on 127.0.0.1: a head and one more node, token auth for every
process, the extraction run as a driver subprocess. The progress markers record the node of the
model actor that wrote each shard; both nodes must have computed shards and the output must be complete."""
import json
import os
import random
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from pipeline import storage

ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def _free_ports(n: int, taken: set[int]) -> list[int]:
    out = []
    while len(out) < n:
        p = random.randint(20000, 59000)
        if p not in taken and _port_free(p):
            out.append(p)
            taken.add(p)
    return out


def _free_range(width: int, taken: set[int]) -> tuple[int, int]:
    while True:
        base = random.randint(20000, 59000 - width)
        span = set(range(base, base + width))
        if not span & taken and all(_port_free(p) for p in range(base, base + width, 7)):
            taken |= span
            return base, base + width - 1


def _node_args(taken: set[int]) -> list[str]:
    manager, objects, agent, agent_grpc, metrics, runtime_env = _free_ports(6, taken)
    lo, hi = _free_range(40, taken)
    # One "extract_slot" per node and one per model actor: exactly one actor lands on each node.
    return ["--node-ip-address", "127.0.0.1", "--num-cpus", "2", "--resources", '{"extract_slot": 1}',
            "--object-store-memory", str(150 * 1024 * 1024),
            "--node-manager-port", str(manager), "--object-manager-port", str(objects),
            "--dashboard-agent-listen-port", str(agent), "--dashboard-agent-grpc-port", str(agent_grpc),
            "--metrics-export-port", str(metrics), "--runtime-env-agent-port", str(runtime_env),
            "--min-worker-port", str(lo), "--max-worker-port", str(hi), "--disable-usage-stats", "--block"]


@pytest.fixture()
def two_node_cluster(tmp_path, tmp_path_factory):
    """``(address, env)`` of a head plus one worker node; only the two ``ray start --block`` processes
    started here are stopped (SIGINT makes each tear down its own Ray daemons). The session lives in
    its own ``--temp-dir`` under pytest's base temp (short: Ray's socket paths are length-limited),
    so ``/tmp/ray/ray_current_cluster`` and any Ray of the user's are left as they were."""
    temp_dir = tempfile.mkdtemp(prefix="rn", dir=tmp_path_factory.getbasetemp())
    taken: set[int] = set()
    gcs, client = _free_ports(2, taken)
    env = dict(os.environ, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(16), RAY_USAGE_STATS_ENABLED="0",
               PYTHONPATH=str(ROOT))
    env.pop("RAY_ADDRESS", None)
    logs = [open(tmp_path / f"node{i}.log", "wb") for i in range(2)]
    procs = []
    address = f"127.0.0.1:{gcs}"
    try:
        procs.append(subprocess.Popen(
            [RAY, "start", "--head", "--port", str(gcs), "--ray-client-server-port", str(client),
             "--include-dashboard", "false", "--temp-dir", temp_dir, *_node_args(taken)],
            env=env, stdout=logs[0], stderr=subprocess.STDOUT, cwd=ROOT))
        _wait_nodes(address, env, 1, started=procs)
        procs.append(subprocess.Popen([RAY, "start", "--address", address, "--temp-dir", temp_dir, *_node_args(taken)],
                                      env=env, stdout=logs[1], stderr=subprocess.STDOUT, cwd=ROOT))
        _wait_nodes(address, env, 2, started=procs)
        yield address, env
    finally:
        stop_nodes(procs, logs)


def stop_nodes(procs: list[subprocess.Popen], logs: list, timeout: float = 10) -> None:
    """Stop the ``ray start --block`` processes a test started (newest first): SIGINT makes each
    tear down its own daemons; one that does not within ``timeout`` is killed."""
    for p in reversed(procs):
        if p.poll() is None:
            p.send_signal(signal.SIGINT)
    for p in reversed(procs):
        try:
            p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    for f in logs:
        f.close()


def _wait_nodes(address: str, env: dict, n: int, timeout: float = 180,
                started: list[subprocess.Popen] | None = None) -> None:
    """Wait until ``n`` nodes are alive. Each probe is a subprocess with its own time limit (a
    ``ray.init`` against a head that died during start-up can hang for many minutes), and a
    ``ray start --block`` process of ``started`` that already exited fails the wait at once."""
    code = ("import ray, sys; ray.init(address=sys.argv[1], logging_level='ERROR'); "
            "print(sum(1 for x in ray.nodes() if x['Alive']))")
    deadline = time.time() + timeout
    err = ""
    while time.time() < deadline:
        dead = [p.args[:3] for p in started or [] if p.poll() is not None]
        if dead:
            raise AssertionError(f"`ray start` exited during start-up (see node*.log): {dead}")
        try:
            out = subprocess.run([sys.executable, "-c", code, address], env=env, capture_output=True, text=True,
                                 timeout=max(5.0, min(60.0, deadline - time.time())))
        except subprocess.TimeoutExpired:
            err = "probe timed out"
            continue
        if out.returncode == 0 and out.stdout.strip().splitlines()[-1:] == [str(n)]:
            return
        err = out.stderr[-2000:]
        time.sleep(2)
    raise AssertionError(f"Ray cluster at {address} did not reach {n} node(s): {err}")


def test_two_node_extraction_uses_both_nodes(planted_ray_address_file, two_node_cluster, gardens_point, tmp_path):
    """Shards are COMPUTED on both nodes, not only placed there. Ray Data hands a decoded shard to a
    model actor on the node that holds it (locality-aware dispatch), and decoding tasks spread over
    the nodes; that holds only for a shard that lives in a node's object store, i.e. larger than
    Ray's inline limit (``max_direct_call_object_size``, 100 KiB): smaller task outputs travel back
    inside the driver's process, carry no node, and the first idle actor takes nearly all of them.
    So the shards here are two 128x224 images (168 KiB), as any real shard is (256 images)."""
    address, env = two_node_cluster
    num_images, shard_size, size = 16, 2, (128, 224)
    assert shard_size * size[0] * size[1] * 3 > 100 * 1024, "decoded shards must not be inlined (see docstring)"
    paths = [gardens_point / "night_right" / f"Image{i:03d}.jpg" for i in range(num_images)]
    manifest = tmp_path / "m.csv"
    manifest.write_text("path\n" + "".join(f"{p}\n" for p in paths))
    store = tmp_path / "store"
    code = (
        "import json, ray; from pipeline import extract; from pipeline.log import setup_logging; setup_logging()\n"
        f"r = extract.run(extract.ExtractConfig(dataset={str(manifest)!r}, store={str(store)!r}, "
        f"backbone='efficientnet-lite0', image_size={size}, batch_size={shard_size}, shard_size={shard_size}, "
        f"chunk_rows={shard_size}, num_actors=2, threads_per_actor=1, progress=False, "
        "actor_resources={'extract_slot': 1}))\n"
        "print('RESULT', json.dumps({'nodes': sorted(n['NodeID'] for n in ray.nodes() if n['Alive']), "
        "'actor_nodes': r.node_ids, 'extracted': r.num_extracted}))\n")
    out = subprocess.run([sys.executable, "-c", code], env=dict(env, RAY_ADDRESS=address), cwd=ROOT,
                         capture_output=True, text=True, timeout=480)
    assert out.returncode == 0, out.stderr[-4000:]
    line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")][-1]
    got = json.loads(line[len("RESULT "):])
    assert len(got["nodes"]) == 2
    num_shards = num_images // shard_size
    markers = [json.loads(p.read_text()) for p in sorted((store / "progress").glob("shard-*.json"))]
    assert [m["shard"] for m in markers] == list(range(num_shards))
    # One model actor per node (each needs the node's one "extract_slot") ...
    actors = [json.loads(p.read_text()) for p in sorted((store / "actors").glob("*.json"))]
    assert {a["node_id"] for a in actors} == set(got["nodes"]), (actors, got)
    # ... and each node's actor computed shards: the markers (written by the actor that extracted
    # the shard) name both nodes, and so does the run's result.
    computed = {n: [m["shard"] for m in markers if m["node_id"] == n] for n in got["nodes"]}
    assert all(computed.values()), f"shards per node: {computed}"
    assert set(got["actor_nodes"]) == set(got["nodes"])
    table = storage.read_global_table(str(store))
    assert got["extracted"] == num_images and table.num_rows == num_images
    assert len(set(table.column("image_id").to_pylist())) == num_images
    assert storage.read_manifest(str(store))["counts"] == {"images": num_images, "extracted": num_images, "failed": 0}
    # Starting and joining the nodes left the machine's Ray address file as it was.
    from conftest import RAY_ADDRESS_FILE
    assert RAY_ADDRESS_FILE.read_text() == planted_ray_address_file
