"""The eStargz layer format: read, verify and write eStargz (and legacy stargz) blobs.

This package knows nothing of registries, EROFS or NBD: anyone who only wants to read an
eStargz blob can use it alone.
"""

from blockfs.estargz._errors import (
    BuildError,
    ChunkVerificationError,
    DecompressionError,
    EntryError,
    FooterError,
    FormatError,
    TOCDigestMismatch,
    TOCError,
    TOCTooLargeError,
    TruncatedBlobError,
)
from blockfs.estargz._footer import Footer, parse_footer
from blockfs.estargz._model import (
    LANDMARKS,
    NO_PREFETCH_LANDMARK,
    PREFETCH_LANDMARK,
    TOC,
    TOC_TAR_NAME,
    Chunk,
    Entry,
)
from blockfs.estargz._source import BlobSource, CountingSource, FileBlobSource

__all__ = [
    "LANDMARKS",
    "NO_PREFETCH_LANDMARK",
    "PREFETCH_LANDMARK",
    "TOC",
    "TOC_TAR_NAME",
    "BlobSource",
    "BuildError",
    "Chunk",
    "ChunkVerificationError",
    "CountingSource",
    "DecompressionError",
    "Entry",
    "EntryError",
    "FileBlobSource",
    "Footer",
    "FooterError",
    "FormatError",
    "TOCDigestMismatch",
    "TOCError",
    "TOCTooLargeError",
    "TruncatedBlobError",
    "parse_footer",
]
