"""The three footers that end an eStargz blob, read and written through named structs."""

from __future__ import annotations

import struct

import attrs

from blockfs.estargz._errors import FooterError
from blockfs.estargz._model import Compression, FooterKind

# eStargz footer, 51 bytes: an empty gzip member whose FEXTRA field holds one RFC 1952
# subfield "SG". Offsets: 0 magic 1f8b, 2 CM, 3 FLG=FEXTRA, 4 MTIME, 8 XFL, 9 OS,
# 10 XLEN=26, 12 SI1 'S', 13 SI2 'G', 14 LEN=22, 16 TOC offset (16 hex digits),
# 32 "STARGZ", 38 empty final stored block, 43 CRC32=0, 47 ISIZE=0.
ESTARGZ_FOOTER = struct.Struct("<2sBBIBBH2sH16s6s5sII")
ESTARGZ_FOOTER_SIZE = ESTARGZ_FOOTER.size  # 51

# Legacy stargz (CRFS) footer, 47 bytes: like the above but the 22-byte extra field has no
# subfield header. Offsets: 10 XLEN=22, 12 TOC offset (16 hex digits), 28 "STARGZ",
# 34 empty final stored block, 39 CRC32=0, 43 ISIZE=0.
LEGACY_FOOTER = struct.Struct("<2sBBIBBH16s6s5sII")
LEGACY_FOOTER_SIZE = LEGACY_FOOTER.size  # 47

# zstd footer: a skippable frame (magic 0x184D2A50, u32 length 40) whose 40-byte payload
# is: 0 TOC offset, 8 compressed TOC length, 16 uncompressed TOC length, 24 manifest
# type (1), 32 magic "GnUlInUx"; the integers are little-endian u64.
ZSTD_SKIPPABLE_HEADER = struct.Struct("<II")
ZSTD_FOOTER_PAYLOAD = struct.Struct("<QQQQ8s")
ZSTD_FOOTER_SIZE = ZSTD_SKIPPABLE_HEADER.size + ZSTD_FOOTER_PAYLOAD.size  # 48

ZSTD_SKIPPABLE_MAGIC = 0x184D2A50
ZSTD_MANIFEST_MAGIC = b"GnUlInUx"
ZSTD_MANIFEST_TYPE_CRFS = 1

MAX_FOOTER_SIZE = max(ESTARGZ_FOOTER_SIZE, LEGACY_FOOTER_SIZE, ZSTD_FOOTER_SIZE)

_GZIP_MAGIC = b"\x1f\x8b"
_EMPTY_STORED_BLOCK = b"\x01\x00\x00\xff\xff"
_STARGZ = b"STARGZ"


@attrs.frozen
class Footer:
    """What a footer says: where the TOC is and how the blob is compressed.

    For gzip blobs the TOC member spans ``[toc_offset, payload end)``; for zstd blobs the
    compressed TOC frame is ``[toc_offset, toc_offset + toc_compressed_size)``.
    """

    kind: FooterKind
    toc_offset: int
    size: int
    toc_compressed_size: int = 0
    toc_uncompressed_size: int = 0

    @property
    def compression(self) -> Compression:
        return "zstd" if self.kind == "zstd" else "gzip"

    def payload_end(self) -> int:
        """Where the data members end: the TOC's start (minus its frame header for zstd)."""
        if self.kind == "zstd":
            return self.toc_offset - ZSTD_SKIPPABLE_HEADER.size
        return self.toc_offset


def encode_estargz_footer(toc_offset: int) -> bytes:
    """The 51-byte eStargz footer pointing at ``toc_offset``."""
    return ESTARGZ_FOOTER.pack(
        _GZIP_MAGIC, 8, 4, 0, 0, 0xFF, 26, b"SG", 22,
        b"%016x" % toc_offset, _STARGZ, _EMPTY_STORED_BLOCK, 0, 0,
    )  # fmt: skip


def encode_legacy_footer(toc_offset: int) -> bytes:
    """The 47-byte legacy stargz footer pointing at ``toc_offset``."""
    return LEGACY_FOOTER.pack(
        _GZIP_MAGIC, 8, 4, 0, 0, 0xFF, 22,
        b"%016x" % toc_offset, _STARGZ, _EMPTY_STORED_BLOCK, 0, 0,
    )  # fmt: skip


def encode_zstd_footer(toc_offset: int, compressed_size: int, uncompressed_size: int) -> bytes:
    """The zstd skippable frame that ends a zstd eStargz blob."""
    payload = ZSTD_FOOTER_PAYLOAD.pack(
        toc_offset, compressed_size, uncompressed_size, ZSTD_MANIFEST_TYPE_CRFS, ZSTD_MANIFEST_MAGIC
    )
    return ZSTD_SKIPPABLE_HEADER.pack(ZSTD_SKIPPABLE_MAGIC, len(payload)) + payload


def _hex_offset(text: bytes) -> int | None:
    try:
        value = int(text.decode("ascii"), 16)
    except (UnicodeDecodeError, ValueError):
        return None
    return value if text.isalnum() else None


def _parse_estargz(tail: bytes) -> int | None:
    if len(tail) < ESTARGZ_FOOTER_SIZE:
        return None
    f = ESTARGZ_FOOTER.unpack(tail[-ESTARGZ_FOOTER_SIZE:])
    magic, cm, flg, _mtime, _xfl, _os, xlen, si, sublen, hexoff, mark, block, crc, isize = f
    if (magic, cm, flg, xlen, si, sublen, mark) != (_GZIP_MAGIC, 8, 4, 26, b"SG", 22, _STARGZ):
        return None
    if block != _EMPTY_STORED_BLOCK or crc or isize:
        return None
    return _hex_offset(hexoff)


def _parse_legacy(tail: bytes) -> int | None:
    if len(tail) < LEGACY_FOOTER_SIZE:
        return None
    magic, cm, flg, _mtime, _xfl, _os, xlen, hexoff, mark, block, crc, isize = LEGACY_FOOTER.unpack(
        tail[-LEGACY_FOOTER_SIZE:]
    )
    if (magic, cm, flg, xlen, mark) != (_GZIP_MAGIC, 8, 4, 22, _STARGZ):
        return None
    if block != _EMPTY_STORED_BLOCK or crc or isize:
        return None
    return _hex_offset(hexoff)


def _parse_zstd(tail: bytes) -> tuple[int, int, int] | None:
    if len(tail) < ZSTD_FOOTER_SIZE:
        return None
    magic, length = ZSTD_SKIPPABLE_HEADER.unpack_from(tail, len(tail) - ZSTD_FOOTER_SIZE)
    toc_offset, clen, ulen, mtype, mmagic = ZSTD_FOOTER_PAYLOAD.unpack(
        tail[-ZSTD_FOOTER_PAYLOAD.size :]
    )
    if magic != ZSTD_SKIPPABLE_MAGIC or length != ZSTD_FOOTER_PAYLOAD.size:
        return None
    if mmagic != ZSTD_MANIFEST_MAGIC or mtype != ZSTD_MANIFEST_TYPE_CRFS:
        return None
    return toc_offset, clen, ulen


def parse_footer(tail: bytes, blob_size: int, *, layer: str | None = None) -> Footer:
    """Recognise the footer at the end of ``tail`` (the last bytes of a blob of ``blob_size``).

    Tries eStargz, legacy stargz, then zstd, as the reference reader does, and checks that
    the TOC it points to lies inside the blob.
    """
    off = _parse_estargz(tail)
    if off is not None:
        footer = Footer("estargz", off, ESTARGZ_FOOTER_SIZE)
    elif (off := _parse_legacy(tail)) is not None:
        footer = Footer("stargz", off, LEGACY_FOOTER_SIZE)
    elif (z := _parse_zstd(tail)) is not None:
        footer = Footer("zstd", z[0], ZSTD_FOOTER_SIZE, z[1], z[2])
    else:
        raise FooterError(
            "not an eStargz blob: it ends in no eStargz, stargz or zstd footer", layer=layer
        )
    if footer.kind == "zstd":
        toc_end = footer.toc_offset + footer.toc_compressed_size
        bad = footer.toc_offset < ZSTD_SKIPPABLE_HEADER.size or toc_end > blob_size - footer.size
    else:
        bad = footer.toc_offset >= blob_size - footer.size
    if bad or blob_size < footer.size:
        raise FooterError(
            f"footer points to a TOC outside the blob of {blob_size} bytes",
            layer=layer,
            offset=footer.toc_offset,
        )
    return footer
