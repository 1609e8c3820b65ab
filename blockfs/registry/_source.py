"""A registry blob as a ranged byte source for the eStargz reader and the block image."""

from __future__ import annotations

import threading
from collections.abc import Sequence

from blockfs.oci import Reference, validate_digest
from blockfs.registry._client import RegistryClient, RepositoryLike, repository_of
from blockfs.registry._errors import RangeNotSatisfiable

# Ranges closer than this are fetched in one request: a second round trip costs more
# than the bytes in between.
DEFAULT_COALESCE_GAP = 64 << 10
DEFAULT_MAX_REQUEST = 16 << 20


class RegistryBlobSource:
    """One registry blob read by ranges; satisfies ``blockfs.estargz.BlobSource``.

    ``size`` is asked of the registry once (HEAD) unless given. Thread-safe.
    """

    def __init__(
        self,
        client: RegistryClient,
        repository: RepositoryLike,
        digest: str,
        size: int | None = None,
        *,
        coalesce_gap: int = DEFAULT_COALESCE_GAP,
        max_request: int = DEFAULT_MAX_REQUEST,
    ) -> None:
        self._client = client
        self._registry, self._repository = repository_of(repository)
        self._digest = validate_digest(digest)
        self._size = size
        self._gap = coalesce_gap
        self._max_request = max_request
        self._lock = threading.Lock()

    @property
    def name(self) -> str:
        """``host/repository@digest``."""
        return f"{self._registry}/{self._repository}@{self._digest}"

    @property
    def reference(self) -> Reference:
        """The blob's repository and digest as a reference."""
        return Reference(self._registry, self._repository, digest=self._digest)

    @property
    def digest(self) -> str:
        """The blob's digest."""
        return self._digest

    @property
    def size(self) -> int:
        """The blob's size in bytes (one HEAD request the first time, if not given)."""
        with self._lock:
            if self._size is None:
                self._size = self._client.blob_size(
                    (self._registry, self._repository), self._digest
                )
            return self._size

    def read_range(self, offset: int, length: int) -> bytes:
        """Exactly ``length`` bytes at ``offset``; raises if the blob has fewer."""
        if length == 0:
            return b""
        self._check(offset, length)
        return self._client.read_range(
            (self._registry, self._repository), self._digest, offset, length
        )

    def read_ranges(self, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
        """The bytes of each ``(offset, length)`` in ``ranges``, in the order given.

        Ranges less than the coalescing gap apart are fetched with one request (up to
        ``max_request`` bytes each), which suits prefetching many small chunks.
        """
        for offset, length in ranges:
            self._check(offset, length)
        order = sorted((i for i, r in enumerate(ranges) if r[1] > 0), key=lambda i: ranges[i][0])
        results: list[bytes] = [b""] * len(ranges)
        group: list[int] = []
        group_start = group_end = 0
        for i in order:
            offset, length = ranges[i]
            end = offset + length
            if (
                group
                and offset <= group_end + self._gap
                and max(group_end, end) - group_start <= self._max_request
            ):
                group.append(i)
                group_end = max(group_end, end)
                continue
            if group:
                self._fetch_group(ranges, group, group_start, group_end, results)
            group, group_start, group_end = [i], offset, end
        if group:
            self._fetch_group(ranges, group, group_start, group_end, results)
        return results

    def _fetch_group(
        self,
        ranges: Sequence[tuple[int, int]],
        group: list[int],
        start: int,
        end: int,
        results: list[bytes],
    ) -> None:
        data = self.read_range(start, end - start)
        for i in group:
            offset, length = ranges[i]
            results[i] = data[offset - start : offset - start + length]

    def _check(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0:
            raise ValueError(f"invalid range: offset {offset}, length {length}")
        known = self._size  # no lock: a HEAD in progress must not hold up reads
        if known is not None and offset + length > known:
            raise RangeNotSatisfiable(
                f"range [{offset}, {offset + length}) is outside the blob of {known} bytes",
                host=self._registry,
                repository=self._repository,
                digest=self._digest,
            )
