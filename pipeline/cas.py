"""Conditional writes of small objects (compare-and-swap), on S3 and on local disk: the one place
that knows how.

    read(url)               -> (bytes, tag)   tag: the S3 ETag; locally a hash of the content
    create(url, data)       -> tag            only if absent       (S3: PUT If-None-Match: *)
    replace(url, data, tag) -> tag            only if still ``tag`` (S3: PUT If-Match: <ETag>)
    delete(url, tag)                          only if still ``tag`` (S3: DELETE If-Match: <ETag>)

A condition that does not hold raises ``PreconditionFailed`` (S3's 412; for ``replace`` also an
object that is gone). Nothing else means that: throttling (503 SlowDown), 5xx, timeouts and
dropped connections, which s3fs maps to ``OSError`` or lets through as botocore errors once
botocore's own retries are spent, are *transient* (``is_transient``) and raised as they are;
``retrying`` retries them with backoff within a time budget the caller chooses.

A lost answer: a write the server applied whose answer never arrived is retried (by botocore, or
by ``retrying``) and then fails its own condition. ``create`` and ``replace`` therefore read the
object back on a failed condition and, when it holds exactly the bytes they wrote, return its tag:
the write was theirs. Callers whose payload changes between attempts (the reindex lock's
heartbeat counter) recognise their own object by a token in it instead.

Local disk has no conditional rename, so every conditional operation there runs under an
exclusive ``flock`` of the object's folder (on one host, or NFSv4 locks): compare the content read,
then write a temp file and rename it over (or link it, for ``create``). Readers take no lock: a
rename is atomic, so they see the old content or the new one.
"""
from __future__ import annotations

import errno
import hashlib
import os
import time
import uuid
from collections.abc import Callable
from contextlib import contextmanager
from typing import Any, TypeVar

from . import storage
from .log import get_logger

log = get_logger(__name__)
T = TypeVar("T")

# S3 error codes that are the server asking to be asked again later (not a verdict on the request).
_TRANSIENT_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "RequestTimeoutException",
                    "InternalError", "ServiceUnavailable", "ConditionalRequestConflict", "OperationAborted"}


class PreconditionFailed(RuntimeError):
    """The object is not in the state the conditional operation required (S3 412)."""


def _is_local(fs) -> bool:
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    return "file" in protocols or "local" in protocols


def _chain(exc: BaseException):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _response(exc: BaseException) -> tuple[str | None, int | None]:
    """(S3 error code, HTTP status) of the botocore error behind ``exc`` (s3fs keeps it as the cause)."""
    for e in _chain(exc):
        resp = getattr(e, "response", None)
        if isinstance(resp, dict) and ("Error" in resp or "ResponseMetadata" in resp):
            return resp.get("Error", {}).get("Code"), resp.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return None, None


def is_precondition_failed(exc: BaseException) -> bool:
    if isinstance(exc, PreconditionFailed):
        return True
    code, status = _response(exc)
    return code == "PreconditionFailed" or status == 412


def is_transient(exc: BaseException) -> bool:
    """Worth asking again: throttling, 5xx, timeouts, dropped connections. Not: a failed
    condition, a missing object, a refused permission, a malformed request."""
    if is_precondition_failed(exc) or isinstance(exc, (FileNotFoundError, FileExistsError, PermissionError,
                                                       IsADirectoryError, NotADirectoryError)):
        return False
    code, status = _response(exc)
    if code is not None or status is not None:
        return code in _TRANSIENT_CODES or (status is not None and status >= 500)
    if isinstance(exc, (TimeoutError, ConnectionError)):
        return True
    if isinstance(exc, OSError):
        return exc.errno not in (errno.EINVAL, errno.EACCES, errno.EPERM, errno.ENOSPC, errno.EROFS)
    try:
        from botocore.exceptions import BotoCoreError
        if isinstance(exc, BotoCoreError):
            return True
    except ImportError:  # pragma: no cover - botocore ships with s3fs
        pass
    try:
        import aiohttp
        if isinstance(exc, aiohttp.ClientError):
            return True
    except ImportError:  # pragma: no cover
        pass
    return False


def describe(exc: BaseException) -> str:
    code, status = _response(exc)
    text = str(exc).strip() or type(exc).__name__
    return f"{text} ({code}, HTTP {status})" if code or status else text


def retrying(what: str, fn: Callable[[], T], budget_s: float, first_wait_s: float = 0.1,
             max_wait_s: float = 5.0) -> T:
    """``fn()``, asked again after transient errors (doubling waits) until ``budget_s`` has passed;
    the last transient error is raised then. Any other error is raised at once."""
    deadline = time.monotonic() + budget_s
    wait = first_wait_s
    while True:
        try:
            return fn()
        except Exception as exc:
            if not is_transient(exc) or time.monotonic() + wait > deadline:
                raise
            log.warning("%s: transient storage error (%s); asking again in %.2f s", what, describe(exc), wait)
            time.sleep(wait)
            wait = min(wait * 2, max_wait_s)


def content_tag(data: bytes) -> str:
    return "b2-" + hashlib.blake2b(data, digest_size=16).hexdigest()


# ---------------------------------------------------------------- S3
def _s3(fs, method: str, **kwargs) -> Any:
    """One S3 request through the filesystem's own client (its endpoint, retries, credentials).
    Called at run time through ``fs._call_s3``, so it is the single edge every request crosses."""
    from fsspec.asyn import sync

    return sync(fs.loop, fs._call_s3, method, **kwargs)


def _s3_get(fs, bucket: str, key: str) -> tuple[bytes, str]:
    """Body and ETag from ONE GET (a HEAD then a GET could pair one version's tag with another's bytes)."""
    from fsspec.asyn import sync

    async def get():
        resp = await fs._call_s3("get_object", Bucket=bucket, Key=key)
        body = resp["Body"]
        try:
            data = await body.read()
        finally:
            body.close()
        return data, resp["ETag"]

    return sync(fs.loop, get)


def _s3_write(fs, path: str, method: str, **kwargs) -> dict[str, Any]:
    bucket, key, _ = fs.split_path(path)
    try:
        return _s3(fs, method, Bucket=bucket, Key=key, **kwargs)
    except Exception as exc:
        if is_precondition_failed(exc):
            raise PreconditionFailed(f"s3://{bucket}/{key} is not in the state this {method} required") from exc
        raise
    finally:
        fs.invalidate_cache(path)  # s3fs caches listings; exists()/ls() must see the object as it is now


# ---------------------------------------------------------------- local disk
@contextmanager
def _dir_locked(path: str):
    import fcntl

    folder = os.path.dirname(path) or "."
    os.makedirs(folder, exist_ok=True)
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing drops the flock


def _local_read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _local_temp(path: str, data: bytes) -> str:
    tmp = os.path.join(os.path.dirname(path) or ".", f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return tmp


# ---------------------------------------------------------------- the operations
def read(url: str) -> tuple[bytes, str]:
    """(content, tag) of the object as it is now; ``FileNotFoundError`` when absent."""
    fs, path = storage.filesystem(url)
    if _is_local(fs):
        data = _local_read(path)
        return data, content_tag(data)
    bucket, key, _ = fs.split_path(path)
    return _s3_get(fs, bucket, key)


def _ours_after_all(url: str, data: bytes, exc: PreconditionFailed) -> str:
    """After a failed condition: the tag of the object if it holds exactly ``data`` (our write
    landed and its answer was lost), else ``exc`` again."""
    try:
        now, tag = read(url)
    except FileNotFoundError:
        raise exc from None
    if now == data:
        return tag
    raise exc


def create(url: str, data: bytes) -> str:
    """Write ``data`` only if nothing is at ``url``; returns the new tag."""
    fs, path = storage.filesystem(url)
    if _is_local(fs):
        with _dir_locked(path):
            if os.path.lexists(path):
                raise PreconditionFailed(f"{url} exists")
            tmp = _local_temp(path, data)
            try:
                os.link(tmp, path)
            finally:
                os.unlink(tmp)
        return content_tag(data)
    try:
        return _s3_write(fs, path, "put_object", Body=data, IfNoneMatch="*")["ETag"]
    except PreconditionFailed as exc:
        return _ours_after_all(url, data, exc)


def _local_still(path: str, url: str, tag: str) -> bool:
    """Under the folder lock: whether local ``path`` exists (False: gone) and is still version
    ``tag`` (otherwise PreconditionFailed)."""
    try:
        now = _local_read(path)
    except FileNotFoundError:
        return False
    if content_tag(now) != tag:
        raise PreconditionFailed(f"{url} changed")
    return True


def replace(url: str, data: bytes, tag: str) -> str:
    """Overwrite ``url`` with ``data`` only if it still is version ``tag``; returns the new tag."""
    fs, path = storage.filesystem(url)
    if _is_local(fs):
        with _dir_locked(path):
            if not _local_still(path, url, tag):
                raise PreconditionFailed(f"{url} is gone")
            os.replace(_local_temp(path, data), path)
        return content_tag(data)
    try:
        return _s3_write(fs, path, "put_object", Body=data, IfMatch=tag)["ETag"]
    except FileNotFoundError:  # S3 answers 404 to If-Match on a missing key
        exc = PreconditionFailed(f"{url} is gone")
        return _ours_after_all(url, data, exc)
    except PreconditionFailed as exc:
        return _ours_after_all(url, data, exc)


def delete(url: str, tag: str) -> None:
    """Remove ``url`` only if it still is version ``tag`` (already gone: nothing to do)."""
    fs, path = storage.filesystem(url)
    if _is_local(fs):
        with _dir_locked(path):
            if _local_still(path, url, tag):
                os.unlink(path)
        return
    try:
        _s3_write(fs, path, "delete_object", IfMatch=tag)
    except FileNotFoundError:
        return
