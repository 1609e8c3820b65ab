"""The baseline of every read figure: the same blob members, decompressed with nothing else.

No blockfs code runs here, only ``os.pread``, ISA-L's inflate (which blockfs uses for
gzip) or zstandard and (optionally) sha256, so the gap to a blockfs figure is what
blockfs adds.
"""

from __future__ import annotations

import hashlib
import itertools
import os
from collections.abc import Iterable
from pathlib import Path

import zstandard
from isal import isal_zlib

from blockfs.estargz import Chunk
from blockfs.estargz._compression import GZIP_WBITS


def decompress_members(
    blob: str | os.PathLike[str], compression: str, chunks: Iterable[Chunk], *, hash_chunks: bool
) -> int:
    """Read and decompress each member behind ``chunks`` once; decompressed bytes produced.

    ``chunks`` are in blob order. With ``hash_chunks``, also take the sha256 of each
    chunk's bytes (compared with nothing: this is the cost of verifying, not a check).
    """
    total = 0
    zstd = zstandard.ZstdDecompressor()
    fd = os.open(Path(blob), os.O_RDONLY)
    try:
        for (offset, end), group in itertools.groupby(chunks, key=lambda c: (c.offset, c.end)):
            data = os.pread(fd, end - offset, offset)
            first = b""
            while data:
                d = (
                    isal_zlib.decompressobj(GZIP_WBITS)
                    if compression == "gzip"
                    else zstd.decompressobj()
                )
                plain = d.decompress(data)
                first = first or plain
                total += len(plain)
                data = d.unused_data
            if hash_chunks:
                view = memoryview(first)
                for c in group:
                    hashlib.sha256(view[c.inner_offset : c.inner_offset + c.size])
    finally:
        os.close(fd)
    return total
