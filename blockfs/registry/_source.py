"""A registry blob as a ranged byte source for the eStargz reader and the block image."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from blockfs.oci import Reference, validate_digest
from blockfs.registry._client import RegistryClient, RepositoryLike, repository_of
from blockfs.registry._errors import RangeNotSatisfiable, RegistryProtocolError

log = logging.getLogger(__name__)


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
    ) -> None:
        self._client = client
        self._registry, self._repository = repository_of(repository)
        self._digest = validate_digest(digest)
        self._size = size
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

    def read_tail(self, length: int) -> tuple[bytes, int]:
        """The last ``length`` bytes (all, if the blob is shorter) and the blob's size
        (``blockfs.estargz.TailBlobSource``): one request, without a ``HEAD`` when the size
        is not known yet; a registry that cannot answer a suffix range is asked for the
        size first."""
        if self._size is None:
            try:
                data, size = self._client.read_tail(
                    (self._registry, self._repository), self._digest, length
                )
            except (RegistryProtocolError, RangeNotSatisfiable) as e:
                # Some servers answer a suffix range with 416 or nonsense; the size and a
                # plain range then say the same in two requests (an empty blob, too).
                log.info("suffix range refused (%s); asking for the blob's size first", e)
            else:
                with self._lock:
                    self._size = size
                return data, size
        size = self.size
        take = min(length, size)
        return self.read_range(size - take, take), size

    def read_range(self, offset: int, length: int) -> bytes:
        """Exactly ``length`` bytes at ``offset``; raises if the blob has fewer."""
        return self.read_range_streaming(offset, length, None)

    def read_range_streaming(
        self, offset: int, length: int, on_bytes: Callable[[int, bytes], None] | None
    ) -> bytes:
        """:meth:`read_range`, with ``on_bytes(position, piece)`` called as the body
        arrives (``blockfs.estargz.StreamingBlobSource``)."""
        if length == 0:
            return b""
        self._check(offset, length)
        return self._client.read_range(
            (self._registry, self._repository), self._digest, offset, length, on_bytes=on_bytes
        )

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
