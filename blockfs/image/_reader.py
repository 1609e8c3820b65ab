"""BlobChunkReader: fetch, decompress and verify the chunks of one member run of a blob."""

from __future__ import annotations

import io
from collections.abc import Sequence

from blockfs.estargz import BlobSource, Chunk, verify_piece
from blockfs.estargz._compression import decompress_spans
from blockfs.estargz._model import Compression


class BlobChunkReader:
    """Reads chunks of a blob from ``source``: one range request per member run."""

    def __init__(self, source: BlobSource, compression: Compression) -> None:
        self.source = source
        self.compression = compression

    @property
    def name(self) -> str:
        return self.source.name

    def read_chunks(self, chunks: Sequence[tuple[str, Chunk]]) -> list[bytes]:
        """Verified plaintext of ``(file name, chunk)`` pairs that start in the same member."""
        first_name, first = chunks[0]
        # The run ends at the next member start: everything the pieces need is inside it.
        data = self.source.read_range(first.offset, first.end - first.offset)
        plain = decompress_spans(
            io.BytesIO(data),
            self.compression,
            [(c.inner_offset, c.size) for _, c in chunks],
            layer=self.name,
            entry=first_name,
            offset=first.offset,
        )
        for (name, c), piece in zip(chunks, plain, strict=True):
            verify_piece(piece, c, layer=self.name, entry=name)
        return plain
