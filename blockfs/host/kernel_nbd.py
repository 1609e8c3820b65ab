"""The kernel NBD driver as an attach backend: ``/dev/nbdN`` configured over generic netlink.

blockfs does the NBD handshake itself and hands the kernel sockets already in the
transmission phase, so that it can set a long dead-connection timeout and later give the
same device fresh sockets when the server restarts (:func:`reconnect`); the EROFS mount on
the device stays in place and waiting reads resume.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from socket import socket as Socket

from blockfs.host import _handshake, _netlink
from blockfs.host._attach_common import (
    POLL,
    READY_TIMEOUT,
    AttachError,
    BackendMount,
    handshake_failed,
    mount_erofs,
    push_undo,
    server_unreachable,
)

BLOCK_SIZE = 4096
DEFAULT_DEAD_CONN_TIMEOUT = 30 * 24 * 3600
# With several connections the kernel gives up on a request after this long, marks its
# connection dead and requeues it; 0 would mean the block layer's 30 s, far too short for
# a read that fetches chunks from a slow registry.
DEFAULT_REQUEST_TIMEOUT = 3600
# Connections a device gets by default. One: on Debian 12's kernel (6.1) a device with
# several connections (so several blk-mq hardware queues) now and then loses a read,
# which blk-mq shows started and in flight while no connection carries it and the server
# is idle; the read then waits until the device is disconnected. The VM test met it in
# about one run in three with the host's CPUs busy, and not in 13 runs since with one
# connection (docs/vm-test.md). One connection still carries many requests at once:
# nbdkit serves each of its requests on a thread of its own.
DEFAULT_CONNECTIONS = 1


def available() -> bool:
    """Whether this host has the kernel NBD driver, loading it when it is a module."""
    if os.path.isdir("/sys/module/nbd"):
        return True
    modprobe = shutil.which("modprobe") or next(
        (p for p in ("/usr/sbin/modprobe", "/sbin/modprobe") if os.access(p, os.X_OK)), None
    )
    if modprobe is None:
        return False
    result = subprocess.run(
        [modprobe, "nbd", "nbds_max=16", "max_part=0"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        check=False,
    )
    return result.returncode == 0 and os.path.isdir("/sys/module/nbd")


def backend_identifier(export: str) -> str:
    """What the kernel remembers about a device's backend, checked on reconnect and detach."""
    return f"blockfs:{export}"


def device_index(device: str) -> int:
    """N of ``/dev/nbdN``."""
    return int(device.removeprefix("/dev/nbd"))


def attach(
    socket: str,
    export: str,
    mountpoint: str,
    *,
    connections: int,
    dead_conn_timeout: int,
    request_timeout: int,
    undo: contextlib.ExitStack,
) -> BackendMount:
    """Configure a free ``/dev/nbdN`` for ``export`` and mount it on ``mountpoint``.

    The device gets ``connections`` connections (:data:`DEFAULT_CONNECTIONS` says why
    one is the default) if the server allows multi-conn, else one. ``undo`` gets the
    disconnect and the unmount.
    """
    sockets, info = _handshaken_sockets(socket, export, connections)
    read_only = _handshake.NBD_FLAG_HAS_FLAGS | _handshake.NBD_FLAG_READ_ONLY
    try:
        request = _netlink.ConnectRequest(
            size_bytes=info.size,
            block_size=BLOCK_SIZE,
            server_flags=info.transmission_flags | read_only,
            timeout=request_timeout,
            dead_conn_timeout=dead_conn_timeout,
            socket_fds=[s.fileno() for s in sockets],
            backend=backend_identifier(export),
        )
        with _open_netlink(export) as nl:
            index = nl.connect(request)
    except _netlink.NetlinkError as e:
        raise AttachError(f"cannot configure an NBD device: {e}", export=export) from e
    finally:
        # The kernel holds its own references to the sockets now.
        for s in sockets:
            s.close()
    device = f"/dev/nbd{index}"
    push_undo(undo, _disconnect, index)
    _wait_for_block_device(device, export)
    mount_erofs(device, mountpoint, export=export, undo=undo)
    return BackendMount(device, device, "block", len(sockets))


def reconnect(device: str, socket: str, export: str, connections: int) -> int:
    """Give ``device`` fresh connections to ``export`` on ``socket``; how many it got."""
    expected = _block_device_size(device)
    sockets, info = _handshaken_sockets(socket, export, connections)
    try:
        # The kernel keeps the size in 512-byte sectors.
        if expected is not None and info.size // 512 * 512 != expected:
            raise AttachError(
                f"the server now serves {info.size} bytes for this export where "
                f"{device} has {expected}: it is a different image; unmount and attach again",
                export=export,
            )
        with _open_netlink(export) as nl:
            nl.reconfigure(
                device_index(device), [s.fileno() for s in sockets], backend_identifier(export)
            )
    except _netlink.NetlinkError as e:
        raise AttachError(f"cannot reconnect {device}: {e}", export=export) from e
    finally:
        for s in sockets:
            s.close()
    return len(sockets)


def detach(device: str, export: str) -> None:
    """Disconnect ``device`` if it still serves ``export``.

    The device may have been freed and reused by another layer since: it is only
    disconnected while the kernel still names this export as its backend. Older kernels
    keep no backend identifier; there a configured device (one with a pid file) is taken
    as ours.
    """
    sysfs = f"/sys/block/{os.path.basename(device)}"
    try:
        with open(f"{sysfs}/backend", encoding="utf-8") as f:
            if f.read().strip() != backend_identifier(export):
                return
    except FileNotFoundError:
        if not os.path.exists(f"{sysfs}/pid"):
            return  # no such device, or not configured
    except OSError:
        return
    try:
        _disconnect(device_index(device))
    except _netlink.NetlinkError as e:
        raise AttachError(f"cannot disconnect {device}: {e}", export=export) from e


def _handshaken_sockets(
    socket_path: str, export: str, connections: int
) -> tuple[list[Socket], _handshake.ExportInfo]:
    """Sockets in the transmission phase for ``export``: several only if multi-conn is safe."""
    sockets: list[Socket] = []
    try:
        info = _handshake_one(socket_path, export, sockets)
        if info.block_size_min > BLOCK_SIZE:
            raise AttachError(
                f"the server needs requests of at least {info.block_size_min} bytes; "
                f"the kernel will send {BLOCK_SIZE}",
                export=export,
            )
        wanted = connections if info.can_multi_conn else 1
        while len(sockets) < wanted:
            _handshake_one(socket_path, export, sockets)
    except BaseException:
        for s in sockets:
            s.close()
        raise
    return sockets, info


def _handshake_one(socket_path: str, export: str, sockets: list[Socket]) -> _handshake.ExportInfo:
    try:
        sock = _handshake.connect_unix(socket_path)
    except OSError as e:
        raise server_unreachable(socket_path, export, e) from e
    sockets.append(sock)
    try:
        return _handshake.handshake(sock, export)
    except _handshake.HandshakeError as e:
        raise handshake_failed(socket_path, e) from e


def _disconnect(index: int) -> None:
    with _netlink.NBDNetlink() as nl:
        nl.disconnect(index)


def _block_device_size(device: str) -> int | None:
    try:
        with open(f"/sys/block/{os.path.basename(device)}/size", encoding="utf-8") as f:
            return int(f.read()) * 512
    except (OSError, ValueError):
        return None


def _wait_for_block_device(device: str, export: str) -> None:
    # devtmpfs creates nodes of newly added devices asynchronously, and the capacity is
    # set when the device starts.
    deadline = time.monotonic() + READY_TIMEOUT
    while not (os.path.exists(device) and _block_device_size(device)):
        if time.monotonic() > deadline:
            raise AttachError(f"{device} did not appear with a size", export=export)
        time.sleep(POLL)


@contextlib.contextmanager
def _open_netlink(export: str) -> Iterator[_netlink.NBDNetlink]:
    try:
        nl = _netlink.NBDNetlink()
    except _netlink.FamilyNotFoundError:
        raise AttachError(
            "nbd.ko not available (no 'nbd' generic netlink family): "
            "load the nbd module, or use attach mode nbdfuse",
            export=export,
        ) from None
    with nl:
        yield nl
