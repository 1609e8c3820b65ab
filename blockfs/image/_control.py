"""A tiny unix-socket endpoint that reports the statistics of the layers a process serves.

The NBD server process runs it in a thread; ``blockfs layer stats`` and the snapshotter's
metrics read it. One request per connection: a line ``stats`` or ``stats NAME``, answered
with one JSON document.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
from collections.abc import Callable
from typing import Any

from blockfs.errors import BlockfsError

StatsProvider = Callable[[str | None], dict[str, Any]]


class ControlError(BlockfsError):
    """The stats endpoint could not be reached or answered nonsense."""


class ControlServer:
    """Serves ``provider(name)`` as JSON on the unix socket ``path`` from a daemon thread."""

    def __init__(self, path: str, provider: StatsProvider) -> None:
        self.path = path
        self.provider = provider
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
            with conn:
                conn.settimeout(5)
                try:
                    line = conn.makefile("rb").readline(4096).decode("utf-8", "replace").split()
                    if not line or line[0] != "stats":
                        reply: dict[str, Any] = {"error": "unknown request"}
                    else:
                        reply = self.provider(line[1] if len(line) > 1 else None)
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
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(path)
            s.sendall(f"stats {name or ''}\n".encode())
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
