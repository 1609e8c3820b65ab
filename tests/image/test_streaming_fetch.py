"""A fetch settles each member as its bytes arrive: a read that waits for the first
member of a large request goes on before the rest of the request is in."""

from __future__ import annotations

import threading
import time

from test_layer_image import file_span, open_image

from blockfs.estargz import FileBlobSource, SourceWrapper
from blockfs.image import FetchPolicy
from blockfs.image._layer import BACKGROUND_FETCHERS
from tests.helpers.testdata import TESTDATA
from tests.helpers.waiting import wait_for

BLOB = TESTDATA / "gzip-64k.esgz"
PIECE = 16 << 10


class HeldStream(SourceWrapper):
    """The blob file, streamed in pieces; a request stops before its last piece until
    ``release`` is set, as a long response still on its way would."""

    def __init__(self) -> None:
        super().__init__(FileBlobSource(BLOB))
        self.release = threading.Event()
        self.held = threading.Event()  # a request is waiting for its last piece

    def read_range(self, offset: int, length: int) -> bytes:
        return self.read_range_streaming(offset, length, None)

    def read_range_streaming(self, offset, length, on_bytes):
        data = self.inner.read_range(offset, length)
        for pos in range(0, length, PIECE):
            if pos + PIECE >= length:
                self.held.set()
                assert self.release.wait(30), "the test never released the request"
            if on_bytes is not None:
                on_bytes(pos, data[pos : pos + PIECE])
        return data


def test_a_read_of_a_prefetched_file_returns_before_the_prefetch_request_ends(
    tmp_path, layer_files
):
    source = HeldStream()
    image, toc, emap, _ = open_image(BLOB, tmp_path, source=source)
    # The prefetch claims every member below the end of the blob's data, one request.
    region_end = max(emap.chunk(j).end for j in range(emap.chunk_count))
    prefetch = threading.Thread(target=image.prefetch, args=(region_end,))
    prefetch.start()
    try:
        assert source.held.wait(30)
        # The file whose data comes first in the blob.
        first = min(
            (i for i in range(emap.extent_count) if emap.extent_chunks(i)),
            key=lambda i: emap.chunk(emap.extent_chunks(i)[0]).offset,
        )
        name = emap.extent_name(first).lstrip("/")
        start, size = file_span(emap, toc, name)
        # The first file's member came early in the request: the read has it while the
        # request still waits for its end, and it is the file's right bytes.
        assert image.pread(start, -(-size // 4096) * 4096)[:size] == layer_files[name]
        assert not source.release.is_set()
        assert image.stats.members_fetched >= 1
    finally:
        source.release.set()
        prefetch.join(30)
    assert image.stats.fetch_errors == 0
    # Every file is right, all of it from the one prefetch request.
    for name, data in layer_files.items():
        if not data:
            continue  # an empty file has no extent
        s, n = file_span(emap, toc, name)
        assert image.pread(s, -(-n // 4096) * 4096)[:n] == data, name
    image.close()


def test_a_read_returns_once_its_own_members_are_in_while_the_fetch_unit_still_comes(
    tmp_path, layer_files
):
    source = HeldStream()
    image, toc, emap, _ = open_image(
        BLOB, tmp_path, source=source, policy=FetchPolicy(unit=256 << 10, whole_file_max=0)
    )
    name = "etc/passwd"
    start, size = file_span(emap, toc, name)
    try:
        # Its own member leads the request; the members that come along are held back.
        assert image.pread(start, 4096)[:size] == layer_files[name]
        assert not source.release.is_set()  # so the request has not ended
    finally:
        source.release.set()
    assert image.wait_idle()
    assert image.stats.members_fetched > 1  # the neighbours came, in the same request
    image.close()


class HeldLargeRequests(HeldStream):
    """The blob file; requests larger than ``limit`` (the background fetch's steps) wait
    until ``release`` is set, smaller ones (a read's own) go through at once."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit
        self.requests: list[tuple[int, int]] = []

    def read_range_streaming(self, offset, length, on_bytes):
        self.requests.append((offset, length))
        if length > self.limit:
            self.held.set()
            assert self.release.wait(30), "the test never released the request"
        data = self.inner.read_range(offset, length)
        if on_bytes is not None:
            on_bytes(0, data)
        return data


def test_a_read_takes_over_a_member_the_background_has_not_begun_to_fetch(tmp_path, layer_files):
    source = HeldLargeRequests(limit=200 << 10)
    image, toc, emap, _ = open_image(
        BLOB, tmp_path, source=source, policy=FetchPolicy(unit=0, whole_file_max=64 << 20)
    )
    name = "usr/lib/libbig.so"
    chunks = toc.lookup(name).chunks
    members = sorted({c.offset for c in chunks})
    start, size = file_span(emap, toc, name)
    data = layer_files[name]
    try:
        # The first read fetches its member and claims the rest of the file for the
        # background, whose first 1 MiB step is then held at the registry.
        assert image.pread(start, 4096) == data[:4096]
        assert source.held.wait(30)
        # The last page's member sits in a later step, not begun: the read fetches it
        # itself instead of waiting behind the held step.
        last = (size - 1) // 4096 * 4096
        assert image.pread(start + last, 4096)[: size - last] == data[last:]
        assert not source.release.is_set()
        assert source.requests[-1][0] == members[-1]
    finally:
        source.release.set()
    assert image.wait_idle()
    # Every member of the file was fetched exactly once, between the reads and the steps.
    assert image.stats.members_fetched == len(members)
    assert image.pread(start, -(-size // 4096) * 4096)[:size] == data
    image.close()


def test_the_next_step_of_a_background_fetch_goes_out_before_the_step_before_it_ends(
    tmp_path, layer_files
):
    class Recording(HeldStream):
        def __init__(self) -> None:
            super().__init__()
            self.offsets: list[int] = []

        def read_range_streaming(self, offset, length, on_bytes):
            self.offsets.append(offset)
            return super().read_range_streaming(offset, length, on_bytes)

    source = Recording()
    image, toc, emap, _ = open_image(BLOB, tmp_path, source=source, policy=FetchPolicy())
    name = "usr/lib/libbig.so"
    start, _ = file_span(emap, toc, name)
    read = threading.Thread(target=image.pread, args=(start, 4096))
    read.start()
    try:
        # Every request stops before its last piece. The read's own request (its member
        # first) and the first step of the rest of the file go out; then, once the first
        # half of that step is in, the second step, though the first has not ended.
        deadline = time.monotonic() + 30
        while len(source.offsets) < 3:
            assert time.monotonic() < deadline, f"requests: {source.offsets}"
            time.sleep(0.01)
        read.join(30)
        assert not read.is_alive()  # its own member came before its request's end
    finally:
        source.release.set()
        read.join(30)
    chunks = toc.lookup(name).chunks
    deadline = time.monotonic() + 30
    while not all(c.digest in image.cache for c in chunks):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert image.pread(start, 4096) == layer_files[name][:4096]
    image.close()


class HoldOne(SourceWrapper):
    """The blob file; a request that covers offset ``at`` waits for ``release``."""

    def __init__(self, at: int) -> None:
        super().__init__(FileBlobSource(BLOB))
        self.at = at
        self.release = threading.Event()
        self.held = threading.Event()
        self.others = 0  # requests that did not cover ``at``

    def read_range(self, offset: int, length: int) -> bytes:
        if offset <= self.at < offset + length:
            self.held.set()
            assert self.release.wait(30), "the test never released the request"
        else:
            self.others += 1
        return self.inner.read_range(offset, length)


def test_a_prefetch_returns_only_once_members_another_fetch_claimed_are_in(tmp_path):
    # The fetch of a container's command ahead may claim a file of the prioritised
    # region first: the region's prefetch waits for it too (its end releases the
    # region's preload).
    probe, toc, emap, _ = open_image(BLOB, tmp_path / "probe")
    probe.close()
    middle = toc.lookup("usr/lib/libbig.so").chunks[0].offset  # files lie on either side
    source = HoldOne(middle)
    whole_files = FetchPolicy(unit=0, whole_file_max=64 << 20, directory_window=0)
    image = open_image(BLOB, tmp_path, source=source, policy=whole_files)[0]
    region_end = max(emap.chunk(j).end for j in range(emap.chunk_count))
    command = threading.Thread(target=image.fetch_ahead, args=(middle,), kwargs={"around": True})
    command.start()  # claims the whole middle file, its request held
    region = threading.Thread(target=image.prefetch, args=(region_end,))
    try:
        assert source.held.wait(30)
        region.start()
        # The region's own members come in (requests of their own, not held)...
        deadline = time.monotonic() + 30
        while source.others < 2:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        time.sleep(0.3)
        # ...yet it has not returned: the middle member is not in.
        assert region.is_alive()
    finally:
        source.release.set()
        command.join(30)
        region.join(30)
    assert not region.is_alive()
    image.close()


class HoldAll(SourceWrapper):
    """The blob file; every request waits for ``release``."""

    def __init__(self) -> None:
        super().__init__(FileBlobSource(BLOB))
        self.release = threading.Event()
        self.requests = 0

    def read_range(self, offset: int, length: int) -> bytes:
        self.requests += 1
        assert self.release.wait(30), "the test never released the request"
        return self.inner.read_range(offset, length)


def test_closing_a_layer_settles_the_background_fetches_it_drops(tmp_path):
    # A fetch that waits for a member another fetch claimed (the region's prefetch, a
    # read's members along) must not wait for ever on a claim the closing layer dropped
    # from its queue: the thread would be lost with everything it holds.
    source = HoldAll()
    image, _, emap, _ = open_image(BLOB, tmp_path, source=source)
    offsets = sorted({emap.chunk(k).offset for k in range(emap.chunk_count)})
    assert len(offsets) > BACKGROUND_FETCHERS + 1
    # One background fetch per member: the first ones hold every fetcher thread at
    # their requests, the rest wait in the queue.
    for off in offsets:
        image._fetch_in_background(image._claim([off])[0])
    wait_for(lambda: source.requests == BACKGROUND_FETCHERS)
    region_end = max(emap.chunk(j).end for j in range(emap.chunk_count))
    waiting = threading.Thread(target=image.prefetch, args=(region_end,))
    try:
        waiting.start()  # waits for the queued fetches
        time.sleep(0.1)
        image.close()
    finally:
        source.release.set()
    waiting.join(10)
    assert not waiting.is_alive(), "a fetch waits for a claim the closed layer dropped"
    assert image.wait_idle()
    assert source.requests == BACKGROUND_FETCHERS  # the queued fetches never went out
