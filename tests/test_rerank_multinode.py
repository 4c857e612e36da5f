"""The rerank job on a two-node local Ray cluster where the second node joins after the job
started: the scorer pool (Ray Data's autoscaling actor pool, max = what the cluster has) grows
onto it, and the score partitions' markers show partitions scored on both nodes."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from ray_nodes import LocalCluster

ROOT = Path(__file__).resolve().parents[1]
from helpers_store import indexed_city

DB_ROWS, QUERIES, PART, K = 1600, 640, 16, 20  # 40 partitions


@pytest.fixture(scope="module")
def city(tmp_path_factory, ray_session):
    return indexed_city(tmp_path_factory.mktemp("city_nodes"), DB_ROWS, QUERIES, PART)


def test_partitions_scored_on_a_node_that_joined_mid_job(city, tmp_path):
    cluster = LocalCluster(tmp_path)
    results = tmp_path / "res"
    cfg = json.dumps(dict(query_store=str(city / "q"), database_store=str(city / "db"), index_dir=str(city / "index"),
                          results=str(results), backbone="efficientnet-lite0", reranker="ransac", candidates=K,
                          partition_queries=PART, batch_pairs=64, image_size=[480, 640]))
    code = ("import json, sys; from pipeline.rerank import RerankConfig, run\n"
            "r = run(RerankConfig(**json.loads(sys.argv[1])))\n"
            "print('RESULT', json.dumps({'nodes': r.scorer_nodes, 'pairs': r.num_pairs}))\n")
    out_path, err_path = tmp_path / "driver.out", tmp_path / "driver.err"
    try:
        cluster.start_head(1)
        with open(out_path, "w") as out_f, open(err_path, "w") as err_f:
            driver = subprocess.Popen([sys.executable, "-c", code, cfg], env=dict(cluster.env, RAY_ADDRESS=cluster.address),
                                      cwd=ROOT, stdout=out_f, stderr=err_f, text=True)
        deadline = time.time() + 120
        while not (results / "plan.json").exists():  # the job has started: state pinned, plan written
            assert driver.poll() is None and time.time() < deadline, err_path.read_text()[-3000:]
            time.sleep(0.2)
        # the job runs on the head alone (one CPU: one scorer); now a second node joins
        cluster.add_node(2)
        joined = time.time()
        deadline, replaced = joined + 300, False
        while driver.poll() is None:
            assert time.time() < deadline, err_path.read_text()[-3000:]
            if cluster.procs[-1].poll() is not None and not replaced:
                # the joined node's raylet died (as a loaded CI machine has seen): the job must
                # survive losing it, and one more node joins in its place
                print(f"joined node exited ({cluster.procs[-1].returncode}); joining another")
                cluster.procs.pop()
                cluster.add_node(2)
                replaced = True
            time.sleep(0.5)
        assert driver.returncode == 0, err_path.read_text()[-4000:]
        got = json.loads(out_path.read_text().split("RESULT ", 1)[1])
    finally:
        cluster.stop()
    markers = [json.loads(p.read_text()) for p in sorted((results / "scores" / "progress").glob("*.json"))]
    assert len(markers) == QUERIES // PART and got["pairs"] == QUERIES * K
    nodes = {m["node_id"] for m in markers}
    # partitions were scored on the head and on the node that joined (and, where that node died
    # and another joined in its place, perhaps on both)
    assert len(nodes) == 2 or (replaced and len(nodes) == 3), markers
    head = min(markers, key=lambda m: m["finished_at"])["node_id"]
    assert sum(m["node_id"] != head for m in markers) >= 1
    assert time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(joined - 1)) <= max(m["finished_at"] for m in markers)
