"""Mining: soft positives never become negatives, the sharded FAISS mining gives the ids of the
brute-force oracle ``partial_topk``, a rerun after a killed run gives the same file, readers
stream the output as arrays, partial mining picks the right triplets (through the k-d tree)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import storage
from pipeline.mine import (
    MineConfig,
    PartialMiner,
    iter_hardest_negatives,
    merge_ranked,
    partial_topk,
    read_hardest_negatives,
    run,
)

ROOT = Path(__file__).resolve().parents[1]


def make_store(root: str, positions: np.ndarray, descriptors: np.ndarray, shard_size: int, key: str) -> np.ndarray:
    """A finished extraction store holding only the Parquet part (what mining reads)."""
    layout = storage.StoreLayout(root)
    n = len(positions)
    ids = np.array([storage.image_id_for(f"{key}/{i}") for i in range(n)], np.int64)
    shards = []
    for s, start in enumerate(range(0, n, shard_size)):
        sl = slice(start, min(n, start + shard_size))
        m = sl.stop - sl.start
        table = pa.table({
            "image_id": ids[sl], "path": [f"{key}/{i}.jpg" for i in range(sl.start, sl.stop)],
            "utm_east": positions[sl, 0], "utm_north": positions[sl, 1],
            "heading": [None] * m, "timestamp": [None] * m, "place_id": [None] * m,
            "width": [160] * m, "height": [128] * m,
            "global_descriptor": pa.FixedSizeListArray.from_arrays(
                pa.array(descriptors[sl].reshape(-1).astype(np.float32)), descriptors.shape[1]),
            "shard": [s] * m, "row": np.arange(sl.start, sl.stop), "content_hash": ["x"] * m,
            "tag": [None] * m,
        }, schema=storage.global_schema(descriptors.shape[1]))
        storage.write_parquet(layout.global_part(s), table)
        shards.append(s)
    storage.write_json(layout.manifest, {"shards": shards, "rows": n, "global_dim": descriptors.shape[1],
                                         "layout_version": storage.LAYOUT_VERSION})
    return ids


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """A street: database every 5 m, queries near the database; descriptors correlate with position
    so that the nearest descriptors are mostly soft positives (the hard case for the filter)."""
    root = tmp_path_factory.mktemp("mine")
    rng = np.random.default_rng(0)
    n_db, n_q, dim = 300, 90, 32
    db_pos = np.stack([np.arange(n_db) * 5.0, np.zeros(n_db)], 1)
    q_pos = np.stack([rng.uniform(0, n_db * 5.0, n_q), rng.normal(0, 3, n_q)], 1)
    basis = rng.normal(size=(2, dim))
    feat = lambda p: np.concatenate([np.sin(p[:, :1] / 40 + basis[0]), np.cos(p[:, :1] / 40 + basis[1])], 1)
    db_desc = unit(feat(db_pos) + 0.3 * rng.normal(size=(n_db, 2 * dim)))
    q_desc = unit(feat(q_pos) + 0.3 * rng.normal(size=(n_q, 2 * dim)))
    db_ids = make_store(str(root / "db"), db_pos, db_desc, 70, "db")
    q_ids = make_store(str(root / "q"), q_pos, q_desc, 40, "q")
    return dict(root=root, db=str(root / "db"), q=str(root / "q"), db_pos=db_pos, q_pos=q_pos,
                db_desc=db_desc, q_desc=q_desc, db_ids=db_ids, q_ids=q_ids)


def config(stores, out: str, **kw) -> MineConfig:
    return MineConfig(queries=stores["q"], database=stores["db"], output=out, soft_positive_radius=25.0,
                      top_k=20, query_block_size=8, index_shards=3, **kw)


def assert_same_as_oracle(ids: np.ndarray, dists: np.ndarray, ref_ids: np.ndarray, ref_d: np.ndarray) -> None:
    """Same ids as the oracle; a swap is allowed only between distances within 1e-6 relative,
    and every distance is within 1e-5 of the oracle's."""
    np.testing.assert_allclose(dists, ref_d, rtol=0, atol=1e-5)
    for r in range(len(ids)):
        if np.array_equal(ids[r], ref_ids[r]):
            continue
        # Positions where the lists differ must hold near-equal distances, and the same id sets there.
        diff = np.flatnonzero(ids[r] != ref_ids[r])
        lo, hi = ref_d[r, diff].min(), ref_d[r, diff].max()
        assert hi - lo <= 1e-6 * max(abs(hi), 1e-12) + 1e-7, f"row {r}: ids swapped across distinct distances"
        assert set(ids[r][diff]) == set(ref_ids[r][diff]) or diff[-1] == len(ids[r]) - 1


def test_global_hardest_negatives_exclude_soft_positives_and_are_exact(ray_session, stores):
    out = str(stores["root"] / "out_full")
    result = run(config(stores, out))
    assert result.blocks_total == 12 and result.blocks_computed == 12 and result.queries == 90
    negatives = read_hardest_negatives(out)
    id_to_row = {int(i): r for r, i in enumerate(stores["db_ids"])}
    d_all = ((stores["q_desc"][:, None] - stores["db_desc"][None]) ** 2).sum(-1)
    geo = np.linalg.norm(stores["q_pos"][:, None] - stores["db_pos"][None], axis=-1)
    excluded_somewhere = 0
    for qi, qid in enumerate(stores["q_ids"]):
        rows = np.array([id_to_row[int(i)] for i in negatives[int(qid)]])
        assert len(rows) == 20
        assert (geo[qi, rows] > 25.0).all(), f"query {qi} got a negative within the soft-positive radius"
        excluded_somewhere += int((np.argsort(d_all[qi])[:20] != rows).any())
    assert excluded_somewhere > 45, "the fixture should make soft positives compete with negatives"
    # The oracle: plain brute force over the whole database, soft positives masked.
    t = pq.read_table(os.path.join(out, "hardest_negatives.parquet"))
    order = np.argsort(np.searchsorted(stores["q_ids"], t.column("query_image_id").to_numpy()))
    got_ids = np.array(t.column("hardest_negatives").to_pylist())
    got_d = np.array(t.column("negative_distances").to_pylist(), np.float32)
    q_of_row = np.array([np.flatnonzero(stores["q_ids"] == q)[0] for q in t.column("query_image_id").to_pylist()])
    ref_ids, ref_d = partial_topk(stores["q_desc"][q_of_row], stores["q_pos"][q_of_row], stores["db_ids"],
                                  stores["db_desc"], stores["db_pos"], 20, 25.0)
    assert_same_as_oracle(got_ids, got_d, ref_ids, ref_d)
    assert (np.diff(got_d, axis=1) >= 0).all()
    assert result.extra["index_version"] and len(order) == 90


def test_rerun_after_a_killed_run_gives_the_same_file(ray_session, stores):
    ref_out = stores["root"] / "out_ref"
    run(config(stores, str(ref_out)))
    out = stores["root"] / "out_killed"
    # A real driver process, joined to this test's Ray, SIGKILLed once its first block is done.
    address = ray_session.get_runtime_context().gcs_address
    code = ("import sys; from pipeline.mine import MineConfig, run; "
            f"run(MineConfig(queries={stores['q']!r}, database={stores['db']!r}, output={str(out)!r}, "
            "soft_positive_radius=25.0, top_k=20, query_block_size=8, index_shards=3))")
    env = dict(os.environ, RAY_ADDRESS=address, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, cwd=ROOT)
    deadline = time.time() + 90
    blocks = out / "blocks"
    while time.time() < deadline and not list(blocks.glob("*.done")) and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = len(list(blocks.glob("*.done")))
    assert 1 <= done_before < 12, f"the kill should land mid-run ({done_before} blocks done)"
    assert not (out / "hardest_negatives.parquet").exists()

    result = run(config(stores, str(out)))
    assert result.blocks_skipped == done_before and result.blocks_computed == 12 - done_before
    assert (out / "hardest_negatives.parquet").read_bytes() == (ref_out / "hardest_negatives.parquet").read_bytes()


def test_changed_settings_refuse_old_blocks(ray_session, stores):
    out = str(stores["root"] / "out_full")
    with pytest.raises(ValueError, match="top_k"):
        run(MineConfig(queries=stores["q"], database=stores["db"], output=out, top_k=5, query_block_size=8))


def test_partial_mining_best_positive_and_hardest_negatives(stores):
    miner = PartialMiner(stores["q_pos"], stores["db_pos"], positive_radius=10.0, negative_radius=25.0,
                         cache_queries=30, database_subset=100, num_negatives=2, seed=3)
    r1, r1_again = miner.sample(1), miner.sample(1)
    np.testing.assert_array_equal(r1.database, r1_again.database)  # workers agree without talking
    assert not np.array_equal(miner.sample(2).queries, r1.queries)
    trip = miner.triplets(r1, stores["q_desc"][r1.queries], stores["db_desc"][r1.database])
    assert len(trip.queries) > 20
    geo = np.linalg.norm(stores["q_pos"][:, None] - stores["db_pos"][None], axis=-1)
    for q, p, negs in zip(trip.queries, trip.positives, trip.negatives):
        assert geo[q, p] <= 10.0
        hard = np.flatnonzero(geo[q] <= 10.0)
        d = ((stores["db_desc"][hard] - stores["q_desc"][q]) ** 2).sum(-1)
        assert p == hard[np.argmin(d)]
        assert set(negs) <= set(r1.negative_pool) and (geo[q, negs] > 25.0).all()
        pool = r1.negative_pool[geo[q, r1.negative_pool] > 25.0]
        dp = ((stores["db_desc"][pool] - stores["q_desc"][q]) ** 2).sum(-1)
        np.testing.assert_array_equal(negs, pool[np.argsort(dp, kind="stable")[:2]])


def test_readers_stream_arrays(stores):
    out = str(stores["root"] / "out_full")
    negatives = read_hardest_negatives(out, top=5)
    assert negatives.negatives.shape == (90, 5) and negatives.negatives.dtype == np.int64
    batches = list(iter_hardest_negatives(out, top=20, batch_rows=16))
    assert len(batches) == 6 and sum(len(q) for q, _ in batches) == 90
    first = {int(q): n for q, n in zip(*batches[0])}
    qid = next(iter(first))
    np.testing.assert_array_equal(negatives[qid], first[qid][:5])
    assert int(stores["db_ids"][0]) not in negatives  # not a query id


def test_merge_ranked_orders_by_distance_then_id():
    ids = np.array([[5, 3, -1, 9, 2, 7]], np.int64)
    d = np.array([[0.5, 0.5, 0.0, 0.1, 0.7, 0.5]], np.float32)
    got_ids, got_d = merge_ranked(ids, d, 4)
    np.testing.assert_array_equal(got_ids, [[9, 3, 5, 7]])
    got_ids, _ = merge_ranked(ids, d, 7)
    np.testing.assert_array_equal(got_ids, [[9, 3, 5, 7, 2, -1, -1]])


def test_named_index_version_gives_the_same_negatives(ray_session, stores):
    """Mining with the index another run built (index_dir + index_version=current) reads the
    pinned version and gives the same rows."""
    ref = stores["root"] / "out_full"
    out = stores["root"] / "out_named"
    result = run(config(stores, str(out), index_dir=str(ref / "index"), index_version="current"))
    assert result.extra["index_dir"] == str(ref / "index") and not (out / "index").exists()
    a = pq.read_table(ref / "hardest_negatives.parquet")
    b = pq.read_table(out / "hardest_negatives.parquet")
    assert a.equals(b)
