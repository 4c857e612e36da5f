"""Extraction on a two-node Ray cluster on 127.0.0.1: a head and one more node, token auth for every
process, the extraction run as a driver subprocess. The progress markers record the node of the
model actor that wrote each shard; both nodes must have computed shards and the output must be complete."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
from ray_nodes import LocalCluster

from pipeline import storage

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def two_node_cluster(tmp_path):
    """``(address, env)`` of a head plus one worker node (tests/ray_nodes.py). One "extract_slot"
    per node and one per model actor: exactly one actor lands on each node."""
    cluster = LocalCluster(tmp_path)
    try:
        cluster.start_head(2, {"extract_slot": 1})
        cluster.add_node(2, {"extract_slot": 1})
        yield cluster.address, cluster.env
    finally:
        cluster.stop()


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
