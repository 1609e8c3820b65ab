"""Preload: a layer's prioritised region, requested before its index exists.

A layer's prioritised files sit at the start of its blob, before the prefetch landmark;
their prefetch is one request. Without help it can only start once the layer's TOC has
been fetched and indexed: a round trip, the TOC's bytes and the indexing, during which
the link carries nothing else. When the image says where the landmark is (the
``containerd.io/snapshot/blockfs/prefetch.end`` annotation), the snapshotter has the
server request ``[0, end)`` as soon as it has the manifest, and the bytes are kept here
as they arrive. Once the layer is indexed and opened, its prefetch reads through a
:class:`PreloadedSource`, which hands it these bytes (waiting for those still on the way)
instead of sending its own request.

Nothing is trusted here: the members are decompressed and verified against the TOC by
the reader, as if they came from the registry. A range is handed out once; a member
that failed verification is fetched again from the registry itself.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Hashable

from blockfs.errors import BlockfsError
from blockfs.estargz import BlobSource, CountingSource, SourceWrapper
from blockfs.estargz._source import read_range_streaming

log = logging.getLogger(__name__)

# The largest region kept: a longer one is preloaded up to here, the rest prefetched.
PRELOAD_MAX = 64 << 20
# A preload whose layer was not opened within this many seconds is dropped.
PRELOAD_TTL = 60.0


class Preload:
    """Reads ``[0, end)`` of ``source`` in one request, in a thread of its own, keeping
    the bytes until :meth:`release` and the end of every read that took a range."""

    def __init__(self, source: CountingSource, end: int, blob: Hashable) -> None:
        self.source = source
        self.end = min(end, PRELOAD_MAX)
        self.blob = blob  # what names the blob, to check it is the layer's
        self.started = time.monotonic()
        self._buf: bytearray | None = bytearray()
        self._error: BlockfsError | None = None
        self._done = False
        self._cond = threading.Condition()
        self._handed: list[tuple[int, int]] = []
        self._streams = 0  # reads between take and the end of their stream
        self._released = False
        threading.Thread(target=self._run, name=f"preload-{source.name[-12:]}", daemon=True).start()

    def _run(self) -> None:
        try:
            read_range_streaming(self.source, 0, self.end, self._arrived)
        except BlockfsError as e:
            with self._cond:
                self._error = e
        except Exception as e:  # a bug: the reads fall back to the registry
            log.exception("preload of %s failed", self.source.name)
            with self._cond:
                self._error = BlockfsError(f"preload failed: {e!r}")
        finally:
            with self._cond:
                self._done = True
                self._cond.notify_all()

    def _arrived(self, position: int, piece: bytes) -> None:
        with self._cond:
            buf = self._buf
            if buf is None:
                raise _Released("preload released")
            # A retried request starts again at 0 with the same bytes: keep what is new.
            if position + len(piece) > len(buf):
                buf += piece[len(buf) - position :] if position <= len(buf) else b""
                self._cond.notify_all()

    def take(self, offset: int, length: int) -> bool:
        """Claim ``[offset, offset + length)`` for one read, which must then :meth:`stream`
        it: False if the preload does not cover it, has failed, was released, or handed
        any of it out before (a read of the same bytes again is a refetch after a failed
        verification: it goes to the registry)."""
        end = offset + length
        with self._cond:
            if self._released or self._error is not None or end > self.end or offset < 0:
                return False
            if any(offset < e and s < end for s, e in self._handed):
                return False
            self._handed.append((offset, end))
            self._streams += 1
            return True

    def stream(self, offset: int, length: int, on_bytes: Callable[[int, bytes], None]) -> bytes:
        """The bytes of a range claimed with :meth:`take`, handed to ``on_bytes`` as they
        arrive; raises the preload's error if it fails first."""
        try:
            return self._stream(offset, length, on_bytes)
        finally:
            with self._cond:
                self._streams -= 1
                self._drop_if_unused()

    def _stream(self, offset: int, length: int, on_bytes: Callable[[int, bytes], None]) -> bytes:
        end = offset + length
        position = offset
        while position < end:
            with self._cond:
                while True:
                    buf = self._buf
                    assert buf is not None  # kept while a read streams
                    if len(buf) > position:
                        break
                    if self._error is not None:
                        raise self._error
                    if self._done:
                        raise BlockfsError("preload ended short of the range")
                    self._cond.wait()
                piece = bytes(buf[position : min(end, len(buf))])
            on_bytes(position - offset, piece)
            position += len(piece)
        with self._cond:
            assert self._buf is not None
            return bytes(self._buf[offset:end])

    @property
    def failed(self) -> bool:
        with self._cond:
            return self._error is not None

    def release(self) -> None:
        """Take no more reads, and drop the bytes once the reads under way have theirs (a
        read of the command ahead may still stream when the prefetch is done); the
        request, if still running then, stops at its next piece."""
        with self._cond:
            self._released = True
            self._drop_if_unused()

    def _drop_if_unused(self) -> None:
        if self._released and self._streams == 0:
            self._buf = None
            self._cond.notify_all()


class _Released(BlockfsError):
    """Stops the preload's request once nobody wants its bytes."""


class PreloadedSource(SourceWrapper):
    """``inner``, except that a streaming read inside ``preload``'s range takes its bytes
    from the preload (once per range)."""

    def __init__(self, inner: BlobSource, preload: Preload) -> None:
        super().__init__(inner)
        self.preload = preload

    def read_range(self, offset: int, length: int) -> bytes:
        return self.inner.read_range(offset, length)

    def read_range_streaming(
        self, offset: int, length: int, on_bytes: Callable[[int, bytes], None] | None
    ) -> bytes:
        if on_bytes is not None and self.preload.take(offset, length):
            try:
                return self.preload.stream(offset, length, on_bytes)
            except BlockfsError:
                pass  # the registry itself, from the range's start (a retry, to on_bytes)
        if on_bytes is None:
            return self.inner.read_range(offset, length)
        return read_range_streaming(self.inner, offset, length, on_bytes)
