"""Write "newc" cpio archives, the format the kernel unpacks as an initramfs.

Written here rather than with cpio(1) so that building the VM test's initramfs needs no
extra tool and no root (device nodes are just archive entries).
"""

from __future__ import annotations

import stat
import struct
from typing import Protocol

# A newc header is the magic "070701" followed by 13 fields, each 8 ASCII hex digits:
# 6 inode, 14 mode, 22 uid, 30 gid, 38 nlink, 46 mtime, 54 file size, 62 dev major,
# 70 dev minor, 78 rdev major, 86 rdev minor, 94 name size (with its NUL), 102 check.
# The header and name are then padded to a multiple of 4 bytes, and so is the data.
NEWC_MAGIC = b"070701"
_FIELDS = struct.Struct("6s" + "8s" * 13)
TRAILER = "TRAILER!!!"


class Output(Protocol):
    """Where an archive goes: a binary file, a gzip stream, a BytesIO."""

    def write(self, data: bytes, /) -> object: ...


def _pad4(n: int) -> bytes:
    return b"\0" * (-n % 4)


class CpioWriter:
    """Appends entries to a newc archive; :meth:`close` writes the trailer.

    Entries need no particular order, but a directory must come before what is in it
    for the kernel to unpack the files into it; callers add parents first.
    """

    def __init__(self, out: Output) -> None:
        self._out = out
        self._inode = 0
        self._names: set[str] = set()

    def _entry(
        self,
        name: str,
        mode: int,
        data: bytes = b"",
        *,
        rdev: tuple[int, int] = (0, 0),
        mtime: int = 0,
    ) -> None:
        name = name.strip("/")
        if name in self._names:
            raise ValueError(f"duplicate cpio entry {name!r}")
        self._names.add(name)
        self._inode += 1
        encoded = name.encode() + b"\0"
        values = (
            self._inode,
            mode,
            0,  # uid
            0,  # gid
            2 if stat.S_ISDIR(mode) else 1,
            mtime,
            len(data),
            0,  # dev major
            0,  # dev minor
            rdev[0],
            rdev[1],
            len(encoded),
            0,  # check (only for the "070702" variant)
        )
        header = _FIELDS.pack(NEWC_MAGIC, *(b"%08X" % v for v in values))
        self._out.write(header + encoded + _pad4(len(header) + len(encoded)))
        self._out.write(data + _pad4(len(data)))

    def has(self, name: str) -> bool:
        return name.strip("/") in self._names

    def directory(self, name: str, mode: int = 0o755) -> None:
        """Add a directory and any missing parents."""
        parts = name.strip("/").split("/")
        for i in range(1, len(parts) + 1):
            path = "/".join(parts[:i])
            if path and not self.has(path):
                self._entry(path, stat.S_IFDIR | mode)

    def _parent(self, name: str) -> None:
        parent = name.strip("/").rpartition("/")[0]
        if parent:
            self.directory(parent)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        """Add a regular file (parents are created as needed)."""
        self._parent(name)
        self._entry(name, stat.S_IFREG | (mode & 0o7777), data)

    def symlink(self, name: str, target: str) -> None:
        self._parent(name)
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def char_device(self, name: str, major: int, minor: int, mode: int = 0o600) -> None:
        self._parent(name)
        self._entry(name, stat.S_IFCHR | mode, rdev=(major, minor))

    def close(self) -> None:
        """Write the trailer entry; the archive is complete."""
        self._entry(TRAILER, 0)
