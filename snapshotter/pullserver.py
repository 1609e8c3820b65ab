"""The daemon's pull socket: ``blockfs image pull`` asks the running daemon to pull.

A pull is a few registry requests and a few calls to containerd; what a fresh
``blockfs image pull`` process spends before the first of them (loading Python, gRPC and
the HTTP client from a cold page cache, about 0.7 s) is most of its time. The daemon has
all of that loaded, and keeps its registry connections, so the command hands the pull
over when the daemon listens, and pulls by itself otherwise.

The protocol is JSON lines over a unix stream socket (``ROOT/run/pull.sock``, root only).
The client sends one request::

    {"ref": "...", "containerd": "/run/containerd/containerd.sock", "namespace": "default",
     "snapshotter": "blockfs", "platform": "linux/amd64" | null, "plain_http": false,
     "hosts_dir": "/etc/containerd/certs.d" | null}

and the daemon answers with a line per layer as it is pulled, then one last line::

    {"layer": {"digest": "sha256:...", "lazy": true, "size": 123}}
    {"pulled": {"name": "...", "manifest": "sha256:...", "layers": 3, "lazy": 3}}
    or {"error": "what went wrong and what to do"}

The registry is reached with the daemon's docker credentials and, unless the request
names one, its hosts.toml directory: the same settings its lazy reads of the layers use.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from blockfs.errors import BlockfsError
from blockfs.oci import Manifest, Platform, ProcessConfig, Reference
from snapshotter.ctrclient import ContainerdClient
from snapshotter.layers import LayerManager
from snapshotter.pull import PulledLayer, pull_image, resolve_image
from snapshotter.remote import TOC_DIGEST_LABEL, RegistrySettings, prefetch_end, toc_tail

log = logging.getLogger(__name__)

# The longest request line taken.
MAX_REQUEST = 64 << 10


class PullRequestError(BlockfsError):
    """A request on the pull socket is not what the protocol says."""


def _request(line: bytes) -> dict[str, Any]:
    try:
        request = json.loads(line)
    except ValueError as e:
        raise PullRequestError(f"the pull request is not JSON: {e}") from None
    if not isinstance(request, dict) or not isinstance(request.get("ref"), str):
        raise PullRequestError("the pull request has no image reference")
    for key in ("containerd", "namespace", "snapshotter"):
        if not isinstance(request.get(key), str):
            raise PullRequestError(f"the pull request has no {key!r}")
    return request


class PullServer:
    """Serves pulls on ``path`` in threads of its own until :meth:`close`. Registry
    clients come from ``layers``' sources, so that a pull's connections serve the footer
    and TOC reads that follow, and ``layers`` reads those as soon as the manifest is in."""

    def __init__(self, path: Path, registry: RegistrySettings, layers: LayerManager) -> None:
        self.path = path
        self.registry = registry
        self._layers = layers
        self._closed = threading.Event()
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        path.unlink(missing_ok=True)
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        old = os.umask(0o177)  # the socket is root's alone: it pulls with root's credentials
        try:
            self._listener.bind(str(path))
        finally:
            os.umask(old)
        self._listener.listen(16)
        self._thread = threading.Thread(target=self._accept, name="pull-socket", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop taking pulls; pulls under way finish in their threads."""
        self._closed.set()
        self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        self._thread.join()
        self.path.unlink(missing_ok=True)

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return  # closed
            threading.Thread(target=self._serve, args=(conn,), name="pull", daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn, conn.makefile("rwb") as stream:

            def send(message: dict[str, Any]) -> None:
                stream.write(json.dumps(message).encode() + b"\n")
                stream.flush()

            try:
                try:
                    self._pull(_request(stream.readline(MAX_REQUEST)), send)
                except BlockfsError as e:
                    send({"error": str(e)})
                except Exception as e:
                    log.exception("pull failed")
                    send({"error": f"internal error in blockfs-snapshotter ({e!r}); see its log"})
            except OSError:
                pass  # the client went away; the pull itself finished or failed above

    def _pull(self, request: dict[str, Any], send: Any) -> None:
        ref = Reference.parse(request["ref"])
        try:
            platform = request.get("platform")
            wanted = Platform.parse(platform) if isinstance(platform, str) else None
        except ValueError as e:
            raise PullRequestError(str(e)) from None
        plain_http = bool(request.get("plain_http", False))
        hosts_dir = request.get("hosts_dir") or self.registry.hosts_dir
        registry = self._layers.sources.client(
            plain_http=plain_http,
            hosts_dir=hosts_dir if hosts_dir is not None and Path(hosts_dir).is_dir() else None,
            docker_config=self.registry.docker_config,
        )
        log.info("pull requested", extra={"ref": str(ref), "namespace": request["namespace"]})

        def read_ahead(manifest: Manifest) -> None:
            # The eStargz layers' footers and TOCs come while the config is fetched and
            # containerd stores it; each layer's Prepare then finds its TOC read. Their
            # prioritised files, where the image says where they end, come meanwhile. The
            # sources are those the Prepares' labels give (snapshotter.remote).
            estargz = [
                layer for layer in manifest.layers if layer.annotations.get(TOC_DIGEST_LABEL)
            ]
            self._layers.read_ahead(
                {
                    layer.digest: self.registry.spec(
                        ref.with_digest(layer.digest), plain_http=plain_http, size=layer.size
                    )
                    for layer in estargz
                },
                {
                    layer.digest: tail
                    for layer in estargz
                    if (tail := toc_tail(layer.annotations)) is not None
                },
                {
                    layer.digest: end
                    for layer in estargz
                    if (end := prefetch_end(layer.annotations, layer.size)) is not None
                },
            )
            # What a container of the image reads first: its command and what that
            # loads, found in those TOCs once the config says what the command is.
            self._layers.fetch_start_ahead(
                [layer.digest for layer in reversed(manifest.layers)], process.result
            )

        process: Future[ProcessConfig | None] = Future()
        try:
            image = resolve_image(registry, ref, wanted, on_manifest=read_ahead)
            process.set_result(image.config.process)
        finally:
            if not process.done():
                process.set_result(None)  # no config: nothing to fetch ahead

        def report(layer: PulledLayer) -> None:
            send({"layer": {"digest": layer.digest, "lazy": layer.lazy, "size": layer.size}})

        with ContainerdClient(request["containerd"], request["namespace"]) as ctr:
            result = pull_image(
                ctr,
                registry,
                image,
                snapshotter=request["snapshotter"],
                plain_http=plain_http,
                report=report,
            )
        send(
            {
                "pulled": {
                    "name": result.name,
                    "manifest": result.manifest.digest,
                    "layers": len(result.layers),
                    "lazy": sum(1 for layer in result.layers if layer.lazy),
                }
            }
        )
