"""Leases: a running job says which published state it reads, so garbage collection keeps it.

A job that pinned a state (``pipeline.index.published.resolve``) holds a lease for as long as it reads
that state's files::

    with hold_lease(index_dir, f"rerank-{run_id}", state):      # <index_dir>/leases/<job>.json
        ...                                                       # heartbeated from a daemon thread

    <index_dir>/leases/rerank-3f2a.json   {"job", "host", "pid", "state": state.metadata(),
                                           "started", "heartbeat", "heartbeat_s"}

The file is rewritten every ``heartbeat_s`` seconds and deleted when the block ends. A job that
dies leaves its file behind; it stops counting once its heartbeat is older than the GC's grace
period and three heartbeat intervals (``live_leases``), so a crashed reader cannot pin data
forever, and a live one, however long it runs, is never collected under. ``job`` names the file:
give each concurrent job its own (e.g. the output's digest).

An unfinished output that a later run resumes against the state it recorded (a rerank results
plan) pins that state without a heartbeat: ``pin(index_dir, job, state)`` when the plan is written,
``unpin(index_dir, job)`` when the output is complete (or abandoned). A pin counts until it is
removed. Memory: O(leases).
"""
from __future__ import annotations

import contextlib
import os
import re
import socket
import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from .. import storage
from ..log import get_logger

if TYPE_CHECKING:
    from .published import PublishedState

log = get_logger(__name__)

_SAFE = re.compile(r"[^A-Za-z0-9._-]+")
MISSED_HEARTBEATS = 3  # a lease counts until this many heartbeats are missed (and the grace period passed)


def leases_dir(index_dir: str) -> str:
    return storage.join(index_dir, "leases")


def lease_url(index_dir: str, job: str) -> str:
    name = _SAFE.sub("-", job).strip("-.") or "job"
    return storage.join(leases_dir(index_dir), f"{name}.json")


class Lease:
    """A held lease; ``heartbeat()`` is called by the daemon thread (and may be called by hand)."""

    def __init__(self, index_dir: str, job: str, state: PublishedState | dict[str, Any], heartbeat_s: float):
        self.url = lease_url(index_dir, job)
        self.heartbeat_s = float(heartbeat_s)
        meta = state.metadata() if hasattr(state, "metadata") else dict(state)
        now = time.time()
        self.record = {"job": job, "host": socket.gethostname(), "pid": os.getpid(), "state": meta,
                       "started": now, "heartbeat": now, "heartbeat_s": self.heartbeat_s}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def heartbeat(self) -> None:
        self.record["heartbeat"] = time.time()
        storage.write_json(self.url, self.record)

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                self.heartbeat()
            except Exception as exc:  # a missed beat is not fatal; three in a row let GC ignore the lease
                log.warning("lease %s: heartbeat failed (%s)", self.url, exc)

    def start(self) -> Lease:
        self.heartbeat()
        self._thread = threading.Thread(target=self._beat, name=f"lease-{self.record['job']}", daemon=True)
        self._thread.start()
        return self

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=max(1.0, self.heartbeat_s))
        fs, path = storage.filesystem(self.url)
        try:
            fs.rm(path)
        except FileNotFoundError:
            pass
        except Exception as exc:  # left behind: it expires by its heartbeat
            log.warning("lease %s: could not remove it (%s); it expires on its own", self.url, exc)


@contextlib.contextmanager
def hold_lease(index_dir: str | None, job: str, state: PublishedState | dict[str, Any],
               heartbeat_s: float = 30.0) -> Iterator[Lease | None]:
    """Hold ``<index_dir>/leases/<job>.json`` naming ``state`` while the block runs (no-op, yielding
    ``None``, when ``index_dir`` is None: a store without an index has no GC to protect from)."""
    if not index_dir:
        yield None
        return
    lease = Lease(index_dir, job, state, heartbeat_s).start()
    try:
        yield lease
    finally:
        lease.release()


def pin(index_dir: str | None, job: str, state: PublishedState | dict[str, Any]) -> str | None:
    """Keep ``state`` from GC until ``unpin``: for unfinished outputs that will be resumed."""
    if not index_dir:
        return None
    lease = Lease(index_dir, job, state, heartbeat_s=0.0)
    lease.record["pinned"] = True
    lease.heartbeat()
    return lease.url


def unpin(index_dir: str | None, job: str) -> None:
    if not index_dir:
        return
    fs, path = storage.filesystem(lease_url(index_dir, job))
    try:
        fs.rm(path)
    except FileNotFoundError:
        pass


def read_leases(index_dir: str) -> list[dict[str, Any]]:
    """Every lease file, live or not, each with its ``url``; unreadable ones are skipped with a warning
    (a half-written file on a store without atomic writes is rewritten at the next heartbeat)."""
    fs, path = storage.filesystem(leases_dir(index_dir))
    try:
        entries = fs.ls(path, detail=False)
    except FileNotFoundError:
        return []
    out = []
    for entry in sorted(entries):
        if not entry.endswith(".json"):
            continue
        url = f"s3://{entry}" if index_dir.startswith("s3://") and not entry.startswith("s3://") else entry
        try:
            rec = storage.read_json(url)
        except FileNotFoundError:
            continue  # released while listing
        except ValueError as exc:
            log.warning("lease %s is unreadable (%s); ignored", url, exc)
            continue
        if isinstance(rec, dict) and isinstance(rec.get("state"), dict):
            out.append({**rec, "url": url})
    return out


def live_leases(index_dir: str | None, grace_s: float) -> list[dict[str, Any]]:
    """Pins, and leases whose last heartbeat is younger than ``grace_s`` or than three of their own
    heartbeat intervals: the states GC must keep."""
    if not index_dir:
        return []
    now = time.time()
    return [r for r in read_leases(index_dir)
            if r.get("pinned") or now - float(r.get("heartbeat") or 0) < max(
                float(grace_s), MISSED_HEARTBEATS * float(r.get("heartbeat_s") or 30.0))]
