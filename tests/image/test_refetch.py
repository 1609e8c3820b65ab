"""A chunk that fails verification is fetched again, a bounded number of times.

The blobs here are intact; ``FlippingSource`` flips one byte of the responses that cover
a chosen member. It stands in for a network glitch: a 206 body whose bits were flipped on
the way. A glitch that happens once must not become a permanent EIO; bytes that are
always wrong must fail the read after a few attempts, and must never reach the cache.
"""

import io
import threading
from typing import Literal

import pytest
from test_layer_image import open_image as open_layer_image

from blockfs.estargz import (
    BlobReader,
    ChunkVerificationError,
    DecompressionError,
    FileBlobSource,
    FormatError,
    SourceWrapper,
    decompress_spans,
    verify_piece,
)
from blockfs.image import (
    MAX_FETCH_ATTEMPTS,
)
from tests.helpers.testdata import TESTDATA

NAME = "usr/share/doc/README"


class FlippingSource(SourceWrapper):
    """A real blob source whose responses covering blob offset ``at`` have that byte
    flipped, the first ``times`` times (``None``: every time)."""

    def __init__(self, inner: FileBlobSource, at: int, times: int | None) -> None:
        super().__init__(inner)
        self.at = at
        self.times = times
        self.hits = 0  # responses that covered ``at``
        self.requests = 0
        self.hold = threading.Event()  # set: the first covering response may go
        self.hold.set()
        self._lock = threading.Lock()

    def read_range(self, offset: int, length: int) -> bytes:
        data = self.inner.read_range(offset, length)
        with self._lock:
            self.requests += 1
            if not offset <= self.at < offset + length:
                return data
            self.hits += 1
            first = self.hits == 1
            flip = self.times is None or self.hits <= self.times
        if first:
            self.hold.wait(5)
        if flip:
            damaged = bytearray(data)
            damaged[self.at - offset] ^= 0x01
            data = bytes(damaged)
        return data


def flip_position(blob: str, name: str, kind: type[FormatError]) -> int:
    """A blob offset in ``name``'s first member where one flipped bit makes the member
    fail with ``kind``: a digest mismatch or a decompression error."""
    compression: Literal["gzip", "zstd"] = "zstd" if blob.startswith("zstd") else "gzip"
    source = FileBlobSource(TESTDATA / blob)
    chunk = BlobReader.open(source).toc.lookup(name).chunks[0]
    data = source.read_range(chunk.offset, chunk.end - chunk.offset)
    middle = len(data) // 2
    for pos in sorted(range(len(data)), key=lambda p: abs(p - middle)):
        damaged = bytearray(data)
        damaged[pos] ^= 0x01
        try:
            (piece,) = decompress_spans(
                io.BytesIO(bytes(damaged)), compression, [(chunk.inner_offset, chunk.size)]
            )
            verify_piece(piece, chunk)
        except FormatError as e:
            if type(e) is kind:
                return chunk.offset + pos
    raise AssertionError(f"no single bit flip in {name} gives {kind.__name__}")


def open_image(tmp_path, blob, source):
    """The image of ``blob`` read through ``source``, fetching only the member under test;
    (image, toc, extent map, chunk cache)."""
    image, toc, emap, _ = open_layer_image(TESTDATA / blob, tmp_path, source=source)
    return image, toc, emap, image.cache


def span_of(emap, toc, name):
    for i in range(emap.extent_count):
        if emap.extent_name(i) == toc.lookup(name).name:
            return emap.extent_span(i)
    raise AssertionError(f"no extent for {name}")


CASES = [
    (blob, kind)
    for blob in ("gzip-64k.esgz", "zstd-64k.esgz")
    for kind in (ChunkVerificationError, DecompressionError)
]


@pytest.mark.parametrize(("blob", "kind"), CASES, ids=lambda v: getattr(v, "__name__", v))
def test_a_member_corrupt_once_is_fetched_again_and_read_right(tmp_path, layer_files, blob, kind):
    at = flip_position(blob, NAME, kind)
    source = FlippingSource(FileBlobSource(TESTDATA / blob), at, times=1)
    image, toc, emap, cache = open_image(tmp_path, blob, source)
    start, size = span_of(emap, toc, NAME)
    assert image.pread(start, size) == layer_files[NAME]
    assert source.hits == 2
    assert image.stats.verification_failures == 1
    assert image.stats.refetches == 1
    assert image.stats.fetch_errors == 0
    # What was cached is the good chunk: a second read needs no fetch and is right.
    chunk = toc.lookup(NAME).chunks[0]
    assert cache.get(chunk.digest) == layer_files[NAME][: chunk.size]
    assert image.pread(start, size) == layer_files[NAME]
    assert source.hits == 2


@pytest.mark.parametrize(("blob", "kind"), CASES, ids=lambda v: getattr(v, "__name__", v))
def test_a_member_always_corrupt_fails_after_the_bound_and_is_never_cached(
    tmp_path, layer_files, blob, kind
):
    at = flip_position(blob, NAME, kind)
    source = FlippingSource(FileBlobSource(TESTDATA / blob), at, times=None)
    image, toc, emap, cache = open_image(tmp_path, blob, source)
    start, size = span_of(emap, toc, NAME)
    with pytest.raises(kind, match=f"{MAX_FETCH_ATTEMPTS} times"):
        image.pread(start, size)
    assert source.hits == MAX_FETCH_ATTEMPTS
    assert image.stats.verification_failures == MAX_FETCH_ATTEMPTS
    assert image.stats.refetches == MAX_FETCH_ATTEMPTS - 1
    assert image.stats.members_fetched == 0
    assert image.stats.fetch_errors == 0
    for chunk in toc.lookup(NAME).chunks:
        assert chunk.digest not in cache
    # Once the network is healthy again, the next read fetches afresh and succeeds.
    source.times = 0
    assert image.pread(start, size) == layer_files[NAME]
    assert "refetches" in image.stats.to_json()


def test_a_readahead_with_one_glitched_member_refetches_only_that_member(tmp_path, layer_files):
    blob = "gzip-64k.esgz"
    at = flip_position(blob, NAME, ChunkVerificationError)
    source = FlippingSource(FileBlobSource(TESTDATA / blob), at, times=1)
    image, toc, emap, _ = open_image(tmp_path, blob, source)
    spans = [emap.extent_span(i) for i in range(emap.extent_count)]
    start = min(s for s, _ in spans)
    end = max(s + -(-n // 4096) * 4096 for s, n in spans)
    image.pread(start, end - start)  # every member in one coalesced request, then one refetch
    assert source.requests == 2
    assert image.stats.refetches == 1
    members = {emap.chunk(j).offset for j in range(emap.chunk_count)}
    assert image.stats.members_fetched == len(members)
    begin, size = span_of(emap, toc, NAME)
    assert image.pread(begin, size) == layer_files[NAME]


@pytest.mark.parametrize("times", [1, None], ids=["glitch-once", "always-corrupt"])
def test_concurrent_readers_of_a_glitched_member_share_its_refetch(tmp_path, layer_files, times):
    blob = "gzip-64k.esgz"
    at = flip_position(blob, NAME, ChunkVerificationError)
    source = FlippingSource(FileBlobSource(TESTDATA / blob), at, times=times)
    source.hold.clear()  # the first, corrupt response waits until every reader has asked
    image, toc, emap, cache = open_image(tmp_path, blob, source)
    start, size = span_of(emap, toc, NAME)
    results: list[bytes | BaseException] = []
    lock = threading.Lock()

    def read() -> None:
        try:
            got: bytes | BaseException = image.pread(start, size)
        except FormatError as e:
            got = e
        with lock:
            results.append(got)

    threads = [threading.Thread(target=read) for _ in range(8)]
    for t in threads:
        t.start()
    threading.Timer(0.3, source.hold.set).start()
    for t in threads:
        t.join()
    assert len(results) == 8
    if times == 1:
        assert results == [layer_files[NAME]] * 8
        assert source.hits == 2  # one corrupt response and one refetch, for all readers
        assert image.stats.refetches == 1
    else:
        assert all(isinstance(r, ChunkVerificationError) for r in results)
        # Readers that were waiting share the owner's attempts; a reader that came after
        # its failure makes attempts of its own, still bounded.
        assert source.hits % MAX_FETCH_ATTEMPTS == 0
        assert image.stats.verification_failures == source.hits
        assert toc.lookup(NAME).chunks[0].digest not in cache
