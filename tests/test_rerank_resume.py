"""Exactly-once resume of the rerank job on a real Ray head: a scorer actor's process is killed
(found by its class through Ray's state API, as an operator would), then the driver is SIGKILLed
in the middle of a multi-partition RANSAC run; the rerun finishes it, and the result is one row
per (query, candidate), the same rows as an uninterrupted run."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from ray_head import RayHead

from pipeline import storage

ROOT = Path(__file__).resolve().parents[1]
from helpers_store import indexed_city

DB_ROWS, QUERIES, PART, K = 1600, 224, 16, 20  # 14 partitions of 16 queries x 20 candidates

DRIVER = (
    "import json, sys; from pipeline.log import setup_logging; setup_logging('WARNING')\n"
    "from pipeline.rerank import RerankConfig, run\n"
    "r = run(RerankConfig(**json.loads(sys.argv[1])))\n"
    "print('RESULT', json.dumps({'pairs': r.num_pairs, 'skipped': r.skipped_score_partitions}))\n")

# Ray Data names a pool's actor class after its operator: the scorers are MapWorker(MapBatches(ScoreWorker)).
SCORER_CLASS = "MapWorker(MapBatches(ScoreWorker))"
# The killer joins the cluster while the driver starts, then waits for the first committed score
# partition and kills at once: the whole run scores in a few seconds, which ray.init alone would eat.
KILL_ONE_SCORER = (
    "import glob, os, signal, sys, time\n"
    "import ray\n"
    "from ray.util.state import list_actors\n"
    "ray.init(address=sys.argv[1], logging_level='ERROR')\n"
    "deadline = time.time() + 120\n"
    "while not glob.glob(os.path.join(sys.argv[2], 'score-*.json')) and time.time() < deadline:\n"
    "    time.sleep(0.05)\n"
    f"found = list_actors(filters=[('class_name', '=', {SCORER_CLASS!r}), ('state', '=', 'ALIVE')], limit=1000)\n"
    "victim = sorted(found, key=lambda a: a.actor_id)[0]\n"
    "os.kill(victim.pid, signal.SIGKILL)  # the local head: its worker process is on this machine\n"
    "print('KILLED', victim.class_name, victim.actor_id, len(found), flush=True)\n")


@pytest.fixture(scope="module")
def city(tmp_path_factory, ray_session):
    return indexed_city(tmp_path_factory.mktemp("city_resume"), DB_ROWS, QUERIES, PART)


def _config(city: Path, results: Path) -> str:
    return json.dumps(dict(query_store=str(city / "q"), database_store=str(city / "db"),
                           index_dir=str(city / "index"), results=str(results), backbone="efficientnet-lite0",
                           reranker="ransac", candidates=K, partition_queries=PART, batch_pairs=64, num_actors=2,
                           image_size=[480, 640]))


def _markers(results: Path) -> int:
    """Score partitions committed (phase 3: the scorers' work; the parts are cut from it last)."""
    folder = results / "scores" / "progress"
    return len(list(folder.glob("score-*.json"))) if folder.exists() else 0


def test_killed_scorer_and_driver_resume_exactly_once(city, tmp_path):
    from pipeline.rerank import RerankConfig, read_results, run
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    # The uninterrupted reference run is not what is killed: it runs here, on the session's Ray.
    done = run(RerankConfig(**json.loads(_config(city, whole))))
    assert done.num_pairs == QUERIES * K and done.skipped_score_partitions == 0
    head = RayHead(num_cpus=2).start()
    driver = killer = None
    try:
        env = dict(head.env, RAY_ADDRESS=head.address, PYTHONPATH=str(ROOT))
        py = [sys.executable, "-c", DRIVER]
        driver = subprocess.Popen(py + [_config(city, cut)], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)
        killer = subprocess.Popen([sys.executable, "-c", KILL_ONE_SCORER, head.address,
                                   str(cut / "scores" / "progress")], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)
        said = killer.stdout.readline()  # returns once the scorer is killed (or the killer gave up)
        assert f"KILLED {SCORER_CLASS}" in said, said + killer.communicate(timeout=60)[1][-2000:]
        deadline = time.time() + 120
        at_kill = _markers(cut)
        while _markers(cut) < at_kill + 2 and time.time() < deadline and driver.poll() is None:
            time.sleep(0.02)
        assert driver.poll() is None, driver.communicate()[1][-3000:]  # the job outlived its lost actor
        os.kill(driver.pid, signal.SIGKILL)
        killer.communicate(timeout=60)
        driver.communicate()
        time.sleep(1.0)  # the job's actors go down with their driver
        finished = _markers(cut)
        assert 0 < finished < QUERIES // PART, (at_kill, finished)
        print(f"score partitions committed: {at_kill} at the scorer kill, {finished} at the driver kill")
        assert not (cut / "manifest.json").exists()

        again = subprocess.run(py + [_config(city, cut)], env=env, cwd=ROOT, capture_output=True, text=True,
                               timeout=300)
        assert again.returncode == 0, again.stderr[-3000:]
        got = json.loads(again.stdout.split("RESULT ", 1)[1])
        assert got["skipped"] == finished and got["pairs"] == QUERIES * K
    finally:
        for proc in (driver, killer):
            if proc is not None and proc.poll() is None:
                proc.kill()
        head.stop()
    a, b = read_results(str(cut)), read_results(str(whole))
    assert a.num_rows == QUERIES * K
    assert not a.to_pandas().duplicated(["query_id", "image_id"]).any()
    # the same rows, bit-equal scores, same order (pandas: the stripped query positions are NaN)
    assert a.to_pandas().equals(b.to_pandas())
    manifest = storage.read_json(str(cut / "manifest.json"))
    assert manifest["complete"] and manifest["parts"] == list(range(QUERIES // PART))
