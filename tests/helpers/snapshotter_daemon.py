"""Running ``blockfs-snapshotter`` from tests, as a real process on a private socket.

The process management lives in :mod:`tools.local_containerd` (the demo and benchmarks
use it too); here a daemon that does not start fails the test, and the generated gRPC
client is at hand.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import grpc
import pytest

from snapshotter._gen.containerd.services.snapshots.v1 import snapshots_pb2_grpc as pb_grpc
from tools import local_containerd
from tools.local_containerd import PROJECT, ContainerdProcessError, SnapshotterDaemon

__all__ = ["PROJECT", "SnapshotterDaemon", "snapshots_stub", "start_snapshotter"]


def snapshots_stub(channel: grpc.Channel) -> Any:
    """The generated Snapshots client (grpc's code generator writes no annotations)."""
    return pb_grpc.SnapshotsStub(channel)


@contextlib.contextmanager
def start_snapshotter(
    root: Path,
    socket: Path,
    *extra_args: str,
    log_path: Path | None = None,
    env: Mapping[str, str] | None = None,
) -> Iterator[SnapshotterDaemon]:
    """Run the daemon with ``--root`` and ``--address``; stop it when the block exits.

    ``env`` is added to the daemon's environment; the test fails if it does not start.
    """
    with contextlib.ExitStack() as exits:
        try:
            daemon = exits.enter_context(
                local_containerd.start_snapshotter(
                    root, socket, *extra_args, log_path=log_path, env=env
                )
            )
        except ContainerdProcessError as e:
            pytest.fail(str(e))
        yield daemon
