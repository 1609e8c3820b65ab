"""The builder's input side: decompress a layer tar, list its entries, and put them in order.

A layer arrives as a plain, gzip or zstd tar stream. It is decompressed into a temporary
file (a plain tar in a seekable file is used where it is) so that the writer can visit
entries in a different order than the input's and read each payload by offset. Nothing
here holds more than a bounded piece of a payload in memory.
"""

from __future__ import annotations

import contextlib
import posixpath
import tarfile
import tempfile
from collections.abc import Iterator
from typing import IO

import attrs
import zstandard
from isal import isal_zlib

from blockfs.estargz._compression import GZIP_WBITS, InflateError
from blockfs.estargz._errors import BuildError
from blockfs.estargz._model import LANDMARKS, TOC_TAR_NAME, EntryType
from blockfs.estargz._toc import clean_name

_GZIP_MAGIC = b"\x1f\x8b\x08"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_BLOCK = tarfile.BLOCKSIZE
# PAX records carrying extended attributes, as GNU tar, bsdtar and Go write them.
XATTR_PREFIX = "SCHILY.xattr."
# Size of the pieces read from the input and of each decompressed piece written out.
IO_PIECE = 1 << 20
# zstd can expand a few bytes into 128 KiB (an RLE block), and its decompressor object
# returns everything a call produces: feeding it 1 KiB at a time caps one call's output
# at about 32 MiB even for a "zstd bomb".
_ZSTD_FEED = 1024

_TYPES: dict[bytes, EntryType] = {
    tarfile.REGTYPE: "reg",
    tarfile.AREGTYPE: "reg",
    tarfile.CONTTYPE: "reg",
    tarfile.LNKTYPE: "hardlink",
    tarfile.SYMTYPE: "symlink",
    tarfile.CHRTYPE: "char",
    tarfile.BLKTYPE: "block",
    tarfile.DIRTYPE: "dir",
    tarfile.FIFOTYPE: "fifo",
}


@attrs.frozen
class InputEntry:
    """One entry of the input tar: its parsed header, its TOC type and where its payload is.

    ``key`` is the cleaned name (no leading ``/`` or ``./``, no trailing ``/``) under which
    duplicates and prioritized names are matched, as the reference builder does.
    """

    info: tarfile.TarInfo
    type: EntryType
    key: str

    @property
    def data_offset(self) -> int:
        """Offset of the payload in the decompressed input."""
        return self.info.offset_data

    @property
    def size(self) -> int:
        """Payload size in bytes (0 for anything but a regular file)."""
        return self.info.size if self.type == "reg" else 0


@attrs.frozen
class OrderedEntries:
    """The input's entries in blob order, split where the landmark goes."""

    prioritized: tuple[InputEntry, ...]
    rest: tuple[InputEntry, ...]
    missed: tuple[str, ...]


@contextlib.contextmanager
def decompressed_tar(src: IO[bytes], tmpdir: str | None) -> Iterator[IO[bytes]]:
    """A seekable file holding the plain tar of ``src`` (gzip, zstd or plain input).

    A plain tar that is already seekable is used in place; anything else is decompressed
    into an anonymous temporary file in ``tmpdir``, which disappears on exit.
    """
    head = _read_some(src, len(_ZSTD_MAGIC))
    if not head.startswith((_GZIP_MAGIC, _ZSTD_MAGIC)) and _seekable(src):
        src.seek(-len(head), 1)
        yield src
        return
    with tempfile.TemporaryFile(dir=tmpdir, prefix="blockfs-build-") as tmp:
        if head.startswith(_GZIP_MAGIC):
            _gunzip(head, src, tmp)
        elif head.startswith(_ZSTD_MAGIC):
            _unzstd(head, src, tmp)
        else:
            tmp.write(head)
            while piece := src.read(IO_PIECE):
                tmp.write(piece)
        tmp.flush()
        tmp.seek(0)
        yield tmp


def _seekable(f: IO[bytes]) -> bool:
    try:
        return f.seekable()
    except (AttributeError, OSError):
        return False


def _read_some(src: IO[bytes], n: int) -> bytes:
    """Up to ``n`` bytes; fewer only at the end of the stream."""
    data = b""
    while len(data) < n:
        piece = src.read(n - len(data))
        if not piece:
            break
        data += piece
    return data


def _gunzip(head: bytes, src: IO[bytes], out: IO[bytes]) -> None:
    # A gzip file may hold several members, possibly followed by zero padding. Output of
    # each call is capped so that a small, highly compressed input cannot blow up memory.
    d: isal_zlib.Decompress | None = None
    data = head
    try:
        while True:
            if not data:
                data = src.read(IO_PIECE)
                if not data:
                    break
            if d is None:
                data = data.lstrip(b"\0")
                if not data:
                    continue
                d = isal_zlib.decompressobj(GZIP_WBITS)
            out.write(d.decompress(data, IO_PIECE))
            if d.eof:
                data, d = d.unused_data, None
            else:
                data = d.unconsumed_tail
        if d is not None:
            out.write(d.flush())
    except InflateError as e:
        raise BuildError(f"gzip input is corrupt: {e}") from None
    if d is not None and not d.eof:
        raise BuildError("gzip input is truncated: its last member has no end")


def _unzstd(head: bytes, src: IO[bytes], out: IO[bytes]) -> None:
    dctx = zstandard.ZstdDecompressor()
    d = None
    buf = memoryview(head)
    pos = 0
    try:
        while True:
            if pos >= len(buf):
                buf, pos = memoryview(src.read(IO_PIECE)), 0
                if not buf:
                    break
            if d is None:
                d = dctx.decompressobj()
            out.write(d.decompress(buf[pos : pos + _ZSTD_FEED]))
            pos += _ZSTD_FEED
            if d.eof:
                rest = d.unused_data
                if rest:
                    buf, pos = memoryview(rest + bytes(buf[pos:])), 0
                d = None
    except zstandard.ZstdError as e:
        raise BuildError(f"zstd input is corrupt: {e}") from None
    if d is not None:
        raise BuildError("zstd input is truncated: its last frame has no end")


def read_entries(tar: IO[bytes]) -> list[InputEntry]:
    """Every entry of the plain tar in ``tar``, in input order, checked for what a blob can hold.

    Refuses (BuildError) entry types that a TOC cannot describe, sparse files, names that
    are not UTF-8, and archives that are truncated or corrupt in the middle.
    """
    start = tar.tell()
    end = tar.seek(0, 2)
    tar.seek(start)
    if end == start:
        return []  # an empty stream is an empty archive, as for the reference
    entries: list[InputEntry] = []
    try:
        tf = tarfile.TarFile(fileobj=tar, mode="r", encoding="utf-8", errors="surrogateescape")
        for info in tf:
            entries.append(_input_entry(info))
        stop = tf.offset
    except tarfile.TarError as e:
        raise BuildError(f"input is not a valid tar archive: {e}", offset=_where(tar)) from None
    # tarfile ends its listing quietly at a bad or partial header after the first entry,
    # and at a single zero block. A well-formed archive ends at the end of the data or at
    # two zero blocks (or one, at the very end, as a few writers leave it).
    tar.seek(stop)
    tail = tar.read(2 * _BLOCK)
    if tail[:_BLOCK] and tail[:_BLOCK] != bytes(_BLOCK):
        raise BuildError(
            "input tar is truncated or corrupt: invalid header" if len(tail) >= _BLOCK else
            "input tar is truncated: partial header at its end",
            offset=stop,
        )  # fmt: skip
    if tail[_BLOCK:] and tail[_BLOCK:] != bytes(len(tail) - _BLOCK):
        raise BuildError("input tar has a lone zero block before more entries", offset=stop)
    return entries


def _where(f: IO[bytes]) -> int | None:
    try:
        return f.tell()
    except (OSError, ValueError):
        return None


def _input_entry(info: tarfile.TarInfo) -> InputEntry:
    kind = _TYPES.get(info.type)
    if kind is None or info.sparse is not None:
        what = "sparse file" if info.sparse is not None else f"entry type {info.type!r}"
        raise BuildError(
            f"unsupported {what}: eStargz holds only regular files, directories, "
            "symlinks, hardlinks, devices and fifos",
            entry=info.name,
            offset=info.offset,
        )
    texts = [("name", info.name), ("link name", info.linkname)]
    texts += [("user name", info.uname), ("group name", info.gname)]
    texts += [("xattr name", k) for k in info.pax_headers if k.startswith(XATTR_PREFIX)]
    for field, value in texts:
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise BuildError(
                f"{field} {_printable(value)!r} is not valid UTF-8, which the TOC JSON needs",
                entry=_printable(info.name),
                offset=info.offset,
            ) from None
    key = clean_name(info.name)
    if key is None or (kind == "hardlink" and clean_name(info.linkname) is None):
        # Readers refuse such names (they would point outside the layer): refuse them here.
        raise BuildError(
            "name has a '..' component or a NUL byte, which no layer may hold",
            entry=_printable(info.name),
            offset=info.offset,
        )
    return InputEntry(info=info, type=kind, key=key)


def _printable(text: str) -> str:
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def order_entries(
    entries: list[InputEntry], prioritized: tuple[str, ...], *, allow_missing: bool
) -> OrderedEntries:
    """Drop what the builder replaces, resolve duplicates, and move prioritized files first.

    Landmarks and ``stargz.index.json`` in the input are dropped; of entries with the same
    cleaned name only the last is kept (in its own position). Each prioritized name is
    moved with its parent directories present in the input and, for a hardlink, with its
    target; names not found raise BuildError unless ``allow_missing``.
    """
    remaining: dict[str, InputEntry] = {}
    for e in entries:
        if e.key in LANDMARKS or e.key == TOC_TAR_NAME:
            continue
        remaining.pop(e.key, None)  # the later duplicate wins and takes its own position
        remaining[e.key] = e
    moved: dict[str, InputEntry] = {}

    def move(key: str, following: frozenset[str]) -> None:
        # Ancestors present in the input go first, outermost first (absent ones are skipped).
        ancestors = []
        parent = key
        while parent:
            parent = posixpath.dirname(parent)
            if parent in remaining:
                ancestors.append(parent)
        for a in reversed(ancestors):
            take(a, following)
        take(key, following)

    def take(key: str, following: frozenset[str]) -> None:
        e = remaining.get(key)
        if e is None:
            return
        if e.type == "hardlink" and key not in following:
            target = clean_name(e.info.linkname)
            if target is not None and target in remaining:
                move(target, following | {key})
        if key in remaining:  # a hardlink cycle may have taken it already
            moved[key] = remaining.pop(key)

    missed: list[str] = []
    for name in prioritized:
        key = clean_name(name)
        if key is not None and (key in remaining or key in moved):
            move(key, frozenset())
        elif allow_missing:
            missed.append(name)
        else:
            raise BuildError(f"prioritized file {name!r} is not in the input tar", entry=name)
    return OrderedEntries(tuple(moved.values()), tuple(remaining.values()), tuple(missed))
