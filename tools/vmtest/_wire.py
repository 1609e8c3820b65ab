"""What the VM test's host and guest say to each other, shared by both sides.

The control channel is a virtio-serial port: one JSON object per line, each with a
``"kind"``. Guest to host: ``hello``, ``stop-server``, ``start-server``, ``result``.
Host to guest: ``config``, ``server-stopped``, ``server-started``. This module runs in the
guest too, so it uses the standard library only.
"""

from __future__ import annotations

import json
from typing import Any

# virtio-serial port names (the guest finds them in /sys/class/virtio-ports/*/name).
CONTROL_PORT = "blockfs.ctl"
NBD_PORT_PREFIX = "blockfs.nbd."

# Lines the guest prints that the host (and tests/vm) look for in the log.
PASS_LINE = "VM TEST: PASS"
FAIL_LINE = "VM TEST: FAIL"


def encode(kind: str, **fields: Any) -> bytes:
    """One message as a line of JSON."""
    return json.dumps({"kind": kind, **fields}, sort_keys=True).encode() + b"\n"


def decode(line: bytes) -> dict[str, Any]:
    """The message in one line; raises ValueError if it is not one."""
    message = json.loads(line)
    if not isinstance(message, dict) or not isinstance(message.get("kind"), str):
        raise ValueError(f"not a control message: {line[:200]!r}")
    return message


class LineReader:
    """Splits what arrives on a byte stream into lines."""

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, data: bytes) -> list[bytes]:
        """Add ``data``; return the lines it completed (without their newline)."""
        self._buffer += data
        *lines, self._buffer = self._buffer.split(b"\n")
        return lines
