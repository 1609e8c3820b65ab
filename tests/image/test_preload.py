"""Preload: a layer's prioritised region read before the layer is indexed, then handed to
its prefetch, verified like any fetched bytes (blockfs.image._preload)."""

from __future__ import annotations

import socket
import threading

import pytest

from blockfs.cache import ChunkCache
from blockfs.errors import BlockfsError
from blockfs.estargz import (
    LANDMARKS,
    BlobReader,
    CountingSource,
    FileBlobSource,
    SourceWrapper,
)
from blockfs.image import (
    ControlError,
    ExportTable,
    ServedLayers,
    ServerConfig,
    file_source_spec,
    index_layer,
    preload_export,
    query_stats,
)
from blockfs.image._preload import Preload, PreloadedSource
from tests.helpers.testdata import TESTDATA
from tests.helpers.waiting import wait_for

BLOB = TESTDATA / "gzip-prio.esgz"  # the reference writer's blob with prioritised files


def region() -> tuple[int, list[str]]:
    """Where the blob's prioritised region ends, and the chunk digests inside it."""
    reader = BlobReader.open(FileBlobSource(BLOB))
    prefetch = reader.prefetch_range()
    assert prefetch is not None
    end = prefetch[1]
    digests = [
        c.digest
        for e in reader.toc.entries
        if e.name not in LANDMARKS
        for c in e.chunks
        if c.offset < end
    ]
    assert digests, "the region holds file data"
    return end, digests


def assert_region_cached(table: ExportTable, end: int) -> None:
    """Every file of the region is in the cache with its own bytes."""
    reader = BlobReader.open(FileBlobSource(BLOB))
    for entry in reader.toc.entries:
        if entry.name not in LANDMARKS and entry.chunks and entry.chunks[0].offset < end:
            data = b"".join(table.cache.get(c.digest) or b"" for c in entry.chunks)
            assert data == reader.read_file(entry.name), entry.name


def index(tmp_path, name: str = "l") -> None:
    index_layer(
        BlobReader.open(FileBlobSource(BLOB)),
        tmp_path / "layers" / name,
        name=name,
        source=file_source_spec(BLOB),
        bytes_fetched=0,
    )


class Flaky(SourceWrapper):
    """A file blob whose first read is corrupt (one byte flipped) or fails."""

    def __init__(self, *, fail: bool = False) -> None:
        super().__init__(FileBlobSource(BLOB))
        self.fail = fail
        self.reads: list[tuple[int, int]] = []

    def read_range(self, offset: int, length: int) -> bytes:
        self.reads.append((offset, length))
        data = self.inner.read_range(offset, length)
        if len(self.reads) > 1:
            return data
        if self.fail:
            raise BlockfsError("registry unavailable")
        flipped = bytearray(data)
        flipped[len(data) // 2] ^= 0xFF
        return bytes(flipped)


def table_with(tmp_path, source: Flaky | None = None, **options) -> ExportTable:
    opener = None if source is None else (lambda spec: source)
    cache = ChunkCache(tmp_path / "cache", max_bytes=1 << 30)
    return ExportTable(tmp_path / "layers", cache, open_source=opener, **options)


def test_the_prefetch_takes_the_preloaded_bytes_one_request_in_all(tmp_path) -> None:
    end, digests = region()
    table = table_with(tmp_path, prefetch=True)
    try:
        # Before the layer is indexed: only the blob and where its region ends are known.
        assert table.preload("l", file_source_spec(BLOB), end)
        assert not table.preload("l", file_source_spec(BLOB), end)  # under way already
        index(tmp_path)
        image = table.open("l")
        wait_for(lambda: all(d in table.cache for d in digests))
        stats = table.stats("l")["layers"]["l"]
        assert stats["range_requests"] == 1
        assert stats["bytes_fetched"] == end  # [0, end): the preload's request
        assert image.stats.verification_failures == 0
        assert_region_cached(table, end)
    finally:
        table.close()


def test_corrupt_preloaded_bytes_are_fetched_again_from_the_blob(tmp_path) -> None:
    end, digests = region()
    source = Flaky()
    table = table_with(tmp_path, source, prefetch=True)
    try:
        assert table.preload("l", file_source_spec(BLOB), end)
        index(tmp_path)
        image = table.open("l")
        wait_for(lambda: all(d in table.cache for d in digests))
        # The member with the flipped byte failed verification once and came again from
        # the blob itself, not from the preload.
        assert source.reads[0] == (0, end)
        assert len(source.reads) == 2 and source.reads[1][0] < end // 2 < sum(source.reads[1])
        assert image.stats.verification_failures == 1 and image.stats.refetches == 1
        assert_region_cached(table, end)
    finally:
        table.close()


def test_a_failed_preload_leaves_the_prefetch_to_the_blob(tmp_path) -> None:
    end, digests = region()
    source = Flaky(fail=True)
    table = table_with(tmp_path, source, prefetch=True)
    try:
        assert table.preload("l", file_source_spec(BLOB), end)
        wait_for(lambda: len(source.reads) == 1)
        index(tmp_path)
        image = table.open("l")
        wait_for(lambda: all(d in table.cache for d in digests))
        assert image.stats.verification_failures == 0 and image.stats.fetch_errors == 0
        assert len(source.reads) == 2
    finally:
        table.close()


def test_nothing_is_preloaded_without_the_prefetch_setting(tmp_path) -> None:
    end, _ = region()
    source = Flaky()
    table = table_with(tmp_path, source)
    try:
        assert not table.preload("l", file_source_spec(BLOB), end)
        assert source.reads == []
    finally:
        table.close()


def test_a_preload_of_another_blob_is_not_used(tmp_path) -> None:
    end, digests = region()
    table = table_with(tmp_path, prefetch=True)
    try:
        other = file_source_spec(TESTDATA / "gzip-64k.esgz")
        assert table.preload("l", other, end)
        index(tmp_path)
        table.open("l")
        wait_for(lambda: all(d in table.cache for d in digests))
        # The layer's own source made its own request; the preload's bytes were dropped.
        stats = table.stats("l")["layers"]["l"]
        assert stats["range_requests"] == 1 and stats["bytes_fetched"] < end
    finally:
        table.close()


def test_preload_over_the_control_socket(tmp_path) -> None:
    end, digests = region()
    control = tmp_path / "ctl.sock"
    served = ServedLayers(
        ServerConfig(
            root=tmp_path / "layers", cache_dir=tmp_path / "cache", control=control, prefetch=True
        )
    )
    try:
        # A spec with spaces and non-ASCII in a path still makes one word of the request.
        odd = tmp_path / "a dir é"
        odd.mkdir()
        (odd / "blob").write_bytes(BLOB.read_bytes())
        assert preload_export(str(control), "l", file_source_spec(odd / "blob"), end) is True
        index(tmp_path)
        # index_layer recorded BLOB's own path: the preload of the copy is not used, and
        # the prefetch fetches the region itself.
        served.exports.open("l")
        wait_for(lambda: all(d in served.cache for d in digests))
        assert query_stats(str(control), "l")["layers"]["l"]["range_requests"] == 1
        with pytest.raises(ControlError, match="preload NAME END SPEC"):
            preload_export(str(control), "l", {}, -1)
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(control))
            s.sendall(b"preload l 5 !!\n")
            assert "not an encoded source spec" in s.makefile("rb").readline().decode()
    finally:
        served.close()


class GatedPieces:
    """A blob of 1000-byte ``pieces`` whose only read is streamed, each piece sent once
    its gate is set."""

    name = "gated"

    def __init__(self, pieces: list[bytes], gates: list[threading.Event]) -> None:
        self.pieces = pieces
        self.gates = gates
        self.size = sum(map(len, pieces))

    def read_range(self, offset: int, length: int) -> bytes:
        raise AssertionError("the preload streams")

    def read_range_streaming(self, offset, length, on_bytes):
        for i, piece in enumerate(self.pieces):
            assert self.gates[i].wait(10)
            on_bytes(i * 1000, piece)
        return b"".join(self.pieces)


def test_a_read_gets_the_preloaded_bytes_as_they_arrive() -> None:
    pieces = [bytes([i]) * 1000 for i in range(4)]
    gates = [threading.Event() for _ in pieces]

    class Blob:
        name = "blob"
        size = 4000

        def __init__(self) -> None:
            self.reads: list[tuple[int, int]] = []

        def read_range(self, offset: int, length: int) -> bytes:
            self.reads.append((offset, length))
            return bytes(length)

    blob = Blob()
    preload = Preload(CountingSource(GatedPieces(pieces, gates)), 4000, "gated")
    source = PreloadedSource(blob, preload)
    seen: list[tuple[int, bytes]] = []
    first = threading.Event()

    def on_bytes(position: int, piece: bytes) -> None:
        seen.append((position, piece))
        first.set()

    result: list[bytes] = []
    reader = threading.Thread(
        target=lambda: result.append(source.read_range_streaming(500, 3000, on_bytes))
    )
    reader.start()
    gates[0].set()
    assert first.wait(10)
    assert seen == [(0, pieces[0][500:])]  # before the rest of the request has come
    for gate in gates[1:]:
        gate.set()
    reader.join(10)
    assert result == [b"".join(pieces)[500:3500]]
    assert b"".join(p for _, p in seen) == result[0]
    assert blob.reads == []
    # The same bytes again are a refetch (they failed verification): from the blob.
    assert source.read_range_streaming(600, 10, lambda position, piece: None) == bytes(10)
    assert blob.reads == [(600, 10)]
    preload.release()


def test_a_read_under_way_keeps_its_bytes_when_the_preload_is_released() -> None:
    # The layer's prefetch may be done (and release the preload) while a read of the
    # command ahead still streams the bytes of a file at the end of the region.
    gates = [threading.Event(), threading.Event()]
    gates[0].set()
    halves = GatedPieces([b"a" * 1000, b"b" * 1000], gates)
    preload = Preload(CountingSource(halves), 2000, "halves")
    assert preload.take(500, 1500)
    got: list[bytes] = []
    reader = threading.Thread(
        target=lambda: got.append(preload.stream(500, 1500, lambda position, piece: None))
    )
    reader.start()
    preload.release()
    assert not preload.take(0, 100)  # released: no new reads
    gates[1].set()
    reader.join(10)
    assert got == [b"a" * 500 + b"b" * 1000]
