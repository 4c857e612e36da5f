"""A fault-injecting HTTP/1.1 reverse proxy on 127.0.0.1, put in front of the moto S3 server so
that every S3 client of a command (driver and Ray workers, through ``AWS_ENDPOINT_URL``) meets the
faults a real object store produces:

    slowdown      503 with S3's ``<Error><Code>SlowDown</Code>`` body (throttling), not forwarded
    internal      500 with ``<Code>InternalError</Code>``, not forwarded
    drop_before   the request is read, then the connection is closed unanswered, not forwarded
    drop_after    the request is forwarded and applied by the server, then the connection is
                  closed unanswered (a write whose answer is lost)

Which request gets which fault is drawn from a ``random.Random`` seeded by the proxy's seed, the
request's method and target and how many times that same request was seen before. The draws are
therefore the same from one test run to the next whatever order concurrent clients' requests
arrive in, and a client's retry of a faulted request gets a fresh draw.

Bodies are read whole before anything is decided (``Content-Length``, or ``Transfer-Encoding:
chunked`` decoded, which also carries botocore's ``aws-chunked`` payloads unchanged) and forwarded
with a ``Content-Length``; ``Expect: 100-continue`` is answered here. Connections to clients are
kept alive; each forwarded request opens its own connection to the server.
"""
from __future__ import annotations

import http.client
import random
import socket
import threading
import uuid
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

KINDS = ("slowdown", "internal", "drop_before", "drop_after")
_ERRORS = {"slowdown": (503, "Slow Down", "SlowDown", "Please reduce your request rate."),
           "internal": (500, "Internal Server Error", "InternalError",
                        "We encountered an internal error. Please try again.")}
# Hop-by-hop headers (RFC 9110 7.6.1) and those this proxy rewrites.
_HOP = {"connection", "keep-alive", "proxy-connection", "proxy-authenticate", "proxy-authorization", "te",
        "trailer", "transfer-encoding", "upgrade", "expect", "content-length"}


class FaultProxy:
    """``FaultProxy(upstream_url, rate=0.08, seed=0)``; ``start()`` returns its URL. ``rate`` is the
    fraction of requests faulted (0 forwards everything), split evenly between ``kinds``."""

    def __init__(self, upstream: str, rate: float = 0.0, seed: int = 0, kinds=KINDS):
        u = urlsplit(upstream)
        self.upstream_host, self.upstream_port = u.hostname, u.port or 80
        self.rate, self.seed, self.kinds = float(rate), seed, tuple(kinds)
        self._lock = threading.Lock()
        self._seen: Counter = Counter()
        self.counts: Counter = Counter()   # faults injected, by kind
        self.requests = 0                  # requests received (faulted or not)
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ---- control
    def start(self) -> str:
        proxy = self

        class Handler(_Handler):
            owner = proxy

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="s3-fault-proxy", daemon=True)
        self._thread.start()
        return self.url

    @property
    def url(self) -> str:
        assert self._server is not None, "proxy not started"
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def set_rate(self, rate: float) -> None:
        with self._lock:
            self.rate = float(rate)

    def snapshot(self) -> dict[str, int]:
        """Faults injected so far by kind (every kind present), and ``requests`` received."""
        with self._lock:
            return {**{k: self.counts[k] for k in KINDS}, "requests": self.requests}

    def __enter__(self) -> FaultProxy:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---- the draw
    def draw(self, method: str, target: str) -> str | None:
        """The fault for this request, or None to forward it unharmed."""
        with self._lock:
            self.requests += 1
            key = f"{method} {target}"
            n = self._seen[key]
            self._seen[key] += 1
            rate = self.rate
            if rate <= 0:
                return None
            r = random.Random(f"{self.seed}|{key}|{n}").random()
            if r >= rate:
                return None
            kind = self.kinds[min(int(r / rate * len(self.kinds)), len(self.kinds) - 1)]
            self.counts[kind] += 1
            return kind


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive; also makes the base class answer Expect: 100-continue
    owner: FaultProxy
    timeout = 120  # an idle keep-alive connection is closed after this (its thread ends)

    def log_message(self, format, *args):  # quiet: the tests print the counts instead
        pass

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            out = bytearray()
            while True:
                size = int(self.rfile.readline().split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
                        pass
                    return bytes(out)
                out += self.rfile.read(size)
                self.rfile.readline()
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def _drop(self) -> None:
        """Close the connection without a byte of answer (the client sees it closed mid-request)."""
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _error(self, kind: str) -> None:
        status, reason, code, message = _ERRORS[kind]
        rid = uuid.uuid4().hex[:16].upper()
        body = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}</Message>'
                f'<RequestId>{rid}</RequestId><HostId>fault-proxy</HostId></Error>').encode()
        head = self.command == "HEAD"
        self.wfile.write(f"HTTP/1.1 {status} {reason}\r\n".encode()
                         + b"Content-Type: application/xml\r\n"
                         + f"x-amz-request-id: {rid}\r\n".encode()
                         + f"Content-Length: {0 if head else len(body)}\r\n\r\n".encode()
                         + (b"" if head else body))
        self.wfile.flush()

    def _handle(self) -> None:
        body = self._read_body()
        kind = self.owner.draw(self.command, self.path)
        if kind in _ERRORS:
            self._error(kind)
            return
        if kind == "drop_before":
            self._drop()
            return
        headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP}
        if body or self.command in ("PUT", "POST"):
            headers["Content-Length"] = str(len(body))
        conn = http.client.HTTPConnection(self.owner.upstream_host, self.owner.upstream_port, timeout=120)
        try:
            conn.request(self.command, self.path, body=body or None, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
            status, reason, resp_headers = resp.status, resp.reason, resp.getheaders()
        except (OSError, http.client.HTTPException):
            self._drop()  # the server failed: the client sees what it would have seen
            return
        finally:
            conn.close()
        if kind == "drop_after":
            self._drop()
            return
        lines = [f"HTTP/1.1 {status} {reason}"]
        for k, v in resp_headers:
            if k.lower() not in _HOP:
                lines.append(f"{k}: {v}")
        if self.command == "HEAD":  # no body: the object's length is the answer, kept as the server gave it
            lines += [f"Content-Length: {v}" for k, v in resp_headers if k.lower() == "content-length"]
        else:
            lines.append(f"Content-Length: {len(data)}")
        if self.close_connection:
            lines.append("Connection: close")
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        self.wfile.write(head + (b"" if self.command == "HEAD" else data))
        self.wfile.flush()

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = do_PATCH = do_OPTIONS = _handle
