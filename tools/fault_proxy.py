"""A fault-injecting HTTP proxy: :class:`ShapingProxy`'s forwarding, with bad responses.

:class:`FaultProxy` forwards every request to a plain-HTTP upstream (a ``docker-registry``
started by ``tools.local_registry``) exactly as :class:`tools.shaping_proxy.ShapingProxy`
does, unshaped by default. Each response to a blob range GET (``GET .../blobs/...`` with a
``Range`` header, answered 200 or 206) is spoiled, with probability ``probability``, in
one of the ways of :data:`FAULT_KINDS`, chosen among ``kinds``:

- ``flip``: one to eight bits of the body are flipped; same length, same headers;
- ``stall``: the body is held for ``stall_seconds`` before it is sent, then sent whole;
- ``cut``: the headers promise the whole body, half of it is sent, then the connection
  is closed;
- ``error``: the upstream's body is read and dropped, and the client gets 500 or 503
  (a short plain-text body; the connection stays open).

Faults are off until :meth:`FaultProxy.arm` (so that a mount can index its layers first,
or not: arm before mounting to spoil that too) and counted by kind
(:meth:`FaultProxy.faults`), beside the range GETs seen while armed. The random choices
come from one ``random.Random(seed)``, so a run is repeatable up to thread interleaving.
"""

from __future__ import annotations

import collections
import random
import threading
import time
from collections.abc import Sequence
from http.client import HTTPResponse

from tools.shaping_proxy import (
    PIECE,
    RequestRecord,
    ShapingProxy,
    _ClientGone,
    _Handler,
    _Server,
)

FAULT_KINDS = ("flip", "stall", "cut", "error")


class FaultProxy(ShapingProxy):
    """A proxy in front of ``upstream`` that spoils blob range responses.

    ``probability`` is the chance that one blob range response is spoiled, ``kinds`` the
    faults to choose from (uniformly), ``stall_seconds`` how long ``stall`` holds a body.
    """

    def __init__(
        self,
        upstream: str,
        *,
        probability: float,
        kinds: Sequence[str] = ("flip",),
        stall_seconds: float = 1.0,
        seed: int = 0,
        rate_bps: float | None = None,
        delay: float = 0.0,
        armed: bool = False,
    ) -> None:
        super().__init__(upstream, rate_bps=rate_bps, delay=delay)
        unknown = [k for k in kinds if k not in FAULT_KINDS]
        if unknown or not kinds:
            raise ValueError(f"fault kinds must be among {', '.join(FAULT_KINDS)}: {kinds}")
        if not 0 <= probability <= 1:
            raise ValueError(f"a probability is between 0 and 1, not {probability}")
        self.probability = probability
        self.kinds = tuple(kinds)
        self.stall_seconds = stall_seconds
        self._random = random.Random(seed)
        self._random_lock = threading.Lock()
        self._armed = threading.Event()
        if armed:
            self._armed.set()
        self._faults: collections.Counter[str] = collections.Counter()
        self._range_gets = 0

    kind = "fault"

    @staticmethod
    def handler() -> type[_Handler]:
        return _FaultHandler

    def arm(self) -> None:
        """Spoil responses from now on."""
        self._armed.set()

    def disarm(self) -> None:
        """Forward responses untouched from now on."""
        self._armed.clear()

    def faults(self) -> dict[str, int]:
        """Faults injected so far, by kind (every kind of :data:`FAULT_KINDS` present)."""
        with self._lock:
            return {kind: self._faults[kind] for kind in FAULT_KINDS}

    @property
    def range_gets(self) -> int:
        """Blob range GETs answered 200/206 by the upstream while armed."""
        with self._lock:
            return self._range_gets

    def _choose(self) -> str | None:
        """The fault for one blob range response, or None; counted."""
        if not self._armed.is_set():
            return None
        with self._random_lock:
            hit = self._random.random() < self.probability
            kind = self._random.choice(self.kinds) if hit else None
        with self._lock:
            self._range_gets += 1
            if kind is not None:
                self._faults[kind] += 1
        return kind

    def _randint(self, low: int, high: int) -> int:
        with self._random_lock:
            return self._random.randint(low, high)


class _FaultHandler(_Handler):
    server: _Server

    def _send_response(
        self, proxy: ShapingProxy, record: RequestRecord, response: HTTPResponse
    ) -> None:
        assert isinstance(proxy, FaultProxy)
        if not (
            self.command == "GET"
            and "/blobs/" in self.path
            and self.headers.get("Range")
            and response.status in (200, 206)
        ):
            super()._send_response(proxy, record, response)
            return
        kind = proxy._choose()
        if kind is None:
            super()._send_response(proxy, record, response)
        elif kind == "stall":
            time.sleep(proxy.stall_seconds)
            super()._send_response(proxy, record, response)
        elif kind == "error":
            self._send_error(proxy, record, response)
        else:
            self._send_spoiled(proxy, record, response, kind)

    def _send_error(self, proxy: FaultProxy, record: RequestRecord, response: HTTPResponse) -> None:
        response.read()  # the upstream connection stays usable
        status = 500 if proxy._randint(0, 1) == 0 else 503
        body = b"fault injected\n"
        proxy._update(record, status=status)
        try:
            self.send_response_only(status)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            proxy._sent(record, len(body))
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError) as e:
            raise _ClientGone() from e

    def _send_spoiled(
        self, proxy: FaultProxy, record: RequestRecord, response: HTTPResponse, kind: str
    ) -> None:
        """The whole body, read first, with bits flipped (``flip``) or half of it (``cut``)."""
        body = bytearray(response.read())
        self.send_response_only(response.status, response.reason)
        for name, value in response.getheaders():
            if name.lower() not in ("transfer-encoding", "connection", "content-length"):
                self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        if kind == "flip" and body:
            for _ in range(proxy._randint(1, 8)):
                bit = proxy._randint(0, len(body) * 8 - 1)
                body[bit // 8] ^= 1 << (bit % 8)
        elif kind == "cut":
            del body[len(body) // 2 :]
            self.close_connection = True
        try:
            self.end_headers()
            for start in range(0, len(body), PIECE):
                piece = body[start : start + PIECE]
                proxy._shape(len(piece))
                proxy._sent(record, len(piece))
                self.wfile.write(piece)
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError) as e:
            raise _ClientGone() from e
        if kind == "cut":
            self._drop_upstream()
