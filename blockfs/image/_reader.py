"""BlobChunkReader: fetch, decompress and verify the chunks of members of one blob."""

from __future__ import annotations

import io
import threading
from collections.abc import Callable, Sequence

import attrs

from blockfs.errors import BlockfsError
from blockfs.estargz import BlobSource, Chunk, read_coalesced, verify_piece
from blockfs.estargz._compression import decompress_spans
from blockfs.estargz._model import Compression


@attrs.frozen
class Compressed:
    """A member's bytes as fetched, not decompressed or verified yet
    (:meth:`BlobChunkReader.decode` does both)."""

    data: bytes


# What reading a member gives: its chunks' verified plaintext, its compressed bytes kept
# for later, or the error that kept it from being read.
MemberOutcome = list[bytes] | Compressed | BlockfsError


class BlobChunkReader:
    """Reads chunks of a blob from ``source``; members close together share one request."""

    def __init__(self, source: BlobSource, compression: Compression) -> None:
        self.source = source
        self.compression = compression

    @property
    def name(self) -> str:
        return self.source.name

    def read_members(
        self,
        members: Sequence[Sequence[tuple[str, Chunk]]],
        on_member: Callable[[int, MemberOutcome], None] | None = None,
        *,
        keep: Callable[[int], bool] | None = None,
    ) -> list[MemberOutcome]:
        """For each member, the verified plaintext of its ``(file name, chunk)`` pairs, or
        the error that kept it from being read.

        The compressed bytes of all members are read with :func:`read_coalesced`: the
        members of consecutive files are adjacent in the blob, so a read that spans many
        small files costs one request. A failed read fails every member it had not
        delivered; a member that does not decompress or verify fails alone.
        ``on_member(i, outcome)`` gets each member's outcome as soon as it is known: a
        member is decoded and verified as soon as its bytes are in, before the rest of
        its request (from the thread of that request). A member for which ``keep(i)`` is
        true when its bytes are in is not: its outcome is those bytes,
        :class:`Compressed`, for :meth:`decode` to check when they are needed.
        """
        # A member's run ends where the next member starts: its pieces are all inside.
        ranges = [(m[0][1].offset, m[0][1].end - m[0][1].offset) for m in members]
        results: list[MemberOutcome | None] = [None] * len(members)
        lock = threading.Lock()

        def settle(i: int, outcome: MemberOutcome) -> None:
            with lock:
                if results[i] is not None:
                    return
                results[i] = outcome
            if on_member is not None:
                on_member(i, outcome)

        def arrived(i: int, compressed: bytes) -> None:
            if keep is not None and keep(i):
                settle(i, Compressed(compressed))
                return
            try:
                settle(i, self.decode(members[i], compressed))
            except BlockfsError as e:
                settle(i, e)

        try:
            read_coalesced(self.source, ranges, on_range=arrived)
        except BlockfsError as e:
            # The source has retried already; members of a request that failed part way
            # were lost with it, but nothing wrong was returned.
            for i in range(len(members)):
                settle(i, e)
        done: list[MemberOutcome] = []
        for outcome in results:
            assert outcome is not None  # every range is delivered, or the read raised
            done.append(outcome)
        return done

    def decode(self, member: Sequence[tuple[str, Chunk]], data: bytes) -> list[bytes]:
        """The verified plaintext of the chunks of ``member`` from its compressed bytes
        ``data``; a :class:`blockfs.estargz.FormatError` if they are not right."""
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
