"""ExtentMap: block ranges of a layer's block image -> the eStargz chunks behind them.

It is what the block image needs at read time, in compact arrays rather than one Python
object per chunk, so that serving many large layers from one process stays cheap. It is
written once when a layer is indexed and loaded by the NBD server, which maps the file
instead of reading it: the arrays are views of the page cache, so a served layer costs
the server no memory of its own however many files and chunks it has.
"""

from __future__ import annotations

import bisect
import mmap
import os
import struct
import sys
from array import array
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Protocol

from blockfs.erofs._layout import Extents
from blockfs.errors import BlockfsError
from blockfs.estargz import TOC, Chunk

# extents file header, 48 bytes: 0 magic "BFSEXT01", 8 u32 version, 12 u32 block size,
# 16 u64 metadata blocks, 24 u64 total blocks, 32 u64 extent count, 40 u64 chunk count.
# Then, little-endian u64 arrays: extent start block[n], extent byte size[n],
# extent first chunk[n + 1], extent name offset[n + 1]; chunk offset[m], end[m], inner
# offset[m], file offset[m], size[m]; then m raw 32-byte sha256 digests; then the UTF-8
# names of the extents' files, back to back (only read to name a file in an error).
_HEADER = struct.Struct("<8sIIQQQQ")
_MAGIC = b"BFSEXT01"
_VERSION = 2


class ExtentMapError(BlockfsError):
    """An extents file is damaged or was written by an incompatible version."""


class _Index(Protocol):
    @property
    def block_size(self) -> int: ...
    @property
    def meta_blocks(self) -> int: ...
    @property
    def total_blocks(self) -> int: ...
    @property
    def extents(self) -> Sequence[object]: ...


def _u64(values: Iterable[int] = ()) -> array[int]:
    return array("Q", values)


# What the map's arrays are: arrays when built, views of the mapped file when loaded.
_U64s = Sequence[int]
_Bytes = bytes | memoryview


class ExtentMap:
    """Which chunks hold the bytes of each file extent in the data region."""

    def __init__(
        self,
        *,
        block_size: int,
        meta_blocks: int,
        total_blocks: int,
        ext_start: _U64s,
        ext_size: _U64s,
        ext_first_chunk: _U64s,
        chunk_offset: _U64s,
        chunk_end: _U64s,
        chunk_inner: _U64s,
        chunk_file_offset: _U64s,
        chunk_size: _U64s,
        chunk_digests: _Bytes,
        name_offsets: _U64s,
        names: _Bytes,
    ) -> None:
        self.block_size = block_size
        self.meta_blocks = meta_blocks
        self.total_blocks = total_blocks
        self._ext_start = ext_start
        self._ext_size = ext_size
        self._ext_first_chunk = ext_first_chunk
        self._c_offset = chunk_offset
        self._c_end = chunk_end
        self._c_inner = chunk_inner
        self._c_file_offset = chunk_file_offset
        self._c_size = chunk_size
        self._c_digests = chunk_digests
        self._name_offsets = name_offsets
        self._names = names

    @property
    def meta_size(self) -> int:
        return self.meta_blocks * self.block_size

    @property
    def image_size(self) -> int:
        return self.total_blocks * self.block_size

    @property
    def extent_count(self) -> int:
        return len(self._ext_start)

    @property
    def chunk_count(self) -> int:
        return len(self._c_offset)

    @classmethod
    def build(cls, index: _Index, toc: TOC) -> ExtentMap:
        """Map each extent of an EROFS ``index`` laid out from ``toc`` (``build_index``)
        to the chunks of its file, from the TOC's columns: no Entry or Chunk objects."""
        extents = index.extents
        if not (isinstance(extents, Extents) and extents.table is toc.table):
            raise ExtentMapError("the index was not laid out from this TOC (build_index(toc))")
        t = toc.table
        rows = extents.rows
        ext_first = _u64([0])
        c_off, c_end, c_inner, c_foff, c_size = _u64(), _u64(), _u64(), _u64(), _u64()
        digests = bytearray()
        name_offsets, names = _u64([0]), bytearray()
        last_offset = -1
        for row in rows:
            names += t.name_bytes(row)
            name_offsets.append(len(names))
            lo, hi = t.chunk_range(row)
            if lo < hi:
                if t.c_offset[lo] < last_offset:
                    raise ExtentMapError(f"extents of {t.name(row)!r} are not in blob order")
                last_offset = t.c_offset[hi - 1]
                _extend(c_off, t.c_offset, lo, hi)
                _extend(c_end, t.c_end, lo, hi)
                _extend(c_inner, t.c_inner, lo, hi)
                _extend(c_foff, t.c_file_offset, lo, hi)
                _extend(c_size, t.c_size, lo, hi)
                for j in range(lo, hi):
                    raw = t.chunk_digest_bytes(j)
                    if raw is None:
                        raise ExtentMapError(f"chunk has no sha256 digest: {t.chunk_digest(j)!r}")
                    digests += raw
            ext_first.append(len(c_off))
        return cls(
            block_size=index.block_size,
            meta_blocks=index.meta_blocks,
            total_blocks=index.total_blocks,
            ext_start=_u64(extents.starts),
            ext_size=_u64(extents.sizes),
            ext_first_chunk=ext_first,
            chunk_offset=c_off,
            chunk_end=c_end,
            chunk_inner=c_inner,
            chunk_file_offset=c_foff,
            chunk_size=c_size,
            chunk_digests=bytes(digests),
            name_offsets=name_offsets,
            names=bytes(names),
        )

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the map to ``path`` atomically (piece by piece: nothing is joined)."""
        n, m = self.extent_count, self.chunk_count
        tmp = Path(f"{os.fspath(path)}.tmp")
        with open(tmp, "wb") as f:
            f.write(
                _HEADER.pack(
                    _MAGIC, _VERSION, self.block_size, self.meta_blocks, self.total_blocks, n, m
                )
            )
            for arr in (
                self._ext_start,
                self._ext_size,
                self._ext_first_chunk,
                self._name_offsets,
                self._c_offset,
                self._c_end,
                self._c_inner,
                self._c_file_offset,
                self._c_size,
            ):
                f.write(_le_bytes(arr))
            f.write(self._c_digests)
            f.write(self._names)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> ExtentMap:
        """Map a file written by :meth:`save`, checking its shape.

        The file is mapped read-only, not read: its arrays are used in place (on a
        little-endian machine), so the map costs page cache, shared and reclaimable,
        rather than memory of the process. Index files are replaced by rename, never
        rewritten in place, so a mapped file does not change under its readers.
        """
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < _HEADER.size:
                raise ExtentMapError(f"{path}: truncated extents file")
            data = memoryview(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ))
        magic, version, bsize, meta, total, n, m = _HEADER.unpack_from(data)
        if magic != _MAGIC or version != _VERSION:
            raise ExtentMapError(f"{path}: not a blockfs extents file of version {_VERSION}")
        fixed = _HEADER.size + 8 * (4 * n + 2 + 5 * m) + 32 * m
        if size < fixed:
            raise ExtentMapError(f"{path}: truncated extents file")
        pos = _HEADER.size
        arrays: list[_U64s] = []
        for count in (n, n, n + 1, n + 1, m, m, m, m, m):
            arrays.append(_u64_view(data[pos : pos + 8 * count]))
            pos += 8 * count
        if size != fixed + arrays[3][-1]:
            raise ExtentMapError(f"{path}: size {size} does not match its header")
        return cls(
            block_size=bsize,
            meta_blocks=meta,
            total_blocks=total,
            ext_start=arrays[0],
            ext_size=arrays[1],
            ext_first_chunk=arrays[2],
            chunk_offset=arrays[4],
            chunk_end=arrays[5],
            chunk_inner=arrays[6],
            chunk_file_offset=arrays[7],
            chunk_size=arrays[8],
            chunk_digests=data[pos : pos + 32 * m],
            name_offsets=arrays[3],
            names=data[pos + 32 * m :],
        )

    def extent_at(self, offset: int) -> int | None:
        """Number of the extent whose blocks hold image byte ``offset``, if any."""
        i = bisect.bisect_right(self._ext_start, offset // self.block_size) - 1
        if i < 0:
            return None
        start = self._ext_start[i] * self.block_size
        blocks = -(-self._ext_size[i] // self.block_size)
        return i if offset < start + blocks * self.block_size else None

    def extent_span(self, i: int) -> tuple[int, int]:
        """(first image byte, file size) of extent ``i``."""
        return self._ext_start[i] * self.block_size, self._ext_size[i]

    def chunk_in_extent(self, i: int, file_offset: int) -> int:
        """Number of the chunk of extent ``i`` that holds byte ``file_offset`` of its file."""
        lo, hi = self._ext_first_chunk[i], self._ext_first_chunk[i + 1]
        return bisect.bisect_right(self._c_file_offset, file_offset, lo, hi) - 1

    def chunk(self, j: int) -> Chunk:
        """Chunk number ``j``."""
        return Chunk(
            offset=self._c_offset[j],
            end=self._c_end[j],
            inner_offset=self._c_inner[j],
            chunk_offset=self._c_file_offset[j],
            size=self._c_size[j],
            digest="sha256:" + self._c_digests[32 * j : 32 * j + 32].hex(),
        )

    def extent_name(self, i: int) -> str:
        """Name of the file whose data extent ``i`` holds."""
        return self.extent_name_bytes(i).decode("utf-8", "surrogateescape")

    def extent_name_bytes(self, i: int) -> bytes:
        """:meth:`extent_name` as the TOC's bytes (cheaper to look at many of)."""
        lo, hi = self._name_offsets[i], self._name_offsets[i + 1]
        return bytes(self._names[lo:hi])

    def file_of_chunk(self, j: int) -> str:
        """Name of the file that chunk ``j`` belongs to."""
        return self.extent_name(self.extent_of_chunk(j))

    def extent_of_chunk(self, j: int) -> int:
        """Number of the extent that chunk ``j`` belongs to."""
        return bisect.bisect_right(self._ext_first_chunk, j) - 1

    def extent_chunks(self, i: int) -> range:
        """Numbers of the chunks of extent ``i``, in blob order."""
        return range(self._ext_first_chunk[i], self._ext_first_chunk[i + 1])

    def chunks_in_member(self, offset: int) -> list[int]:
        """Numbers of the chunks whose compressed stream starts at blob ``offset``."""
        # Chunks are stored in blob order, so those of one member are adjacent.
        lo = bisect.bisect_left(self._c_offset, offset)
        hi = bisect.bisect_right(self._c_offset, offset)
        return list(range(lo, hi))


def _extend(dst: array[int], src: Sequence[int], lo: int, hi: int) -> None:
    part = src[lo:hi]
    if not isinstance(part, array) or part.typecode != "Q":
        part = list(part)
    dst.extend(part)


def _le_bytes(arr: _U64s) -> bytes | memoryview:
    if isinstance(arr, memoryview):
        return arr.cast("B")
    copy = arr if isinstance(arr, array) and arr.typecode == "Q" else array("Q", arr)
    if sys.byteorder == "little":
        return copy.tobytes()
    copy = array("Q", copy)
    copy.byteswap()
    return copy.tobytes()


def _u64_view(data: memoryview) -> _U64s:
    """Little-endian u64s in ``data``: a view of them, or (big-endian machine) a copy."""
    if sys.byteorder == "little":
        return data.cast("Q")
    arr = array("Q")
    arr.frombytes(data)
    arr.byteswap()
    return arr
