"""Reading an eStargz blob: its footer and TOC, then verified file data, from any byte source.

A :class:`BlobReader` fetches only what it needs through :class:`BlobSource.read_range`:
the tail and the TOC when it opens, then one compressed member run per piece of data.
Every piece is checked against its ``chunkDigest`` before a byte of it is returned.
"""

from __future__ import annotations

import bisect
import hashlib
from collections.abc import Iterator, Sequence
from typing import Final

import attrs

from blockfs.estargz._compression import (
    Readable,
    decompress_spans,
    iter_gzip_toc,
    iter_zstd_toc,
)
from blockfs.estargz._errors import (
    ChunkVerificationError,
    DecompressionError,
    FormatError,
    NoSuchEntryError,
    NotARegularFileError,
    TOCDigestMismatch,
    TOCTooLargeError,
)
from blockfs.estargz._footer import MAX_FOOTER_SIZE, Footer, parse_footer
from blockfs.estargz._model import (
    NO_PREFETCH_LANDMARK,
    PREFETCH_LANDMARK,
    TOC,
    Chunk,
    Compression,
    Entry,
)
from blockfs.estargz._source import BlobSource, read_tail
from blockfs.estargz._toc import DEFAULT_LIMITS, Limits, parse_toc

__all__ = ["BlobReader", "Piece", "VerifyReport", "verify_piece"]

# One piece of file data as read: the file, the piece, and its verified bytes.
Piece = tuple[Entry, Chunk, bytes]

# Member runs that lie close together are fetched with one request of up to this size.
_BATCH_BYTES: Final = 8 << 20
# A run that is fetched on its own starts with a request sized for the bytes it should
# need and grows by doubling up to this size if the data turns out to be longer.
_MAX_WINDOW: Final = 16 << 20
_EMPTY_SHA256: Final = "sha256:" + hashlib.sha256(b"").hexdigest()

# Bytes at the end of a blob read to find its footer and TOC: enough for the TOC of most
# layers, so that opening one costs one request.
TOC_TAIL_GUESS = 256 << 10


@attrs.frozen
class VerifyReport:
    """What :meth:`BlobReader.verify` checked, and what failed if it kept going."""

    #: Pieces whose bytes matched their chunkDigest.
    chunks_verified: int
    #: Non-empty regular files whose pieces (and whole-file digest, if any) all matched.
    files_verified: int
    #: Uncompressed bytes checked.
    bytes_verified: int
    #: Pieces with no digest at all, read unchecked because the reader allows it.
    chunks_unverified: int = 0
    #: Errors found when not stopping at the first one.
    failures: tuple[FormatError, ...] = ()

    @property
    def ok(self) -> bool:
        """True when nothing failed."""
        return not self.failures


class _RangeStream:
    """Compressed bytes ``[start, end)`` of a blob, fetched from the source as they are read."""

    def __init__(self, source: BlobSource, start: int, end: int, first_fetch: int) -> None:
        self._source = source
        self._pos = start
        self._end = end
        self._fetch = max(first_fetch, 1)
        self._buf = memoryview(b"")

    def read(self, size: int, /) -> bytes:
        if not self._buf:
            if self._pos >= self._end:
                return b""
            length = min(self._end - self._pos, max(self._fetch, size))
            self._buf = memoryview(self._source.read_range(self._pos, length))
            self._pos += length
            self._fetch = min(2 * self._fetch, _MAX_WINDOW)
        out = self._buf[:size]
        self._buf = self._buf[size:]
        return bytes(out)


class _BufferStream:
    """A slice of bytes already fetched, read as a stream."""

    def __init__(self, view: memoryview) -> None:
        self._view = view

    def read(self, size: int, /) -> bytes:
        out = self._view[:size]
        self._view = self._view[size:]
        return bytes(out)


def _first_fetch(run: Sequence[tuple[Entry, Chunk]]) -> int:
    """Compressed bytes likely to hold a run's pieces: no more than their plain size.

    Compressed data is at most a hair larger than the data itself, plus headers; the run
    usually ends sooner, at the next member start, and then is fetched whole.
    """
    last = run[-1][1]
    need = last.inner_offset + last.size
    return need + need // 256 + 4096


class BlobReader:
    """A verified view of one eStargz (or legacy stargz, or zstd) blob.

    Open it with :meth:`open`. All reads may run concurrently from several threads.
    """

    def __init__(
        self,
        source: BlobSource,
        footer: Footer,
        toc: TOC,
        toc_digest: str,
        *,
        allow_unverified: bool = False,
    ) -> None:
        self.source = source
        self.footer = footer
        self.toc = toc
        self.toc_digest = toc_digest
        self.allow_unverified = allow_unverified
        # Every piece of file data, ordered by compressed offset, for finding the pieces
        # that share a member run: made when first needed (reading a layer's metadata
        # never needs it).
        self._pieces_cache: list[tuple[Entry, Chunk]] | None = None
        self._piece_offsets_cache: list[int] | None = None

    @property
    def _pieces(self) -> list[tuple[Entry, Chunk]]:
        if self._pieces_cache is None:
            toc = self.toc
            table = toc.table
            pieces: list[tuple[Entry, Chunk]] = []
            for row in table.live_rows():
                lo, hi = table.chunk_range(row)
                if lo < hi:
                    e = toc.row_entry(row)
                    pieces.extend((e, c) for c in e.chunks)
            pieces.sort(key=lambda p: p[1].offset)
            self._pieces_cache = pieces
        return self._pieces_cache

    @property
    def _piece_offsets(self) -> list[int]:
        if self._piece_offsets_cache is None:
            self._piece_offsets_cache = [c.offset for _, c in self._pieces]
        return self._piece_offsets_cache

    @classmethod
    def open(
        cls,
        source: BlobSource,
        *,
        toc_digest: str | None = None,
        limits: Limits = DEFAULT_LIMITS,
        allow_unverified: bool = False,
        tail_size: int | None = None,
    ) -> BlobReader:
        """Read the footer and TOC of the blob in ``source`` and check them.

        Fetches only the tail of the blob and the TOC. If ``toc_digest`` is given, the
        sha256 of the TOC JSON must equal it (:class:`TOCDigestMismatch` otherwise).
        ``allow_unverified`` lets pieces that have no digest at all (possible only in legacy
        stargz blobs) be read unchecked; otherwise reading them fails. ``tail_size``, when
        known (an image's ``toc.tail`` annotation), is how many bytes at the end hold the
        TOC and footer: they are read exactly, instead of a guess. A wrong one costs a
        second request or a few bytes more, never a wrong TOC.
        """
        name = source.name
        # One request for the footer and, usually, the TOC before it: a round trip costs
        # more than the bytes of a tail that reaches further back than the TOC. A registry
        # blob reads it as a suffix range, which needs no size (no HEAD first).
        guess = TOC_TAIL_GUESS
        if tail_size is not None and tail_size > 0:
            guess = min(tail_size, limits.max_toc_bytes + MAX_FOOTER_SIZE)
        tail, size = read_tail(source, max(MAX_FOOTER_SIZE, guess))
        tail_size = len(tail)
        tail_start = size - tail_size
        footer = parse_footer(tail[-MAX_FOOTER_SIZE:], size, layer=name)
        if footer.kind == "zstd":
            toc_start, toc_size = footer.toc_offset, footer.toc_compressed_size
        else:
            toc_start = footer.toc_offset
            toc_size = size - footer.size - toc_start
        if toc_size > limits.max_toc_bytes:
            raise TOCTooLargeError(
                f"compressed TOC of {toc_size} bytes exceeds the limit of {limits.max_toc_bytes}",
                layer=name,
                offset=toc_start,
            )
        if toc_size < 0 or toc_start + toc_size > size:
            compressed = source.read_range(toc_start, toc_size)  # raises what it should
        elif toc_start < tail_start:
            compressed = source.read_range(toc_start, tail_start - toc_start) + tail
        else:
            compressed = tail[toc_start - tail_start :]
        del tail
        compressed = compressed[:toc_size]
        # The TOC is decompressed, hashed and parsed piece by piece: neither its JSON text
        # nor the decoded JSON is ever held whole.
        pieces: Iterator[bytes]
        if footer.kind == "zstd":
            pieces = iter_zstd_toc(
                compressed,
                footer.toc_uncompressed_size,
                layer=name,
                offset=toc_start,
                max_bytes=limits.max_toc_bytes,
            )
        else:
            pieces = iter_gzip_toc(
                compressed, layer=name, offset=toc_start, max_bytes=limits.max_toc_bytes
            )
        hashed = _HashedPieces(pieces)
        try:
            toc = parse_toc(
                hashed,
                layer=name,
                payload_end=footer.payload_end(),
                limits=limits,
                # Legacy stargz predates chunkDigest.
                require_chunk_digests=footer.kind != "stargz",
            )
        except FormatError:
            # A TOC that is not what the digest says is reported as that, whatever else
            # is wrong with it: hash the rest (not parsing it) to tell.
            if toc_digest is not None and hashed.drain() and hashed.digest() != toc_digest:
                raise TOCDigestMismatch(
                    f"TOC digest is {hashed.digest()}, expected {toc_digest}",
                    layer=name,
                    offset=footer.toc_offset,
                ) from None
            raise
        digest = hashed.digest()
        if toc_digest is not None and digest != toc_digest:
            raise TOCDigestMismatch(
                f"TOC digest is {digest}, expected {toc_digest}",
                layer=name,
                offset=footer.toc_offset,
            )
        return cls(source, footer, toc, digest, allow_unverified=allow_unverified)

    @classmethod
    def from_toc_json(
        cls,
        source: BlobSource,
        toc_json: bytes,
        *,
        footer: Footer,
        toc_digest: str | None = None,
        limits: Limits = DEFAULT_LIMITS,
        allow_unverified: bool = False,
    ) -> BlobReader:
        """A reader over ``source`` from a TOC JSON and footer already at hand (kept on disk,
        say), checked as :meth:`open` checks them but without fetching anything."""
        name = source.name
        digest = "sha256:" + hashlib.sha256(toc_json).hexdigest()
        if toc_digest is not None and digest != toc_digest:
            raise TOCDigestMismatch(
                f"TOC digest is {digest}, expected {toc_digest}",
                layer=name,
                offset=footer.toc_offset,
            )
        toc = parse_toc(
            toc_json,
            layer=name,
            payload_end=footer.payload_end(),
            limits=limits,
            # Legacy stargz predates chunkDigest.
            require_chunk_digests=footer.kind != "stargz",
        )
        return cls(source, footer, toc, digest, allow_unverified=allow_unverified)

    @property
    def name(self) -> str:
        """The layer's name in messages (the source's name)."""
        return self.source.name

    @property
    def compression(self) -> Compression:
        """How the data members are compressed."""
        return self.footer.compression

    @property
    def toc_offset(self) -> int:
        """Where the TOC starts in the blob, as the footer says."""
        return self.footer.toc_offset

    # ----------------------------------------------------------------------------------
    # Pieces

    def read_chunk(self, entry: Entry, chunk: Chunk) -> bytes:
        """The verified bytes of one piece of ``entry``'s data."""
        ((_, _, data),) = self._read_pieces([(entry, chunk)])
        return data

    def read_member(self, entry: Entry, chunk: Chunk) -> list[Piece]:
        """Every piece (of any file) in the member run that holds ``chunk``, each verified.

        Pieces share a run when the blob was written with a minimum chunk size; they are
        fetched and decompressed once, so they are cheapest to verify and cache together.
        """
        lo = bisect.bisect_left(self._piece_offsets, chunk.offset)
        hi = bisect.bisect_right(self._piece_offsets, chunk.offset, lo)
        run = self._pieces[lo:hi]
        if not any(c == chunk and e.name == entry.name for e, c in run):
            raise ValueError(f"{entry.name!r} has no such piece at offset {chunk.offset}")
        return list(self._read_pieces(run))

    def _read_pieces(self, pieces: Sequence[tuple[Entry, Chunk]]) -> Iterator[Piece]:
        """Verified bytes of ``pieces`` (in blob order); raises at the first bad one."""
        for run, result in self._decode(pieces):
            if isinstance(result, FormatError):
                raise result
            for (e, c), data in zip(run, result, strict=True):
                self._check(e, c, data)
                yield e, c, data

    def _decode(
        self, pieces: Sequence[tuple[Entry, Chunk]]
    ) -> Iterator[tuple[list[tuple[Entry, Chunk]], list[bytes] | FormatError]]:
        """Each member run of ``pieces`` with its pieces' decompressed, unchecked bytes.

        A run whose data cannot be decompressed comes with the error instead. Runs that lie
        close together are fetched with one request.
        """
        for batch in _batches(_runs(pieces)):
            view: memoryview | None = None
            start = batch[0][0][1].offset
            if len(batch) > 1:
                view = memoryview(self.source.read_range(start, batch[-1][0][1].end - start))
            for run in batch:
                entry, first = run[0]
                stream: Readable
                if view is None:
                    stream = _RangeStream(self.source, first.offset, first.end, _first_fetch(run))
                else:
                    stream = _BufferStream(view[first.offset - start : first.end - start])
                try:
                    datas = decompress_spans(
                        stream,
                        self.compression,
                        [(c.inner_offset, c.size) for _, c in run],
                        layer=self.name,
                        entry=entry.name,
                        offset=first.offset,
                    )
                except DecompressionError as exc:
                    yield run, exc
                else:
                    yield run, datas

    def _check(self, entry: Entry, chunk: Chunk, data: bytes) -> bool:
        return verify_piece(
            data,
            chunk,
            layer=self.name,
            entry=entry.name,
            allow_unverified=self.allow_unverified,
        )

    # ----------------------------------------------------------------------------------
    # Files

    def _file(self, path: str) -> Entry:
        try:
            entry = self.toc.lookup(path)
        except KeyError:
            raise NoSuchEntryError(
                f"no {path!r} in layer {self.name}; paths are relative to the layer's root, "
                "and `blockfs layer inspect` lists them"
            ) from None
        if entry.type != "reg":
            raise NotARegularFileError(
                f"{path!r} in layer {self.name} is a {entry.type}, not a file; "
                "give the path of a regular file"
            )
        return entry

    def read_file(self, path: str, offset: int = 0, length: int | None = None) -> bytes:
        """Verified bytes ``[offset, offset + length)`` of the regular file at ``path``.

        Hardlinks are followed; the range is cut at the end of the file. Only the pieces
        that overlap the range are fetched.
        """
        if offset < 0 or (length is not None and length < 0):
            raise ValueError(f"bad range: offset {offset}, length {length}")
        entry = self._file(path)
        end = entry.size if length is None else min(entry.size, offset + length)
        if offset >= end:
            return b""
        first = entry.chunk_at(offset)
        last = entry.chunk_at(end - 1)
        parts = []
        for _, c, data in self._read_pieces([(entry, c) for c in entry.chunks[first : last + 1]]):
            lo = max(offset - c.chunk_offset, 0)
            hi = min(end - c.chunk_offset, c.size)
            parts.append(data[lo:hi] if (lo, hi) != (0, c.size) else data)
        return b"".join(parts)

    def iter_file(self, path: str) -> Iterator[bytes]:
        """The verified bytes of the regular file at ``path``, piece by piece."""
        entry = self._file(path)
        for _, _, data in self._read_pieces([(entry, c) for c in entry.chunks]):
            yield data

    # ----------------------------------------------------------------------------------
    # Whole blob

    def verify(self, *, fail_fast: bool = True) -> VerifyReport:
        """Read and check every piece of every file, and each file's whole digest.

        With ``fail_fast`` the first failure is raised; otherwise every failure is
        collected in the report and reading goes on.
        """
        failures: list[FormatError] = []
        chunks = files = nbytes = unverified = 0
        # The file being checked piece by piece (pieces of a file are contiguous).
        current: Entry | None = None
        hasher = hashlib.sha256()
        good = True

        def finish_file() -> None:
            nonlocal files
            if current is None or not good:
                return
            if current.digest and "sha256:" + hasher.hexdigest() != current.digest:
                fail(
                    ChunkVerificationError(
                        "the file's bytes do not match its digest",
                        layer=self.name,
                        entry=current.name,
                    )
                )
            else:
                files += 1

        def fail(error: FormatError) -> None:
            nonlocal good
            if fail_fast:
                raise error
            failures.append(error)
            good = False

        for run, result in self._decode(self._pieces):
            for k, (e, c) in enumerate(run):
                if e is not current:
                    finish_file()
                    current, hasher, good = e, hashlib.sha256(), True
                if isinstance(result, FormatError):
                    if good:
                        fail(result)
                    continue
                data = result[k]
                try:
                    checked = self._check(e, c, data)
                except ChunkVerificationError as exc:
                    fail(exc)
                    continue
                hasher.update(data)
                nbytes += len(data)
                if checked:
                    chunks += 1
                else:
                    unverified += 1
        finish_file()
        for e in self.toc.entries:
            if e.type == "reg" and e.size == 0 and e.digest and e.digest != _EMPTY_SHA256:
                fail(
                    ChunkVerificationError(
                        "an empty file's digest is not that of empty data",
                        layer=self.name,
                        entry=e.name,
                    )
                )
        return VerifyReport(
            chunks_verified=chunks,
            files_verified=files,
            bytes_verified=nbytes,
            chunks_unverified=unverified,
            failures=tuple(failures),
        )

    def prefetch_range(self) -> tuple[int, int] | None:
        """The compressed range ``[0, end)`` holding the prioritized files, if the blob has one.

        None when the blob has ``.no.prefetch.landmark`` or no landmark at all.
        """
        nodes = self.toc.nodes
        if NO_PREFETCH_LANDMARK in nodes:
            return None
        landmark = nodes.get(PREFETCH_LANDMARK)
        if landmark is None or not landmark.chunks:
            return None
        return (0, landmark.chunks[0].offset)


class _HashedPieces:
    """The pieces of a TOC's JSON, hashed as they go by."""

    def __init__(self, pieces: Iterator[bytes]) -> None:
        self._pieces = pieces
        self._sha = hashlib.sha256()
        self._failed = False

    def __iter__(self) -> Iterator[bytes]:
        try:
            for piece in self._pieces:
                self._sha.update(piece)
                yield piece
        except FormatError:
            self._failed = True
            raise

    def drain(self) -> bool:
        """Hash the pieces nobody read; False if they cannot all be read."""
        if self._failed:
            return False
        try:
            for piece in self._pieces:
                self._sha.update(piece)
        except FormatError:
            return False
        return True

    def digest(self) -> str:
        return "sha256:" + self._sha.hexdigest()


def verify_piece(
    data: bytes,
    chunk: Chunk,
    *,
    layer: str | None = None,
    entry: str | None = None,
    allow_unverified: bool = False,
) -> bool:
    """Check decompressed ``data`` against ``chunk``'s size and digest.

    Raises :class:`ChunkVerificationError` (naming ``layer``, ``entry`` and the chunk's
    offset) on a mismatch, or when the chunk has no digest (legacy stargz) unless
    ``allow_unverified``; returns False in that last case and True when verified.
    """
    if len(data) != chunk.size:
        raise ChunkVerificationError(
            f"piece has {len(data)} bytes, the TOC says {chunk.size}",
            layer=layer,
            entry=entry,
            offset=chunk.offset,
        )
    if not chunk.digest:
        if allow_unverified:
            return False
        raise ChunkVerificationError(
            "piece has no digest to verify it against (legacy stargz)",
            layer=layer,
            entry=entry,
            offset=chunk.offset,
        )
    actual = "sha256:" + hashlib.sha256(data).hexdigest()
    if actual != chunk.digest:
        raise ChunkVerificationError(
            f"bytes [{chunk.chunk_offset}, {chunk.chunk_offset + chunk.size}) of the file "
            f"have digest {actual}, the TOC says {chunk.digest}",
            layer=layer,
            entry=entry,
            offset=chunk.offset,
        )
    return True


def _runs(pieces: Sequence[tuple[Entry, Chunk]]) -> Iterator[list[tuple[Entry, Chunk]]]:
    """Group pieces in blob order into member runs: pieces that share a start offset."""
    run: list[tuple[Entry, Chunk]] = []
    for piece in pieces:
        if run and piece[1].offset != run[0][1].offset:
            yield run
            run = []
        run.append(piece)
    if run:
        yield run


def _batches(
    runs: Iterator[list[tuple[Entry, Chunk]]],
) -> Iterator[list[list[tuple[Entry, Chunk]]]]:
    """Group runs into batches whose compressed span is small enough to fetch at once."""
    batch: list[list[tuple[Entry, Chunk]]] = []
    for run in runs:
        if batch and run[0][1].end - batch[0][0][1].offset > _BATCH_BYTES:
            yield batch
            batch = []
        batch.append(run)
    if batch:
        yield batch
