"""Decompressing eStargz data: gzip members, zstd frames and the TOC they end with.

Every read starts at a member (or frame) boundary and may run on across following members,
as the format allows. Output is produced only as far as the caller asks, in bounded steps,
so a decompression bomb costs no more memory than the bytes actually wanted.
"""

from __future__ import annotations

import io
import struct
from collections.abc import Iterator, Sequence
from typing import IO, Final, Protocol, cast

import zstandard
from isal import isal_zlib

from blockfs.estargz._errors import DecompressionError, TOCError, TOCTooLargeError
from blockfs.estargz._model import TOC_TAR_NAME, Compression

__all__ = [
    "Decompressor",
    "Readable",
    "decompress_spans",
    "iter_gzip_toc",
    "iter_zstd_toc",
    "read_gzip_toc",
    "read_zstd_toc",
]

# Most decompressed bytes produced by one step of a read (bytes the caller wants: zstd
# is twice as fast in 4 MiB steps as in 1 MiB ones) and of a skip (bytes thrown away, so
# smaller), and compressed bytes pulled in at once.
_OUTPUT_STEP: Final = 4 << 20
_SKIP_STEP: Final = 1 << 20
_INPUT_STEP: Final = 1 << 16
# Largest zstd window a frame may ask for (zstd's own default limit, 2**27). A frame
# wanting more is refused instead of allocating it.
_ZSTD_MAX_WINDOW: Final = 1 << 27
# zlib wbits for a gzip wrapper (16 + 15-bit window). Members are inflated by ISA-L
# (isal_zlib: zlib's stream API, checks and errors, about twice zlib's speed): a page
# fault that fetches waits for its chunks to be inflated and verified.
GZIP_WBITS: Final = 31
# What isal_zlib raises for corrupt data (its stubs declare an instance, not a class).
InflateError: Final = cast("type[Exception]", isal_zlib.error)
# Decompressed TOC bytes are handed on in pieces of this size.
TOC_PIECE: Final = 1 << 20

# ustar header, 512 bytes: 0 name, 100 mode, 108 uid, 116 gid, 124 size, 136 mtime,
# 148 chksum, 156 typeflag, 157 linkname, 257 magic, 263 version, 265 uname, 297 gname,
# 329 devmajor, 337 devminor, 345 prefix, 500 padding.
TAR_HEADER = struct.Struct("100s8s8s8s12s12s8sc100s6s2s32s32s8s8s155s12s")
TAR_BLOCK: Final = TAR_HEADER.size  # 512
_CHKSUM_START: Final = 148
_CHKSUM_END: Final = 156


class Readable(Protocol):
    """Where compressed bytes come from: ``read(n)`` returns up to ``n`` bytes, b"" at the end."""

    def read(self, size: int, /) -> bytes: ...


class Decompressor:
    """The decompressed stream that starts at a gzip member or zstd frame, read in order.

    ``layer``, ``entry`` and ``offset`` (the compressed offset where the stream starts) go
    into the errors raised, which are :class:`DecompressionError` for corrupt data and for
    data that ends before the bytes asked for.
    """

    def __init__(
        self,
        source: Readable,
        compression: Compression,
        *,
        layer: str | None = None,
        entry: str | None = None,
        offset: int | None = None,
    ) -> None:
        self._source = source
        self._layer = layer
        self._entry = entry
        self._offset = offset
        self._produced = 0
        self._gzip: isal_zlib.Decompress | None = None
        self._zstd: zstandard.ZstdDecompressionReader | None = None
        self._pending = b""
        if compression == "gzip":
            self._gzip = isal_zlib.decompressobj(GZIP_WBITS)
        else:
            dctx = zstandard.ZstdDecompressor(max_window_size=_ZSTD_MAX_WINDOW)
            # The reader only ever calls source.read(n).
            self._zstd = dctx.stream_reader(
                cast("IO[bytes]", source),
                read_size=_INPUT_STEP,
                read_across_frames=True,
                closefd=False,
            )

    def _error(self, message: str) -> DecompressionError:
        return DecompressionError(
            message, layer=self._layer, entry=self._entry, offset=self._offset
        )

    def _produce(self, limit: int) -> bytes:
        """Between 1 and ``limit`` more bytes of output, or b"" once the input is used up."""
        try:
            if self._zstd is not None:
                return self._zstd.read(limit)
            return self._gunzip(limit)
        except (InflateError, zstandard.ZstdError) as exc:
            raise self._error(
                f"corrupt compressed data after {self._produced} decompressed bytes: {exc}"
            ) from None

    def _gunzip(self, limit: int) -> bytes:
        z = self._gzip
        assert z is not None
        while True:
            out = z.decompress(self._pending, limit)
            self._pending = z.unconsumed_tail
            if z.eof:
                # The member ended; whatever follows starts the next one.
                self._pending = z.unused_data
                z = self._gzip = isal_zlib.decompressobj(GZIP_WBITS)
            if out:
                return out
            # Nothing came out, so inflate wants more input (any output still held back by
            # the limit would have come out first).
            if not self._pending:
                self._pending = self._source.read(_INPUT_STEP)
                if not self._pending:
                    return b""

    def read_exact(self, size: int) -> bytes:
        """Exactly the next ``size`` decompressed bytes."""
        parts = []
        need = size
        while need:
            out = self._produce(min(need, _OUTPUT_STEP))
            if not out:
                raise self._error(
                    f"compressed data ends after {self._produced} decompressed bytes, "
                    f"short of the {self._produced + need} expected"
                )
            self._produced += len(out)
            need -= len(out)
            parts.append(out)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def skip(self, size: int) -> None:
        """Decompress and discard the next ``size`` bytes."""
        while size:
            out = self._produce(min(size, _SKIP_STEP))
            if not out:
                raise self._error(
                    f"compressed data ends after {self._produced} decompressed bytes, "
                    f"short of the {self._produced + size} expected"
                )
            self._produced += len(out)
            size -= len(out)

    def at_end(self) -> bool:
        """Whether the stream has no more decompressed bytes (reads one byte if it has)."""
        out = self._produce(1)
        self._produced += len(out)
        return not out


def decompress_spans(
    source: Readable,
    compression: Compression,
    spans: Sequence[tuple[int, int]],
    *,
    layer: str | None = None,
    entry: str | None = None,
    offset: int | None = None,
) -> list[bytes]:
    """The bytes of each ``(start, length)`` span of the stream decompressed from ``source``.

    Spans are in increasing order without overlap; bytes between them are decompressed and
    dropped, and nothing past the last span is decompressed.
    """
    d = Decompressor(source, compression, layer=layer, entry=entry, offset=offset)
    out = []
    pos = 0
    for start, length in spans:
        if start < pos or length < 0:
            raise ValueError(f"spans must be increasing and disjoint, got {list(spans)}")
        d.skip(start - pos)
        out.append(d.read_exact(length))
        pos = start + length
    return out


def _octal(field: bytes) -> int | None:
    text = field.rstrip(b"\0 ").lstrip(b" ")
    if not text:
        return 0
    if not all(0x30 <= c <= 0x37 for c in text):
        return None
    return int(text, 8)


def read_gzip_toc(
    data: bytes, *, layer: str | None = None, offset: int | None = None, max_bytes: int
) -> bytes:
    """The TOC JSON from a gzip TOC member, whole (:func:`iter_gzip_toc` in one piece)."""
    return b"".join(iter_gzip_toc(data, layer=layer, offset=offset, max_bytes=max_bytes))


def iter_gzip_toc(
    data: bytes,
    *,
    layer: str | None = None,
    offset: int | None = None,
    max_bytes: int,
    piece: int = TOC_PIECE,
) -> Iterator[bytes]:
    """The TOC JSON from a gzip TOC member (a tar stream whose first entry is the TOC), in
    pieces of up to ``piece`` bytes, each decompressed only when asked for.

    ``data`` is the compressed member, ``offset`` where it starts in the blob. A TOC whose
    tar header declares more than ``max_bytes`` is refused before it is decompressed; a
    consumer that stops early stops the decompression there.
    """
    d = Decompressor(io.BytesIO(data), "gzip", layer=layer, entry=TOC_TAR_NAME, offset=offset)
    header = d.read_exact(TAR_BLOCK)
    (name, _mode, _uid, _gid, size_field, _mtime, chksum, typeflag, _link, magic, _version,
     _uname, _gname, _major, _minor, prefix, _pad) = TAR_HEADER.unpack(header)  # fmt: skip

    def refuse(message: str) -> TOCError:
        return TOCError(message, layer=layer, entry=TOC_TAR_NAME, offset=offset)

    # The checksum is the byte sum of the header with its own field read as spaces.
    expected = _octal(chksum)
    actual = sum(header[:_CHKSUM_START]) + 8 * ord(" ") + sum(header[_CHKSUM_END:])
    if expected != actual:
        raise refuse("the TOC member does not start with a valid tar header")
    full_name = name.split(b"\0", 1)[0]
    if magic.startswith(b"ustar") and prefix.strip(b"\0"):
        full_name = prefix.split(b"\0", 1)[0] + b"/" + full_name
    if full_name != TOC_TAR_NAME.encode():
        raise refuse(f"the TOC member holds {full_name[:100]!r}, not {TOC_TAR_NAME}")
    if typeflag not in (b"0", b"\0"):
        raise refuse(f"the TOC tar entry has type {typeflag!r}, not a regular file")
    size = _octal(size_field)
    if size is None:
        raise refuse("the TOC tar header has an unreadable size")
    if size > max_bytes:
        raise TOCTooLargeError(
            f"TOC of {size} bytes exceeds the limit of {max_bytes}",
            layer=layer,
            entry=TOC_TAR_NAME,
            offset=offset,
        )
    while size:
        out = d.read_exact(min(size, piece))
        size -= len(out)
        yield out


def read_zstd_toc(
    data: bytes,
    uncompressed_size: int,
    *,
    layer: str | None = None,
    offset: int | None = None,
    max_bytes: int,
) -> bytes:
    """The TOC JSON from a zstd TOC frame, whole (:func:`iter_zstd_toc` in one piece)."""
    return b"".join(
        iter_zstd_toc(data, uncompressed_size, layer=layer, offset=offset, max_bytes=max_bytes)
    )


def iter_zstd_toc(
    data: bytes,
    uncompressed_size: int,
    *,
    layer: str | None = None,
    offset: int | None = None,
    max_bytes: int,
    piece: int = TOC_PIECE,
) -> Iterator[bytes]:
    """The TOC JSON from a zstd TOC frame that the footer says is ``uncompressed_size``
    long, in pieces of up to ``piece`` bytes, each decompressed only when asked for.

    Refuses a declared size over ``max_bytes`` before decompressing anything, and a frame
    that decompresses to more or fewer bytes than declared.
    """
    if uncompressed_size > max_bytes:
        raise TOCTooLargeError(
            f"TOC of {uncompressed_size} bytes exceeds the limit of {max_bytes}",
            layer=layer,
            offset=offset,
        )
    d = Decompressor(io.BytesIO(data), "zstd", layer=layer, entry=TOC_TAR_NAME, offset=offset)
    size = uncompressed_size
    while size:
        out = d.read_exact(min(size, piece))
        size -= len(out)
        yield out
    if not d.at_end():
        raise TOCError(
            f"the TOC frame holds more than the {uncompressed_size} bytes its footer declares",
            layer=layer,
            offset=offset,
        )
