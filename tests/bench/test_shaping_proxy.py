"""tools/shaping_proxy.py: what passes through the proxy arrives intact and is counted.

No assertion here is about time (the link's speed is the benchmark's self-check, run by
``python -m tools.bench wan``): the tests send small bodies at a low rate and check
bytes, headers, request counts and that bodies stream rather than wait to be buffered.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from blockfs.oci import Reference
from blockfs.registry import RegistryClient
from tools.local_registry import free_port, registry_available, start_registry
from tools.shaping_proxy import Counters, ShapingProxy, TokenBucket

BLOB = os.urandom(300_000)
RATE = 8_000_000  # 1 MB/s: a low rate, so that shaping is at work in every test
HALF = len(BLOB) // 2


class Upstream(ThreadingHTTPServer):
    """An HTTP/1.1 server that answers in every framing a registry may use."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), UpstreamHandler)
        self.seen: list[dict[str, Any]] = []  # per request: method, path, headers, peer port
        self.first_half_read = threading.Event()

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.server_address[1]}"


class UpstreamHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: Upstream

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _note(self) -> None:
        self.server.seen.append(
            {
                "method": self.command,
                "path": self.path,
                "headers": dict(self.headers.items()),
                "port": self.client_address[1],
            }
        )

    def do_HEAD(self) -> None:
        self._note()
        self.send_response(200)
        self.send_header("Content-Length", str(len(BLOB)))
        self.end_headers()

    def do_GET(self) -> None:
        self._note()
        if self.path == "/blob":
            self._blob()
        elif self.path == "/chunked":
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for start in range(0, len(BLOB), 7_000):
                piece = BLOB[start : start + 7_000]
                self.wfile.write(b"%x\r\n%b\r\n" % (len(piece), piece))
            self.wfile.write(b"0\r\n\r\n")
        elif self.path == "/until-close":
            self.send_response(200)
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(BLOB)
            self.close_connection = True
        elif self.path == "/stream":
            # The second half only goes once the client has the first: a proxy that
            # buffered the body before sending it would never deliver either.
            self.send_response(200)
            self.send_header("Content-Length", str(len(BLOB)))
            self.end_headers()
            self.wfile.write(BLOB[:HALF])
            self.server.first_half_read.wait(60)
            self.wfile.write(BLOB[HALF:])
        else:
            self.send_error(404)

    def _blob(self) -> None:
        range_header = self.headers.get("Range")
        if range_header is None:
            self.send_response(200)
            body = BLOB
        else:
            first, last = (int(x) for x in range_header.removeprefix("bytes=").split("-"))
            body = BLOB[first : last + 1]
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {first}-{last}/{len(BLOB)}")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Upstream", "yes")
        self.end_headers()
        self.wfile.write(body)

    def do_PUT(self) -> None:
        self._note()
        if "chunked" in self.headers.get("Transfer-Encoding", ""):
            data = b""
            while size := int(self.rfile.readline().strip(), 16):
                data += self.rfile.read(size)
                self.rfile.readline()
            self.rfile.readline()
        else:
            data = self.rfile.read(int(self.headers["Content-Length"]))
        body = json.dumps({"length": len(data), "sha256": hashlib.sha256(data).hexdigest()})
        self.send_response(201)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body.encode())


@pytest.fixture
def upstream() -> Iterator[Upstream]:
    server = Upstream()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def proxy(upstream: Upstream) -> Iterator[ShapingProxy]:
    with ShapingProxy(upstream.host, rate_bps=RATE, delay=0.001) as proxy:
        yield proxy


def get(conn: http.client.HTTPConnection, path: str, **headers: str) -> tuple[int, bytes, Any]:
    conn.request("GET", path, headers=headers)
    response = conn.getresponse()
    return response.status, response.read(), response


def test_get_head_and_range_pass_through_one_keep_alive_connection_and_are_counted(
    upstream: Upstream, proxy: ShapingProxy
) -> None:
    conn = http.client.HTTPConnection(proxy.host, timeout=60)
    status, body, response = get(conn, "/blob", **{"X-Custom": "kept"})
    assert (status, body) == (200, BLOB)
    assert response.getheader("X-Upstream") == "yes"
    sock = conn.sock
    conn.request("HEAD", "/blob")
    head = conn.getresponse()
    assert (head.status, head.getheader("Content-Length"), head.read()) == (
        200,
        str(len(BLOB)),
        b"",
    )
    status, body, response = get(conn, "/blob", Range="bytes=1000-1999")
    assert (status, body) == (206, BLOB[1000:2000])
    assert response.getheader("Content-Range") == f"bytes 1000-1999/{len(BLOB)}"
    assert conn.sock is sock  # the proxy kept the client's connection open throughout
    conn.close()

    # Headers reach the registry as the client sent them (Host too), Range included, and
    # the upstream connection is kept alive as well.
    assert [s["method"] for s in upstream.seen] == ["GET", "HEAD", "GET"]
    assert upstream.seen[0]["headers"]["X-Custom"] == "kept"
    assert upstream.seen[0]["headers"]["Host"] == proxy.host
    assert upstream.seen[2]["headers"]["Range"] == "bytes=1000-1999"
    assert len({s["port"] for s in upstream.seen}) == 1
    assert proxy.counters() == Counters(requests=3, bytes=len(BLOB) + 1000, request_bytes=0)
    records = proxy.records()
    assert [(r.method, r.path, r.range, r.status, r.bytes) for r in records] == [
        ("GET", "/blob", None, 200, len(BLOB)),
        ("HEAD", "/blob", None, 200, 0),
        ("GET", "/blob", "bytes=1000-1999", 206, 1000),
    ]


def test_chunked_and_close_delimited_responses_arrive_intact(proxy: ShapingProxy) -> None:
    conn = http.client.HTTPConnection(proxy.host, timeout=60)
    status, body, response = get(conn, "/chunked")
    assert (status, body) == (200, BLOB)
    assert response.getheader("Transfer-Encoding") == "chunked"
    status, body, response = get(conn, "/until-close")
    assert (status, body) == (200, BLOB)
    assert response.will_close
    status, body, _ = get(conn, "/blob")  # http.client connects again
    assert (status, body) == (200, BLOB)
    assert proxy.counters() == Counters(requests=3, bytes=3 * len(BLOB), request_bytes=0)


def test_request_bodies_with_length_or_chunked_reach_the_upstream_intact(
    proxy: ShapingProxy,
) -> None:
    conn = http.client.HTTPConnection(proxy.host, timeout=60)
    expected = {"length": len(BLOB), "sha256": hashlib.sha256(BLOB).hexdigest()}
    conn.request("PUT", "/upload", body=BLOB)
    response = conn.getresponse()
    assert (response.status, json.loads(response.read())) == (201, expected)
    pieces = (BLOB[i : i + 50_000] for i in range(0, len(BLOB), 50_000))
    conn.request("PUT", "/upload", body=pieces, encode_chunked=True)
    response = conn.getresponse()
    assert (response.status, json.loads(response.read())) == (201, expected)
    counted = proxy.counters()
    assert (counted.requests, counted.request_bytes) == (2, 2 * len(BLOB))
    assert [r.request_bytes for r in proxy.records()] == [len(BLOB), len(BLOB)]


def test_a_body_streams_to_the_client_before_the_upstream_has_sent_all_of_it(
    upstream: Upstream, proxy: ShapingProxy
) -> None:
    conn = http.client.HTTPConnection(proxy.host, timeout=60)
    conn.request("GET", "/stream")
    response = conn.getresponse()
    first = response.read(HALF)  # blocks for ever (until the timeout) if the proxy buffers
    upstream.first_half_read.set()
    assert first + response.read() == BLOB
    assert proxy.counters().bytes == len(BLOB)


def test_an_unreachable_upstream_is_a_502_and_logged() -> None:
    with ShapingProxy(f"127.0.0.1:{free_port()}", rate_bps=RATE, delay=0) as proxy:
        conn = http.client.HTTPConnection(proxy.host, timeout=60)
        status, _, _ = get(conn, "/v2/")
        assert status == 502
        assert [(r.path, r.status) for r in proxy.records()] == [("/v2/", 502)]


def test_token_bucket_owes_what_is_taken_beyond_its_burst() -> None:
    now = [0.0]

    def sleep(seconds: float) -> None:
        now[0] += seconds

    bucket = TokenBucket(1000, 100, clock=lambda: now[0], sleep=sleep)
    assert bucket.take(100) == 0  # the burst
    assert bucket.take(300) == pytest.approx(0.3)
    assert bucket.take(100) == pytest.approx(0.1)  # nothing accrued while it was owed
    now[0] += 10  # idle: the bucket fills up to its burst, no more
    assert bucket.take(100) == 0
    assert bucket.take(50) == pytest.approx(0.05)
    # 650 bytes in all, 100 of them free at the start and 100 after the pause.
    assert now[0] == pytest.approx(10 + 0.45)


@pytest.mark.skipif(not registry_available(), reason="needs docker-registry")
def test_a_registry_client_pushes_and_reads_ranges_through_the_proxy(tmp_path: Path) -> None:
    blob = os.urandom(3 << 20)  # three upload chunks: PATCH requests
    digest = "sha256:" + hashlib.sha256(blob).hexdigest()
    with (
        start_registry(tmp_path / "registry") as registry,
        ShapingProxy(registry.host, rate_bps=None, delay=0) as loopback,
        ShapingProxy(registry.host, rate_bps=RATE, delay=0.001) as shaped,
    ):
        with RegistryClient(plain_http=True, chunk_size=1 << 20) as client:
            ref = Reference.parse(f"{loopback.host}/proxy/test:1")
            assert client.push_blob(ref, digest, len(blob), blob) == "uploaded"
            ranged = Reference.parse(f"{shaped.host}/proxy/test:1")
            assert (
                client.read_range(ranged, digest, 1 << 20, 4096) == blob[1 << 20 : (1 << 20) + 4096]
            )
        uploads = loopback.records()
        assert {r.method for r in uploads} >= {"HEAD", "POST", "PATCH", "PUT"}
        assert sum(r.request_bytes for r in uploads) == len(blob)
        # The upload locations the registry returned named the proxy: every step went
        # through it, none failed.
        assert all(r.status < 400 or r.method == "HEAD" for r in uploads)
        [read] = [r for r in shaped.records() if r.range is not None]
        assert (read.method, read.status, read.bytes) == ("GET", 206, 4096)
        assert read.range == f"bytes={1 << 20}-{(1 << 20) + 4095}"
