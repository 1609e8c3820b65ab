"""The shared libraries an ELF program or library asks the dynamic loader for, and where
in a layer the loader would find them.

A process that runs a program first has the loader open every library the program's
dynamic section names (``DT_NEEDED``), then those each of them names, one after another.
On a lazily fetched layer each is a page fault and a round trip in a chain; read from the
program's own bytes, they can all be asked for at once (see ``LayerImage``).

Everything here reads bytes from images, which may be hostile: every offset and count is
checked against the bytes at hand, and anything malformed gives "nothing known", never an
exception.
"""

from __future__ import annotations

import os
import re
import struct
import threading
from typing import Any

import attrs

from blockfs.image._extents import ExtentMap

ELF_MAGIC = b"\x7fELF"
_PT_LOAD, _PT_DYNAMIC, _PT_INTERP = 1, 2, 3
_DT_NULL, _DT_NEEDED, _DT_STRTAB, _DT_STRSZ = 0, 1, 5, 10
# Bounds on what the library fetch reads: real programs have about ten program headers
# (in the first few hundred bytes), a dynamic section of a few hundred entries and a few
# dozen libraries, each a file name (at most 255 bytes and its NUL).
HEAD_BYTES = 64 << 10
MAX_PROGRAM_HEADERS = 256
MAX_DYNAMIC_BYTES = 64 << 10
MAX_NEEDED = 256
NAME_BYTES = 256
# The longest interpreter path read (Linux's PATH_MAX, its NUL included).
PATH_BYTES = 4096

# Debian's multiarch directory names, by ELF machine (e_machine) and class.
_TRIPLETS = {
    (62, True): "x86_64-linux-gnu",
    (3, False): "i386-linux-gnu",
    (183, True): "aarch64-linux-gnu",
    (40, False): "arm-linux-gnueabihf",
    (243, True): "riscv64-linux-gnu",
    (21, True): "powerpc64le-linux-gnu",
    (22, True): "s390x-linux-gnu",
}
# The directories library_dirs names, for any machine: those LibraryFinder indexes.
_LIBRARY_DIR = re.compile(r"(usr/)?(local/)?lib(32|64)?(/[a-z0-9_]+-linux-[a-z0-9_]+)?")
_LIBRARY_PREFIXES = (b"lib", b"usr/lib", b"usr/local/lib", b"local/lib")


@attrs.frozen
class ElfLayout:
    """What an ELF file's header and program headers say about its dynamic linking."""

    is64: bool
    byte_order: str  # struct's "<" or ">"
    machine: int
    # Where its dynamic section is in the file, (offset, size); None for a static file.
    dynamic: tuple[int, int] | None
    # Where the path of its interpreter (the dynamic loader) is, (offset, size); None
    # for a library or a static program.
    interpreter: tuple[int, int] | None
    # Its PT_LOAD segments: (virtual address, file offset, size in the file).
    loads: tuple[tuple[int, int, int], ...]

    def file_offset(self, vaddr: int) -> int | None:
        """The file offset of virtual address ``vaddr``, if a loaded segment holds it."""
        for start, offset, size in self.loads:
            if start <= vaddr < start + size:
                return offset + vaddr - start
        return None


@attrs.frozen
class DynamicSection:
    """The entries of a dynamic section that name libraries."""

    needed: tuple[int, ...]  # offsets in the string table
    string_table: int  # virtual address
    string_table_size: int


def parse_layout(head: bytes) -> ElfLayout | None:
    """The layout of the ELF file that starts with ``head`` (its header and program
    headers must be in it), or None if it is not one or is malformed."""
    if len(head) < 52 or head[:4] != ELF_MAGIC or head[4] not in (1, 2) or head[5] not in (1, 2):
        return None
    is64 = head[4] == 2
    order = "<" if head[5] == 1 else ">"
    try:
        if is64:
            _, machine, _, _, phoff, _, _, _, phentsize, phnum = struct.unpack_from(
                order + "HHIQQQIHHH", head, 16
            )
            ph_format = order + "IIQQQQQQ"
        else:
            _, machine, _, _, phoff, _, _, _, phentsize, phnum = struct.unpack_from(
                order + "HHIIIIIHHH", head, 16
            )
            ph_format = order + "IIIIIIII"
        if phentsize < struct.calcsize(ph_format) or phnum > MAX_PROGRAM_HEADERS:
            return None
        if phoff + phnum * phentsize > len(head):
            return None
        dynamic = interpreter = None
        loads = []
        for k in range(phnum):
            fields = struct.unpack_from(ph_format, head, phoff + k * phentsize)
            if is64:
                p_type, _, offset, vaddr, _, filesz, _, _ = fields
            else:
                p_type, offset, vaddr, _, filesz, _, _, _ = fields
            if p_type == _PT_LOAD:
                loads.append((vaddr, offset, filesz))
            elif p_type == _PT_DYNAMIC:
                dynamic = (offset, filesz)
            elif p_type == _PT_INTERP:
                interpreter = (offset, filesz)
    except struct.error:
        return None
    return ElfLayout(is64, order, machine, dynamic, interpreter, tuple(loads))


def parse_dynamic(layout: ElfLayout, data: bytes) -> DynamicSection | None:
    """The library entries of the dynamic section ``data`` of a file of ``layout``, or
    None if it names no string table."""
    entry = struct.Struct(layout.byte_order + ("qQ" if layout.is64 else "iI"))
    needed: list[int] = []
    strtab = strsz = None
    for pos in range(0, len(data) - entry.size + 1, entry.size):
        tag, value = entry.unpack_from(data, pos)
        if tag == _DT_NULL:
            break
        if tag == _DT_NEEDED and len(needed) < MAX_NEEDED:
            needed.append(value)
        elif tag == _DT_STRTAB:
            strtab = value
        elif tag == _DT_STRSZ:
            strsz = value
    if strtab is None or strsz is None:
        return None
    return DynamicSection(tuple(needed), strtab, strsz)


def string_at(table: bytes, offset: int) -> str | None:
    """The NUL-terminated string at ``offset`` of a string table, if it is a plain file
    name (no path, nothing unprintable)."""
    end = table.find(b"\0", offset)
    if offset >= len(table) or end <= offset:
        return None
    name = table[offset:end].decode("utf-8", "replace")
    if "/" in name or not name.isprintable() or name in (".", ".."):
        return None
    return name


def interpreter_path(data: bytes) -> str | None:
    """The interpreter's path from the bytes of a ``PT_INTERP`` segment, if it is a plain
    absolute path (NUL-terminated, nothing unprintable)."""
    end = data.find(b"\0")
    if end <= 0:
        return None
    path = data[:end].decode("utf-8", "replace")
    if not path.startswith("/") or not path.isprintable():
        return None
    return path


@attrs.frozen
class LoaderNeeds:
    """What the dynamic loader opens to run an ELF file: its interpreter (an absolute
    path in the image; programs only), the libraries its dynamic section names, and the
    directories of the image where the loader looks for them, in its order."""

    interpreter: str | None
    needed: tuple[str, ...]
    dirs: tuple[str, ...]

    def to_json(self) -> dict[str, object]:
        return {
            "interpreter": self.interpreter,
            "needed": list(self.needed),
            "dirs": list(self.dirs),
        }

    @classmethod
    def from_json(cls, obj: Any) -> LoaderNeeds:
        """The needs that :meth:`to_json` wrote; ValueError if ``obj`` is not that."""
        try:
            interpreter, needed, dirs = obj["interpreter"], obj["needed"], obj["dirs"]
            if not (
                (interpreter is None or isinstance(interpreter, str))
                and all(isinstance(x, str) for x in [*needed, *dirs])
            ):
                raise TypeError
            return cls(interpreter, tuple(needed), tuple(dirs))
        except (KeyError, TypeError) as exc:
            raise ValueError(f"not a loader's needs: {obj!r:.200}") from exc


def library_dirs(layout: ElfLayout) -> tuple[str, ...]:
    """The layer directories where the loader looks for a library a file of ``layout``
    needs, in its order: the multiarch ones, then the classic ones (for its class)."""
    triplet = _TRIPLETS.get((layout.machine, layout.is64))
    multiarch = (f"lib/{triplet}", f"usr/lib/{triplet}") if triplet else ()
    classic = ("lib64", "usr/lib64") if layout.is64 else ("lib32", "usr/lib32")
    return (*multiarch, *classic, "lib", "usr/lib", "usr/local/lib")


class LibraryFinder:
    """Finds, among a layer's files, the library the loader would open for a name."""

    def __init__(self, extents: ExtentMap) -> None:
        self._extents = extents
        self._lock = threading.Lock()
        self._dirs: dict[str, dict[str, int]] | None = None

    def find(self, name: str, dirs: tuple[str, ...]) -> int | None:
        """The extent of the file ``name`` in the first of ``dirs`` that has it, or of its
        one versioned file there (``libz.so.1`` is mostly a symlink to ``libz.so.1.2.13``,
        which holds the data); None if no such file is in this layer."""
        index = self._index()
        for directory in dirs:
            files = index.get(directory)
            if not files:
                continue
            if name in files:
                return files[name]
            versioned = [i for base, i in files.items() if base.startswith(name + ".")]
            if len(versioned) == 1:
                return versioned[0]
        return None

    def _index(self) -> dict[str, dict[str, int]]:
        """The files of the layer's library directories, by directory and name (made on
        first use, from one pass over the layer's file names)."""
        with self._lock:
            if self._dirs is None:
                dirs: dict[str, dict[str, int]] = {}
                for i in range(self._extents.extent_count):
                    raw = self._extents.extent_name_bytes(i)
                    if not raw.startswith(_LIBRARY_PREFIXES):
                        continue  # most names of a large layer: not decoded
                    directory, base = os.path.split(raw.decode("utf-8", "surrogateescape"))
                    if _LIBRARY_DIR.fullmatch(directory):
                        dirs.setdefault(directory, {})[base] = i
                self._dirs = dirs
            return self._dirs
