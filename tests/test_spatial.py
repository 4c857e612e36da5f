"""The k-d tree answers radius queries exactly as a dense distance check would (pairs within,
counts, membership), and the validation recall through FAISS top-K matches a dense ranking."""
from __future__ import annotations

import numpy as np

from pipeline.spatial import PositionIndex, geo_within, within_radius
from pipeline.train import recall_at


def test_pairs_and_counts_match_a_dense_check():
    rng = np.random.default_rng(0)
    db = rng.uniform(0, 200, (500, 2))
    q = rng.uniform(0, 200, (70, 2))
    q[0] = db[3] + [10.0, 0.0]           # a pair at exactly the radius counts as within
    dense = np.sqrt(((q[:, None] - db[None]) ** 2).sum(-1)) <= 10.0
    where = PositionIndex(db)
    nb = where.pairs_within(q, 10.0, block=16)
    assert len(nb) == 70 and 3 in nb[0]
    for i in range(70):
        np.testing.assert_array_equal(nb[i], np.flatnonzero(dense[i]))
    np.testing.assert_array_equal(where.count_within(q, 10.0), dense.sum(1))
    rows = rng.integers(-1, 500, (70, 9))
    expect = np.take_along_axis(dense, np.maximum(rows, 0), 1) & (rows >= 0)
    np.testing.assert_array_equal(nb.contains(np.arange(70), rows), expect)
    d, r = where.nearest(q[:5], k=2)
    assert (np.diff(d, axis=1) >= 0).all() and (r >= 0).all()
    assert len(within_radius(q[:0], db, 10.0)) == 0


def test_recall_through_faiss_topk_matches_a_dense_ranking():
    rng = np.random.default_rng(1)
    db_pos = np.stack([np.arange(300) * 5.0, np.zeros(300)], 1)
    q_pos = db_pos[rng.integers(0, 300, 60)] + rng.normal(0, 3, (60, 2))
    feat = lambda p: np.concatenate([np.sin(p[:, :1] / 30 + np.arange(16)), np.cos(p[:, :1] / 50 + np.arange(16))], 1)
    db = (feat(db_pos) + 0.4 * rng.normal(size=(300, 32))).astype(np.float32)
    q = (feat(q_pos) + 0.4 * rng.normal(size=(60, 32))).astype(np.float32)
    got = recall_at(q, db, q_pos, db_pos, 12.0, block=7)
    order = np.argsort(((q[:, None] - db[None]) ** 2).sum(-1), axis=1, kind="stable")[:, :20]
    hit = geo_within(q_pos, db_pos[order], 12.0)
    want = {f"recall@{k}": 100.0 * hit[:, :k].any(1).mean() for k in (1, 5, 10, 20)}
    assert got.keys() == want.keys()
    for k in want:
        assert abs(got[k] - want[k]) < 1e-9
    assert 0 < got["recall@1"] < got["recall@20"] <= 100
