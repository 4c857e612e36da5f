"""The reindex lock: one run (reindex, rollback or GC) per index at a time, on local disk and on S3.

    <index_dir>/reindex.lock    {"host", "pid", "token", "since", "heartbeat"}

Taking it is one conditional create: ``O_CREAT | O_EXCL`` on local disk, a PUT with
``If-None-Match: *`` on S3 (the store answers 412 to the second of two racing runs), so two runs
can never both hold it. The holder heartbeats from a daemon thread: on S3 a PUT with ``If-Match``
on the ETag of its own last write (a 412 means another run broke the lock: this one has lost it
and stops before publishing), locally by touching the file's mtime. A lock whose last heartbeat is
older than ``stale_s`` (or, on this host, whose process is gone) belongs to a dead run and is
broken with a logged warning: on S3 by a conditional overwrite (``If-Match`` on the ETag that was
judged stale, so of two runs breaking it at once only one wins), locally by renaming the judged
file aside (only one rename succeeds) and creating a fresh one exclusively.
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from typing import Any

from .. import storage
from ..log import get_logger

log = get_logger(__name__)


class ReindexError(RuntimeError):
    pass


class ReindexBusy(ReindexError):
    """Another reindex holds the lock of this index (or broke this run's stale lock)."""


def _is_local(fs) -> bool:
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    return "file" in protocols or "local" in protocols


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(t)) + " UTC"


class ReindexLock:
    def __init__(self, url: str, stale_s: float = 600.0, heartbeat_s: float = 30.0):
        if heartbeat_s * 2 > stale_s:
            raise ReindexError(f"lock heartbeat ({heartbeat_s} s) must be well under its staleness ({stale_s} s)")
        self.url, self.stale_s, self.heartbeat_s = url, float(stale_s), float(heartbeat_s)
        self.fs, self.path = storage.filesystem(url)
        self.local = _is_local(self.fs)
        self.token = uuid.uuid4().hex
        self.etag: str | None = None
        self.lost: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ---- the record
    def _record(self) -> bytes:
        now = time.time()
        return json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "token": self.token,
                           "since": getattr(self, "_since", now), "heartbeat": now}).encode()

    def _read(self) -> tuple[dict[str, Any], str | None, float]:
        """(record, ETag (S3) or None, last heartbeat) of the lock as it is now."""
        if self.local:
            with open(self.path, "rb") as f:
                raw = f.read()
            beat = os.stat(self.path).st_mtime
            etag = None
        else:
            self.fs.invalidate_cache(self.path)
            info = self.fs.info(self.path)
            etag = info.get("ETag")
            raw = self.fs.cat_file(self.path)
            beat = 0.0
        try:
            rec = json.loads(raw)
        except ValueError:
            rec = {}
        return rec, etag, max(beat, float(rec.get("heartbeat") or rec.get("since") or 0))

    # ---- conditional writes
    def _create(self) -> None:
        data = self._record()
        if self.local:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            return
        bucket, key, _ = self.fs.split_path(self.path)
        try:
            out = self.fs.call_s3("put_object", Bucket=bucket, Key=key, Body=data, IfNoneMatch="*")
        finally:
            self.fs.invalidate_cache(self.path)  # s3fs caches listings; the lock must be seen as it is
        self.etag = out.get("ETag")

    def _replace(self, judged: dict[str, Any], etag: str | None) -> bool:
        """Overwrite the lock only if it is still the one judged (``etag`` / its token)."""
        if self.local:
            aside = f"{self.path}.broken-{self.token}"
            try:
                os.rename(self.path, aside)  # of two breakers, one moves it; the other finds nothing
            except FileNotFoundError:
                return False
            with open(aside, "rb") as f:
                moved = json.loads(f.read() or b"{}")
            if moved.get("token") != judged.get("token"):
                try:
                    os.link(aside, self.path)  # not the one judged stale: put it back unless replaced
                except FileExistsError:
                    pass
                os.unlink(aside)
                return False
            os.unlink(aside)
            try:
                self._create()
            except FileExistsError:
                return False
            return True
        bucket, key, _ = self.fs.split_path(self.path)
        try:
            out = self.fs.call_s3("put_object", Bucket=bucket, Key=key, Body=self._record(), IfMatch=etag)
        except (FileExistsError, OSError):
            return False  # 412: someone else wrote it after we judged it
        finally:
            self.fs.invalidate_cache(self.path)
        self.etag = out.get("ETag")
        return True

    # ---- taking, keeping, checking, leaving
    def _stale(self, rec: dict[str, Any], beat: float) -> bool:
        if time.time() - beat > self.stale_s:
            return True
        if rec.get("host") == socket.gethostname() and isinstance(rec.get("pid"), int) and rec["pid"] != os.getpid():
            try:
                os.kill(rec["pid"], 0)
            except ProcessLookupError:
                return True  # its process is gone
            except PermissionError:
                return False
        return False

    def acquire(self) -> "ReindexLock":
        self._since = time.time()
        try:
            self._create()
        except FileExistsError:
            try:
                rec, etag, beat = self._read()
            except FileNotFoundError:  # released between our create and our read: try once more
                try:
                    self._create()
                except FileExistsError:
                    raise ReindexBusy(f"another reindex took {self.url} just now") from None
                return self._started()
            if not self._stale(rec, beat):
                raise ReindexBusy(f"another reindex is running on {self.url.rsplit('/', 1)[0]} (host {rec.get('host')}, "
                                  f"pid {rec.get('pid')}, since {_when(float(rec.get('since') or 0))}, last "
                                  f"heartbeat {_when(beat)}); it is taken over once its heartbeat is "
                                  f"{self.stale_s:.0f} s old") from None
            log.warning("breaking the stale reindex lock %s: host %s, pid %s, last heartbeat %s (more than %.0f s "
                        "ago or its process is gone)", self.url, rec.get("host"), rec.get("pid"), _when(beat),
                        self.stale_s)
            if not self._replace(rec, etag):
                raise ReindexBusy(f"another reindex broke the stale lock {self.url} first") from None
        return self._started()

    def _started(self) -> "ReindexLock":
        self._thread = threading.Thread(target=self._beat, name="reindex-lock", daemon=True)
        self._thread.start()
        return self

    def heartbeat(self) -> None:
        if self.lost:
            return
        if self.local:
            try:
                rec, _, _ = self._read()
            except FileNotFoundError:
                rec = {}
            if rec.get("token") != self.token:
                self.lost = f"the lock {self.url} was taken over by host {rec.get('host')} pid {rec.get('pid')}"
                return
            os.utime(self.path)
            return
        if not self._replace({"token": self.token}, self.etag):
            self.lost = f"the lock {self.url} was overwritten by another run (its ETag changed)"

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                self.heartbeat()
            except Exception as exc:  # a missed beat is retried; staleness needs many in a row
                log.warning("reindex lock %s: heartbeat failed (%s)", self.url, exc)
            if self.lost:
                log.error("reindex: %s; this run will not publish", self.lost)
                return

    def check(self) -> None:
        """Raise ``ReindexBusy`` when this run no longer holds the lock (called right before
        publishing: one heartbeat now, which on S3 is a conditional write, so ownership is proven
        at this moment, not at the last periodic beat)."""
        self.heartbeat()
        if self.lost:
            raise ReindexBusy(f"lost the reindex lock: {self.lost}; nothing was published")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self.lost:
            return
        try:
            if self.local:
                rec, _, _ = self._read()
                if rec.get("token") == self.token:
                    os.unlink(self.path)
            else:
                bucket, key, _ = self.fs.split_path(self.path)
                try:
                    self.fs.call_s3("delete_object", Bucket=bucket, Key=key, IfMatch=self.etag)
                finally:
                    self.fs.invalidate_cache(self.path)
        except (FileNotFoundError, OSError) as exc:
            log.warning("reindex lock %s: not removed (%s)", self.url, exc)

    def __enter__(self) -> "ReindexLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
