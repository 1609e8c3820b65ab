"""The eStargz layer format: read, verify and write eStargz (and legacy stargz) blobs.

This package knows nothing of registries, EROFS or NBD: anyone who only wants to read an
eStargz blob can use it alone.
"""

from blockfs.estargz._compression import decompress_spans
from blockfs.estargz._errors import (
    BuildError,
    ChunkVerificationError,
    DecompressionError,
    EntryError,
    FooterError,
    FormatError,
    NoSuchEntryError,
    NotARegularFileError,
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
from blockfs.estargz._reader import BlobReader, Piece, VerifyReport, verify_piece
from blockfs.estargz._source import (
    BlobSource,
    CountingSource,
    FileBlobSource,
    SourceWrapper,
    StreamingBlobSource,
    TailBlobSource,
    read_coalesced,
)
from blockfs.estargz._toc import DEFAULT_LIMITS, Limits, clean_name, make_toc, parse_toc
from blockfs.estargz._writer import BuildOptions, BuildResult, build, build_file

__all__ = [
    "DEFAULT_LIMITS",
    "LANDMARKS",
    "NO_PREFETCH_LANDMARK",
    "PREFETCH_LANDMARK",
    "TOC",
    "TOC_TAR_NAME",
    "BlobReader",
    "BlobSource",
    "BuildError",
    "BuildOptions",
    "BuildResult",
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
    "Limits",
    "NoSuchEntryError",
    "NotARegularFileError",
    "Piece",
    "SourceWrapper",
    "StreamingBlobSource",
    "TOCDigestMismatch",
    "TOCError",
    "TOCTooLargeError",
    "TailBlobSource",
    "TruncatedBlobError",
    "VerifyReport",
    "build",
    "build_file",
    "clean_name",
    "decompress_spans",
    "make_toc",
    "parse_footer",
    "parse_toc",
    "read_coalesced",
    "verify_piece",
]
