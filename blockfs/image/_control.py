"""A tiny unix-socket endpoint that reports the statistics of the layers a process serves.

The NBD server process runs it in a thread; ``blockfs layer stats`` and the snapshotter's
metrics read it. One request per connection: a line ``VERB [ARG...]``, answered with one
JSON document. Verbs: ``stats [NAME]`` (statistics of one export or all), ``open NAME``
(open an export before its first read, so that its prefetch starts while the layer is
still being attached), ``ahead NAME OFFSET AROUND`` (fetch the file whose data starts at
blob ``OFFSET`` before a container reads it, with AROUND 1 the files around it too, and
answer what the loader opens to run it; see ``LayerImage.fetch_ahead``), ``preload NAME
END SPEC`` (read the prioritised region ``[0, END)`` of the blob of a layer not indexed
yet, the source spec as base64 of its JSON; see ``blockfs.image._preload``) and ``forget
NAME`` (drop a released export from the server's memory).
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import socket
import threading
from collections.abc import Callable
from typing import Any

from blockfs.errors import BlockfsError
from blockfs.image._elf import LoaderNeeds

# The longest request line (a preload's source spec, encoded, is the longest).
MAX_LINE = 16384

# Called with the words after the verb; a wrong number of them is a TypeError, reported.
Handler = Callable[..., dict[str, Any]]


class ControlError(BlockfsError):
    """The stats endpoint could not be reached or answered nonsense."""


class ControlServer:
    """Answers ``VERB [ARG...]`` with ``handlers[VERB](*ARGS)`` as JSON on the unix socket
    ``path``."""

    def __init__(self, path: str, handlers: dict[str, Handler]) -> None:
        self.path = path
        self.handlers = handlers
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.bind(path)
        os.chmod(path, 0o600)
        self._sock.listen(16)
        self._thread = threading.Thread(target=self._serve, name="blockfs-control", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            # Each request in a thread of its own: an ``ahead`` waits for a file's first
            # bytes, and the requests for other layers must not wait behind it.
            threading.Thread(
                target=self._answer, args=(conn,), name="blockfs-control-request", daemon=True
            ).start()

    def _answer(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(5)
            try:
                line = conn.makefile("rb").readline(MAX_LINE).decode("utf-8", "replace").split()
                handler = self.handlers.get(line[0]) if line else None
                if handler is None:
                    reply: dict[str, Any] = {"error": f"unknown request {line[:1]}"}
                else:
                    reply = handler(*line[1:])
            except Exception as exc:  # report, never kill the serving thread
                reply = {"error": str(exc)}
            with contextlib.suppress(OSError):
                conn.sendall(json.dumps(reply).encode() + b"\n")

    def close(self) -> None:
        self._sock.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


def query_stats(path: str, name: str | None = None, timeout: float = 5.0) -> dict[str, Any]:
    """Ask the control socket at ``path`` for the stats of export ``name`` (or all)."""
    return _request(path, f"stats {name or ''}", timeout)


def open_export(path: str, name: str, timeout: float = 5.0) -> None:
    """Tell the server at ``path`` to open export ``name`` now (its prefetch starts)."""
    _request(path, f"open {name}", timeout)


def fetch_ahead(
    path: str, name: str, offset: int, *, around: bool, timeout: float = 30.0
) -> LoaderNeeds | None:
    """Tell the server at ``path`` to fetch the file of export ``name`` whose data starts
    at blob ``offset`` (opening the export if need be), with ``around`` the files around
    it as a container's first read of it would; what the loader opens to run it, None
    if it is not an ELF file. Answered once the file's headers are in: ``timeout``
    allows for a slow registry."""
    loader = _request(path, f"ahead {name} {offset} {int(around)}", timeout).get("loader")
    if loader is None:
        return None
    try:
        return LoaderNeeds.from_json(loader)
    except ValueError as exc:
        raise ControlError(f"bad reply from {path}: {exc}") from exc


def preload_export(
    path: str, name: str, spec: dict[str, Any], end: int, timeout: float = 5.0
) -> bool:
    """Tell the server at ``path`` to read ``[0, end)`` of the blob of source ``spec``
    now, for export ``name`` once it is indexed; False if it has no use for it."""
    encoded = base64.urlsafe_b64encode(json.dumps(spec, separators=(",", ":")).encode())
    return bool(_request(path, f"preload {name} {end} {encoded.decode()}", timeout)["preloading"])


def decode_spec(text: str) -> dict[str, Any]:
    """The source spec that :func:`preload_export` encoded."""
    try:
        spec = json.loads(base64.urlsafe_b64decode(text.encode()))
    except ValueError as exc:
        raise ControlError(f"not an encoded source spec: {text[:80]!r}") from exc
    if not isinstance(spec, dict):
        raise ControlError("a source spec is a JSON object")
    return spec


def forget_export(path: str, name: str, timeout: float = 5.0) -> None:
    """Tell the server at ``path`` to drop export ``name``, whose layer was released."""
    _request(path, f"forget {name}", timeout)


def _request(path: str, line: str, timeout: float) -> dict[str, Any]:
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(path)
            s.sendall(f"{line}\n".encode())
            data = s.makefile("rb").readline()
    except OSError as exc:
        raise ControlError(f"cannot reach the NBD server's control socket {path}: {exc}") from exc
    try:
        reply: dict[str, Any] = json.loads(data)
    except ValueError as exc:
        raise ControlError(f"bad reply from {path}: {data[:200]!r}") from exc
    if "error" in reply:
        raise ControlError(f"NBD server at {path}: {reply['error']}")
    return reply
