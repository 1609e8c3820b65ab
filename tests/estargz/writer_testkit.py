"""Independent checks of written blobs: decompress, list and slice them without blockfs code.

Nothing here imports the writer; a blob is read with the gzip and zstd command-line tools
or Python's zlib/zstandard, and with tarfile, so that a writer bug cannot hide itself.
"""

from __future__ import annotations

import hashlib
import io
import json
import posixpath
import struct
import subprocess
import tarfile
import zlib
from pathlib import Path
from typing import Any, Literal

import attrs
import zstandard

TOC_NAME = "stargz.index.json"

# The 48 bytes that end a zstd eStargz blob: skippable frame magic and length, then
# TOC offset, compressed size, uncompressed size, manifest type (u64 LE) and "GnUlInUx".
ZSTD_FOOTER = struct.Struct("<IIQQQQ8s")
# The 51-byte eStargz gzip footer: the TOC offset is 16 hex digits at byte 16.
ESTARGZ_FOOTER_SIZE = 51


@attrs.frozen
class Member:
    """What a tar entry says about a file, in a form two tar streams can be compared by."""

    type: bytes
    size: int
    sha256: str
    mode: int
    uid: int
    gid: int
    uname: str
    gname: str
    mtime: float
    linkname: str
    devmajor: int
    devminor: int
    xattrs: tuple[tuple[str, bytes], ...]


def clean(name: str) -> str:
    """A tar or TOC name without ``./``, leading ``/`` or trailing ``/``."""
    return posixpath.normpath("/" + name).lstrip("/")


def gunzip_cli(path: Path) -> bytes:
    """The decompressed stream of a gzip file, by the gzip command."""
    return subprocess.run(["gzip", "-dc", str(path)], check=True, capture_output=True).stdout


def unzstd_cli(path: Path) -> bytes:
    """The decompressed stream of a zstd file, by the zstd command."""
    return subprocess.run(["zstd", "-dc", "-q", str(path)], check=True, capture_output=True).stdout


def decompress_all(blob: bytes, compression: Literal["gzip", "zstd"]) -> bytes:
    """The decompressed stream of a whole blob with Python's zlib or zstandard."""
    out = bytearray()
    view = memoryview(blob)
    pos = 0
    while pos < len(blob):
        d: Any = (
            zlib.decompressobj(31)
            if compression == "gzip"
            else zstandard.ZstdDecompressor().decompressobj()
        )
        out += d.decompress(view[pos:])
        assert d.eof, f"member at {pos} has no end"
        pos = len(blob) - len(d.unused_data)
    return bytes(out)


def listing(tar_bytes: bytes) -> dict[str, Member]:
    """Every entry of a tar stream by cleaned name (a later duplicate replaces an earlier one)."""
    result: dict[str, Member] = {}
    with tarfile.open(fileobj=io.BytesIO(tar_bytes), mode="r:") as tf:
        for info in tf:
            data = b""
            if info.isreg():
                f = tf.extractfile(info)
                assert f is not None
                data = f.read()
            kind = (
                tarfile.REGTYPE if info.type in (tarfile.AREGTYPE, tarfile.CONTTYPE) else info.type
            )
            xattrs = tuple(
                sorted(
                    (k.removeprefix("SCHILY.xattr."), v.encode("utf-8", "surrogateescape"))
                    for k, v in info.pax_headers.items()
                    if k.startswith("SCHILY.xattr.")
                )
            )
            result[clean(info.name)] = Member(
                type=kind,
                size=len(data),
                sha256=hashlib.sha256(data).hexdigest(),
                mode=info.mode & 0o7777,
                uid=info.uid,
                gid=info.gid,
                uname=info.uname,
                gname=info.gname,
                mtime=info.mtime,
                linkname=info.linkname,
                devmajor=info.devmajor if info.ischr() or info.isblk() else 0,
                devminor=info.devminor if info.ischr() or info.isblk() else 0,
                xattrs=xattrs,
            )
    return result


def tar_names(tar_bytes: bytes) -> list[str]:
    """The raw names of a tar stream's entries, in order."""
    with tarfile.open(fileobj=io.BytesIO(tar_bytes), mode="r:") as tf:
        return [info.name + ("/" if info.isdir() else "") for info in tf]


def gzip_toc_json(tar_bytes: bytes) -> bytes:
    """The body of the last entry of a decompressed gzip eStargz blob, which must be the TOC."""
    with tarfile.open(fileobj=io.BytesIO(tar_bytes), mode="r:") as tf:
        members = tf.getmembers()
        assert members[-1].name == TOC_NAME
        f = tf.extractfile(members[-1])
        assert f is not None
        return f.read()


def gzip_toc_offset(blob: bytes) -> int:
    """The TOC offset that the 51-byte footer of a gzip eStargz blob records."""
    footer = blob[-ESTARGZ_FOOTER_SIZE:]
    assert footer[:4] == b"\x1f\x8b\x08\x04" and footer[32:38] == b"STARGZ"
    return int(footer[16:32], 16)


def zstd_toc(blob: bytes) -> tuple[bytes, bytes, int]:
    """(compressed TOC frame, TOC JSON, TOC offset) of a zstd eStargz blob, from its footer."""
    magic, length, offset, csize, usize, mtype, mmagic = ZSTD_FOOTER.unpack(blob[-48:])
    assert (magic, length, mtype, mmagic) == (0x184D2A50, 40, 1, b"GnUlInUx")
    frame = blob[offset : offset + csize]
    assert blob[offset - 8 : offset] == struct.pack("<II", 0x184D2A50, csize)
    assert offset + csize + 48 == len(blob)
    raw = zstandard.ZstdDecompressor().decompressobj().decompress(frame)
    assert len(raw) == usize
    return frame, raw, offset


def decompress_toc_json(blob: bytes, compression: Literal["gzip", "zstd"]) -> bytes:
    """The TOC JSON of a blob, found the way a plain reader would."""
    if compression == "zstd":
        return zstd_toc(blob)[1]
    return gzip_toc_json(decompress_all(blob, "gzip"))


def toc_entries(blob: bytes, compression: Literal["gzip", "zstd"]) -> list[dict[str, Any]]:
    """The TOC entries of a blob, found the way a plain reader would."""
    toc = json.loads(decompress_toc_json(blob, compression))
    assert toc["version"] == 1
    entries: list[dict[str, Any]] = toc["entries"]
    return entries


def read_piece(
    blob: bytes, compression: Literal["gzip", "zstd"], offset: int, inner: int, size: int
) -> bytes:
    """``size`` bytes after skipping ``inner`` bytes of the stream that starts at ``offset``."""
    out = bytearray()
    view = memoryview(blob)
    pos = offset
    while len(out) < inner + size:
        d: Any = (
            zlib.decompressobj(31)
            if compression == "gzip"
            else zstandard.ZstdDecompressor().decompressobj()
        )
        while not d.eof and len(out) < inner + size and pos < len(blob):
            piece = view[pos : pos + 65536]
            out += d.decompress(piece)
            pos += len(piece)
        if not d.eof:
            break
        pos -= len(d.unused_data)
    return bytes(out[inner : inner + size])


def pieces(entries: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any], int]]:
    """Each data piece of a TOC as (file name, entry, piece size), resolving chunk sizes."""
    result = []
    sizes: dict[str, int] = {}
    name = ""
    for i, e in enumerate(entries):
        if e["type"] == "reg":
            name = e["name"]
            sizes[name] = e.get("size", 0)
        if e["type"] not in ("reg", "chunk") or sizes[name] == 0:
            continue
        nxt = entries[i + 1] if i + 1 < len(entries) else {}
        end = nxt["chunkOffset"] if nxt.get("type") == "chunk" else sizes[name]
        result.append((name, e, end - e.get("chunkOffset", 0)))
    return result
