"""The reindex lock and the CURRENT pointer under storage faults, clock skew and races, on moto's real
S3 server (and local disk where it applies).

Faults are injected at the network edge only: the S3 filesystem's one request function
(``fs._call_s3``, through which ``pipeline.cas`` sends every request) is wrapped for a few calls to
raise what s3fs raises once botocore's retries are spent (a 503 SlowDown as ``OSError``, a dropped
connection as botocore's ``ConnectionClosedError``), or to let the server apply a write and lose
its answer. The lock's own logic runs unchanged against real objects."""
import json
import logging
import threading
import time

import pytest
from botocore.exceptions import ClientError, ConnectionClosedError
from s3fs.errors import translate_boto_error

from pipeline import cas, reindex, storage
from pipeline.index import layout as L
from pipeline.reindex.lock import ReindexLock
from pipeline.reindex.publish import publish_pointer

STALE_S, BEAT_S = 2.0, 0.2


class EdgeFaults:
    """Wraps ``fs._call_s3`` for the calls a rule matches (method, key suffix, a condition header)."""

    def __init__(self, fs, monkeypatch):
        self.real = fs._call_s3
        self.rules: list[dict] = []
        monkeypatch.setattr(fs, "_call_s3", self.call)

    def add(self, kind: str, times: int, method: str, key: str, header: str | None = None) -> dict:
        rule = dict(kind=kind, left=times, hits=0, method=method, key=key, header=header)
        self.rules.append(rule)
        return rule

    def _match(self, method: str, kwargs: dict) -> dict | None:
        for r in self.rules:
            if r["left"] > 0 and r["method"] == method and str(kwargs.get("Key", "")).endswith(r["key"]) \
                    and (r["header"] is None or r["header"] in kwargs):
                r["left"] -= 1
                r["hits"] += 1
                return r
        return None

    async def call(self, method, *args, **kwargs):
        rule = self._match(method, kwargs)
        if rule is None:
            return await self.real(method, *args, **kwargs)
        if rule["kind"] == "slowdown":  # what s3fs raises for a 503 once the retries are spent
            raise translate_boto_error(ClientError(
                {"Error": {"Code": "SlowDown", "Message": "Please reduce your request rate."},
                 "ResponseMetadata": {"HTTPStatusCode": 503}}, method))
        await self.real(method, *args, **kwargs)  # the server applies it; the answer never arrives
        if rule["kind"] == "lost_then_retried":  # botocore sends the same request again
            return await self.real(method, *args, **kwargs)
        raise ConnectionClosedError(endpoint_url=f"s3 {method} {kwargs.get('Key')}")  # "lost": retries spent


def _index_with_versions(index_dir: str, versions: list[str]) -> None:
    for v in versions:  # a version is finished once its infos.json exists
        storage.write_json(L.IndexLayout(index_dir).infos(v), {"shards": [], "num_vectors": 0})


def _root(where: str, s3_bucket: str, tmp_path) -> str:
    return s3_bucket if where == "s3" else str(tmp_path)


def test_heartbeat_hitting_503s_keeps_the_lock_then_publishes_and_releases(s3_bucket, monkeypatch, caplog):
    index_dir, store = f"{s3_bucket}/index", f"{s3_bucket}/store"
    url = f"{index_dir}/reindex.lock"
    _index_with_versions(index_dir, ["v0001", "v0002"])
    L.set_current(index_dir, "v0001", store_generation=0, store=store)
    holder = ReindexLock(url, stale_s=STALE_S, heartbeat_s=BEAT_S).acquire()
    faults = EdgeFaults(storage.filesystem(url)[0], monkeypatch)
    # 6 heartbeat writes in a row fail: two whole beats (each asks 3 times in its period), well under STALE_S
    beats = faults.add("slowdown", 6, "put_object", "reindex.lock", header="IfMatch")
    with caplog.at_level(logging.WARNING):
        # another run watching meanwhile sees the heartbeat land again and leaves the lock alone
        with pytest.raises(reindex.ReindexBusy, match="another reindex is running"):
            ReindexLock(url, stale_s=STALE_S, heartbeat_s=BEAT_S).acquire()
        deadline = time.monotonic() + 10
        while beats["left"] and time.monotonic() < deadline:
            time.sleep(0.05)
    assert beats["hits"] == 6 and holder.lost is None
    assert sum("heartbeat failed" in r.getMessage() for r in caplog.records) >= 1
    assert json.loads(cas.read(url)[0])["token"] == holder.token

    pointer = publish_pointer(store, index_dir, "v0002", {"generation": 1}, lock=holder, expected_version="v0001")
    assert L.read_pointer(index_dir)["version"] == "v0002" == pointer["version"]
    gone = faults.add("slowdown", 2, "delete_object", "reindex.lock")
    holder.release()
    assert gone["hits"] == 2 and not storage.exists(url)


@pytest.mark.parametrize("kind", ["lost_then_retried", "lost"])
def test_lost_answer_to_the_conditional_create_is_recognised_as_our_lock(kind, s3_bucket, monkeypatch):
    url = f"{s3_bucket}/index/reindex.lock"
    faults = EdgeFaults(storage.filesystem(url)[0], monkeypatch)
    create = faults.add(kind, 1, "put_object", "reindex.lock", header="IfNoneMatch")
    lock = ReindexLock(url, stale_s=STALE_S, heartbeat_s=BEAT_S).acquire()  # no ReindexBusy
    assert create["hits"] == 1
    record, etag = cas.read(url)
    assert json.loads(record)["token"] == lock.token and lock.etag == etag
    with pytest.raises(reindex.ReindexBusy):
        ReindexLock(url, stale_s=STALE_S, heartbeat_s=BEAT_S).acquire()
    lock.check()
    lock.release()
    assert not storage.exists(url)


@pytest.mark.parametrize("where,skew_s", [("s3", 600.0), ("s3", -600.0), ("local", -600.0)])
def test_holder_clock_off_by_ten_minutes_live_lock_kept_dead_lock_broken_on_observer_time(where, skew_s, s3_bucket,
                                                                                           tmp_path):
    url = f"{_root(where, s3_bucket, tmp_path)}/index/reindex.lock"
    holder = ReindexLock(url, stale_s=STALE_S, heartbeat_s=BEAT_S)
    holder.wall_clock = lambda: time.time() + skew_s  # the holder's machine's clock
    holder.acquire()
    assert abs(json.loads(cas.read(url)[0])["heartbeat"] - (time.time() + skew_s)) < 5
    time.sleep(STALE_S)  # longer than staleness: only the heartbeats landing keep it
    with pytest.raises(reindex.ReindexBusy, match="another reindex is running"):
        ReindexLock(url, stale_s=STALE_S, heartbeat_s=BEAT_S).acquire()
    assert holder.lost is None

    holder._stop.set()  # the holder dies
    holder._thread.join()
    t0 = time.monotonic()
    breaker = ReindexLock(url, stale_s=STALE_S, heartbeat_s=BEAT_S).acquire()
    broken_at = time.monotonic()
    assert broken_at >= holder._landed + STALE_S  # unchanged for STALE_S of this process's own clock
    assert broken_at - t0 < STALE_S + 3  # not minutes: the holder's wall-clock times play no part
    assert json.loads(cas.read(url)[0])["token"] == breaker.token
    with pytest.raises(reindex.ReindexBusy, match="lost the reindex lock"):
        holder.check()
    breaker.release()


@pytest.mark.parametrize("where", ["s3", "local"])
def test_pointer_write_after_the_lock_was_taken_over_publishes_nothing(where, s3_bucket, tmp_path):
    root = _root(where, s3_bucket, tmp_path)
    index_dir, store = f"{root}/index", f"{root}/store"
    url = f"{index_dir}/reindex.lock"
    _index_with_versions(index_dir, ["v0001", "v0002", "v0003"])
    L.set_current(index_dir, "v0001", store_generation=0, store=store)
    before = cas.read(L.IndexLayout(index_dir).current)

    stalled = ReindexLock(url, stale_s=STALE_S, heartbeat_s=BEAT_S).acquire()
    stalled._stop.set()  # a run stalled (GC pause, partitioned) long enough to be judged dead
    stalled._thread.join()
    other = ReindexLock(url, stale_s=STALE_S, heartbeat_s=BEAT_S).acquire()
    with pytest.raises(reindex.ReindexBusy, match="lost the reindex lock.*nothing was published"):
        publish_pointer(store, index_dir, "v0002", {"generation": 1}, lock=stalled, expected_version="v0001")
    assert cas.read(L.IndexLayout(index_dir).current) == before
    assert not storage.exists(storage.StoreLayout(store).manifest)

    # the run holding the lock publishes; a run whose base moved meanwhile is refused by the pointer
    publish_pointer(store, index_dir, "v0003", {"generation": 2}, lock=other, expected_version="v0001")
    moved = cas.read(L.IndexLayout(index_dir).current)
    with pytest.raises(reindex.ReindexError, match="names v0003, but this publication was based on v0001"):
        publish_pointer(store, index_dir, "v0002", {"generation": 1}, lock=other, expected_version="v0001")
    assert cas.read(L.IndexLayout(index_dir).current) == moved
    other.release()


@pytest.mark.parametrize("where", ["s3", "local"])
def test_two_writers_of_current_racing_from_the_same_read_only_one_wins(where, s3_bucket, tmp_path):
    index_dir = f"{_root(where, s3_bucket, tmp_path)}/index"
    _index_with_versions(index_dir, ["v0001", "v0002", "v0003"])
    L.set_current(index_dir, "v0001")
    barrier, out = threading.Barrier(2), {}

    def write(version: str) -> None:  # both have read CURRENT when the barrier lets them write
        try:
            out[version] = L.set_current(index_dir, version, fence=lambda: barrier.wait(30))
        except L.PointerChanged as exc:
            out[version] = exc

    threads = [threading.Thread(target=write, args=(v,)) for v in ("v0002", "v0003")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    won = [v for v, r in out.items() if isinstance(r, dict)]
    lost = [r for r in out.values() if isinstance(r, L.PointerChanged)]
    assert len(won) == 1 and len(lost) == 1, out
    assert "changed after it was read" in str(lost[0]) and "was not published" in str(lost[0])
    pointer = L.read_pointer(index_dir)
    assert pointer["version"] == won[0] and [h["version"] for h in pointer["history"]] == ["v0001"]


def test_pointer_write_whose_answer_was_lost_is_not_reported_as_a_conflict(s3_bucket, monkeypatch):
    index_dir = f"{s3_bucket}/index"
    _index_with_versions(index_dir, ["v0001", "v0002"])
    L.set_current(index_dir, "v0001")
    faults = EdgeFaults(storage.filesystem(index_dir)[0], monkeypatch)
    lost = faults.add("lost_then_retried", 1, "put_object", "CURRENT", header="IfMatch")
    L.set_current(index_dir, "v0002")
    assert lost["hits"] == 1 and L.read_pointer(index_dir)["version"] == "v0002"
