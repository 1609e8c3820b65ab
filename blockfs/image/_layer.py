"""LayerImage: the block image of one layer, read with ``pread``.

The image is ``[metadata region][data region]``. The metadata region is the EROFS index
file built on the node; the data region holds each regular file in its own block-aligned
extent, and its bytes come from the eStargz chunks behind that extent: from the chunk
cache when present, else fetched, decompressed and verified, then cached.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future
from typing import Protocol

import attrs

from blockfs.cache import ChunkCache
from blockfs.errors import BlockfsError
from blockfs.estargz import Chunk, FormatError
from blockfs.image._extents import ExtentMap


class ImageReadError(BlockfsError):
    """A read of the block image cannot return verified bytes."""


class ChunkReader(Protocol):
    """Fetches chunks of one blob and returns their verified plaintext."""

    @property
    def name(self) -> str: ...

    def read_chunks(self, chunks: Sequence[tuple[str, Chunk]]) -> list[bytes]:
        """Plaintext of ``(file name, chunk)`` pairs whose chunks start in one member.

        Raises a :class:`blockfs.errors.BlockfsError` if a chunk cannot be fetched or
        fails verification.
        """
        ...


@attrs.define
class LayerStats:
    """What a LayerImage has done since it was opened."""

    reads: int = 0
    read_bytes: int = 0
    data_reads: int = 0
    chunks_fetched: int = 0
    members_fetched: int = 0
    cache_hits: int = 0
    verification_failures: int = 0
    fetch_errors: int = 0
    fetch_seconds: float = 0.0

    def to_json(self) -> dict[str, int | float]:
        return attrs.asdict(self)


class LayerImage:
    """A read-only block image of one eStargz layer; ``pread`` is safe from many threads."""

    def __init__(
        self,
        name: str,
        meta_path: str | os.PathLike[str],
        extents: ExtentMap,
        reader: ChunkReader,
        cache: ChunkCache,
    ) -> None:
        self.name = name
        self.extents = extents
        self.reader = reader
        self.cache = cache
        self.stats = LayerStats()
        self._meta_fd = os.open(meta_path, os.O_RDONLY | os.O_CLOEXEC)
        meta_size = os.fstat(self._meta_fd).st_size
        if meta_size != extents.meta_size:
            os.close(self._meta_fd)
            raise ImageReadError(
                f"layer {name}: index is {meta_size} bytes, its extent map expects "
                f"{extents.meta_size}; re-index the layer"
            )
        self._lock = threading.Lock()
        self._inflight: dict[int, Future[dict[str, bytes]]] = {}

    @property
    def size(self) -> int:
        """Size of the block image in bytes."""
        return self.extents.image_size

    def close(self) -> None:
        """Release the index file."""
        if self._meta_fd >= 0:
            os.close(self._meta_fd)
            self._meta_fd = -1

    def pread(self, offset: int, length: int) -> bytes:
        """``length`` bytes of the image at ``offset``: verified file data, metadata or zeros."""
        if offset < 0 or length < 0 or offset + length > self.size:
            raise ImageReadError(
                f"layer {self.name}: read [{offset}, {offset + length}) outside image of "
                f"{self.size} bytes"
            )
        out = bytearray(length)
        pos, end = offset, offset + length
        meta_size = self.extents.meta_size
        if pos < meta_size:
            n = min(end, meta_size) - pos
            out[:n] = os.pread(self._meta_fd, n, pos)
            pos += n
        touched_data = pos < end
        bsize = self.extents.block_size
        while pos < end:
            i = self.extents.extent_at(pos)
            if i is None:
                # Not file data (only block padding can be here): zeros, one block at a time.
                pos = min((pos // bsize + 1) * bsize, end)
                continue
            start, file_size = self.extents.extent_span(i)
            file_offset = pos - start
            if file_offset >= file_size:
                pos = min(start + -(-file_size // bsize) * bsize, end)
                continue
            j = self.extents.chunk_in_extent(i, file_offset)
            chunk = self.extents.chunk(j)
            within = file_offset - chunk.chunk_offset
            take = min(chunk.size - within, end - pos, file_size - file_offset)
            out[pos - offset : pos - offset + take] = self._chunk_range(chunk, within, take)
            pos += take
        with self._lock:
            self.stats.reads += 1
            self.stats.read_bytes += length
            self.stats.data_reads += touched_data
        return bytes(out)

    def _chunk_range(self, chunk: Chunk, start: int, length: int) -> bytes:
        """Bytes ``[start, start + length)`` of ``chunk``: from the cache, else fetched."""
        for _ in range(3):
            data = self.cache.read(chunk.digest, start, length)
            if data is not None:
                with self._lock:
                    self.stats.cache_hits += 1
                return data
            fetched = self._fetch_member(chunk.offset)
            if chunk.digest in fetched:
                return fetched[chunk.digest][start : start + length]
            # Another reader cached the member between our look and our fetch: look again.
        raise ImageReadError(f"layer {self.name}: chunk {chunk.digest} keeps leaving the cache")

    def _fetch_member(self, member_offset: int) -> dict[str, bytes]:
        """Fetch (once, however many threads ask) every chunk that starts at ``member_offset``."""
        with self._lock:
            future = self._inflight.get(member_offset)
            owner = future is None
            if future is None:
                future = self._inflight[member_offset] = Future()
        if not owner:
            return future.result()
        try:
            members = self.extents.chunks_in_member(member_offset)
            chunks = [(self.extents.file_of_chunk(k), self.extents.chunk(k)) for k in members]
            if all(c.digest in self.cache for _, c in chunks):
                # A fetch that finished just before ours began already cached it all.
                future.set_result({})
                return {}
            started = time.monotonic()
            try:
                plain = self.reader.read_chunks(chunks)
            except FormatError:
                with self._lock:
                    self.stats.verification_failures += 1
                raise
            except BlockfsError:
                with self._lock:
                    self.stats.fetch_errors += 1
                raise
            result = {}
            for (_, c), data in zip(chunks, plain, strict=True):
                self.cache.put(c.digest, data)
                result[c.digest] = data
            with self._lock:
                self.stats.members_fetched += 1
                self.stats.chunks_fetched += len(chunks)
                self.stats.fetch_seconds += time.monotonic() - started
            future.set_result(result)
            return result
        except BaseException as exc:
            future.set_exception(exc)
            raise
        finally:
            with self._lock:
                del self._inflight[member_offset]

    def prefetch(self, end: int, stop: threading.Event | None = None) -> int:
        """Fetch into the cache every chunk whose member starts below blob offset ``end``.

        Returns how many members were fetched. Failures are left for on-demand reads.
        """
        fetched = 0
        offsets = sorted({self.extents.chunk(j).offset for j in range(self.extents.chunk_count)})
        for off in offsets:
            if off >= end or (stop is not None and stop.is_set()):
                break
            members = self.extents.chunks_in_member(off)
            if all(self.extents.chunk(k).digest in self.cache for k in members):
                continue
            try:
                self._fetch_member(off)
                fetched += 1
            except BlockfsError:
                continue
        return fetched
