"""An HTTP proxy that makes a loopback registry look far away: limited bandwidth, added latency.

:class:`ShapingProxy` listens on a free port of 127.0.0.1 and forwards every request to
one plain-HTTP upstream (a ``docker-registry`` started by ``tools.local_registry``), so
that clients that name the proxy's ``host:port`` in their references (with
``--plain-http``) reach the registry through it. It shapes the link as a WAN would:

- bandwidth: ONE token bucket (:class:`TokenBucket`) shared by every connection and
  both directions caps the bytes of request and response bodies at ``rate_bps`` bits per
  second, so that parallel requests share the link instead of each getting all of it;
- latency: each request is held for ``delay`` seconds before it is forwarded (a round
  trip per request; connection set-up costs nothing extra).

It counts requests and bytes as they go (:meth:`ShapingProxy.counters`) and keeps a log of
every request (:class:`RequestRecord`: method, path, ``Range``, status, bytes), which is
how a benchmark knows what crossed the link up to a given moment.

Everything a registry client needs passes through: keep-alive connections, every
request and response header but the hop-by-hop ones (``Host`` included, so that the
registry writes upload locations that name the proxy), ``Range`` requests, HEAD, request
bodies with ``Content-Length`` or chunked, and responses with ``Content-Length``, chunked
or delimited by the end of the connection. Bodies stream in pieces of
:data:`PIECE` bytes, never buffered whole. One upstream connection per client
connection, kept alive too. Threads, one per client connection
(:class:`http.server.ThreadingHTTPServer`).
"""

from __future__ import annotations

import contextlib
import http.client
import io
import socket
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self

import attrs

PIECE = 64 << 10
# Headers that belong to one connection, not to the request (RFC 9110 7.6.1), and so are
# not forwarded; the proxy frames bodies itself.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
# How long a client connection may sit idle between requests.
IDLE_TIMEOUT = 300.0


class TokenBucket:
    """A token bucket of ``rate`` bytes per second holding at most ``burst`` bytes.

    :meth:`take` never refuses: it takes the tokens, possibly going into debt, and sleeps
    until the debt is paid back. Threads that take from the same bucket therefore share
    its rate, each waiting for its place in line. Time lost to a late wake-up is given
    back, up to ``burst`` bytes, since tokens accrue by the clock.
    """

    def __init__(
        self,
        rate: float,
        burst: int,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if rate <= 0 or burst <= 0:
            raise ValueError(f"a token bucket needs a positive rate and burst, not {rate}, {burst}")
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._sleep = sleep
        self._tokens = float(burst)
        self._stamp = clock()
        self._lock = threading.Lock()

    def take(self, n: int) -> float:
        """Take ``n`` tokens, sleeping as long as the bucket owes them; the seconds slept."""
        with self._lock:
            now = self._clock()
            self._tokens = min(float(self.burst), self._tokens + (now - self._stamp) * self.rate)
            self._stamp = now
            self._tokens -= n
            wait = -self._tokens / self.rate if self._tokens < 0 else 0.0
        if wait > 0:
            self._sleep(wait)
        return wait


@attrs.define
class RequestRecord:
    """One request through the proxy, updated while its response streams."""

    method: str
    path: str
    range: str | None  # the request's Range header
    started: float  # time.monotonic() when its headers had arrived
    status: int = 0  # 0 until the upstream answered
    bytes: int = 0  # response body bytes sent to the client so far
    request_bytes: int = 0  # request body bytes sent upstream
    finished: float | None = None


@attrs.frozen
class Counters:
    """Requests received and body bytes sent to clients, since the proxy started."""

    requests: int
    bytes: int
    request_bytes: int

    def __sub__(self, other: Counters) -> Counters:
        return Counters(
            self.requests - other.requests,
            self.bytes - other.bytes,
            self.request_bytes - other.request_bytes,
        )


class ShapingProxy:
    """A shaping HTTP proxy in front of ``upstream`` (``host:port``, plain HTTP).

    ``rate_bps`` is the link's bandwidth in bits per second (None: unlimited) and
    ``delay`` the seconds each request is held before it is forwarded. Use it as a context
    manager, or call :meth:`start` and :meth:`stop`.
    """

    kind = "shaping"  # in its thread's name

    @staticmethod
    def handler() -> type[_Handler]:
        """The request handler class its server uses."""
        return _Handler

    def __init__(
        self,
        upstream: str,
        *,
        rate_bps: float | None = 100e6,
        delay: float = 0.020,
        burst: int | None = None,
    ) -> None:
        self.upstream = upstream
        self.rate_bps = rate_bps
        self.delay = delay
        # A burst of 10 ms of the rate (at least one piece): what a link's queues hold.
        self.bucket = (
            TokenBucket(rate_bps / 8, burst or max(PIECE, int(rate_bps / 8 / 100)))
            if rate_bps
            else None
        )
        self._lock = threading.Lock()
        self._records: list[RequestRecord] = []
        self._bytes = 0
        self._request_bytes = 0
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # -- life cycle ---------------------------------------------------------------------

    def start(self) -> Self:
        """Listen on a free port of 127.0.0.1 and serve in a thread."""
        if self._server is not None:
            raise RuntimeError("the proxy is already running")
        server = _Server(("127.0.0.1", 0), self.handler())
        server.proxy = self
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, name=f"{self.kind}-proxy-{self.port}", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop listening, close every client connection and wait for their threads."""
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.close_clients()
        server.server_close()  # joins the connection threads
        if self._thread is not None:
            self._thread.join()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("the proxy is not running")
        return int(self._server.server_address[1])

    @property
    def host(self) -> str:
        """``127.0.0.1:PORT``: the registry host for image references."""
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    # -- what went through ---------------------------------------------------------------

    def counters(self) -> Counters:
        """Requests so far (counted when their headers arrive) and body bytes so far
        (counted as each piece is sent, just before it is written)."""
        with self._lock:
            return Counters(len(self._records), self._bytes, self._request_bytes)

    def records(self) -> list[RequestRecord]:
        """A copy of the log of every request so far, oldest first."""
        with self._lock:
            return [attrs.evolve(r) for r in self._records]

    def _begin(self, method: str, path: str, range_header: str | None) -> RequestRecord:
        record = RequestRecord(method, path, range_header, time.monotonic())
        with self._lock:
            self._records.append(record)
        return record

    def _sent(self, record: RequestRecord, n: int, *, upstream: bool = False) -> None:
        with self._lock:
            if upstream:
                record.request_bytes += n
                self._request_bytes += n
            else:
                record.bytes += n
                self._bytes += n

    def _update(self, record: RequestRecord, **changes: Any) -> None:
        with self._lock:
            for name, value in changes.items():
                setattr(record, name, value)

    def _shape(self, n: int) -> None:
        if self.bucket is not None:
            self.bucket.take(n)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    proxy: ShapingProxy

    def __init__(self, address: tuple[str, int], handler: type[_Handler]) -> None:
        super().__init__(address, handler)
        self._clients: set[socket.socket] = set()
        self._clients_lock = threading.Lock()

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        with self._clients_lock:
            self._clients.add(request)
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self._clients_lock:
                self._clients.discard(request)

    def close_clients(self) -> None:
        """End every client connection (idle keep-alive ones would wait for their timeout)."""
        with self._clients_lock:
            clients = list(self._clients)
        for client in clients:
            with contextlib.suppress(OSError):
                client.shutdown(socket.SHUT_RDWR)


class _ClientGone(Exception):
    """The client closed its connection while the proxy was sending."""


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = IDLE_TIMEOUT
    server: _Server
    _upstream: http.client.HTTPConnection | None = None

    def log_message(self, format: str, *args: Any) -> None:
        pass  # the proxy keeps its own log

    def finish(self) -> None:
        with contextlib.suppress(OSError):
            super().finish()
        if self._upstream is not None:
            self._upstream.close()

    def do_GET(self) -> None:
        self._forward()

    do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = do_OPTIONS = do_GET

    # -- one request -------------------------------------------------------------------

    def _forward(self) -> None:
        proxy = self.server.proxy
        record = proxy._begin(self.command, self.path, self.headers.get("Range"))
        try:
            if proxy.delay > 0:
                time.sleep(proxy.delay)
            response = self._send_upstream(proxy, record)
            proxy._update(record, status=response.status)
            self._send_response(proxy, record, response)
        except _ClientGone:
            self.close_connection = True
            self._drop_upstream()
        except (OSError, http.client.HTTPException) as e:
            self._drop_upstream()
            if record.status == 0:
                proxy._update(record, status=502)
                with contextlib.suppress(OSError):
                    self.send_error(502, f"upstream {proxy.upstream}: {e}")
            self.close_connection = True
        finally:
            proxy._update(record, finished=time.monotonic())

    def _connection(self, proxy: ShapingProxy) -> http.client.HTTPConnection:
        if self._upstream is None:
            host, _, port = proxy.upstream.rpartition(":")
            self._upstream = http.client.HTTPConnection(host, int(port), timeout=IDLE_TIMEOUT)
        return self._upstream

    def _drop_upstream(self) -> None:
        if self._upstream is not None:
            self._upstream.close()
            self._upstream = None

    def _send_upstream(
        self, proxy: ShapingProxy, record: RequestRecord
    ) -> http.client.HTTPResponse:
        """Forward the request line, headers and body; the upstream's response (headers)."""
        length = self.headers.get("Content-Length")
        chunked = "chunked" in self.headers.get("Transfer-Encoding", "").lower()
        has_body = chunked or (length is not None and int(length) > 0)
        for attempt in (1, 2):
            reused = self._upstream is not None and self._upstream.sock is not None
            conn = self._connection(proxy)
            try:
                conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
                for name, value in self.headers.items():
                    if name.lower() not in HOP_BY_HOP:
                        conn.putheader(name, value)
                if chunked:
                    conn.putheader("Transfer-Encoding", "chunked")
                conn.endheaders()
                if chunked:
                    self._copy_chunked_request(proxy, record, conn)
                elif has_body:
                    assert length is not None
                    self._copy_request(proxy, record, conn, int(length))
                return conn.getresponse()
            except (ConnectionError, http.client.RemoteDisconnected):
                # An idle kept-alive upstream connection the registry closed: try a new one,
                # unless part of a body the client sent is gone with it.
                self._drop_upstream()
                if attempt == 2 or not reused or has_body:
                    raise
        raise AssertionError("unreachable")

    def _copy_request(
        self,
        proxy: ShapingProxy,
        record: RequestRecord,
        conn: http.client.HTTPConnection,
        length: int,
    ) -> None:
        left = length
        while left > 0:
            piece = self.rfile.read(min(PIECE, left))
            if not piece:
                raise _ClientGone()
            proxy._shape(len(piece))
            proxy._sent(record, len(piece), upstream=True)
            conn.send(piece)
            left -= len(piece)

    def _copy_chunked_request(
        self, proxy: ShapingProxy, record: RequestRecord, conn: http.client.HTTPConnection
    ) -> None:
        for piece in _read_chunked(self.rfile):
            proxy._shape(len(piece))
            proxy._sent(record, len(piece), upstream=True)
            conn.send(b"%X\r\n%b\r\n" % (len(piece), piece))
        conn.send(b"0\r\n\r\n")

    def _send_response(
        self, proxy: ShapingProxy, record: RequestRecord, response: http.client.HTTPResponse
    ) -> None:
        """The upstream's status and headers, then its body as it comes, re-framed."""
        bodiless = self.command == "HEAD" or response.status in (204, 304) or response.status < 200
        length = response.getheader("Content-Length")
        chunked = bool(response.chunked)
        self.send_response_only(response.status, response.reason)
        for name, value in response.getheaders():
            if name.lower() not in HOP_BY_HOP:
                self.send_header(name, value)
        if not bodiless:
            if chunked:
                self.send_header("Transfer-Encoding", "chunked")
            elif length is None:
                self.send_header("Connection", "close")  # the body ends with the connection
                self.close_connection = True
        try:
            self.end_headers()
            if not bodiless:
                while piece := response.read1(PIECE):
                    proxy._shape(len(piece))
                    # Counted before it is written: a client that has a byte finds it counted.
                    proxy._sent(record, len(piece))
                    self.wfile.write(b"%X\r\n%b\r\n" % (len(piece), piece) if chunked else piece)
                if chunked:
                    self.wfile.write(b"0\r\n\r\n")
            # Marks the response done (read1 does not when a Content-Length body ends), so
            # that the upstream connection takes the next request.
            response.read()
        except (BrokenPipeError, ConnectionResetError) as e:
            raise _ClientGone() from e


def _read_chunked(stream: io.BufferedIOBase) -> Iterator[bytes]:
    """The data of a chunked body read from ``stream``, piece by piece (trailers dropped)."""
    while True:
        size_line = stream.readline(1 << 16)
        if not size_line:
            raise _ClientGone()
        size = int(size_line.split(b";", 1)[0].strip(), 16)
        if size == 0:
            while stream.readline(1 << 16) not in (b"\r\n", b"\n", b""):
                pass  # trailers
            return
        left = size
        while left > 0:
            piece = stream.read(min(PIECE, left))
            if not piece:
                raise _ClientGone()
            yield piece
            left -= len(piece)
        stream.readline(1 << 16)  # the CRLF after the chunk
