"""Attach a layer's NBD export to the kernel and mount its EROFS image read-only.

Two ways to get a block device (or a file) out of the NBD server:

- ``AttachMode.KERNEL_NBD``: ``/dev/nbdN`` configured over generic netlink with sockets this
  module has handshaken itself, so that it can set a long dead-connection timeout and later
  hand the same device fresh sockets when the server restarts (:func:`reconnect`).
- ``AttachMode.NBDFUSE``: where nbd.ko is missing, ``nbdfuse`` exposes the export as one
  file, which is mounted directly (file-backed EROFS, Linux ≥ 6.12) or through a read-only
  loop device.

Every attachment is described by an :class:`Attachment` that is also written to
``state_dir/attachment.json``, so that a restarted daemon can find and undo it.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import json
import logging
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from socket import socket as Socket
from typing import Any, Literal
from urllib.parse import quote

import attrs

from blockfs.errors import BlockfsError
from blockfs.host import _handshake, _netlink, mounts

log = logging.getLogger(__name__)

MountMethod = Literal["block", "file-backed", "loop"]

ATTACHMENT_FILE = "attachment.json"
BLOCK_SIZE = 4096
DEFAULT_DEAD_CONN_TIMEOUT = 30 * 24 * 3600
# With several connections the kernel gives up on a request after this long, marks its
# connection dead and requeues it; 0 would mean the block layer's 30 s, far too short for
# a read that fetches chunks from a slow registry.
DEFAULT_REQUEST_TIMEOUT = 3600

_NBDFUSE_PIDFILE = "nbdfuse.pid"
_NBDFUSE_LOG = "nbdfuse.log"
_FUSE_DIR = "fuse"
_FUSE_FILE = "image"
_READY_TIMEOUT = 30.0
_EXIT_TIMEOUT = 10.0
_POLL = 0.02


class AttachError(BlockfsError):
    """Attaching, mounting, reconnecting or detaching a layer's export failed.

    The message says what the user can do about it; ``export`` and ``mountpoint`` say which
    attachment it was, when known.
    """

    def __init__(
        self, message: str, *, export: str | None = None, mountpoint: str | None = None
    ) -> None:
        super().__init__(message)
        self.export = export
        self.mountpoint = mountpoint

    def context(self) -> list[str]:
        where = []
        if self.export is not None:
            where.append(f"export {self.export!r}")
        if self.mountpoint is not None:
            where.append(f"mountpoint {self.mountpoint}")
        return where


class AttachMode(enum.Enum):
    """How an export reaches the kernel; the values are the configuration and CLI words."""

    KERNEL_NBD = "nbd"
    NBDFUSE = "nbdfuse"


def parse_mode(value: str) -> AttachMode | None:
    """``"nbd"`` or ``"nbdfuse"`` as an AttachMode, ``"auto"`` as None (decide per host)."""
    if value == "auto":
        return None
    try:
        return AttachMode(value)
    except ValueError:
        raise AttachError(f"unknown attach mode {value!r}: use one of auto, nbd, nbdfuse") from None


def kernel_nbd_available() -> bool:
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


def choose_mode(requested: str = "auto") -> AttachMode:
    """The attach mode to use here: ``requested`` if it can work, else a clear AttachError."""
    mode = parse_mode(requested)
    if mode is AttachMode.KERNEL_NBD:
        if not kernel_nbd_available():
            raise AttachError(
                "attach mode nbd was requested but nbd.ko is not available "
                "(modprobe nbd failed or is missing): load the nbd module, "
                "or use attach mode nbdfuse"
            )
        return mode
    if mode is AttachMode.NBDFUSE:
        _require_tool("nbdfuse", "install libnbd-bin")
        return mode
    if kernel_nbd_available():
        return AttachMode.KERNEL_NBD
    if shutil.which("nbdfuse") is None:
        raise AttachError(
            "neither nbd.ko nor nbdfuse is available: load the nbd module, "
            "or install libnbd-bin and fuse3"
        )
    return AttachMode.NBDFUSE


@attrs.frozen
class Attachment:
    """One export attached and mounted: everything needed to find it again and undo it.

    ``device`` is ``/dev/nbdN`` or the nbdfuse file; ``mount_source`` is what is mounted
    (the device, the file, or the loop device in front of the file).
    """

    mode: AttachMode
    export: str
    socket: str
    device: str
    state_dir: str
    mount_source: str
    mount_method: MountMethod = attrs.field(
        validator=attrs.validators.in_(("block", "file-backed", "loop"))
    )
    mountpoint: str
    nbdfuse_pid: int | None = None
    loop_device: str | None = None
    connections: int = 1

    def to_json(self) -> dict[str, Any]:
        """The attachment as a JSON-ready dict (what ``attachment.json`` holds)."""
        data = attrs.asdict(self)
        data["mode"] = self.mode.value
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Attachment:
        """The attachment described by :meth:`to_json`'s dict."""
        try:
            fields = dict(data)
            fields["mode"] = AttachMode(fields["mode"])
            return cls(**fields)
        except (ValueError, KeyError, TypeError) as e:
            raise AttachError(f"unreadable attachment record: {e}") from e

    @property
    def nbd_index(self) -> int:
        """N of ``/dev/nbdN`` (kernel mode only)."""
        return int(self.device.removeprefix("/dev/nbd"))

    @property
    def backend_identifier(self) -> str:
        """What the kernel remembers about the device's backend, checked on reconnect."""
        return _backend_identifier(self.export)


def read_attachment(state_dir: str) -> Attachment | None:
    """The attachment recorded in ``state_dir``, or None if there is none."""
    try:
        with open(os.path.join(state_dir, ATTACHMENT_FILE), encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        return None
    except ValueError as e:
        raise AttachError(f"unreadable attachment record in {state_dir}: {e}") from e
    return Attachment.from_json(data)


def is_mounted(path: str) -> bool:
    """Whether something is mounted on ``path`` (per /proc/self/mountinfo)."""
    return mounts.find_mount(path) is not None


def attach_and_mount(
    socket: str,
    export: str,
    mountpoint: str,
    *,
    state_dir: str,
    mode: AttachMode | None = None,
    dead_conn_timeout: int = DEFAULT_DEAD_CONN_TIMEOUT,
    connections: int = 4,
    request_timeout: int = DEFAULT_REQUEST_TIMEOUT,
    mount_method: Literal["file-backed", "loop"] | None = None,
) -> Attachment:
    """Attach ``export`` served on the unix socket ``socket`` and mount it on ``mountpoint``.

    Returns once ``mountpoint`` is a read-only EROFS mount. ``state_dir`` is a private
    directory for this attachment. ``mode`` None picks one for this host. In nbdfuse mode,
    ``mount_method`` forces the file-backed mount or the loop device (default: file-backed
    when the kernel supports it). On failure everything done so far is undone.
    """
    mode = mode if mode is not None else choose_mode("auto")
    if connections < 1:
        raise ValueError("connections must be at least 1")
    if mount_method is not None and mode is not AttachMode.NBDFUSE:
        raise AttachError(f"mount_method {mount_method!r} applies to attach mode nbdfuse only")
    if not os.path.isdir(mountpoint):
        raise AttachError("the mountpoint is not a directory", export=export, mountpoint=mountpoint)
    mountpoint = os.path.realpath(mountpoint)
    if is_mounted(mountpoint):
        raise AttachError(
            "something is already mounted there: unmount it first",
            export=export,
            mountpoint=mountpoint,
        )
    os.makedirs(state_dir, mode=0o700, exist_ok=True)
    state_dir = os.path.realpath(state_dir)
    if read_attachment(state_dir) is not None or is_mounted(os.path.join(state_dir, _FUSE_DIR)):
        raise AttachError(
            f"{state_dir} still holds an earlier attachment: unmount and detach it first",
            export=export,
        )
    with _undo_on_error() as undo:
        if mode is AttachMode.KERNEL_NBD:
            att = _attach_kernel(
                socket,
                export,
                mountpoint,
                state_dir,
                connections,
                dead_conn_timeout,
                request_timeout,
                undo,
            )
        else:
            att = _attach_nbdfuse(
                socket, export, mountpoint, state_dir, connections, mount_method, undo
            )
        _write_attachment(att)
    log.info(
        "attached export %s via %s (%s), mounted %s on %s",
        export,
        att.mode.value,
        att.mount_method,
        att.mount_source,
        mountpoint,
    )
    return att


def unmount_and_detach(att: Attachment, *, lazy: bool = False) -> None:
    """Unmount ``att`` and release what it used: loop device, nbd device, nbdfuse process.

    Safe to call again after it succeeded or partly failed; it only touches what still
    belongs to this attachment. ``lazy`` is for an nbdfuse attachment whose server is
    gone: whatever still holds the layer (a running container's overlay) keeps its
    broken view, while the mounts are detached at once (and freed when let go) and
    nbdfuse is stopped, so that the layer can be attached afresh on the same mountpoint.
    """
    entry = mounts.find_mount(att.mountpoint)
    if entry is not None:
        if entry.source != att.mount_source:
            raise AttachError(
                f"{entry.source} ({entry.fstype}) is mounted there, not this attachment's "
                f"{att.mount_source}: unmount it by hand",
                export=att.export,
                mountpoint=att.mountpoint,
            )
        try:
            mounts.umount(att.mountpoint, lazy=lazy)
        except mounts.MountError as e:
            hint = (
                ": stop what uses it (containers, overlay mounts) first"
                if e.errno == errno.EBUSY
                else ""
            )
            raise AttachError(
                f"{e.strerror}{hint}", export=att.export, mountpoint=att.mountpoint
            ) from e
    if att.loop_device is not None and mounts.loop_backing_file(att.loop_device) == att.device:
        mounts.loop_detach(att.loop_device)
    if att.mode is AttachMode.KERNEL_NBD:
        _nbd_disconnect_if_ours(att)
    else:
        _stop_nbdfuse(att.state_dir, att.nbdfuse_pid, export=att.export, lazy=lazy)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(os.path.join(att.state_dir, ATTACHMENT_FILE))
    _remove_nbdfuse_files(att.state_dir)
    log.info("unmounted %s and detached export %s", att.mountpoint, att.export)


def reconnect(att: Attachment, socket: str) -> Attachment:
    """Give the kernel fresh connections for ``att``'s device after the server restarted.

    The EROFS mount stays in place; I/O waiting for the dead connections resumes. Returns
    the attachment with the (possibly new) socket path, also recorded in ``state_dir``.
    """
    if att.mode is not AttachMode.KERNEL_NBD:
        raise AttachError(
            "an nbdfuse attachment cannot be reconnected (nbdfuse has no reconnect): "
            "unmount and attach it again",
            export=att.export,
            mountpoint=att.mountpoint,
        )
    expected = _block_device_size(att.device)
    sockets, info = _handshaken_sockets(socket, att.export, att.connections)
    try:
        # The kernel keeps the size in 512-byte sectors.
        if expected is not None and info.size // 512 * 512 != expected:
            raise AttachError(
                f"the server now serves {info.size} bytes for this export where "
                f"{att.device} has {expected}: it is a different image; unmount and attach again",
                export=att.export,
            )
        with _open_netlink(att.export) as nl:
            nl.reconfigure(att.nbd_index, [s.fileno() for s in sockets], att.backend_identifier)
    except _netlink.NetlinkError as e:
        raise AttachError(f"cannot reconnect {att.device}: {e}", export=att.export) from e
    finally:
        for s in sockets:
            s.close()
    new = attrs.evolve(att, socket=socket, connections=len(sockets))
    _write_attachment(new)
    log.info("reconnected %s to export %s on %s", att.device, att.export, socket)
    return new


# -- kernel NBD ---------------------------------------------------------------------------


def _attach_kernel(
    socket: str,
    export: str,
    mountpoint: str,
    state_dir: str,
    connections: int,
    dead_conn_timeout: int,
    request_timeout: int,
    undo: _Undo,
) -> Attachment:
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
            backend=_backend_identifier(export),
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
    undo.push(_nbd_disconnect, index)
    _wait_for_block_device(device, export)
    try:
        mounts.mount(device, mountpoint, "erofs", mounts.MS_RDONLY)
    except mounts.MountError as e:
        raise _mount_failed(device, e, export, mountpoint) from e
    undo.push(mounts.umount, mountpoint)
    return Attachment(
        mode=AttachMode.KERNEL_NBD,
        export=export,
        socket=socket,
        device=device,
        state_dir=state_dir,
        mount_source=device,
        mount_method="block",
        mountpoint=mountpoint,
        connections=len(sockets),
    )


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
        raise _server_unreachable(socket_path, export, e) from e
    sockets.append(sock)
    try:
        return _handshake.handshake(sock, export)
    except _handshake.HandshakeError as e:
        raise _handshake_failed(socket_path, e) from e


def _nbd_disconnect(index: int) -> None:
    with _netlink.NBDNetlink() as nl:
        nl.disconnect(index)


def _nbd_disconnect_if_ours(att: Attachment) -> None:
    # The device may have been freed and reused by another layer since: only disconnect it
    # while the kernel still names this attachment's backend. Older kernels keep no backend
    # identifier; there a configured device (one with a pid file) is taken as ours.
    sysfs = f"/sys/block/{os.path.basename(att.device)}"
    try:
        with open(f"{sysfs}/backend", encoding="utf-8") as f:
            if f.read().strip() != att.backend_identifier:
                return
    except FileNotFoundError:
        if not os.path.exists(f"{sysfs}/pid"):
            return  # no such device, or not configured
    except OSError:
        return
    try:
        _nbd_disconnect(att.nbd_index)
    except _netlink.NetlinkError as e:
        raise AttachError(f"cannot disconnect {att.device}: {e}", export=att.export) from e


def _block_device_size(device: str) -> int | None:
    try:
        with open(f"/sys/block/{os.path.basename(device)}/size", encoding="utf-8") as f:
            return int(f.read()) * 512
    except (OSError, ValueError):
        return None


def _wait_for_block_device(device: str, export: str) -> None:
    # devtmpfs creates nodes of newly added devices asynchronously, and the capacity is
    # set when the device starts.
    deadline = time.monotonic() + _READY_TIMEOUT
    while not (os.path.exists(device) and _block_device_size(device)):
        if time.monotonic() > deadline:
            raise AttachError(f"{device} did not appear with a size", export=export)
        time.sleep(_POLL)


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


# -- nbdfuse ------------------------------------------------------------------------------


def _attach_nbdfuse(
    socket: str,
    export: str,
    mountpoint: str,
    state_dir: str,
    connections: int,
    mount_method: Literal["file-backed", "loop"] | None,
    undo: _Undo,
) -> Attachment:
    nbdfuse = _require_tool("nbdfuse", "install libnbd-bin")
    _require_tool("fusermount3", "install fuse3")
    # Ask the server first: its answer makes a far clearer error than nbdfuse's exit status.
    try:
        _handshake.query_export(socket, export)
    except _handshake.HandshakeError as e:
        raise _handshake_failed(socket, e) from e
    except OSError as e:
        raise _server_unreachable(socket, export, e) from e

    fuse_dir = os.path.join(state_dir, _FUSE_DIR)
    os.makedirs(fuse_dir, mode=0o700, exist_ok=True)
    undo.push(_remove_nbdfuse_files, state_dir)
    image = os.path.join(fuse_dir, _FUSE_FILE)
    pid = _spawn_nbdfuse(nbdfuse, socket, export, image, state_dir, connections)
    undo.push(_stop_nbdfuse, state_dir, pid, export=export)
    _wait_for_nbdfuse(state_dir, pid, export)

    loop_device = None
    if mount_method in (None, "file-backed"):
        try:
            mounts.mount(image, mountpoint, "erofs", mounts.MS_RDONLY)
            method: MountMethod = "file-backed"
        except mounts.MountError as e:
            # ENOTBLK: this kernel's EROFS only mounts block devices (no file-backed mounts).
            if e.errno != errno.ENOTBLK or mount_method == "file-backed":
                raise _mount_failed(image, e, export, mountpoint) from e
            log.info("this kernel cannot mount EROFS from a file; using a loop device")
            method = "loop"
    else:
        method = "loop"
    if method == "loop":
        try:
            loop_device = mounts.loop_attach_readonly(image)
        except mounts.MountError as e:
            raise AttachError(f"cannot set up a loop device: {e.strerror}", export=export) from e
        undo.push(mounts.loop_detach, loop_device)
        try:
            mounts.mount(loop_device, mountpoint, "erofs", mounts.MS_RDONLY)
        except mounts.MountError as e:
            raise _mount_failed(loop_device, e, export, mountpoint) from e
    undo.push(mounts.umount, mountpoint)
    return Attachment(
        mode=AttachMode.NBDFUSE,
        export=export,
        socket=socket,
        device=image,
        state_dir=state_dir,
        mount_source=loop_device or image,
        mount_method=method,
        mountpoint=mountpoint,
        nbdfuse_pid=pid,
        loop_device=loop_device,
        connections=connections,
    )


def _spawn_nbdfuse(
    nbdfuse: str, socket: str, export: str, image: str, state_dir: str, connections: int
) -> int:
    """Start nbdfuse detached from this process and return its pid.

    nbdfuse must outlive a restart of the daemon, like the mount it backs, so a throwaway
    shell starts it in the background: it is never our child and needs no reaping.
    """
    pidfile = os.path.join(state_dir, _NBDFUSE_PIDFILE)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(pidfile)
    # nbdfuse's --unix mode cannot name an export; the URI's path is the export name.
    uri = f"nbd+unix:///{quote(export, safe='')}?socket={quote(socket, safe='/')}"
    argv = [nbdfuse, "-r", "-C", str(connections), "-P", pidfile, image, uri]
    launcher = 'log=$1; shift; "$@" </dev/null >"$log" 2>&1 & echo $!'
    result = subprocess.run(
        ["/bin/sh", "-c", launcher, "sh", os.path.join(state_dir, _NBDFUSE_LOG), *argv],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        check=False,
        start_new_session=True,
    )
    if result.returncode != 0 or not result.stdout.strip().isdigit():
        raise AttachError(f"cannot start nbdfuse: {result.stderr.strip()}", export=export)
    return int(result.stdout.strip())


def _wait_for_nbdfuse(state_dir: str, pid: int, export: str) -> None:
    """Wait until nbdfuse writes its pid file, which it does once the FUSE file is ready."""
    pidfile = os.path.join(state_dir, _NBDFUSE_PIDFILE)
    fuse_dir = os.path.join(state_dir, _FUSE_DIR)
    deadline = time.monotonic() + _READY_TIMEOUT
    while True:
        with (
            contextlib.suppress(FileNotFoundError, ValueError),
            open(pidfile, encoding="ascii") as f,
        ):
            if int(f.read()) == pid:
                return
        if not _process_alive(pid, fuse_dir):
            raise AttachError(
                f"nbdfuse exited before it was ready: {_log_tail(state_dir)}", export=export
            )
        if time.monotonic() > deadline:
            raise AttachError(
                f"nbdfuse was not ready after {_READY_TIMEOUT:.0f} s: {_log_tail(state_dir)}",
                export=export,
            )
        time.sleep(_POLL)


def _stop_nbdfuse(state_dir: str, pid: int | None, *, export: str, lazy: bool = False) -> None:
    """Unmount nbdfuse's FUSE directory and wait for it to exit (kill it as a last resort).

    ``lazy``: the FUSE file may still be held (by an EROFS superblock that a container's
    overlay keeps alive): detach the directory at once and stop nbdfuse by force.
    """
    fuse_dir = os.path.join(state_dir, _FUSE_DIR)
    entry = mounts.find_mount(fuse_dir)
    if lazy and entry is not None:
        _fusermount_unmount(fuse_dir, export, lazy=True)
        entry = None
    if entry is not None and entry.fstype.startswith("fuse"):
        _fusermount_unmount(fuse_dir, export)
        if pid is not None and _wait_exit(pid, fuse_dir, _EXIT_TIMEOUT):
            return
    # Not mounted (it failed or never got ready) or it did not exit: stop it by force.
    if pid is None or not _process_alive(pid, fuse_dir):
        return
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        if _wait_exit(pid, fuse_dir, _EXIT_TIMEOUT):
            break
    # A killed nbdfuse may leave a dead FUSE mount behind ("transport endpoint is not
    # connected"), which still has to be unmounted.
    if mounts.find_mount(fuse_dir) is not None:
        _fusermount_unmount(fuse_dir, export)


def _fusermount_unmount(fuse_dir: str, export: str, *, lazy: bool = False) -> None:
    # Right after the EROFS or loop device lets go of the file, the FUSE mount can still be
    # busy for a moment.
    deadline = time.monotonic() + _EXIT_TIMEOUT
    while True:
        result = subprocess.run(
            ["fusermount3", "-u", *(["-z"] if lazy else []), fuse_dir],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode == 0 or mounts.find_mount(fuse_dir) is None:
            return
        if time.monotonic() > deadline:
            raise AttachError(
                f"cannot unmount nbdfuse's directory {fuse_dir}: {result.stderr.strip()}",
                export=export,
            )
        time.sleep(0.1)


def _process_alive(pid: int, marker: str) -> bool:
    """Whether ``pid`` runs and is the nbdfuse of ``marker`` (pids get reused)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read()
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    # A zombie has exited: whoever its parent is will reap it.
    return state not in (b"Z", b"X") and os.fsencode(marker) in cmdline


def _wait_exit(pid: int, marker: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while _process_alive(pid, marker):
        if time.monotonic() > deadline:
            return False
        time.sleep(_POLL)
    return True


def _log_tail(state_dir: str) -> str:
    try:
        with open(os.path.join(state_dir, _NBDFUSE_LOG), encoding="utf-8", errors="replace") as f:
            text = f.read().strip()
    except FileNotFoundError:
        return "no output"
    return text[-2000:] or "no output"


# -- shared -------------------------------------------------------------------------------


def _mount_failed(source: str, e: mounts.MountError, export: str, mountpoint: str) -> AttachError:
    reason = os.strerror(e.errno) if e.errno else str(e)
    return AttachError(
        f"cannot mount {source} as EROFS: {reason} (is the export an EROFS image?)",
        export=export,
        mountpoint=mountpoint,
    )


def _server_unreachable(socket: str, export: str, e: OSError) -> AttachError:
    return AttachError(
        f"cannot connect to the NBD server at {socket}: {e.strerror or e} "
        "(is the blockfs NBD server running?)",
        export=export,
    )


def _handshake_failed(socket: str, e: _handshake.HandshakeError) -> AttachError:
    if isinstance(e, _handshake.ExportNotFoundError):
        return AttachError(
            f"export not found on the NBD server at {socket} (is the layer being served?)",
            export=e.export,
        )
    return AttachError(f"NBD handshake with {socket} failed: {e.message}", export=e.export)


def _backend_identifier(export: str) -> str:
    return f"blockfs:{export}"


def _require_tool(name: str, hint: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise AttachError(f"{name} not found: {hint}")
    return path


def _remove_nbdfuse_files(state_dir: str) -> None:
    for name in (_NBDFUSE_PIDFILE, _NBDFUSE_LOG):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(state_dir, name))
    with contextlib.suppress(FileNotFoundError):
        os.rmdir(os.path.join(state_dir, _FUSE_DIR))


def _write_attachment(att: Attachment) -> None:
    path = os.path.join(att.state_dir, ATTACHMENT_FILE)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(att.to_json(), f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class _Undo:
    """Steps that reverse an attach in progress, run last-first if it fails."""

    def __init__(self) -> None:
        self._steps: list[tuple[Callable[..., object], tuple[object, ...], dict[str, Any]]] = []

    def push(self, fn: Callable[..., object], *args: object, **kwargs: Any) -> None:
        self._steps.append((fn, args, kwargs))

    def run(self) -> None:
        while self._steps:
            fn, args, kwargs = self._steps.pop()
            try:
                fn(*args, **kwargs)
            except Exception:
                # Keep undoing the rest; the original error is the one worth raising.
                log.exception("cleanup step %s failed", getattr(fn, "__name__", fn))


@contextlib.contextmanager
def _undo_on_error() -> Iterator[_Undo]:
    undo = _Undo()
    try:
        yield undo
    except BaseException:
        undo.run()
        raise
