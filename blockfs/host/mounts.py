"""mount(2), umount2(2), /proc/self/mountinfo and read-only loop devices, without mount(8).

util-linux's mount(8) silently puts a file on a loop device, which hides whether the
kernel's file-backed EROFS mount worked; calling the syscall directly keeps the choice
ours.

:func:`unmount` takes a mount away from this mount namespace even when other mount
namespaces hold copies of it. A new mount namespace (``unshare -m``, a container, a
systemd service with ``PrivateTmp=``) starts with a copy of every mount, whatever its
propagation (private and unbindable ones too); propagation only decides whether later
mounts and unmounts travel between the copies, and ``unshare -m`` cuts that tie at once
(``--propagation private``). Such a copy keeps the filesystem alive, so what lies under it
(nbdfuse's FUSE mount under an EROFS layer) stays busy here. When nothing in this
namespace uses a mount, :func:`unmount` therefore detaches it (``MNT_DETACH``) rather than
fail; when something here does, it names the processes and mounts.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import struct
import time
from collections.abc import Collection, Iterator

import attrs

from blockfs.errors import BlockfsError

MS_RDONLY = 1
MNT_DETACH = 2

# include/uapi/linux/loop.h
LOOP_CLR_FD = 0x4C01
LOOP_CONFIGURE = 0x4C0A
LOOP_CTL_GET_FREE = 0x4C82
LO_FLAGS_READ_ONLY = 1
LO_NAME_SIZE = 64

# struct loop_config, 304 bytes: 0 backing fd (u32), 4 logical block size (u32, 0 =
# default), 8 struct loop_info64 (232 bytes: 8 lo_device, 16 lo_inode, 24 lo_rdevice,
# 32 lo_offset, 40 lo_sizelimit, 48 lo_number, 52 lo_encrypt_type, 56 lo_encrypt_key_size,
# 60 lo_flags, 64 lo_file_name[64], 128 lo_crypt_name[64], 192 lo_encrypt_key[32],
# 224 lo_init[2]), 240 reserved (8 u64).
LOOP_CONFIG = struct.Struct("=II5Q4I64s64s32s2Q64x")

_LIBC = ctypes.CDLL(None, use_errno=True)
_LIBC.mount.argtypes = [
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_ulong,
    ctypes.c_char_p,
]
_LIBC.mount.restype = ctypes.c_int
_LIBC.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_LIBC.umount2.restype = ctypes.c_int

# Another process may take the free loop device we were given before we configure it.
_LOOP_ATTEMPTS = 20

# How many users or copies a message names, and how many uses of one process.
_SHOWN = 8
_USES_SHOWN = 3
# overlayfs options that name directories of its layers.
_OVERLAY_DIR_OPTIONS = ("lowerdir", "lowerdir+", "upperdir", "workdir", "datadir+")
# How often unmount tries again while a mount is busy for no reason it can see.
_RETRY = 0.1


class MountError(BlockfsError, OSError):
    """A mount, unmount or loop-device call failed; ``errno`` says why."""

    def __init__(self, errno_: int, message: str) -> None:
        text = f"{message}: {os.strerror(errno_)}"
        OSError.__init__(self, errno_, text)
        self.message = text


class MountBusyError(MountError):
    """A mount cannot be taken away: something in this mount namespace uses it.

    ``users`` describes each process or mount that does (``pid 12 (bash): working
    directory /mnt/x``), for the user to stop or unmount before trying again.
    """

    def __init__(self, target: str, users: Collection[str]) -> None:
        self.target = target
        self.users = tuple(users)
        shown = list(self.users[:_SHOWN])
        if len(self.users) > _SHOWN:
            shown.append(f"and {len(self.users) - _SHOWN} more")
        text = f"cannot unmount {target}: it is in use by {'; '.join(shown)}"
        OSError.__init__(self, errno.EBUSY, text)
        self.message = text


def mount(source: str, target: str, fstype: str, flags: int = 0, data: str | None = None) -> None:
    """mount(2): mount ``source`` on ``target`` as ``fstype``."""
    result = _LIBC.mount(
        os.fsencode(source),
        os.fsencode(target),
        fstype.encode(),
        flags,
        None if data is None else data.encode(),
    )
    if result != 0:
        err = ctypes.get_errno()
        raise MountError(err, f"cannot mount {source} on {target} as {fstype}")


def umount(target: str, *, lazy: bool = False) -> None:
    """umount2(2); ``lazy`` detaches now and cleans up when the mount is no longer busy."""
    if _LIBC.umount2(os.fsencode(target), MNT_DETACH if lazy else 0) != 0:
        err = ctypes.get_errno()
        raise MountError(err, f"cannot unmount {target}")


@attrs.frozen
class MountEntry:
    """One line of /proc/self/mountinfo."""

    mount_id: int
    mountpoint: str
    mount_options: tuple[str, ...]
    fstype: str
    source: str
    super_options: tuple[str, ...]
    # major:minor of the filesystem: the same for every mount of it (bind mounts, and the
    # copies other mount namespaces hold), and unique on the host.
    device: str = ""

    @property
    def read_only(self) -> bool:
        return "ro" in self.mount_options


def _unescape(field: str) -> str:
    # The kernel writes space, tab, newline and backslash in paths as octal escapes.
    out: list[str] = []
    i = 0
    while i < len(field):
        if field[i] == "\\" and i + 3 < len(field) and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def parse_mountinfo(text: str) -> list[MountEntry]:
    """The entries of a mountinfo file, in mount order."""
    entries: list[MountEntry] = []
    for line in text.splitlines():
        fields = line.split(" ")
        if len(fields) < 10 or "-" not in fields[6:]:
            continue
        sep = fields.index("-", 6)
        entries.append(
            MountEntry(
                mount_id=int(fields[0]),
                mountpoint=_unescape(fields[4]),
                mount_options=tuple(fields[5].split(",")),
                fstype=fields[sep + 1],
                source=_unescape(fields[sep + 2]),
                super_options=tuple(fields[sep + 3].split(",")),
                device=fields[2],
            )
        )
    return entries


def read_mountinfo() -> list[MountEntry]:
    """This process's mounts."""
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        return parse_mountinfo(f.read())


def find_mount(path: str) -> MountEntry | None:
    """The topmost mount whose mount point is ``path`` (after resolving symlinks)."""
    real = os.path.realpath(path)
    found = None
    for entry in read_mountinfo():
        if entry.mountpoint == real:
            found = entry
    return found


def loop_attach_readonly(path: str) -> str:
    """Attach ``path`` to a free loop device, read-only; returns ``/dev/loopN``."""
    backing = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        control = os.open("/dev/loop-control", os.O_RDWR | os.O_CLOEXEC)
        try:
            for _ in range(_LOOP_ATTEMPTS):
                number = fcntl.ioctl(control, LOOP_CTL_GET_FREE)
                device = f"/dev/loop{number}"
                if _loop_configure(device, backing, path):
                    return device
        finally:
            os.close(control)
    finally:
        os.close(backing)
    raise MountError(errno.EBUSY, f"cannot find a free loop device for {path}")


def _loop_configure(device: str, backing: int, path: str) -> bool:
    name = os.fsencode(path)[: LO_NAME_SIZE - 1]
    config = LOOP_CONFIG.pack(
        backing, 0, 0, 0, 0, 0, 0, 0, 0, 0, LO_FLAGS_READ_ONLY, name, b"", b"", 0, 0
    )
    fd = _open_new_device(device)
    try:
        fcntl.ioctl(fd, LOOP_CONFIGURE, config)
    except OSError as e:
        if e.errno == errno.EBUSY:
            return False  # taken by someone else between GET_FREE and CONFIGURE
        raise MountError(e.errno or errno.EIO, f"cannot attach {path} to {device}") from None
    finally:
        os.close(fd)
    return True


def _open_new_device(device: str) -> int:
    # devtmpfs creates the node of a just-allocated loop device asynchronously.
    deadline = time.monotonic() + 5
    while True:
        try:
            return os.open(device, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def loop_detach(device: str) -> None:
    """Detach a loop device; nothing happens if it is already free or gone."""
    try:
        fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    try:
        fcntl.ioctl(fd, LOOP_CLR_FD)
    except OSError as e:
        if e.errno != errno.ENXIO:  # ENXIO: not attached
            raise MountError(e.errno or errno.EIO, f"cannot detach {device}") from None
    finally:
        os.close(fd)


def loop_backing_file(device: str) -> str | None:
    """The file behind a loop device, or None when it is not attached."""
    name = os.path.basename(device)
    try:
        with open(f"/sys/block/{name}/loop/backing_file", encoding="utf-8") as f:
            return f.read().rstrip("\n")
    except (FileNotFoundError, NotADirectoryError):
        return None


# ---------------------------------------------------------------------------------------
# Unmounting what other mount namespaces may hold copies of.


@attrs.frozen
class NamespaceCopy:
    """Mounts of a filesystem in another mount namespace, and some processes there."""

    namespace: str  # mnt:[4026532…], as /proc/PID/ns/mnt reads
    processes: tuple[tuple[int, str], ...]  # (pid, command), a few of them
    mountpoints: tuple[str, ...]

    def describe(self) -> str:
        who = ", ".join(f"pid {pid} ({command})" for pid, command in self.processes)
        return f"{who} in mount namespace {self.namespace}"


@attrs.frozen
class Detached:
    """A mount that :func:`unmount` detached lazily: it is gone from this mount namespace,
    and the kernel frees it once whatever outside this namespace holds it lets go."""

    target: str
    copies: tuple[NamespaceCopy, ...]

    def describe(self) -> str:
        """What holds it, for a warning: ``held by copies of its mounts in …``."""
        if not self.copies:
            return (
                "still busy though nothing in this mount namespace uses it (a mount "
                "namespace without processes, or a detached mount, may hold a copy)"
            )
        shown = [copy.describe() for copy in self.copies[:_SHOWN]]
        if len(self.copies) > _SHOWN:
            shown.append(f"and {len(self.copies) - _SHOWN} more")
        return f"held by copies of its mounts in other mount namespaces: {'; '.join(shown)}"


def unmount(
    target: str,
    *,
    sole: bool = False,
    ignore_pids: Collection[int] = (),
    ignore_loops: Collection[str] = (),
    related: Collection[str] = (),
    settle: float = 0.0,
) -> Detached | None:
    """Take the mount on ``target`` away from this mount namespace, even when other
    mount namespaces hold copies of it.

    Returns None when it was unmounted outright (umount propagates to copies that are
    still peers or slaves of it), or a :class:`Detached` when it was busy only because of
    something outside this namespace and was detached (``MNT_DETACH``). Raises
    MountBusyError naming them when something in this namespace uses it: a process
    (working or root directory, open or mapped file at or below ``target``; the pids in
    ``ignore_pids`` excepted), an overlay stacked on a directory in it, a mount below it,
    a loop device backed by a file in it (the devices in ``ignore_loops`` excepted), and
    with ``sole`` (the filesystem is this mount's alone: an EROFS layer, an image's
    overlay, a FUSE mount) another mount of the same filesystem. overlayfs holds private
    clones of its layers, so umount2 alone would let such an overlay go unnoticed, and a
    bind mount elsewhere keeps the filesystem alive.

    ``related`` are further filesystems (``major:minor``) whose copies elsewhere explain
    why ``target`` is busy (an EROFS mounted from a file in it). When it is busy and no
    copy is found, it is tried again for up to ``settle`` seconds (what releases a file
    can take a moment) before it is detached. Nothing mounted on ``target``: None.
    """
    entry = find_mount(target)
    if entry is None:
        return None
    users = mount_users(entry, sole=sole, ignore_loops=ignore_loops)
    if users:
        raise MountBusyError(entry.mountpoint, users)
    devices = {entry.device, *related}
    deadline = time.monotonic() + settle
    copies: list[NamespaceCopy] | None = None
    while True:
        try:
            umount(entry.mountpoint)
            return None
        except MountError as e:
            if e.errno != errno.EBUSY:
                raise
        if copies is None or time.monotonic() >= deadline:
            # The first time and the last: who makes it busy?
            users = [use.describe() for use in processes_using(entry.mountpoint, ignore_pids)]
            users += mount_users(entry, sole=sole, ignore_loops=ignore_loops)
            if users:
                raise MountBusyError(entry.mountpoint, users)
            copies = copies_elsewhere(devices)
            if copies or time.monotonic() >= deadline:
                break
        time.sleep(_RETRY)
    umount(entry.mountpoint, lazy=True)
    return Detached(entry.mountpoint, tuple(copies))


def mount_users(
    entry: MountEntry, *, sole: bool = False, ignore_loops: Collection[str] = ()
) -> list[str]:
    """What in this mount namespace uses the filesystem mounted as ``entry``, apart from
    processes: overlays on directories in it, mounts below it, loop devices backed by
    files in it (except ``ignore_loops``), and with ``sole`` (nothing but ``entry`` should
    mount the filesystem) other mounts of it."""
    top = entry.mountpoint
    users: list[str] = []
    for other in read_mountinfo():
        if other.mount_id == entry.mount_id:
            continue
        if sole and other.device == entry.device:
            users.append(f"the same filesystem is also mounted on {other.mountpoint}")
        elif _below(other.mountpoint, top) and other.mountpoint != top:
            users.append(f"{other.fstype} is mounted on {other.mountpoint} below it")
        elif other.fstype == "overlay" and any(_below(d, top) for d in _overlay_dirs(other)):
            users.append(f"the overlay mounted on {other.mountpoint} stacks a directory in it")
    ignored = {os.path.realpath(device) for device in ignore_loops}
    for loop in sorted(os.listdir("/sys/block")):
        if not loop.startswith("loop") or f"/dev/{loop}" in ignored:
            continue
        backing = loop_backing_file(f"/dev/{loop}")
        if backing is not None and _below(backing, top):
            users.append(f"/dev/{loop} is backed by {backing}")
    return users


@attrs.frozen
class ProcessUse:
    """A process of this mount namespace with files at or below some path."""

    pid: int
    command: str
    uses: tuple[str, ...]  # "working directory /mnt/x", "open file /mnt/x/a", …

    def describe(self) -> str:
        shown = list(self.uses[:_USES_SHOWN])
        if len(self.uses) > _USES_SHOWN:
            shown.append("…")
        this = ", this command" if self.pid == os.getpid() else ""
        return f"pid {self.pid} ({self.command}{this}): {', '.join(shown)}"


def processes_using(path: str, ignore_pids: Collection[int] = ()) -> list[ProcessUse]:
    """Processes of this mount namespace whose working directory, root directory, open
    files or mapped files are at or below ``path``.

    Only readlink and /proc text files are read, never the files themselves, so a dead
    FUSE mount cannot make this hang.
    """
    own = mount_namespace()
    found = []
    for pid in _pids():
        if pid in ignore_pids or mount_namespace(pid) != own:
            continue
        uses = list(_uses(pid, path))
        if uses:
            found.append(ProcessUse(pid, _command(pid), tuple(uses)))
    return found


def copies_elsewhere(devices: Collection[str]) -> list[NamespaceCopy]:
    """Mounts of the filesystems ``devices`` (``major:minor``) in other mount namespaces
    than this one, per namespace that has a process."""
    own = mount_namespace()
    namespaces: dict[str, list[int]] = {}
    for pid in _pids():
        namespace = mount_namespace(pid)
        if namespace is not None and namespace != own:
            namespaces.setdefault(namespace, []).append(pid)
    copies = []
    for namespace, pids in namespaces.items():
        for pid in pids:
            try:
                with open(
                    f"/proc/{pid}/mountinfo", encoding="utf-8", errors="surrogateescape"
                ) as f:
                    entries = parse_mountinfo(f.read())
            except OSError:
                continue  # it exited: ask another process of the namespace
            places = tuple(e.mountpoint for e in entries if e.device in devices)
            if places:
                processes = tuple((p, _command(p)) for p in pids[:_USES_SHOWN])
                copies.append(NamespaceCopy(namespace, processes, places))
            break
    return copies


def mount_namespace(pid: int | str = "self") -> str | None:
    """The mount namespace of ``pid`` (``mnt:[4026531841]``), or None if it is gone."""
    try:
        return os.readlink(f"/proc/{pid}/ns/mnt")
    except OSError:
        return None


def _pids() -> list[int]:
    return sorted(int(name) for name in os.listdir("/proc") if name.isdigit())


def _command(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm", encoding="utf-8", errors="replace") as f:
            return f.read().strip()
    except OSError:
        return "?"


def _uses(pid: int, path: str) -> Iterator[str]:
    for link, what in (("cwd", "working directory"), ("root", "root directory")):
        target = _readlink(f"/proc/{pid}/{link}")
        if target is not None and _below(target, path):
            yield f"{what} {target}"
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        fds = []
    for fd in fds:
        target = _readlink(f"/proc/{pid}/fd/{fd}")
        if target is not None and _below(target, path):
            yield f"open file {target}"
    mapped = set()
    try:
        with open(f"/proc/{pid}/maps", encoding="utf-8", errors="surrogateescape") as f:
            for line in f:
                fields = line.rstrip("\n").split(maxsplit=5)
                if len(fields) == 6 and _below(fields[5], path) and fields[5] not in mapped:
                    mapped.add(fields[5])
                    yield f"mapped file {fields[5]}"
    except OSError:
        pass


def _readlink(path: str) -> str | None:
    try:
        return os.readlink(path)
    except OSError:
        return None


def _below(path: str, top: str) -> bool:
    """Whether ``path`` is ``top`` or inside it (a deleted file's path too)."""
    path = path.removesuffix(" (deleted)")
    return path == top or path.startswith(top.rstrip("/") + "/")


def _overlay_dirs(entry: MountEntry) -> list[str]:
    dirs = []
    for option in entry.super_options:
        key, _, value = option.partition("=")
        if key in _OVERLAY_DIR_OPTIONS:
            dirs += [d for d in value.split(":") if d]
    return dirs
