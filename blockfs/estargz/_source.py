"""Ranged byte sources: where a reader gets the bytes of a blob from."""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol, runtime_checkable

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


class CountingSource:
    """Wraps a source and counts the bytes and requests that go through it."""

    def __init__(self, inner: BlobSource) -> None:
        self.inner = inner
        self._lock = threading.Lock()
        self.bytes_read = 0
        self.requests = 0

    @property
    def name(self) -> str:
        return self.inner.name

    @property
    def size(self) -> int:
        return self.inner.size

    def read_range(self, offset: int, length: int) -> bytes:
        data = self.inner.read_range(offset, length)
        with self._lock:
            self.bytes_read += len(data)
            self.requests += 1
        return data


def read_coalesced(
    source: BlobSource,
    ranges: Sequence[tuple[int, int]],
    *,
    gap: int = DEFAULT_COALESCE_GAP,
    max_request: int = DEFAULT_MAX_REQUEST,
) -> list[bytes]:
    """The bytes of each ``(offset, length)`` in ``ranges``, in the order given.

    Ranges less than ``gap`` bytes apart are read with one ``read_range`` of at most
    ``max_request`` bytes (a single range may be longer), so that many small pieces,
    such as the adjacent members of consecutive files, cost one round trip. Groups that
    need requests of their own are requested at the same time, so that the call costs
    one round trip rather than one per group.
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
        data = source.read_range(start, end - start)
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
