"""What a read that must fetch asks for by default: its neighbours up to the fetch unit in
the same request, and the rest of the file it touched in the background."""

from __future__ import annotations

import time

from test_layer_image import file_span, open_image

from blockfs.estargz import CountingSource
from blockfs.image import FetchPolicy
from blockfs.image._layer import BACKGROUND_STEP
from tests.helpers.testdata import TESTDATA

POLICY = FetchPolicy()


def wait_for(predicate, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_a_small_file_brings_its_neighbours_in_the_same_request(tmp_path, layer_files):
    image, toc, emap, source = open_image(TESTDATA / "gzip-64k.esgz", tmp_path, policy=POLICY)
    start, size = file_span(emap, toc, "etc/passwd")
    assert image.pread(start, 4096)[:size] == layer_files["etc/passwd"]
    own = toc.lookup("etc/passwd").chunks[0]
    # The read returned once its own member was in; the rest of the request goes on.
    wait_for(lambda: not image._inflight)
    assert source.requests == 1
    # More than its own member came, all from one range of at most the fetch unit.
    assert image.stats.members_fetched > 1
    assert own.end - own.offset < source.bytes_read <= POLICY.unit
    # The neighbours are in the cache: reading every file that came costs no request.
    fetched = source.bytes_read
    for name, data in layer_files.items():
        entry = toc.lookup(name)
        came = (
            len(entry.chunks) == 1
            and own.offset <= entry.chunks[0].offset
            and entry.chunks[0].end <= own.offset + POLICY.unit
        )
        if came:
            s, n = file_span(emap, toc, name)
            assert image.pread(s, -(-n // 4096) * 4096)[:n] == data, name
    assert source.bytes_read == fetched


def test_a_read_of_a_large_file_fetches_the_rest_of_it_in_the_background(tmp_path, layer_files):
    image, toc, emap, source = open_image(TESTDATA / "gzip-64k.esgz", tmp_path, policy=POLICY)
    name = "usr/lib/libbig.so"
    chunks = toc.lookup(name).chunks
    assert len(chunks) > 20  # many 64 KiB chunks
    start, _ = file_span(emap, toc, name)
    assert image.pread(start, 4096) == layer_files[name][:4096]
    wait_for(lambda: all(c.digest in image.cache for c in chunks))
    requests = source.requests
    assert image.pread(start, 1 << 20) == layer_files[name][: 1 << 20]
    assert source.requests == requests  # all of it was in the cache already
    # Each member came once, the first with the read and the rest in the background.
    assert image.stats.members_fetched <= len({c.offset for c in chunks}) + 64
    image.close()


def test_a_read_waits_for_a_member_the_background_is_fetching(tmp_path, layer_files):
    image, toc, emap, _ = open_image(TESTDATA / "gzip-64k.esgz", tmp_path, policy=POLICY)
    name = "usr/lib/libbig.so"
    start, size = file_span(emap, toc, name)
    image.pread(start, 4096)  # starts the background fetch of the rest
    last = (size - 1) // 4096 * 4096
    want = layer_files[name][last:]
    assert image.pread(start + last, 4096)[: len(want)] == want
    wait_for(lambda: not image._inflight)
    # Every member fetched went to the cache; one fetched twice would be counted twice.
    cached = {
        emap.chunk(j).offset for j in range(emap.chunk_count) if emap.chunk(j).digest in image.cache
    }
    assert image.stats.members_fetched <= len(cached)
    image.close()


def test_the_exact_policy_fetches_only_what_a_read_lacks(tmp_path):
    image, toc, emap, source = open_image(
        TESTDATA / "gzip-64k.esgz", tmp_path, policy=FetchPolicy.exact()
    )
    start, _ = file_span(emap, toc, "usr/lib/libbig.so")
    image.pread(start, 4096)
    time.sleep(0.2)
    assert image.stats.members_fetched == 1
    assert source.requests == 1


def test_the_rest_of_a_large_file_comes_in_steps_in_blob_order(tmp_path, layer_files):
    class Recording(CountingSource):
        def __init__(self, inner):
            super().__init__(inner)
            self.ranges = []

        def read_range_streaming(self, offset, length, on_bytes):
            self.ranges.append((offset, length))
            return super().read_range_streaming(offset, length, on_bytes)

    image, toc, emap, source = open_image(TESTDATA / "gzip-64k.esgz", tmp_path, policy=POLICY)
    recording = Recording(source.inner)
    image.reader.source = recording
    name = "usr/lib/libbig.so"
    chunks = toc.lookup(name).chunks
    start, _ = file_span(emap, toc, name)
    image.pread(start, 4096)
    wait_for(lambda: all(c.digest in image.cache for c in chunks))
    _, *background = recording.ranges
    span = chunks[-1].end - chunks[0].offset
    # Steps of about BACKGROUND_STEP (a member more at most), one after another in order.
    assert len(background) >= (span - POLICY.unit) // (BACKGROUND_STEP + 70_000)
    assert all(n <= BACKGROUND_STEP + 70_000 for _, n in background)
    assert [o for o, _ in background] == sorted(o for o, _ in background)
    image.close()
