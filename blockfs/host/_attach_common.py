"""What both attach backends (:mod:`blockfs.host.kernel_nbd`, :mod:`blockfs.host.nbdfuse`)
share: the error they raise, the EROFS mount that ends every attach, and the wording of
the NBD server's failures.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
from collections.abc import Callable
from typing import Literal, ParamSpec

import attrs

from blockfs.errors import BlockfsError
from blockfs.host import _handshake, mounts

log = logging.getLogger(__name__)

P = ParamSpec("P")

# How long a device or an nbdfuse process may take to become ready, and how often to look.
READY_TIMEOUT = 30.0
# EROFS's mount option for reading a backing file with direct I/O (file-backed mounts).
DIRECT_IO = "directio"
POLL = 0.02

# How EROFS is mounted: on the nbd device, on the nbdfuse file, or on a loop device over it.
MountMethod = Literal["block", "file-backed", "loop"]


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


@attrs.frozen
class BackendMount:
    """What a backend attached and mounted: its part of an attachment's record.

    ``device`` is ``/dev/nbdN`` or the nbdfuse file; ``mount_source`` is what is mounted
    (the device, the file, or the loop device in front of the file). ``relay_socket`` is
    where nbdfuse's relay listens (None: attached through the kernel, or by an earlier
    version whose nbdfuse connected to the server directly).
    """

    device: str
    mount_source: str
    mount_method: MountMethod = attrs.field(
        validator=attrs.validators.in_(("block", "file-backed", "loop"))
    )
    connections: int = 1
    nbdfuse_pid: int | None = None
    loop_device: str | None = None
    relay_socket: str | None = None


class ErofsMountError(AttachError):
    """The kernel refused to mount an export's image as EROFS; ``errno`` says why."""

    def __init__(
        self, source: str, cause: mounts.MountError, *, export: str, mountpoint: str
    ) -> None:
        reason = os.strerror(cause.errno) if cause.errno else str(cause)
        super().__init__(
            f"cannot mount {source} as EROFS: {reason} (is the export an EROFS image?)",
            export=export,
            mountpoint=mountpoint,
        )
        self.errno: int | None = cause.errno


def push_undo(
    undo: contextlib.ExitStack, step: Callable[P, object], *args: P.args, **kwargs: P.kwargs
) -> None:
    """Push ``step(*args, **kwargs)`` onto ``undo``, the reversal of an attach in progress.

    A step that fails is logged and the rest still run: the error that made the attach
    fail is the one worth raising.
    """

    def run() -> None:
        try:
            step(*args, **kwargs)
        except Exception:
            log.exception("cleanup step %s failed", getattr(step, "__name__", step))

    undo.callback(run)


def mount_erofs(
    source: str,
    mountpoint: str,
    *,
    export: str,
    undo: contextlib.ExitStack,
    direct_io: bool = False,
) -> None:
    """Mount ``source`` (a block device, or a file where the kernel can) read-only as EROFS
    on ``mountpoint``; ``undo`` gets the unmount.

    ``direct_io`` (a file-backed mount): EROFS reads its file with direct I/O, where its
    ``directio`` option exists. Through the file's page cache, whose readahead takes the
    image's blocks in order once reads look sequential, a read of a file would also read
    the files after it in the image, each a fetch from the registry; with direct I/O,
    each read is what EROFS asks for, within the file read (its own readahead stops at
    the file's end), as on a block device.
    """
    try:
        try:
            mounts.mount(
                source, mountpoint, "erofs", mounts.MS_RDONLY, DIRECT_IO if direct_io else None
            )
        except mounts.MountError as e:
            if not direct_io or e.errno != errno.EINVAL:
                raise
            # An EROFS without the option: the file's page cache reads ahead.
            log.info("EROFS has no %s option here: %s is read through its page cache",
                     DIRECT_IO, source)  # fmt: skip
            mounts.mount(source, mountpoint, "erofs", mounts.MS_RDONLY)
    except mounts.MountError as e:
        raise ErofsMountError(source, e, export=export, mountpoint=mountpoint) from e
    push_undo(undo, mounts.umount, mountpoint)


def server_unreachable(socket: str, export: str, e: OSError) -> AttachError:
    """The error for an NBD server that does not answer on ``socket``."""
    return AttachError(
        f"cannot connect to the NBD server at {socket}: {e.strerror or e} "
        "(is the blockfs NBD server running?)",
        export=export,
    )


def handshake_failed(socket: str, e: _handshake.HandshakeError) -> AttachError:
    """The error for an NBD handshake that failed (an unknown export, say)."""
    if isinstance(e, _handshake.ExportNotFoundError):
        return AttachError(
            f"export not found on the NBD server at {socket} (is the layer being served?)",
            export=e.export,
        )
    return AttachError(f"NBD handshake with {socket} failed: {e.message}", export=e.export)
