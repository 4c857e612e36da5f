"""The reindex lock on a real S3 endpoint (moto) and on local disk: of runs that start at once exactly
one proceeds; a lock seen unchanged for its staleness period is broken by a conditional overwrite,
with a logged message, and the run it belonged to finds out before publishing. Faults, clock skew
and the fenced pointer write: tests/test_reindex_lock_faults.py."""
import json
import logging
import threading
import time

import pytest

from pipeline import cas, reindex
from pipeline.index import published
from pipeline.reindex.lock import ReindexLock
from tests.helpers_reindex import s3_fs, write_hand_store, write_source

STALE_S, BEAT_S = 3.0, 0.3  # seconds: a live holder rewrites the lock 10 times per staleness period


def _race(url: str, n: int = 4) -> list:
    barrier, out = threading.Barrier(n), []

    def take():
        lock = ReindexLock(url, stale_s=STALE_S, heartbeat_s=BEAT_S)
        barrier.wait()
        try:
            out.append(lock.acquire())
        except reindex.ReindexBusy as exc:
            out.append(exc)

    threads = [threading.Thread(target=take) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


@pytest.mark.parametrize("where", ["local", "s3"])
def test_lock_taken_by_exactly_one_and_stale_lock_broken_by_conditional_overwrite(where, tmp_path, s3_bucket, caplog):
    url = f"{s3_bucket}/index/reindex.lock" if where == "s3" else str(tmp_path / "index" / "reindex.lock")
    got = _race(url)
    held = [g for g in got if isinstance(g, ReindexLock)]
    assert len(held) == 1 and sum(isinstance(g, reindex.ReindexBusy) for g in got) == 3
    holder = held[0]

    # the holder stops heartbeating (a dead run): a new run that has watched the lock stay
    # unchanged for STALE_S of its own time breaks it
    holder._stop.set()
    holder._thread.join()
    t0 = time.monotonic()
    with caplog.at_level(logging.WARNING):
        breaker = ReindexLock(url, stale_s=STALE_S, heartbeat_s=BEAT_S).acquire()
    assert time.monotonic() >= holder._landed + STALE_S and time.monotonic() - t0 < STALE_S + 5
    assert any("breaking the stale reindex lock" in r.getMessage() for r in caplog.records)
    with pytest.raises(reindex.ReindexBusy, match="another reindex is running"):
        ReindexLock(url, stale_s=STALE_S, heartbeat_s=BEAT_S).acquire()

    # the old holder learns at its next heartbeat that it lost the lock, and would not publish
    holder.heartbeat()
    with pytest.raises(reindex.ReindexBusy, match="lost the reindex lock"):
        holder.check()
    holder.release()  # leaves the breaker's lock alone
    assert json.loads(cas.read(url)[0])["token"] == breaker.token
    breaker.heartbeat()
    breaker.check()
    breaker.release()
    assert not (s3_fs(url).exists(url) if where == "s3" else (tmp_path / "index" / "reindex.lock").exists())


def test_two_reindex_runs_at_once_on_s3_exactly_one_proceeds(ray_session, s3_bucket, gardens_point, tmp_path):
    folder = gardens_point / "day_left"
    source = write_source(tmp_path / "src.csv", folder, range(6))
    store = f"{s3_bucket}/store"
    write_hand_store(store, source, tokens=4, dim=32)
    write_source(tmp_path / "src.csv", folder, [0, 1, 3, 4, 5])  # one image deleted, and no index yet
    cfg = reindex.ReindexConfig(source=source, store=store, index=dict(held_back_queries=2, num_shards=2),
                                lock_heartbeat_s=1.0, lock_stale_s=60.0)  # the loser sees a beat land within 1 s

    barrier, loser_done = threading.Barrier(2), threading.Event()
    results: list = []

    def hold(stage, info):  # the run that got the lock waits here until the other one has given up
        if stage == "planned":
            assert loser_done.wait(120)

    def one():
        barrier.wait()
        try:
            results.append(reindex.run(cfg, on_stage=hold))
        except reindex.ReindexBusy as exc:
            results.append(exc)
            loser_done.set()

    threads = [threading.Thread(target=one) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert len(results) == 2
    busy = [r for r in results if isinstance(r, reindex.ReindexBusy)]
    done = [r for r in results if isinstance(r, reindex.ReindexResult)]
    assert len(busy) == 1 and len(done) == 1 and done[0].status == "published"
    assert "another reindex" in str(busy[0])
    state = published.resolve(store, cfg.resolved_index_dir)
    assert state.index_version == done[0].version and state.read_global_table(["image_id"]).num_rows == 5
