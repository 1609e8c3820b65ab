"""The eStargz error hierarchy: every refusal of a blob says what, where and in which layer."""

from __future__ import annotations

from blockfs.errors import BlockfsError


class FormatError(BlockfsError):
    """A blob is not a valid eStargz layer, or its data does not match its TOC.

    ``layer`` names the blob (a path or a digest), ``entry`` the TOC entry concerned and
    ``offset`` the byte offset in the blob, when they are known.
    """

    def __init__(
        self,
        message: str,
        *,
        layer: str | None = None,
        entry: str | None = None,
        offset: int | None = None,
    ) -> None:
        super().__init__(message)
        self.layer = layer
        self.entry = entry
        self.offset = offset

    def context(self) -> list[str]:
        where = []
        if self.layer is not None:
            where.append(f"layer {self.layer}")
        if self.entry is not None:
            where.append(f"entry {self.entry!r}")
        if self.offset is not None:
            where.append(f"offset {self.offset}")
        return where


class TruncatedBlobError(FormatError):
    """The blob is shorter than its footer or TOC says it must be."""


class FooterError(FormatError):
    """The blob ends in none of the known footers (eStargz, legacy stargz, zstd)."""


class TOCError(FormatError):
    """The TOC cannot be read: not JSON, wrong version, too large, or a malformed field."""


class TOCTooLargeError(TOCError):
    """The TOC is larger than the configured limit."""


class TOCDigestMismatch(FormatError):
    """The sha256 of the TOC JSON differs from the expected TOC digest."""


class EntryError(TOCError):
    """A TOC entry is invalid or hostile: bad name, bad offsets, bad sizes, bad links."""


class ChunkVerificationError(FormatError):
    """A chunk's decompressed bytes do not match its ``chunkDigest`` or size."""


class DecompressionError(FormatError):
    """A gzip member or zstd frame in the blob is corrupt."""


class BuildError(FormatError):
    """A tar stream cannot be turned into an eStargz blob."""


class NoSuchEntryError(BlockfsError, FileNotFoundError):
    """The layer has no entry at the path asked for (also a FileNotFoundError)."""


class NotARegularFileError(BlockfsError, ValueError):
    """The entry at the path asked for is not a regular file (also a ValueError)."""
