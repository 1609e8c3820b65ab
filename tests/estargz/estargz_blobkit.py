"""A tiny eStargz blob maker for reader tests: real gzip members / zstd frames, any TOC.

It lays files out the way the reference writer does (tar headers in the open member, a new
member at each piece of a payload, or shared members with ``innerOffset`` when asked), and
lets a test replace or edit the TOC JSON so that hostile TOCs ride in a well-formed blob.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import zlib
from collections.abc import Callable
from typing import Any, Literal

import attrs
import zstandard

from blockfs.estargz._footer import (
    ZSTD_SKIPPABLE_HEADER,
    ZSTD_SKIPPABLE_MAGIC,
    encode_estargz_footer,
    encode_legacy_footer,
    encode_zstd_footer,
)

Kind = Literal["estargz", "stargz", "zstd"]
TocEdit = Callable[[dict[str, Any]], Any]


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def gzip_member(data: bytes, level: int = 9) -> bytes:
    z = zlib.compressobj(level, zlib.DEFLATED, 31)
    return z.compress(data) + z.flush()


def zstd_frame(data: bytes) -> bytes:
    return zstandard.ZstdCompressor(level=3).compress(data)


def tar_header(name: str, *, type: bytes = tarfile.REGTYPE, size: int = 0, link: str = "") -> bytes:
    info = tarfile.TarInfo(name)
    info.type = type
    info.size = size
    info.linkname = link
    info.mode = 0o644
    return info.tobuf(format=tarfile.PAX_FORMAT)


@attrs.frozen
class Blob:
    data: bytes
    toc_json: bytes
    toc_digest: str
    toc_offset: int
    # The TOC entries as written (after any edit), for tests to refer to.
    entries: list[dict[str, Any]]

    def payload_end(self, kind: Kind) -> int:
        return self.toc_offset - 8 if kind == "zstd" else self.toc_offset


@attrs.define
class BlobMaker:
    """Collects entries, then writes a blob. ``chunk_size`` splits payloads into pieces;
    ``share_members`` keeps pieces in the open member (``innerOffset``) instead of starting
    a new one for each."""

    kind: Kind = "estargz"
    chunk_size: int = 1 << 20
    share_members: bool = False
    digests: bool = True
    # gzip level; 0 stores data as is, so a flipped byte gives wrong data, not bad deflate.
    level: int = 9
    _items: list[tuple[dict[str, Any], bytes, bytes | None]] = attrs.field(factory=list)

    def dir(self, name: str, **fields: Any) -> BlobMaker:
        self._items.append(({"name": name, "type": "dir", "mode": 0o755, **fields}, b"", None))
        return self

    def file(
        self, name: str, data: bytes, *, stored: bytes | None = None, **fields: Any
    ) -> BlobMaker:
        """A regular file whose TOC entry describes ``data``; its first member holds
        ``stored`` instead, when given (to make blobs that lie)."""
        self._items.append(({"name": name, "type": "reg", "mode": 0o644, **fields}, data, stored))
        return self

    def entry(self, **fields: Any) -> BlobMaker:
        self._items.append((fields, b"", None))
        return self

    def build(self, edit: TocEdit | None = None, *, toc_json: bytes | None = None) -> Blob:
        def compress(data: bytes) -> bytes:
            return zstd_frame(data) if self.kind == "zstd" else gzip_member(data, self.level)

        out = bytearray()
        member = bytearray()  # uncompressed bytes of the member being written
        member_start = 0
        entries: list[dict[str, Any]] = []

        def close_member() -> None:
            nonlocal member, member_start
            if member:
                out.extend(compress(bytes(member)))
            member = bytearray()
            member_start = len(out)

        for fields, data, stored in self._items:
            e = dict(fields)
            typ = {"dir": tarfile.DIRTYPE, "symlink": tarfile.SYMTYPE}.get(
                e["type"], tarfile.REGTYPE
            )
            member.extend(tar_header(e["name"], type=typ, size=len(data)))
            entries.append(e)
            if e["type"] != "reg" or not data:
                if e["type"] == "reg" and self.digests:
                    e.setdefault("digest", sha(b""))
                continue
            e["size"] = len(data)
            if self.digests:
                e["digest"] = sha(data)
            for pos in range(0, len(data), self.chunk_size):
                piece = data[pos : pos + self.chunk_size]
                # The blob's first member is never shared: no piece may sit at offset 0.
                if not self.share_members or not out:
                    close_member()
                target = e if pos == 0 else {"name": e["name"], "type": "chunk"}
                if pos:
                    target["chunkOffset"] = pos
                    entries.append(target)
                if len(data) > self.chunk_size:
                    target["chunkSize"] = len(piece)
                target["offset"] = member_start
                if member:
                    target["innerOffset"] = len(member)
                if self.digests:
                    target["chunkDigest"] = sha(piece)
                member.extend(stored if stored is not None and pos == 0 else piece)
            member.extend(bytes(-len(data) % 512))
        close_member()
        toc_offset = len(out)

        toc: dict[str, Any] = {"version": 1, "entries": entries}
        if edit is not None:
            replaced = edit(toc)
            if replaced is not None:
                toc = replaced
        if toc_json is None:
            toc_json = json.dumps(toc, indent="\t").encode()
        if self.kind == "zstd":
            frame = zstd_frame(toc_json)
            out.extend(ZSTD_SKIPPABLE_HEADER.pack(ZSTD_SKIPPABLE_MAGIC, len(frame)))
            toc_offset = len(out)
            out.extend(frame)
            out.extend(encode_zstd_footer(toc_offset, len(frame), len(toc_json)))
        else:
            out.extend(gzip_toc_member(toc_json))
            footer = encode_legacy_footer if self.kind == "stargz" else encode_estargz_footer
            out.extend(footer(toc_offset))
        return Blob(bytes(out), toc_json, sha(toc_json), toc_offset, entries)


def gzip_toc_member(toc_json: bytes, *, name: str = "stargz.index.json") -> bytes:
    """The gzip member holding the TOC tar entry and the end-of-archive blocks."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        info = tarfile.TarInfo(name)
        info.size = len(toc_json)
        tar.addfile(info, io.BytesIO(toc_json))
    return gzip_member(buf.getvalue())


class BytesSource:
    """A blob held in memory, as a BlobSource; counts requests like CountingSource."""

    def __init__(self, data: bytes, name: str = "test-layer") -> None:
        self.data = data
        self._name = name
        self.requests: list[tuple[int, int]] = []

    @property
    def name(self) -> str:
        return self._name

    @property
    def size(self) -> int:
        return len(self.data)

    def read_range(self, offset: int, length: int) -> bytes:
        from blockfs.estargz import TruncatedBlobError

        self.requests.append((offset, length))
        if offset < 0 or length < 0 or offset + length > len(self.data):
            raise TruncatedBlobError("range outside the blob", layer=self._name, offset=offset)
        return self.data[offset : offset + length]
