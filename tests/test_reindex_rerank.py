"""Rerank while a reindex publishes: the reindex adds, changes and deletes images (real extraction of
the new bytes, efficientnet-lite0) and is paused through ``on_stage`` after each step; at every pause
readers resolve the previous state, and a rerank job started at the riskiest pause (new snapshot and
new index version written, pointer not yet moved) returns only images of the state it resolved, with
that state's global descriptors; the job after the pointer write sees the new state."""
import shutil

import numpy as np
import pytest

from pipeline import reindex, storage
from pipeline.index import published, search
from tests.helpers_reindex import write_hand_store

SIZE = [128, 224]      # efficientnet-lite0 at 128x224: 8 x 14 = 112 tokens, 1280-d GeM
TOKENS, DIM = 112, 1280


def _rerank(store, index_dir, queries, results):
    from pipeline.rerank import RerankConfig, read_results, run

    res = run(RerankConfig(query_store=queries, database_store=store, index_dir=index_dir, results=str(results),
                           backbone="efficientnet-lite0", reranker="ransac", candidates=16, partition_queries=2,
                           num_actors=1, image_size=SIZE))
    return res, read_results(res.results)


def _by_id(state):
    t = state.read_global_table(["image_id", "global_descriptor"])
    d = storage.descriptors_of(t)
    d = d / np.linalg.norm(d, axis=1, keepdims=True)
    return dict(zip(t.column("image_id").to_pylist(), d))


def _check(results, state, queries_by_id):
    """Every row is an image of ``state``, scored with ``state``'s descriptor of it."""
    db = _by_id(state)
    rows = results.to_pylist()
    assert rows and {r["image_id"] for r in rows} == set(db)  # all candidates: the whole state, nothing else
    for r in rows:
        assert r["global_score"] == pytest.approx(float(queries_by_id[r["query_id"]] @ db[r["image_id"]]), abs=1e-4)


def test_rerank_during_a_paused_reindex_sees_one_state(ray_session, gardens_point, tmp_path):
    src = tmp_path / "images"
    src.mkdir()
    for i in range(6):
        shutil.copy(gardens_point / "day_left" / f"Image{i:03d}.jpg", src / f"Image{i:03d}.jpg")
    store, queries = str(tmp_path / "store"), str(tmp_path / "queries")
    write_hand_store(store, str(src), tokens=TOKENS, dim=DIM)
    qsrc = tmp_path / "qimages"
    qsrc.mkdir()
    for i in (0, 3):
        shutil.copy(gardens_point / "day_right" / f"Image{i:03d}.jpg", qsrc / f"Image{i:03d}.jpg")
    write_hand_store(queries, str(qsrc), tokens=TOKENS, dim=DIM, seed=1)
    q_by_id = _by_id(published.resolve(queries))
    cfg = reindex.ReindexConfig(source=str(src), store=store, gc_grace_s=0.0,
                                extract=dict(batch_size=4, progress=False, num_actors=1),
                                index=dict(held_back_queries=2, num_shards=2))
    index_dir = cfg.resolved_index_dir
    assert reindex.run(cfg).status == "published"
    before = published.resolve(store, index_dir)
    before_ids = set(_by_id(before))

    # add two, change one (new bytes under the same name), delete one
    for i in (6, 7):
        shutil.copy(gardens_point / "day_left" / f"Image{i:03d}.jpg", src / f"Image{i:03d}.jpg")
    shutil.copy(gardens_point / "night_right" / "Image001.jpg", src / "Image001.jpg")
    (src / "Image002.jpg").unlink()
    probe = np.stack(list(_by_id(before).values()))
    answers = search(index_dir, probe, k=3)
    seen, during = [], {}

    def pause(stage, info):
        seen.append(stage)
        state = published.resolve(store, index_dir)
        if stage in ("published", "collected"):
            return
        assert state == before, stage  # only the pointer switches readers
        assert set(_by_id(state)) == before_ids
        got = search(index_dir, probe, k=3)
        assert np.array_equal(got.ids, answers.ids), stage
        if stage == "checked":  # new snapshot and new index version on disk; the pointer not yet moved
            during["run"] = _rerank(store, index_dir, queries, tmp_path / "res_during")

    result = reindex.run(cfg, on_stage=pause)
    assert result.status == "published" and (result.added, result.changed, result.deleted) == (2, 1, 1)
    assert seen[:7] == ["planned", "extracted", "adopted", "snapshot", "index_built", "checked", "published"]
    res, table = during["run"]
    assert res.state == before.metadata()
    _check(table, before, q_by_id)

    after = published.resolve(store, index_dir)
    assert (after.index_version, after.store_generation) == (result.version, result.store_generation)
    res2, table2 = _rerank(store, index_dir, queries, tmp_path / "res_after")
    assert res2.state == after.metadata()
    _check(table2, after, q_by_id)
    changed = storage.image_id_for("Image001.jpg")
    assert not np.allclose(_by_id(before)[changed], _by_id(after)[changed])  # really a new descriptor
