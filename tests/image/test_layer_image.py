"""LayerImage over the reference blobs: metadata from the index, file data from verified chunks."""

import threading

import pytest

from blockfs.cache import ChunkCache
from blockfs.estargz import BlobReader, CountingSource, FileBlobSource, FormatError
from blockfs.image import (
    EXTENTS_FILE,
    INDEX_FILE,
    MAX_FETCH_ATTEMPTS,
    PREFETCH_BATCH,
    BlobChunkReader,
    ExtentMap,
    ExtentMapError,
    FetchPolicy,
    LayerImage,
    index_layer,
)
from tests.helpers.testdata import TESTDATA, VERIFIABLE_BLOBS, toc_digest_of


def open_image(
    blob_path, tmp_path, *, toc_digest=None, cache_bytes=0, policy=None, source=None, kept=None
):
    """A LayerImage of ``blob_path`` read through ``source`` (default: the file, counted);
    it fetches only what reads lack unless ``policy``; ``kept``: its budget of guesses kept
    compressed. Returns (image, toc, extent map, source)."""
    reader = BlobReader.open(FileBlobSource(blob_path), toc_digest=toc_digest)
    layer_dir = tmp_path / "layer"
    record = index_layer(
        reader,
        layer_dir,
        name="l",
        source={"type": "file", "path": str(blob_path)},
        bytes_fetched=0,
    )
    if source is None:
        source = CountingSource(FileBlobSource(blob_path))
    emap = ExtentMap.load(layer_dir / EXTENTS_FILE)
    cache = ChunkCache(tmp_path / "cache", max_bytes=1 << 30, memory_bytes=cache_bytes)
    image = LayerImage(
        "l",
        layer_dir / INDEX_FILE,
        emap,
        BlobChunkReader(source, record.compression),
        cache,
        policy=policy or FetchPolicy.exact(),
        prioritized_end=record.prefetch_end or 0,
        kept=kept,
    )
    return image, reader.toc, emap, source


def file_span(emap, toc, name):
    for i in range(emap.extent_count):
        if emap.extent_name(i) == toc.lookup(name).name:
            return emap.extent_span(i)
    raise AssertionError(f"no extent for {name}")


@pytest.mark.parametrize("blob", VERIFIABLE_BLOBS)
def test_every_file_reads_back_exactly_through_the_image(blob, tmp_path, layer_files):
    image, toc, emap, _ = open_image(TESTDATA / blob, tmp_path, toc_digest=toc_digest_of(blob))
    checked = 0
    for name, content in layer_files.items():
        if not content or name.endswith((".wh.removed.conf", ".wh..wh..opq")):
            continue
        start, size = file_span(emap, toc, name)
        assert size == len(content)
        padded = -(-size // 4096) * 4096
        data = image.pread(start, padded)
        assert data[:size] == content, name
        assert data[size:] == bytes(padded - size)
        checked += 1
    assert checked > 40


def test_metadata_reads_fetch_nothing_from_the_blob(tmp_path):
    image, _, emap, source = open_image(TESTDATA / "gzip-64k.esgz", tmp_path)
    assert image.pread(0, emap.meta_size)[1024:1028] == bytes.fromhex("e2e1f5e0")
    assert source.bytes_read == 0


def test_reading_one_small_file_fetches_only_its_member(tmp_path, layer_files):
    image, toc, emap, source = open_image(TESTDATA / "gzip-64k.esgz", tmp_path)
    start, size = file_span(emap, toc, "etc/passwd")
    assert image.pread(start, 4096)[:size] == layer_files["etc/passwd"]
    chunk = toc.lookup("etc/passwd").chunks[0]
    assert source.requests == 1
    assert source.bytes_read == chunk.end - chunk.offset
    assert image.stats.chunks_fetched == 1


def test_second_read_is_served_from_the_cache(tmp_path, layer_files):
    image, toc, emap, source = open_image(TESTDATA / "gzip-64k.esgz", tmp_path)
    start, _ = file_span(emap, toc, "usr/lib/libbig.so")
    first = image.pread(start, 1 << 20)
    fetched = source.bytes_read
    assert image.pread(start, 1 << 20) == first == layer_files["usr/lib/libbig.so"][: 1 << 20]
    assert source.bytes_read == fetched
    assert image.stats.cache_hits >= 16


def test_concurrent_reads_of_one_chunk_fetch_it_once(tmp_path):
    image, toc, emap, source = open_image(TESTDATA / "gzip-default.esgz", tmp_path)
    start, _ = file_span(emap, toc, "usr/lib/libbig.so")
    results = []
    threads = [
        threading.Thread(target=lambda k=k: results.append(image.pread(start + k * 4096, 4096)))
        for k in range(8)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 8
    assert image.stats.members_fetched == 1
    assert source.requests == 1


def test_flipped_chunk_byte_fails_that_file_and_leaves_others_readable(
    tmp_path, blob_copy, layer_files
):
    path = blob_copy("gzip-64k.esgz")
    reader = BlobReader.open(FileBlobSource(path))
    chunk = reader.toc.lookup("usr/share/doc/README").chunks[0]
    data = bytearray(path.read_bytes())
    data[(chunk.offset + chunk.end) // 2] ^= 0x55
    path.write_bytes(bytes(data))
    image, toc, emap, _ = open_image(path, tmp_path)
    start, _ = file_span(emap, toc, "usr/share/doc/README")
    with pytest.raises(FormatError):
        image.pread(start, 4096)
    # The blob itself is damaged: every fetch of the member fails, and each counts.
    assert image.stats.verification_failures == MAX_FETCH_ATTEMPTS
    assert image.stats.refetches == MAX_FETCH_ATTEMPTS - 1
    with pytest.raises(FormatError):  # still refused: nothing bad was cached
        image.pread(start, 4096)
    start, size = file_span(emap, toc, "etc/passwd")
    assert image.pread(start, 4096)[:size] == layer_files["etc/passwd"]


def test_damaged_extents_file_is_refused(tmp_path):
    open_image(TESTDATA / "gzip-64k.esgz", tmp_path)
    path = tmp_path / "layer" / EXTENTS_FILE
    path.write_bytes(path.read_bytes()[:-3])
    with pytest.raises(ExtentMapError):
        ExtentMap.load(path)


def test_reads_outside_the_image_are_refused(tmp_path):
    image, *_ = open_image(TESTDATA / "gzip-64k.esgz", tmp_path)
    with pytest.raises(Exception, match="outside"):
        image.pread(image.size - 10, 20)


def expected_bytes(emap, layer_files, start, length):
    """What the image holds in ``[start, start + length)`` of its data region, built from
    the layer tar (each file at its extent, zeros elsewhere), independently of LayerImage."""
    out = bytearray(length)
    for i in range(emap.extent_count):
        offset, size = emap.extent_span(i)
        content = layer_files[emap.extent_name(i)][:size]
        lo, hi = max(offset, start), min(offset + size, start + length)
        if lo < hi:
            out[lo - start : hi - start] = content[lo - offset : hi - offset]
    return bytes(out)


def data_region(emap):
    """The image range that holds every file's data."""
    spans = [emap.extent_span(i) for i in range(emap.extent_count)]
    start = min(s for s, _ in spans)
    end = max(s + -(-n // 4096) * 4096 for s, n in spans)
    return start, end - start


def test_one_read_across_many_files_fetches_their_members_with_one_request(tmp_path, layer_files):
    image, _, emap, source = open_image(TESTDATA / "gzip-64k.esgz", tmp_path)
    start, length = data_region(emap)
    assert image.pread(start, length) == expected_bytes(emap, layer_files, start, length)
    # Consecutive files' members are adjacent in the blob: a read spanning all of them
    # (as kernel readahead spans small files) is one range request, not one per member.
    assert image.stats.members_fetched > 40
    assert source.requests == 1
    assert image.pread(start, length) == expected_bytes(emap, layer_files, start, length)
    assert source.requests == 1  # the second read came from the cache


def test_concurrent_reads_across_shared_members_fetch_each_member_once(tmp_path, layer_files):
    image, _, emap, _ = open_image(TESTDATA / "gzip-64k.esgz", tmp_path)
    start, length = data_region(emap)
    step = length // 8 // 4096 * 4096
    results: dict[int, bytes] = {}
    # Overlapping windows: neighbours share members, which must be fetched only once.
    windows = [(start + k * step, min(2 * step, length - k * step)) for k in range(8)]
    threads = [
        threading.Thread(target=lambda o=o, n=n: results.__setitem__(o, image.pread(o, n)))
        for o, n in windows
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for o, n in windows:
        assert results[o] == expected_bytes(emap, layer_files, o, n)
    members = {emap.chunk(j).offset for j in range(emap.chunk_count)}
    assert image.stats.members_fetched == len(members)


def test_a_bad_member_fails_the_read_that_spans_it_but_not_its_neighbours(
    tmp_path, blob_copy, layer_files
):
    path = blob_copy("gzip-64k.esgz")
    reader = BlobReader.open(FileBlobSource(path))
    chunk = reader.toc.lookup("usr/share/doc/README").chunks[0]
    data = bytearray(path.read_bytes())
    data[(chunk.offset + chunk.end) // 2] ^= 0x55
    path.write_bytes(bytes(data))
    image, toc, emap, source = open_image(path, tmp_path)
    start, length = data_region(emap)
    with pytest.raises(FormatError):
        image.pread(start, length)
    assert image.stats.verification_failures == MAX_FETCH_ATTEMPTS
    requests = source.requests
    # The members fetched with the bad one were verified and cached on their own.
    for name in ("etc/passwd", "usr/lib/libbig.so"):
        begin, size = file_span(emap, toc, name)
        assert image.pread(begin, size) == layer_files[name]
    assert source.requests == requests
    with pytest.raises(FormatError):
        image.pread(*file_span(emap, toc, "usr/share/doc/README"))


def test_prefetch_fetches_members_in_batches(tmp_path, layer_files):
    image, _, emap, source = open_image(TESTDATA / "gzip-64k.esgz", tmp_path)
    members = {emap.chunk(j).offset for j in range(emap.chunk_count)}
    assert image.prefetch(end=source.size) == len(members)
    assert image.stats.members_fetched == len(members)
    assert source.requests <= -(-source.size // PREFETCH_BATCH) + 1
    start, length = data_region(emap)
    assert image.pread(start, length) == expected_bytes(emap, layer_files, start, length)
    assert image.stats.members_fetched == len(members)  # all from the cache


def test_pread_into_overwrites_every_byte_of_a_dirty_buffer(tmp_path, layer_files):
    # nbdkit hands the plugin a buffer with whatever it held before: padding and holes
    # must be written as zeros, not left alone.
    image, _, emap, _ = open_image(TESTDATA / "gzip-64k.esgz", tmp_path)
    start, length = data_region(emap)
    expected = image.pread(0, start) + expected_bytes(emap, layer_files, start, length)
    for _ in range(2):  # cold (fetched members), then warm (cache)
        buf = bytearray(b"\xaa") * (start + length)
        image.pread_into(memoryview(buf), 0)
        assert buf == expected


def test_prefetch_stops_at_its_end_and_fetches_what_lies_before_it(tmp_path):
    image, _, emap, _ = open_image(TESTDATA / "gzip-64k.esgz", tmp_path)
    members = sorted({emap.chunk(j).offset for j in range(emap.chunk_count)})
    end = members[len(members) // 2]  # less than one batch lies before it
    assert image.prefetch(end) == len(members) // 2
    assert image.stats.members_fetched == len(members) // 2
