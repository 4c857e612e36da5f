"""SIGKILL the reindex after each of its steps in turn (each run a real process joining the test's
Ray, killed by the signal from inside its ``on_stage`` hook): until the pointer write, readers keep
resolving the previous state and get its ids, descriptors and search results; each next run picks
up what the killed one left (stale lock broken, pending generation built on) and the last one
finishes the work. The store is hand-written and the changes are a deletion and a move, so no
model runs."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np

from pipeline import reindex, storage
from pipeline.datasets import load_dataset
from pipeline.index import published, search
from tests.helpers_reindex import write_hand_store, write_source

ROOT = Path(__file__).resolve().parents[1]
STEPS = ["planned", "extracted", "adopted", "snapshot", "index_built", "checked", "published"]
CHILD = """
import json, os, signal, sys
from pipeline import reindex
cfg = reindex.ReindexConfig(**json.loads(sys.argv[1]))
def die(stage, info):
    if stage == sys.argv[2]:
        os.kill(os.getpid(), signal.SIGKILL)
reindex.run(cfg, on_stage=die)
"""


def test_sigkill_after_each_step_readers_keep_the_previous_state(ray_session, gardens_point, tmp_path):
    folder = gardens_point / "day_left"
    src = tmp_path / "src.csv"
    write_source(src, folder, range(8))
    store = str(tmp_path / "store")
    write_hand_store(store, str(src), tokens=4, dim=32)
    cfg = reindex.ReindexConfig(source=str(src), store=store, gc_grace_s=0.0,
                                index=dict(held_back_queries=2, num_shards=2))
    index_dir = cfg.resolved_index_dir
    assert reindex.run(cfg).status == "published"
    before = published.resolve(store, index_dir)
    table = before.read_global_table(["image_id", "global_descriptor"])
    queries = storage.descriptors_of(table)
    answers = search(index_dir, queries, k=3)

    write_source(src, folder, [0, 1, 3, 4, 5, 6, 7], east={5: 50.0})  # delete frame 2, move frame 5
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    child_cfg = json.dumps({k: v for k, v in vars(cfg).items()}
                           | {"ray_address": ray_session.get_runtime_context().gcs_address})
    for step in STEPS:
        proc = subprocess.run([sys.executable, "-c", CHILD, child_cfg, step], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=240)
        assert proc.returncode == -signal.SIGKILL, f"{step}: {proc.returncode}\n{proc.stderr[-3000:]}"
        now = published.resolve(store, index_dir)
        if step != "published":  # the pointer is the only switch: until it moves, readers see `before`
            assert now == before, step
            assert np.array_equal(now.read_global_table(["image_id"]).column("image_id").to_numpy(),
                                  table.column("image_id").to_numpy())
            got = search(index_dir, queries, k=3)
            assert np.array_equal(got.ids, answers.ids) and np.allclose(got.scores, answers.scores), step
        else:
            assert now.index_version != before.index_version and now.store_generation > before.store_generation

    final = reindex.run(cfg)  # the lock of the last dead run is broken; the work is done
    assert final.status == "noop", final.message
    state = published.resolve(store, index_dir)
    rows = {r["image_id"]: r for r in state.read_global_table().to_pylist()}
    source = load_dataset(str(src))
    expected = sorted(source.column("image_id").to_pylist())
    assert sorted(rows) == expected == reindex.version_image_ids(index_dir, state.index_version).tolist()
    moved = source.column("image_id")[source.column("path").to_pylist().index(str(folder / "Image005.jpg"))].as_py()
    assert rows[moved]["utm_east"] == 50.0
    # the killed runs' leftovers (parts adopted under numbers no generation lists, unpublished
    # versions) are garbage now
    assert final.gc["shards"] and final.gc["bytes_reclaimed"] > 0  # collected after the no-op run
    assert reindex.collect(cfg).gc["bytes_reclaimed"] == 0
    assert storage.read_global_table(store, ["image_id"], manifest=state.manifest).num_rows == len(expected)
