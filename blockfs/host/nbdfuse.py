"""nbdfuse as an attach backend, where the kernel has no NBD driver.

``nbdfuse`` exposes the export as one file in a FUSE directory of the attachment's state
directory; the file is mounted as EROFS directly (file-backed EROFS, Linux ≥ 6.12) or
through a read-only loop device. nbdfuse cannot reconnect, so it is not connected to the
NBD server itself but to a relay of its own (:class:`~blockfs.host._nbdkit.NBDRelay`,
nbdkit's nbd plugin behind its retry filter), which outlives the server and reconnects
to it when it comes back: a read in the meantime waits, then gets its bytes.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import mmap
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Collection
from typing import Literal
from urllib.parse import quote

from blockfs.host import _handshake, _process, mounts
from blockfs.host._attach_common import (
    POLL,
    READY_TIMEOUT,
    AttachError,
    BackendMount,
    ErofsMountError,
    handshake_failed,
    mount_erofs,
    push_undo,
    server_unreachable,
)
from blockfs.host._nbdkit import NBDRelay, NBDServerError

log = logging.getLogger(__name__)

# How the FUSE file reaches EROFS: mounted itself, or through a loop device.
FileMountMethod = Literal["file-backed", "loop"]

_PIDFILE = "nbdfuse.pid"
_LOG = "nbdfuse.log"
_FUSE_DIR = "fuse"
_FUSE_FILE = "image"
_EXIT_TIMEOUT = 10.0
_BLOCK = 4096
# The reads of nudge() under way, by nbdfuse file.
_nudges: dict[str, threading.Thread] = {}
_nudges_lock = threading.Lock()
# fusectl: one directory per FUSE connection, each with an ``abort`` file.
_FUSECTL = "/sys/fs/fuse/connections"
# nbdfuse's connections to the server (its -C), by default.
DEFAULT_CONNECTIONS = 4
_MINOR_BITS = 20


def available() -> bool:
    """Whether nbdfuse is installed."""
    return shutil.which("nbdfuse") is not None


def require() -> str:
    """The path of nbdfuse; AttachError saying what to install if it is missing."""
    return _require_tool("nbdfuse", "install libnbd-bin")


def fuse_dir(state_dir: str) -> str:
    """Where nbdfuse of the attachment in ``state_dir`` mounts its FUSE directory."""
    return os.path.join(state_dir, _FUSE_DIR)


def attach(
    socket: str,
    export: str,
    mountpoint: str,
    state_dir: str,
    *,
    connections: int,
    mount_method: FileMountMethod | None,
    undo: contextlib.ExitStack,
    relay: bool = True,
) -> BackendMount:
    """Start nbdfuse for ``export`` and mount its file on ``mountpoint``.

    ``mount_method`` None mounts the file itself where the kernel can, else through a loop
    device. With ``relay`` (the default) nbdfuse reaches the server at ``socket`` through
    a relay of its own that survives the server; without, it connects to the server
    directly and fails for good when the server dies (kept for measuring the relay).
    ``undo`` gets every step's reversal.
    """
    nbdfuse = require()
    _require_tool("fusermount3", "install fuse3")
    # Ask the server first: its answer makes a far clearer error than nbdfuse's exit status.
    try:
        _handshake.query_export(socket, export)
    except _handshake.HandshakeError as e:
        raise handshake_failed(socket, e) from e
    except OSError as e:
        raise server_unreachable(socket, export, e) from e

    os.makedirs(fuse_dir(state_dir), mode=0o700, exist_ok=True)
    push_undo(undo, _remove_files, state_dir)
    peer = socket
    relay_socket = None
    if relay:
        forwarder = NBDRelay(state_dir, socket, export)
        push_undo(undo, forwarder.stop)
        try:
            forwarder.start()
        except NBDServerError as e:
            raise AttachError(f"cannot start the NBD relay: {e}", export=export) from e
        peer = relay_socket = str(forwarder.socket)
    image = os.path.join(fuse_dir(state_dir), _FUSE_FILE)
    pid = _spawn(nbdfuse, peer, export, image, state_dir, connections)
    push_undo(undo, _stop, state_dir, pid, export=export)
    _wait_ready(state_dir, pid, export)

    made = functools.partial(
        BackendMount, connections=connections, nbdfuse_pid=pid, relay_socket=relay_socket
    )
    if mount_method != "loop":
        try:
            mount_erofs(image, mountpoint, export=export, undo=undo, direct_io=True)
            return made(image, image, "file-backed")
        except ErofsMountError as e:
            # ENOTBLK: this kernel's EROFS only mounts block devices (no file-backed mounts).
            if e.errno != errno.ENOTBLK or mount_method == "file-backed":
                raise
            log.info("this kernel cannot mount EROFS from a file; using a loop device")
    try:
        loop_device = mounts.loop_attach_readonly(image)
    except mounts.MountError as e:
        raise AttachError(f"cannot set up a loop device: {e.strerror}", export=export) from e
    push_undo(undo, mounts.loop_detach, loop_device)
    mount_erofs(loop_device, mountpoint, export=export, undo=undo)
    return made(image, loop_device, "loop", loop_device=loop_device)


def alive(state_dir: str, pid: int | None, relay: NBDRelay | None) -> bool:
    """Whether the processes of an attachment still run: nbdfuse and, if it has one, its
    relay. Neither can be replaced under a mounted file."""
    if pid is None or not _process.running(pid, fuse_dir(state_dir)):
        return False
    return relay is None or relay.is_running()


def nudge(image: str, connections: int) -> None:
    """Send a small direct read down each of nbdfuse's connections at once, in the
    background (:func:`settle` waits for them).

    When the server restarts, a relay connection finds out that its own connection to the
    server died only when a request comes, and then waits a second (the retry filter's
    delay, its least) before it reconnects. nbdfuse hands requests to its connections in
    turn, so reads that meet them one after another (a container starting) would pay that
    second once per connection. These reads, twice as many as the connections and all in
    flight together, make every connection reconnect now, together.
    """
    size = _BLOCK * 2 * connections

    def read(offset: int) -> None:
        buf = mmap.mmap(-1, _BLOCK)  # page-aligned, as O_DIRECT wants
        try:
            fd = os.open(image, os.O_RDONLY | os.O_DIRECT | os.O_CLOEXEC)
            try:
                os.preadv(fd, [buf], offset)
            finally:
                os.close(fd)
        except OSError as e:
            log.debug("a read to wake nbdfuse's connections failed: %s", e)
        finally:
            buf.close()

    def wake() -> None:
        readers = [
            threading.Thread(target=read, args=(offset,), daemon=True)
            for offset in range(0, size, _BLOCK)
        ]
        for reader in readers:
            reader.start()
        for reader in readers:
            reader.join()

    with _nudges_lock:
        if (earlier := _nudges.get(image)) is not None and earlier.is_alive():
            return
        waker = threading.Thread(target=wake, name="nbdfuse-nudge", daemon=True)
        _nudges[image] = waker
        waker.start()


def settle(image: str, timeout: float = READY_TIMEOUT) -> None:
    """Wait (up to ``timeout`` seconds) for the reads of a :func:`nudge` of ``image``:
    they hold the file open, which would keep it from being unmounted."""
    with _nudges_lock:
        waker = _nudges.pop(image, None)
    if waker is not None:
        waker.join(timeout)


def detach(
    state_dir: str,
    image: str,
    pid: int | None,
    loop_device: str | None,
    *,
    export: str,
    lazy: bool = False,
    related: Collection[str] = (),
    relay: NBDRelay | None = None,
) -> None:
    """Release what :func:`attach` set up once its EROFS mount is gone: the loop device
    (if it still shows ``image``), nbdfuse, its ``relay`` and their files.

    When only other mount namespaces still hold the layer (copies of its mounts made by
    ``unshare -m``, a container or a service with a private mount namespace), its FUSE
    directory is detached here and the FUSE connection ended, so that nbdfuse exits:
    reads through those copies fail from then on, and a warning names them. ``related``
    are the filesystems (``major:minor``: the layer's EROFS) whose copies count too.
    ``lazy``: the FUSE file may still be held (by an EROFS superblock that a container's
    overlay keeps alive): detach the FUSE directory at once and stop nbdfuse by force.
    """
    if loop_device is not None and mounts.loop_backing_file(loop_device) == image:
        # A loop device still open (by an EROFS mount elsewhere) is freed on its last close.
        mounts.loop_detach(loop_device)
    _stop(state_dir, pid, export=export, lazy=lazy, loop_device=loop_device, related=related)
    if relay is not None:
        relay.stop()
    _remove_files(state_dir)


def _spawn(
    nbdfuse: str, socket: str, export: str, image: str, state_dir: str, connections: int
) -> int:
    """Start nbdfuse detached from this process and return its pid.

    nbdfuse must outlive a restart of the daemon, like the mount it backs, so a throwaway
    shell starts it in the background: it is never our child and needs no reaping.
    """
    pidfile = os.path.join(state_dir, _PIDFILE)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(pidfile)
    # nbdfuse's --unix mode cannot name an export; the URI's path is the export name.
    uri = f"nbd+unix:///{quote(export, safe='')}?socket={quote(socket, safe='/')}"
    argv = [nbdfuse, "-r", "-C", str(connections), "-P", pidfile, image, uri]
    launcher = 'log=$1; shift; "$@" </dev/null >"$log" 2>&1 & echo $!'
    result = subprocess.run(
        ["/bin/sh", "-c", launcher, "sh", os.path.join(state_dir, _LOG), *argv],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        check=False,
        start_new_session=True,
    )
    if result.returncode != 0 or not result.stdout.strip().isdigit():
        raise AttachError(f"cannot start nbdfuse: {result.stderr.strip()}", export=export)
    return int(result.stdout.strip())


def _wait_ready(state_dir: str, pid: int, export: str) -> None:
    """Wait until nbdfuse writes its pid file, which it does once the FUSE file is ready."""
    pidfile = os.path.join(state_dir, _PIDFILE)
    marker = fuse_dir(state_dir)
    deadline = time.monotonic() + READY_TIMEOUT
    while True:
        with (
            contextlib.suppress(FileNotFoundError, ValueError),
            open(pidfile, encoding="ascii") as f,
        ):
            if int(f.read()) == pid:
                return
        if not _process.running(pid, marker):
            raise AttachError(
                f"nbdfuse exited before it was ready: {_log_tail(state_dir)}", export=export
            )
        if time.monotonic() > deadline:
            raise AttachError(
                f"nbdfuse was not ready after {READY_TIMEOUT:.0f} s: {_log_tail(state_dir)}",
                export=export,
            )
        time.sleep(POLL)


def _stop(
    state_dir: str,
    pid: int | None,
    *,
    export: str,
    lazy: bool = False,
    loop_device: str | None = None,
    related: Collection[str] = (),
) -> None:
    """Unmount nbdfuse's FUSE directory and wait for it to exit (kill it as a last resort)."""
    directory = fuse_dir(state_dir)
    entry = mounts.find_mount(directory)
    if entry is not None and (lazy or entry.fstype.startswith("fuse")):
        held = _unmount_fuse_dir(
            directory, export, lazy=lazy, pid=pid, loop_device=loop_device, related=related
        )
        # Unmounted, the FUSE connection ends and nbdfuse exits. Detached while held, the
        # connection lives as long as the mount does: end it, or failing that nbdfuse.
        ending = not held or (entry.fstype.startswith("fuse") and _abort_connection(entry))
        if pid is not None and ending and _process.wait_exit(pid, directory, _EXIT_TIMEOUT):
            return
    # Not mounted (it failed or never got ready) or it did not exit: stop it by force.
    if pid is None or not _process.running(pid, directory):
        return
    # Its /dev/fuse closed, the kernel ends the connection: reads through a mount that
    # is still held fail at once.
    _process.end(pid, directory, (signal.SIGTERM, signal.SIGKILL), _EXIT_TIMEOUT)
    # A killed nbdfuse may leave a dead FUSE mount behind ("transport endpoint is not
    # connected"), which still has to be unmounted.
    if mounts.find_mount(directory) is not None:
        _unmount_fuse_dir(directory, export, loop_device=loop_device, related=related)


def _unmount_fuse_dir(
    directory: str,
    export: str,
    *,
    lazy: bool = False,
    pid: int | None = None,
    loop_device: str | None = None,
    related: Collection[str] = (),
) -> bool:
    """Unmount nbdfuse's FUSE directory; whether it was detached while still held.

    Something in this mount namespace with the FUSE file open (other than nbdfuse
    ``pid`` and the attachment's ``loop_device``) makes it fail, naming them. Held only
    from outside (copies of the layer's mounts elsewhere), it is detached with a warning.
    Held by nothing found anywhere, it is tried again for a while first: right after the
    EROFS or loop device lets go of the file, the FUSE mount can still be busy for a
    moment.
    """
    if lazy:
        try:
            mounts.umount(directory, lazy=True)
        except mounts.MountError as e:
            raise AttachError(
                f"cannot detach nbdfuse's directory {directory}: {e.strerror}", export=export
            ) from e
        return True
    try:
        detached = mounts.unmount(
            directory,
            sole=True,
            ignore_pids=() if pid is None else (pid,),
            ignore_loops=() if loop_device is None else (loop_device,),
            related=related,
            settle=_EXIT_TIMEOUT,
        )
    except mounts.MountBusyError as e:
        raise AttachError(
            f"{e.message}: stop those processes or unmount what uses it", export=export
        ) from e
    except mounts.MountError as e:
        raise AttachError(
            f"cannot unmount nbdfuse's directory {directory}: {e.strerror}", export=export
        ) from e
    if detached is None:
        return False
    log.warning(
        "layer %s is %s; detached it here and stopped its nbdfuse: reads through those "
        "copies fail from now on",
        export,
        detached.describe(),
    )
    return True


def _abort_connection(entry: mounts.MountEntry) -> bool:
    """End the FUSE connection of the mount ``entry`` through fusectl: every request
    fails from now on and nbdfuse's read of /dev/fuse ends, so it exits. Whether it
    could (fusectl is not mounted everywhere)."""
    major, _, minor = entry.device.partition(":")
    if not (major.isdigit() and minor.isdigit()):
        return False
    # fusectl names a connection by the kernel's dev_t of its superblock.
    number = (int(major) << _MINOR_BITS) | int(minor)
    try:
        with open(os.path.join(_FUSECTL, str(number), "abort"), "w", encoding="ascii") as f:
            f.write("1")
    except OSError:
        return False
    log.info("aborted FUSE connection %d of %s", number, entry.mountpoint)
    return True


def _log_tail(state_dir: str) -> str:
    try:
        with open(os.path.join(state_dir, _LOG), encoding="utf-8", errors="replace") as f:
            text = f.read().strip()
    except FileNotFoundError:
        return "no output"
    return text[-2000:] or "no output"


def _require_tool(name: str, hint: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise AttachError(f"{name} not found: {hint}")
    return path


def _remove_files(state_dir: str) -> None:
    for name in (_PIDFILE, _LOG, NBDRelay.LOGFILE):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(state_dir, name))
    with contextlib.suppress(FileNotFoundError):
        os.rmdir(fuse_dir(state_dir))
