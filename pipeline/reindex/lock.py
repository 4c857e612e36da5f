"""The reindex lock: one run (reindex, rollback or GC) per index at a time, on local disk and on S3.

    <index_dir>/reindex.lock    {"host", "pid", "token", "beat", "since", "heartbeat", "heartbeat_s", "stale_s"}

Every write of it is conditional (``pipeline.cas``: S3 PUT/DELETE with If-None-Match / If-Match,
locally a compare-and-rename under a folder lock), and each record carries the run's random
``token`` and a heartbeat counter ``beat``, so every write has new bytes and a new ETag.

- Taking it is one conditional create; of runs racing, the store lets exactly one through. When
  the answer to our create is lost after the store applied it, the retry fails its condition;
  the run then reads the object back, finds its own token and holds the lock (with that ETag).
- Keeping it: the holder rewrites the record every ``heartbeat_s`` (``If-Match`` on the ETag of
  its last write). Only a failed condition whose read-back shows another run's token (or no
  lock) means the lock was taken over: the run marks itself lost and will not publish.
  Throttling, 5xx, timeouts and dropped connections are retried with backoff and never drop the
  lock by themselves; a 412 caused by our own write whose answer was lost is recognised by the
  token and the ETag adopted. The lease holds as long as a heartbeat lands within ``stale_s``.
- Staleness is judged on the observer's own monotonic clock, never by comparing the holder's
  written wall-clock times with the observer's: a lock is stale only when the observer has seen
  the same version (same ETag, token and counter) for ``stale_s`` (or the holder's ``stale_s``, if
  larger) of its own time, counted from when this process first saw that version. A run that
  finds the lock taken watches it: any change proves a live holder (``ReindexBusy`` at once, so a
  second run gives up within about one heartbeat); an unchanged one is broken once ``stale_s``
  has passed, by a conditional overwrite of exactly the version judged (of two breakers only one
  wins). A holder whose clock runs minutes ahead or behind is therefore judged like any other.
  On the holder's own host, a lock whose process is gone is broken at once.
- Publishing is fenced: ``check()`` is one conditional heartbeat, so ownership is proven at that
  moment, and nobody can break the lock for ``stale_s`` of their time after it; the pointer write
  that follows is itself conditional on the ``CURRENT`` it read (``index.layout.set_current``).
- Leaving: the holder deletes the lock conditionally on the ETag of the record it reads back
  with its own token, after transient errors too; a lock another run took over is left alone.
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from typing import Any

from .. import cas
from ..log import get_logger

log = get_logger(__name__)

# The versions of each lock this process has seen and when (monotonic), so staleness keeps counting
# across acquire attempts of one process: {url: ((tag, token, beat), first seen)}.
_SEEN: dict[str, tuple[tuple, float]] = {}
_SEEN_MUTEX = threading.Lock()


class ReindexError(RuntimeError):
    pass


class ReindexBusy(ReindexError):
    """Another reindex holds the lock of this index (or broke this run's stale lock)."""


class _TakenOver(Exception):
    def __init__(self, rec: dict[str, Any] | None):
        super().__init__()
        self.rec = rec


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(t)) + " UTC"


def _parse(raw: bytes) -> dict[str, Any]:
    try:
        rec = json.loads(raw)
    except ValueError:
        return {}
    return rec if isinstance(rec, dict) else {}


class ReindexLock:
    wall_clock = staticmethod(time.time)  # only written into the record, for people reading it

    def __init__(self, url: str, stale_s: float = 600.0, heartbeat_s: float = 30.0):
        if heartbeat_s * 2 > stale_s:
            raise ReindexError(f"lock heartbeat ({heartbeat_s} s) must be well under its staleness ({stale_s} s)")
        self.url, self.stale_s, self.heartbeat_s = url, float(stale_s), float(heartbeat_s)
        self.token = uuid.uuid4().hex
        self.etag: str | None = None
        self.lost: str | None = None
        self._beats = 0
        self._since = self.wall_clock()
        self._landed = time.monotonic()  # when our last write reached the store
        self._mutex = threading.RLock()  # the beat thread and check()/release() write in turn
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ---- the record
    def _record(self) -> bytes:
        self._beats += 1
        return json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "token": self.token, "beat": self._beats,
                           "since": self._since, "heartbeat": self.wall_clock(), "heartbeat_s": self.heartbeat_s,
                           "stale_s": self.stale_s}).encode()

    def _read(self, budget_s: float) -> tuple[dict[str, Any], str]:
        """(record, tag) of the lock as it is now; ``FileNotFoundError`` when there is none."""
        raw, tag = cas.retrying(f"reading the reindex lock {self.url}", lambda: cas.read(self.url), budget_s)
        return _parse(raw), tag

    def _budget(self) -> float:
        """How long one write keeps asking through transient errors: the beat's own period."""
        return max(self.heartbeat_s, 0.5)

    # ---- taking
    def acquire(self) -> ReindexLock:
        self._since = self.wall_clock()
        for _ in range(20):  # each turn: the lock was released or replaced under us; racing that long is busy
            data = self._record()
            try:
                self.etag = cas.retrying(f"taking the reindex lock {self.url}", lambda data=data: cas.create(self.url, data),
                                         self.stale_s / 2)
                return self._started()
            except cas.PreconditionFailed:
                pass
            try:
                rec, tag = self._read(self.stale_s / 2)
            except FileNotFoundError:
                continue  # released between our create and our read
            if rec.get("token") == self.token:  # our create landed; its answer (and a retry's) did not
                self.etag = tag
                return self._started()
            verdict, rec, tag, why = self._watch(rec, tag)
            if verdict == "gone":
                continue  # it went away while we watched
            if verdict == "ours":
                self.etag = tag
                return self._started()
            log.warning("breaking the stale reindex lock %s: host %s, pid %s, since %s (%s)", self.url, rec.get("host"),
                        rec.get("pid"), _when(float(rec.get("since") or 0)), why)
            data = self._record()
            try:
                self.etag = cas.retrying(f"breaking the reindex lock {self.url}",
                                         lambda data=data, tag=tag: cas.replace(self.url, data, tag),
                                         self.stale_s / 2)
            except cas.PreconditionFailed:
                try:
                    now, now_tag = self._read(self.stale_s / 2)
                except FileNotFoundError:
                    continue
                if now.get("token") != self.token:
                    raise ReindexBusy(f"another reindex broke the stale lock {self.url} first (host "
                                      f"{now.get('host')}, pid {now.get('pid')})") from None
                self.etag = now_tag
            return self._started()
        raise ReindexBusy(f"another reindex took {self.url} just now")

    def _watch(self, rec: dict[str, Any], tag: str) -> tuple[str, dict[str, Any], str, str]:
        """Watch a lock someone else holds until it changes (``ReindexBusy``: its holder lives),
        disappears ("gone"), turns out to be ours (a create of ours applied late: "ours") or has
        stayed the same version for ``stale_s`` of this process's own monotonic time ("stale": to
        be broken). Returns (verdict, record, tag, why)."""
        stale_s = max(self.stale_s, float(rec.get("stale_s") or 0))
        holder_beat = float(rec.get("heartbeat_s") or self.heartbeat_s)
        poll = min(max(holder_beat / 4, 0.05), 5.0)
        announced = False
        while True:
            key = (tag, rec.get("token"), rec.get("beat"))
            now = time.monotonic()
            with _SEEN_MUTEX:
                seen = _SEEN.get(self.url)
                if seen is None or seen[0] != key:
                    if seen is not None and announced:
                        raise self._busy(rec)  # it changed while we watched: a live holder
                    seen = _SEEN[self.url] = (key, now)
            if self._dead_here(rec):
                return "stale", rec, tag, "its process on this host is gone"
            unchanged = now - seen[1]
            if unchanged >= stale_s:
                return "stale", rec, tag, f"unchanged for {unchanged:.0f} s as seen from this host"
            if not announced:
                log.info("reindex lock %s is held by host %s pid %s; watching it: a live holder rewrites it every "
                         "%.0f s, one unchanged for %.0f s is taken over", self.url, rec.get("host"), rec.get("pid"),
                         holder_beat, stale_s)
                announced = True
            time.sleep(min(poll, stale_s - unchanged))
            try:
                rec, tag = self._read(stale_s)
            except FileNotFoundError:
                return "gone", {}, "", ""
            if rec.get("token") == self.token:  # a delayed retry of our create landed after a release
                return "ours", rec, tag, ""

    def _busy(self, rec: dict[str, Any]) -> ReindexBusy:
        return ReindexBusy(f"another reindex is running on {self.url.rsplit('/', 1)[0]} (host {rec.get('host')}, "
                           f"pid {rec.get('pid')}, since {_when(float(rec.get('since') or 0))} by its clock; its "
                           f"heartbeat is landing); it is taken over once it stays unchanged for {self.stale_s:.0f} s")

    @staticmethod
    def _dead_here(rec: dict[str, Any]) -> bool:
        if rec.get("host") != socket.gethostname() or not isinstance(rec.get("pid"), int) or rec["pid"] == os.getpid():
            return False
        try:
            os.kill(rec["pid"], 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False

    def _started(self) -> ReindexLock:
        self._landed = time.monotonic()
        self._thread = threading.Thread(target=self._beat, name="reindex-lock", daemon=True)
        self._thread.start()
        return self

    # ---- keeping
    def heartbeat(self, budget_s: float | None = None) -> None:
        """One conditional rewrite of the record. Transient errors are retried for ``budget_s``
        (default: one heartbeat period) and then raised; the lock is lost only when the store
        shows another run's record (or none)."""
        with self._mutex:
            if self.lost:
                return
            data = self._record()
            budget = self._budget() if budget_s is None else budget_s

            def once() -> str:
                try:
                    return cas.replace(self.url, data, self.etag)
                except cas.PreconditionFailed:
                    try:
                        rec, tag = self._read(budget)
                    except FileNotFoundError:
                        raise _TakenOver(None) from None
                    if rec.get("token") != self.token:
                        raise _TakenOver(rec) from None
                    self.etag = tag  # an earlier write of ours landed without its answer
                    return cas.replace(self.url, data, tag)

            try:
                self.etag = cas.retrying(f"heartbeat of the reindex lock {self.url}", once, budget)
            except _TakenOver as t:
                self.lost = (f"the lock {self.url} was taken over by host {t.rec.get('host')} pid {t.rec.get('pid')}"
                             if t.rec else f"the lock {self.url} was removed by another run")
                return
            except cas.PreconditionFailed:  # our own record changed between read-back and rewrite
                self.lost = f"the lock {self.url} was overwritten by another run (its ETag changed)"
                return
            self._landed = time.monotonic()

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                self.heartbeat()
            except Exception as exc:  # transient: the next beat tries again; the lease lasts stale_s
                gap = time.monotonic() - self._landed
                log.warning("reindex lock %s: heartbeat failed (%s); last one landed %.0f s ago (another run may "
                            "take the lock over after %.0f s)", self.url, cas.describe(exc), gap, self.stale_s)
            if self.lost:
                log.error("reindex: %s; this run will not publish", self.lost)
                return

    def check(self) -> None:
        """Raise ``ReindexBusy`` when this run no longer holds the lock (called right before
        publishing: one heartbeat now, a conditional write, so ownership is proven at this moment,
        not at the last periodic beat). Storage errors that outlast the retries raise
        ``ReindexError``: ownership unproven, nothing may be published."""
        try:
            self.heartbeat(budget_s=max(self._budget(), min(self.stale_s / 2, 120.0)))
        except Exception as exc:
            if not cas.is_transient(exc):
                raise
            raise ReindexError(f"could not confirm the reindex lock {self.url} ({cas.describe(exc)}); nothing was "
                               f"published") from exc
        if self.lost:
            raise ReindexBusy(f"lost the reindex lock: {self.lost}; nothing was published")

    # ---- leaving
    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.heartbeat_s + 5)
        with self._mutex:
            if self.lost:
                return
            budget = min(self.stale_s / 2, 60.0)

            def once() -> None:
                for _ in range(5):
                    try:
                        rec, tag = self._read(budget)
                    except FileNotFoundError:
                        return  # gone already (our delete landed without its answer)
                    if rec.get("token") != self.token:
                        log.warning("reindex lock %s: another run (host %s, pid %s) holds it now; left alone",
                                    self.url, rec.get("host"), rec.get("pid"))
                        return
                    try:
                        cas.delete(self.url, tag)
                        return
                    except cas.PreconditionFailed:
                        continue  # rewritten between our read and our delete: look again
                log.warning("reindex lock %s: changed under every delete; not removed", self.url)

            try:
                cas.retrying(f"releasing the reindex lock {self.url}", once, budget)
            except Exception as exc:
                log.warning("reindex lock %s: not removed (%s); another run takes it over once it has seen it "
                            "unchanged for %.0f s", self.url, cas.describe(exc), self.stale_s)

    def __enter__(self) -> ReindexLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
