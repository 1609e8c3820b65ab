"""mount(2), umount2(2), /proc/self/mountinfo and read-only loop devices, without mount(8).

util-linux's mount(8) silently puts a file on a loop device, which hides whether the
kernel's file-backed EROFS mount worked; calling the syscall directly keeps the choice
ours.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import struct
import time

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


class MountError(BlockfsError, OSError):
    """A mount, unmount or loop-device call failed; ``errno`` says why."""

    def __init__(self, errno_: int, message: str) -> None:
        text = f"{message}: {os.strerror(errno_)}"
        OSError.__init__(self, errno_, text)
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
