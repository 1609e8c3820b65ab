"""BlobChunkReader: fetch, decompress and verify the chunks of members of one blob."""

from __future__ import annotations

import io
from collections.abc import Sequence

from blockfs.errors import BlockfsError
from blockfs.estargz import BlobSource, Chunk, read_coalesced, verify_piece
from blockfs.estargz._compression import decompress_spans
from blockfs.estargz._model import Compression


class BlobChunkReader:
    """Reads chunks of a blob from ``source``; members close together share one request."""

    def __init__(self, source: BlobSource, compression: Compression) -> None:
        self.source = source
        self.compression = compression

    @property
    def name(self) -> str:
        return self.source.name

    def read_members(
        self, members: Sequence[Sequence[tuple[str, Chunk]]]
    ) -> list[list[bytes] | BlockfsError]:
        """For each member, the verified plaintext of its ``(file name, chunk)`` pairs, or
        the error that kept it from being read.

        The compressed bytes of all members are read with :func:`read_coalesced`: the
        members of consecutive files are adjacent in the blob, so a read that spans many
        small files costs one request. A failed read fails every member; a member that
        does not decompress or verify fails alone.
        """
        # A member's run ends where the next member starts: its pieces are all inside.
        ranges = [(m[0][1].offset, m[0][1].end - m[0][1].offset) for m in members]
        try:
            data = read_coalesced(self.source, ranges)
        except BlockfsError as e:
            # The source has retried already; members fetched by a request that did
            # succeed were lost with it, but nothing wrong was returned.
            return [e] * len(members)
        results: list[list[bytes] | BlockfsError] = []
        for member, compressed in zip(members, data, strict=True):
            try:
                results.append(self._decode(member, compressed))
            except BlockfsError as e:
                results.append(e)
        return results

    def _decode(self, member: Sequence[tuple[str, Chunk]], data: bytes) -> list[bytes]:
        first_name, first = member[0]
        plain = decompress_spans(
            io.BytesIO(data),
            self.compression,
            [(c.inner_offset, c.size) for _, c in member],
            layer=self.name,
            entry=first_name,
            offset=first.offset,
        )
        for (name, c), piece in zip(member, plain, strict=True):
            verify_piece(piece, c, layer=self.name, entry=name)
        return plain
