"""Attach a layer's NBD export to the kernel and mount its EROFS image read-only.

Two backends get a block device (or a file) out of the NBD server:

- ``AttachMode.KERNEL_NBD`` (:mod:`blockfs.host.kernel_nbd`): ``/dev/nbdN`` configured over
  generic netlink with sockets blockfs has handshaken itself, so that it can set a long
  dead-connection timeout and later hand the same device fresh sockets when the server
  restarts (:func:`reconnect`).
- ``AttachMode.NBDFUSE`` (:mod:`blockfs.host.nbdfuse`): where nbd.ko is missing,
  ``nbdfuse`` exposes the export as one file, which is mounted directly (file-backed
  EROFS, Linux ≥ 6.12) or through a read-only loop device. nbdfuse reaches the server
  through a relay of its own that reconnects when the server restarts, so there is
  nothing for :func:`reconnect` to do.

Every attachment is described by an :class:`Attachment` that is also written to
``state_dir/attachment.json``, so that a restarted daemon can find and undo it.
"""

from __future__ import annotations

import contextlib
import enum
import json
import logging
import os
from typing import Any, Final, TypeAlias

import attrs

from blockfs.host import kernel_nbd, mounts, nbdfuse
from blockfs.host._attach_common import AttachError, BackendMount, MountMethod
from blockfs.host._nbdkit import NBDRelay
from blockfs.host.kernel_nbd import DEFAULT_DEAD_CONN_TIMEOUT, DEFAULT_REQUEST_TIMEOUT

__all__ = [
    "ATTACHMENT_FILE",
    "AUTO",
    "CHOICE_WORDS",
    "DEFAULT_DEAD_CONN_TIMEOUT",
    "DEFAULT_REQUEST_TIMEOUT",
    "AttachChoice",
    "AttachError",
    "AttachMode",
    "Attachment",
    "Auto",
    "MountMethod",
    "attach_and_mount",
    "backend_alive",
    "choose_mode",
    "is_mounted",
    "parse_choice",
    "parse_mode",
    "read_attachment",
    "reconnect",
    "unmount_and_detach",
]

log = logging.getLogger(__name__)

ATTACHMENT_FILE = "attachment.json"


class AttachMode(enum.Enum):
    """How an export reaches the kernel; the values are the configuration and CLI words."""

    KERNEL_NBD = "nbd"
    NBDFUSE = "nbdfuse"


class Auto(enum.Enum):
    """The attach choice that leaves the mode to :func:`choose_mode`, per host."""

    AUTO = "auto"


AUTO: Final = Auto.AUTO
# What a caller (a flag, the configuration) may ask for: a mode, or AUTO.
AttachChoice: TypeAlias = AttachMode | Auto
# The words of the choices, for flags and messages.
CHOICE_WORDS = tuple(choice.value for choice in (AUTO, *AttachMode))


def parse_choice(value: str) -> AttachChoice:
    """``"auto"``, ``"nbd"`` or ``"nbdfuse"`` (a flag's or the configuration's word) as
    the choice it names; AttachError for any other word."""
    if value == AUTO.value:
        return AUTO
    try:
        return AttachMode(value)
    except ValueError:
        raise AttachError(
            f"unknown attach mode {value!r}: use one of {', '.join(CHOICE_WORDS)}"
        ) from None


# The earlier name, which snapshotter/config.py still uses to check its ``attach`` key.
parse_mode = parse_choice


def choose_mode(requested: AttachChoice = AUTO) -> AttachMode:
    """The attach mode to use here: ``requested`` if it can work, else a clear AttachError.

    AUTO picks the kernel NBD driver when it is loaded or loadable, else nbdfuse.
    """
    if requested is AttachMode.KERNEL_NBD:
        if not kernel_nbd.available():
            raise AttachError(
                "attach mode nbd was requested but nbd.ko is not available "
                "(modprobe nbd failed or is missing): load the nbd module, "
                "or use attach mode nbdfuse"
            )
        return requested
    if requested is AttachMode.NBDFUSE:
        nbdfuse.require()
        return requested
    if kernel_nbd.available():
        return AttachMode.KERNEL_NBD
    if not nbdfuse.available():
        raise AttachError(
            "neither nbd.ko nor nbdfuse is available: load the nbd module, "
            "or install libnbd-bin and fuse3"
        )
    return AttachMode.NBDFUSE


@attrs.frozen(kw_only=True)
class Attachment(BackendMount):
    """One export attached and mounted: everything needed to find it again and undo it.

    What the backend made (:class:`BackendMount`: the device, what is mounted and how),
    and which export of which server it is, mounted where, with its state in which
    directory.
    """

    mode: AttachMode
    export: str
    socket: str
    state_dir: str
    mountpoint: str

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
        return kernel_nbd.device_index(self.device)

    @property
    def backend_identifier(self) -> str:
        """What the kernel remembers about the device's backend, checked on reconnect."""
        return kernel_nbd.backend_identifier(self.export)

    @property
    def relay(self) -> NBDRelay | None:
        """nbdfuse's relay to the server (None: kernel mode, or attached without one)."""
        if self.relay_socket is None:
            return None
        return NBDRelay(self.state_dir, self.socket, self.export)


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
    mode: AttachChoice = AUTO,
    dead_conn_timeout: int = DEFAULT_DEAD_CONN_TIMEOUT,
    connections: int | None = None,
    request_timeout: int = DEFAULT_REQUEST_TIMEOUT,
    mount_method: nbdfuse.FileMountMethod | None = None,
    relay: bool = True,
) -> Attachment:
    """Attach ``export`` served on the unix socket ``socket`` and mount it on ``mountpoint``.

    Returns once ``mountpoint`` is a read-only EROFS mount. ``state_dir`` is a private
    directory for this attachment. ``mode`` AUTO picks one for this host (a mode given is
    used as it is, without checking that this host has it). ``connections`` to the server
    default to the mode's own (``kernel_nbd.DEFAULT_CONNECTIONS``,
    ``nbdfuse.DEFAULT_CONNECTIONS``). In nbdfuse mode, ``mount_method`` forces the
    file-backed mount or the loop device (default: file-backed when the kernel supports
    it), and ``relay`` False connects nbdfuse to the server directly instead of through a
    relay that survives the server (for measurements). On failure everything done so far
    is undone.
    """
    if mode is AUTO:
        mode = choose_mode(AUTO)
    if connections is None:
        connections = (
            kernel_nbd.DEFAULT_CONNECTIONS
            if mode is AttachMode.KERNEL_NBD
            else nbdfuse.DEFAULT_CONNECTIONS
        )
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
    if read_attachment(state_dir) is not None or is_mounted(nbdfuse.fuse_dir(state_dir)):
        raise AttachError(
            f"{state_dir} still holds an earlier attachment: unmount and detach it first",
            export=export,
        )
    with contextlib.ExitStack() as undo:
        if mode is AttachMode.KERNEL_NBD:
            made = kernel_nbd.attach(
                socket,
                export,
                mountpoint,
                connections=connections,
                dead_conn_timeout=dead_conn_timeout,
                request_timeout=request_timeout,
                undo=undo,
            )
        else:
            made = nbdfuse.attach(
                socket,
                export,
                mountpoint,
                state_dir,
                connections=connections,
                mount_method=mount_method,
                undo=undo,
                relay=relay,
            )
        att = Attachment(
            mode=mode,
            export=export,
            socket=socket,
            state_dir=state_dir,
            mountpoint=mountpoint,
            **attrs.asdict(made),
        )
        _write_attachment(att)
        undo.pop_all()
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
    belongs to this attachment. Copies of the layer's mounts in other mount namespaces
    (``unshare -m``, containers, services with a private mount namespace) do not stop it:
    the layer is detached here, its device disconnected or its nbdfuse stopped, and
    reads through those copies fail from then on (a warning names them). Something in
    this mount namespace that still uses the layer (a process, an overlay stacked on it,
    another mount of it) makes it fail, naming them, before anything is undone.

    ``lazy`` is for an nbdfuse attachment that cannot serve any more (its nbdfuse or relay
    died, or it has no relay and its server died): whatever still holds the layer (a
    running container's overlay) keeps its broken view, while the mounts are detached at
    once (and freed when let go) and nbdfuse is stopped, so that the layer can be
    attached afresh on the same mountpoint.
    """
    if att.mode is AttachMode.NBDFUSE:
        nbdfuse.settle(att.device)  # reads that wake its connections hold the file open
    entry = mounts.find_mount(att.mountpoint)
    related: tuple[str, ...] = ()
    detached = None
    if entry is not None:
        if entry.source != att.mount_source:
            raise AttachError(
                f"{entry.source} ({entry.fstype}) is mounted there, not this attachment's "
                f"{att.mount_source}: unmount it by hand",
                export=att.export,
                mountpoint=att.mountpoint,
            )
        related = (entry.device,)
        try:
            if lazy:
                mounts.umount(att.mountpoint, lazy=True)
            else:
                detached = mounts.unmount(att.mountpoint, sole=True)
        except mounts.MountBusyError as e:
            raise AttachError(
                f"the layer is in use by {'; '.join(e.users)}: stop those processes "
                "or unmount what uses it",
                export=att.export,
                mountpoint=att.mountpoint,
            ) from e
        except mounts.MountError as e:
            raise AttachError(
                f"cannot unmount the layer: {e.strerror}",
                export=att.export,
                mountpoint=att.mountpoint,
            ) from e
        if detached is not None:
            log.warning(
                "layer %s mounted on %s is %s; detached it here: reads through those "
                "copies fail from now on",
                att.export,
                att.mountpoint,
                detached.describe(),
            )
    if att.mode is AttachMode.KERNEL_NBD:
        if related and detached is None:
            # Unmounted here outright, the layer may still be mounted through private
            # copies elsewhere, which the disconnect leaves reading errors: say so.
            held = mounts.Detached(att.mountpoint, tuple(mounts.copies_elsewhere(related)))
            if held.copies:
                log.warning(
                    "layer %s is %s; disconnected %s: reads through those copies fail from now on",
                    att.export,
                    held.describe(),
                    att.device,
                )
        kernel_nbd.detach(att.device, att.export)
    else:
        nbdfuse.detach(
            att.state_dir,
            att.device,
            att.nbdfuse_pid,
            att.loop_device,
            export=att.export,
            lazy=lazy,
            related=related,
            relay=att.relay,
        )
    with contextlib.suppress(FileNotFoundError):
        os.unlink(os.path.join(att.state_dir, ATTACHMENT_FILE))
    log.info("unmounted %s and detached export %s", att.mountpoint, att.export)


def backend_alive(att: Attachment) -> bool:
    """Whether the processes ``att`` needs still run: nbdfuse and its relay (nbdfuse mode;
    the kernel needs none). A dead one cannot be replaced under the mounted file."""
    if att.mode is AttachMode.KERNEL_NBD:
        return True
    return nbdfuse.alive(att.state_dir, att.nbdfuse_pid, att.relay)


def reconnect(att: Attachment, socket: str) -> Attachment:
    """Give the kernel fresh connections for ``att``'s device after the server restarted.

    The EROFS mount stays in place; I/O waiting for the dead connections resumes. Returns
    the attachment with the (possibly new) socket path, also recorded in ``state_dir``.

    An nbdfuse attachment's relay reconnects by itself: this checks that it can, i.e.
    that the relay and nbdfuse run and the server is back on the socket the relay
    forwards to, sends a read down each of nbdfuse's connections so that they all
    reconnect now rather than one by one as reads come (:func:`nbdfuse.nudge`, in the
    background), and returns ``att`` unchanged. AttachError if it cannot (or if it has
    no relay): then it has to be unmounted and attached again.
    """
    if att.mode is not AttachMode.KERNEL_NBD:
        if att.relay_socket is None:
            problem = "nbdfuse connects to the server itself, without a relay"
        elif socket != att.socket:
            problem = f"its relay forwards to {att.socket}, not {socket}"
        elif not backend_alive(att):
            problem = "its nbdfuse or relay is no longer running"
        else:
            nbdfuse.nudge(att.device, att.connections)
            log.info("export %s reconnects through its relay on %s", att.export, att.relay_socket)
            return att
        raise AttachError(
            f"the nbdfuse attachment cannot be reconnected: {problem}; unmount and attach it again",
            export=att.export,
            mountpoint=att.mountpoint,
        )
    used = kernel_nbd.reconnect(att.device, socket, att.export, att.connections)
    new = attrs.evolve(att, socket=socket, connections=used)
    _write_attachment(new)
    log.info("reconnected %s to export %s on %s", att.device, att.export, socket)
    return new


def _write_attachment(att: Attachment) -> None:
    path = os.path.join(att.state_dir, ATTACHMENT_FILE)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(att.to_json(), f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
