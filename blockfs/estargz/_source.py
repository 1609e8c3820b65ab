"""Ranged byte sources: where a reader gets the bytes of a blob from."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol, cast, runtime_checkable

from blockfs.estargz._errors import TruncatedBlobError

# Ranges closer than this are read with one request: over a network, a second round trip
# costs more than the bytes in between.
DEFAULT_COALESCE_GAP = 64 << 10
DEFAULT_MAX_REQUEST = 16 << 20
# Requests of one read_coalesced call in flight at once.
MAX_PARALLEL_REQUESTS = 8


@runtime_checkable
class BlobSource(Protocol):
    """Random access to the bytes of one blob (a local file, a registry blob, ...).

    ``read_range`` returns exactly ``length`` bytes starting at ``offset`` or raises; it is
    called from several threads at once.
    """

    @property
    def name(self) -> str:
        """What to call this blob in messages: a path or a digest."""
        ...

    @property
    def size(self) -> int:
        """Total size of the blob in bytes."""
        ...

    def read_range(self, offset: int, length: int) -> bytes:
        """Exactly ``length`` bytes at ``offset``; raises if the blob has fewer."""
        ...


class StreamingBlobSource(BlobSource, Protocol):
    """A source whose reads can be watched as their bytes arrive (a registry blob)."""

    def read_range_streaming(
        self, offset: int, length: int, on_bytes: Callable[[int, bytes], None] | None
    ) -> bytes:
        """``read_range``, calling ``on_bytes(position, piece)`` as the bytes arrive,
        ``position`` counted from ``offset``; a read that starts over (a retry) starts
        again from position 0."""
        ...


class TailBlobSource(BlobSource, Protocol):
    """A source that reads its end without knowing its size first (a registry blob)."""

    def read_tail(self, length: int) -> tuple[bytes, int]:
        """The last ``length`` bytes (all, if the blob is shorter) and the blob's size."""
        ...


def read_tail(source: BlobSource, length: int) -> tuple[bytes, int]:
    """The last ``length`` bytes of ``source`` (all, if it is shorter) and its size: one
    request where the source can (no size asked first), else its size and a range."""
    # Looked up on the class: isinstance() with a protocol would read ``size``, which is
    # a HEAD request for a registry blob of unknown size, the very request saved here.
    if hasattr(type(source), "read_tail"):
        return cast(TailBlobSource, source).read_tail(length)
    size = source.size
    take = min(length, size)
    return source.read_range(size - take, take), size


def read_range_streaming(
    source: BlobSource, offset: int, length: int, on_bytes: Callable[[int, bytes], None]
) -> bytes:
    """``source.read_range(offset, length)``, with ``on_bytes`` seeing the bytes as they
    arrive where the source can tell (else once, all of them, at the end)."""
    if hasattr(type(source), "read_range_streaming"):
        return cast(StreamingBlobSource, source).read_range_streaming(offset, length, on_bytes)
    data = source.read_range(offset, length)
    on_bytes(0, data)
    return data


class FileBlobSource:
    """A blob in a local file, read with ``pread`` (safe to share between threads)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self._path = os.fspath(path)
        self._fd = os.open(self._path, os.O_RDONLY | os.O_CLOEXEC)
        self._size = os.fstat(self._fd).st_size
        self._lock = threading.Lock()

    @property
    def name(self) -> str:
        return self._path

    @property
    def size(self) -> int:
        return self._size

    def read_range(self, offset: int, length: int) -> bytes:
        if offset < 0 or length < 0 or offset + length > self._size:
            raise TruncatedBlobError(
                f"range [{offset}, {offset + length}) is outside the blob of {self._size} bytes",
                layer=self._path,
                offset=offset,
            )
        parts = []
        while length:
            data = os.pread(self._fd, length, offset)
            if not data:
                raise TruncatedBlobError(
                    "blob shrank while reading", layer=self._path, offset=offset
                )
            parts.append(data)
            offset += len(data)
            length -= len(data)
        return b"".join(parts)

    def close(self) -> None:
        """Close the file; reads after this fail."""
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1

    def __enter__(self) -> FileBlobSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SourceWrapper:
    """The base of a source that adds something to the reads of ``inner``: the blob's
    name and size are inner's."""

    def __init__(self, inner: BlobSource) -> None:
        self.inner = inner

    @property
    def name(self) -> str:
        return self.inner.name

    @property
    def size(self) -> int:
        return self.inner.size


class CountingSource(SourceWrapper):
    """Wraps a source and counts the bytes and requests that go through it."""

    def __init__(self, inner: BlobSource) -> None:
        super().__init__(inner)
        self._lock = threading.Lock()
        self.bytes_read = 0
        self.requests = 0

    def read_range(self, offset: int, length: int) -> bytes:
        data = self.inner.read_range(offset, length)
        self._count(data)
        return data

    def read_range_streaming(
        self, offset: int, length: int, on_bytes: Callable[[int, bytes], None] | None
    ) -> bytes:
        if on_bytes is None:
            return self.read_range(offset, length)
        # Counted as the bytes arrive, before they are handed on: whoever they wake may
        # look at the counts at once.
        counted: int | None = None  # bytes counted so far; None before the first piece

        def counting(pos: int, data: bytes) -> None:
            nonlocal counted
            with self._lock:
                self.bytes_read += len(data)
                self.requests += counted is None
            counted = (counted or 0) + len(data)
            on_bytes(pos, data)

        data = read_range_streaming(self.inner, offset, length, counting)
        with self._lock:  # a response that came without a piece handed on
            self.bytes_read += len(data) - (counted or 0)
            self.requests += counted is None
        return data

    def read_tail(self, length: int) -> tuple[bytes, int]:
        data, size = read_tail(self.inner, length)
        self._count(data)
        return data, size

    def _count(self, data: bytes) -> None:
        with self._lock:
            self.bytes_read += len(data)
            self.requests += 1


def read_coalesced(
    source: BlobSource,
    ranges: Sequence[tuple[int, int]],
    *,
    gap: int = DEFAULT_COALESCE_GAP,
    max_request: int = DEFAULT_MAX_REQUEST,
    on_range: Callable[[int, bytes], None] | None = None,
) -> list[bytes]:
    """The bytes of each ``(offset, length)`` in ``ranges``, in the order given.

    Ranges less than ``gap`` bytes apart are read with one ``read_range`` of at most
    ``max_request`` bytes (a single range may be longer), so that many small pieces,
    such as the adjacent members of consecutive files, cost one round trip. Groups that
    need requests of their own are requested at the same time, so that the call costs
    one round trip rather than one per group. ``on_range(i, data)`` gets range ``i`` as
    soon as its bytes are in, before the rest of its request (from the thread of that
    request; once per range); after a failure, the ranges it did not get are lost with
    the exception raised.
    """
    for offset, length in ranges:
        if offset < 0 or length < 0:
            raise ValueError(f"invalid range: offset {offset}, length {length}")
    order = sorted((i for i, r in enumerate(ranges) if r[1] > 0), key=lambda i: ranges[i][0])
    groups: list[tuple[list[int], int, int]] = []  # (indexes into ranges, start, end)
    for i in order:
        offset, length = ranges[i]
        if groups:
            members, start, end = groups[-1]
            if offset <= end + gap and max(end, offset + length) - start <= max_request:
                members.append(i)
                groups[-1] = (members, start, max(end, offset + length))
                continue
        groups.append(([i], offset, offset + length))
    results: list[bytes] = [b""] * len(ranges)

    def read(group: tuple[list[int], int, int]) -> None:
        members, start, end = group
        if on_range is None:
            data = source.read_range(start, end - start)
        else:
            data = read_range_streaming(
                source, start, end - start, _Arrivals(ranges, members, start, on_range).take
            )
        for i in members:
            offset, length = ranges[i]
            results[i] = data[offset - start : offset - start + length]

    if len(groups) <= 1:
        for group in groups:
            read(group)
        return results
    with ThreadPoolExecutor(max_workers=min(len(groups), MAX_PARALLEL_REQUESTS)) as pool:
        # list() waits for every group and raises the first failure.
        list(pool.map(read, groups))
    return results


class _Arrivals:
    """Hands each range of one request to ``on_range`` once the bytes up to its end are
    in: the body arrives in order, and a request tried again starts again at 0."""

    def __init__(
        self,
        ranges: Sequence[tuple[int, int]],
        members: Sequence[int],
        start: int,
        on_range: Callable[[int, bytes], None],
    ) -> None:
        self._ranges = ranges
        # By where each range ends in the request, so that they go out as the bytes come.
        self._pending = sorted(members, key=lambda i: ranges[i][0] + ranges[i][1])
        self._start = start
        self._on_range = on_range
        self._buf = bytearray()

    def take(self, position: int, piece: bytes) -> None:
        if position < len(self._buf):
            # A retry from the start: the ranges handed out already are not again.
            del self._buf[position:]
        elif position > len(self._buf):
            raise ValueError(f"a body piece at {position} after {len(self._buf)} bytes")
        self._buf += piece
        have = self._start + len(self._buf)
        while self._pending:
            i = self._pending[0]
            offset, length = self._ranges[i]
            if offset + length > have:
                break
            self._pending.pop(0)
            begin = offset - self._start
            with memoryview(self._buf) as view:
                data = bytes(view[begin : begin + length])
            self._on_range(i, data)
