"""What a read that must fetch asks for by default: its neighbours up to the fetch unit in
the same request, and the rest of the file it touched in the background."""

from __future__ import annotations

import io
import random
import time

from test_layer_image import file_span, open_image

from blockfs.estargz import BuildOptions, CountingSource, build
from blockfs.image import FetchPolicy
from blockfs.image._layer import BACKGROUND_STEP
from tests.helpers.containerd import layer_tar
from tests.helpers.testdata import TESTDATA
from tests.helpers.waiting import wait_for

POLICY = FetchPolicy()


def test_a_small_file_brings_its_neighbours_in_the_same_request(tmp_path, layer_files):
    image, toc, emap, source = open_image(TESTDATA / "gzip-64k.esgz", tmp_path, policy=POLICY)
    start, size = file_span(emap, toc, "etc/passwd")
    assert image.pread(start, 4096)[:size] == layer_files["etc/passwd"]
    own = toc.lookup("etc/passwd").chunks[0]
    # The read returned once its own member was in; the rest of the request goes on.
    assert image.wait_idle()
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
    assert image.wait_idle()
    # Every member fetched went to the cache or is kept compressed (the guesses no read
    # needed); one fetched twice would be counted twice.
    cached = {
        emap.chunk(j).offset for j in range(emap.chunk_count) if emap.chunk(j).digest in image.cache
    }
    stats = image.stats
    assert stats.members_fetched <= len(cached) + stats.members_kept - stats.kept_members_read
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
    # The read's own request starts at the file's first member; it races the first steps.
    background = [r for r in recording.ranges if r[0] != chunks[0].offset]
    assert len(background) == len(recording.ranges) - 1
    span = chunks[-1].end - chunks[0].offset
    # Steps of about BACKGROUND_STEP (a member more at most), each begun after the one
    # before it, in blob order.
    assert len(background) >= (span - POLICY.unit) // (BACKGROUND_STEP + 70_000)
    assert all(n <= BACKGROUND_STEP + 70_000 for _, n in background)
    assert [o for o, _ in background] == sorted(o for o, _ in background)
    image.close()


def two_directories(tmp_path, prioritized=(), large=()):
    """A blob of two directories of incompressible 40 KB files (200 KB for those in
    ``large``), one after the other, with ``prioritized`` files first; its files by name."""
    rng = random.Random(3)
    names = [f"{d}/f{i:02}" for d in ("other", "pkg") for i in range(12)]
    files = {name: rng.randbytes(200_000 if name in large else 40_000) for name in names}
    blob = tmp_path / "layer.esgz"
    with open(blob, "wb") as out:
        build(
            io.BytesIO(layer_tar(files)), out, BuildOptions(gzip_level=1, prioritized=prioritized)
        )
    return blob, files


def test_the_first_read_in_a_directory_brings_the_files_around_it_in_that_directory(tmp_path):
    blob, files = two_directories(tmp_path)
    policy = FetchPolicy(unit=50_000, whole_file_max=0, directory_window=400_000)
    image, toc, emap, source = open_image(blob, tmp_path / "img", policy=policy)

    def fetched(name: str) -> bool:  # cached, or kept compressed (the window's guesses)
        return all(image.has_chunk(c) for c in toc.lookup(name).chunks)

    start, size = file_span(emap, toc, "pkg/f05")
    assert image.pread(start, -(-size // 4096) * 4096)[:size] == files["pkg/f05"]
    assert image.wait_idle()
    # Up to 200,000 compressed bytes on each side: four 40 KB files before, four after.
    came = {name for name in files if fetched(name)}
    assert came == {f"pkg/f{i:02}" for i in range(1, 10)}
    requests = source.requests
    # Those files are read without a request; a read elsewhere in pkg/ plans no window again.
    for i in range(1, 10):
        s, n = file_span(emap, toc, f"pkg/f{i:02}")
        assert image.pread(s, -(-n // 4096) * 4096)[:n] == files[f"pkg/f{i:02}"]
    assert source.requests == requests
    s, n = file_span(emap, toc, "pkg/f11")
    image.pread(s, 4096)
    assert image.wait_idle()
    assert not fetched("pkg/f00") and not any(fetched(f"other/f{i:02}") for i in range(12))
    image.close()


def test_the_directory_window_passes_over_files_larger_than_the_fetch_unit(tmp_path):
    blob, files = two_directories(tmp_path, large=("pkg/f04", "pkg/f06"))
    policy = FetchPolicy(unit=100_000, whole_file_max=0, directory_window=400_000)
    image, toc, emap, _ = open_image(blob, tmp_path / "img", policy=policy)
    start, size = file_span(emap, toc, "pkg/f05")
    assert image.pread(start, -(-size // 4096) * 4096)[:size] == files["pkg/f05"]
    assert image.wait_idle()
    came = {n for n in files if all(image.has_chunk(c) for c in toc.lookup(n).chunks)}
    # The small files on both sides came, the large ones between them did not.
    assert {"pkg/f02", "pkg/f03", "pkg/f07", "pkg/f08"} <= came
    assert not came & {"pkg/f04", "pkg/f06"}
    image.close()


def test_a_read_of_prioritized_files_guesses_nothing_beyond_them(tmp_path):
    # The image says what its workload reads: pkg/f05 then other/f03, first in the blob.
    blob, files = two_directories(tmp_path, prioritized=("pkg/f05", "other/f03"))
    policy = FetchPolicy(unit=400_000, whole_file_max=0, directory_window=400_000)
    image, toc, emap, source = open_image(blob, tmp_path / "img", policy=policy)
    assert image.prioritized_end > 0

    def fetched() -> set[str]:  # cached, or kept compressed
        return {n for n in files if all(image.has_chunk(c) for c in toc.lookup(n).chunks)}

    start, size = file_span(emap, toc, "pkg/f05")
    assert image.pread(start, -(-size // 4096) * 4096)[:size] == files["pkg/f05"]
    assert image.wait_idle()
    # The next prioritised file came along (the fetch unit reaches it); nothing past the
    # region's end, and no window of pkg/'s other files.
    assert fetched() == {"pkg/f05", "other/f03"}
    assert source.requests == 1
    # A read outside the region guesses as before: its directory's files around it.
    start, size = file_span(emap, toc, "pkg/f08")
    assert image.pread(start, -(-size // 4096) * 4096)[:size] == files["pkg/f08"]
    assert image.wait_idle()
    assert {f"pkg/f{i:02}" for i in (7, 9)} <= fetched()
    image.close()
