"""Helpers of the remote-snapshot tests: eStargz and plain images pushed to a real
registry, and a proxy in front of the registry that counts what it serves."""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import http.client
import http.server
import io
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import attrs

from blockfs.convert import converted_annotations
from blockfs.estargz import BuildOptions, build
from blockfs.oci import Descriptor, ImageConfig, Manifest, Reference, host_platform
from blockfs.oci import media_types as mt
from blockfs.registry import RegistryClient


@attrs.frozen
class Layer:
    """A layer blob ready to push: its bytes, media type, diffID and annotations."""

    blob: bytes
    diff_id: str
    annotations: Mapping[str, str] = attrs.field(factory=dict)
    media_type: str = mt.OCI_LAYER_GZIP

    @property
    def digest(self) -> str:
        return "sha256:" + hashlib.sha256(self.blob).hexdigest()

    @property
    def toc_digest(self) -> str | None:
        return self.annotations.get("containerd.io/snapshot/stargz/toc.digest")


def estargz_layer(tar: bytes, *, prioritized: Sequence[str] = ()) -> Layer:
    """``tar`` as an eStargz blob with the annotations of a converted image."""
    out = io.BytesIO()
    options = BuildOptions(prioritized=tuple(prioritized), gzip_level=1)
    result = build(io.BytesIO(tar), out, options)
    return Layer(out.getvalue(), result.diff_id, converted_annotations(result))


def gzip_layer(tar: bytes) -> Layer:
    """``tar`` as an ordinary gzip layer (no TOC: not lazily pullable)."""
    return Layer(gzip.compress(tar, compresslevel=1, mtime=0), _sha256(tar))


def _sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@attrs.frozen
class PushedImage:
    """An image in the registry: its reference and what it is made of."""

    ref: Reference
    manifest: Descriptor
    layers: tuple[Layer, ...]

    @property
    def chain_ids(self) -> tuple[str, ...]:
        chain: list[str] = []
        for layer in self.layers:
            diff = layer.diff_id
            chain.append(diff if not chain else _sha256(f"{chain[-1]} {diff}".encode()))
        return tuple(chain)

    @property
    def compressed_size(self) -> int:
        return sum(len(layer.blob) for layer in self.layers)


def push_test_image(
    client: RegistryClient, ref: Reference, layers: Sequence[Layer], *, cmd: Sequence[str]
) -> PushedImage:
    """Push ``layers``, a config for this host running ``cmd`` and a manifest to ``ref``."""
    descriptors = []
    for layer in layers:
        client.push_blob(ref, layer.digest, len(layer.blob), layer.blob)
        descriptors.append(
            Descriptor(layer.media_type, layer.digest, len(layer.blob), layer.annotations)
        )
    platform = host_platform()
    config = ImageConfig.from_json(
        {
            "architecture": platform.architecture,
            "os": platform.os,
            "config": {"Cmd": list(cmd), "Env": ["PATH=/bin"]},
            "rootfs": {"type": "layers", "diff_ids": [layer.diff_id for layer in layers]},
        }
    )
    data = config.to_bytes()
    client.push_blob(ref, config.digest, len(data), data)
    manifest = Manifest(config=config.descriptor(), layers=tuple(descriptors))
    descriptor = client.push_manifest(ref, ref.tag_or_digest, mt.OCI_MANIFEST, manifest.to_bytes())
    return PushedImage(ref, descriptor, tuple(layers))


class CountingProxy:
    """A reverse proxy on 127.0.0.1 in front of ``upstream`` that counts the body bytes
    it sends back, per blob digest; every client in a test goes through it."""

    def __init__(self, upstream: str) -> None:
        self.upstream = urllib.parse.urlsplit(upstream).netloc
        self._lock = threading.Lock()
        self.blob_bytes: dict[str, int] = {}
        # The Range header of each blob GET, per digest ("" for a whole-blob GET).
        self.blob_ranges: dict[str, list[str]] = {}
        self.total_bytes = 0
        # Every request as it arrives: (method, path, Range header or "").
        self.arrived: list[tuple[str, str, str]] = []
        # Called with each request's (method, path, Range) before it is forwarded; it may
        # hold the request by not returning.
        self.before: Callable[[str, str, str], None] | None = None
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                proxy._forward(self)

            do_HEAD = do_PUT = do_POST = do_PATCH = do_DELETE = do_GET

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self._server.server_address[1]}"

    @contextlib.contextmanager
    def holding(
        self,
        which: Callable[[str, str, str], bool],
        until: Callable[[list[tuple[str, str, str]]], bool],
        timeout: float = 10.0,
    ) -> Iterator[list[bool]]:
        """Hold each request that ``which(method, path, range)`` picks until
        ``until(requests arrived so far)`` holds, for at most ``timeout`` seconds; the
        list yielded gets, per request held, whether ``until`` released it."""
        held: list[bool] = []

        def hold(method: str, path: str, range_: str) -> None:
            if not which(method, path, range_):
                return
            deadline = time.monotonic() + timeout
            while not until(list(self.arrived)):
                if time.monotonic() > deadline:
                    held.append(False)
                    return
                time.sleep(0.01)
            held.append(True)

        self.before = hold
        try:
            yield held
        finally:
            self.before = None

    def reset(self) -> None:
        with self._lock:
            self.blob_bytes.clear()
            self.blob_ranges.clear()
            self.total_bytes = 0

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _forward(self, handler: http.server.BaseHTTPRequestHandler) -> None:
        request = (handler.command, urllib.parse.urlsplit(handler.path).path,
                   handler.headers.get("Range", ""))  # fmt: skip
        with self._lock:
            self.arrived.append(request)
        if self.before is not None:
            self.before(*request)
        length = int(handler.headers.get("Content-Length") or 0)
        body = handler.rfile.read(length) if length else None
        headers = {
            k: v for k, v in handler.headers.items() if k.lower() not in ("connection", "host")
        }
        upstream = http.client.HTTPConnection(self.upstream, timeout=60)
        try:
            upstream.request(handler.command, handler.path, body=body, headers=headers)
            answer = upstream.getresponse()
            data = answer.read() if handler.command != "HEAD" else b""
            handler.send_response(answer.status)
            for name, value in answer.getheaders():
                if name.lower() not in ("connection", "transfer-encoding", "content-length"):
                    handler.send_header(name, value)
            declared = answer.getheader("Content-Length")
            size = declared if handler.command == "HEAD" and declared else str(len(data))
            handler.send_header("Content-Length", size)
            handler.end_headers()
            handler.wfile.write(data)
        finally:
            upstream.close()
        path = urllib.parse.urlsplit(handler.path).path
        with self._lock:
            self.total_bytes += len(data)
            if "/blobs/sha256:" in path and handler.command == "GET":
                digest = path.rsplit("/", 1)[1]
                self.blob_bytes[digest] = self.blob_bytes.get(digest, 0) + len(data)
                ranges = self.blob_ranges.setdefault(digest, [])
                ranges.append(handler.headers.get("Range", ""))


def byte_ranges(headers: Sequence[str]) -> list[tuple[int, int]]:
    """The ``(start, end)`` byte ranges (end exclusive) that Range headers asked for."""
    out = []
    for header in headers:
        assert header.startswith("bytes="), f"not a ranged request: {header!r}"
        for part in header.removeprefix("bytes=").split(","):
            start, _, end = part.strip().partition("-")
            out.append((int(start), int(end) + 1))
    return sorted(out)
