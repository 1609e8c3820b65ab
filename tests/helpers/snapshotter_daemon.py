"""Running ``blockfs-snapshotter`` from tests, as a real process on a private socket."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import attrs
import grpc
import pytest

from snapshotter._gen.containerd.services.snapshots.v1 import snapshots_pb2_grpc as pb_grpc

PROJECT = Path(__file__).resolve().parents[2]
_START_TIMEOUT = 30.0


def snapshots_stub(channel: grpc.Channel) -> Any:
    """The generated Snapshots client (grpc's code generator writes no annotations)."""
    return pb_grpc.SnapshotsStub(channel)  # type: ignore[no-untyped-call]


@attrs.define
class SnapshotterDaemon:
    """A running ``python -m snapshotter.daemon``."""

    root: Path
    socket: Path
    process: subprocess.Popen[bytes]
    log_path: Path

    def channel(self) -> grpc.Channel:
        """A new gRPC channel to the daemon's socket."""
        return grpc.insecure_channel(f"unix://{self.socket}")

    def log(self) -> str:
        """What the daemon wrote to stderr so far."""
        return self.log_path.read_text(errors="replace")

    def log_records(self) -> list[dict[str, Any]]:
        """The daemon's log lines, each parsed as the JSON object it must be."""
        return [json.loads(line) for line in self.log().splitlines() if line.strip()]

    def stop(self, sig: signal.Signals = signal.SIGTERM) -> int:
        """Send ``sig`` and wait for the exit status (SIGKILL after 20 s)."""
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        return self.process.returncode


@contextlib.contextmanager
def start_snapshotter(
    root: Path,
    socket: Path,
    *extra_args: str,
    log_path: Path | None = None,
    env: Mapping[str, str] | None = None,
) -> Iterator[SnapshotterDaemon]:
    """Run the daemon with ``--root`` and ``--address``; stop it when the block exits.

    ``env`` is added to the daemon's environment.
    """
    log_path = log_path or root.parent / f"{root.name}-snapshotter.log"
    with open(log_path, "ab") as log_file:
        start = log_file.tell()  # a restarted daemon appends to its predecessor's log
        process = subprocess.Popen(
            [
                sys.executable, "-m", "snapshotter.daemon",
                "--root", str(root), "--address", str(socket), "--log-level", "debug",
                *extra_args,
            ],
            cwd=PROJECT,
            env={**os.environ, **(env or {})},
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=log_file,
        )  # fmt: skip
    daemon = SnapshotterDaemon(root=root, socket=socket, process=process, log_path=log_path)
    try:
        deadline = time.monotonic() + _START_TIMEOUT
        while "serving containerd snapshots API" not in daemon.log()[start:]:
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"blockfs-snapshotter did not start:\n{daemon.log()}")
            time.sleep(0.05)
        yield daemon
    finally:
        daemon.stop()
