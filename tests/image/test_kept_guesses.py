"""Members fetched on a guess (along with a read, in a directory window) are kept as they
came, compressed, and decompressed and verified only when a read needs them."""

from __future__ import annotations

import io
import random
import threading

from test_layer_image import file_span, open_image

from blockfs.estargz import BuildOptions, CountingSource, build
from blockfs.image import FetchPolicy
from blockfs.image._layer import KeptBudget
from tests.helpers.containerd import layer_tar

# Nothing comes along with a read (each file is 20 kB, the unit 30 kB); its directory's
# window brings the rest of the directory.
POLICY = FetchPolicy(
    unit=30_000, whole_file_max=64 << 20, directory_window=4 << 20, libraries=False
)


def one_directory(tmp_path, n=12):
    """A layer of ``n`` incompressible files of 20 kB in one directory: (files, blob)."""
    rng = random.Random(3)
    files = {f"usr/lib/mod/f{k:02d}": rng.randbytes(20_000) for k in range(n)}
    blob = tmp_path / "layer.esgz"
    with open(blob, "wb") as out:
        build(io.BytesIO(layer_tar(files)), out, BuildOptions(gzip_level=1))
    return files, blob


def read_whole(image, emap, toc, name):
    start, size = file_span(emap, toc, name)
    return image.pread(start, -(-size // 4096) * 4096)[:size]


def cached(image, toc, files):
    return {n for n in files if all(c.digest in image.cache for c in toc.lookup(n).chunks)}


def test_a_guess_is_decoded_only_when_a_read_needs_it(tmp_path):
    files, blob = one_directory(tmp_path)
    image, toc, emap, source = open_image(blob, tmp_path / "img", policy=POLICY)
    first = "usr/lib/mod/f05"
    assert read_whole(image, emap, toc, first) == files[first]
    assert image.wait_idle()
    # The whole directory came (the read's request and its window's), but only the file
    # read was decoded and cached; the rest is kept compressed.
    assert image.stats.members_fetched == len(files)
    assert image.stats.members_kept == len(files) - 1
    assert cached(image, toc, files) == {first}
    requests = source.requests
    for name, data in files.items():
        assert read_whole(image, emap, toc, name) == data, name
    assert source.requests == requests  # every file was at hand
    assert image.stats.kept_members_read == len(files) - 1
    assert cached(image, toc, files) == set(files)
    image.close()


def test_kept_bytes_that_do_not_verify_are_fetched_again(tmp_path):
    files, blob = one_directory(tmp_path)
    image, toc, emap, source = open_image(blob, tmp_path / "img", policy=POLICY)
    target = toc.lookup("usr/lib/mod/f08").chunks[0]
    flip_at = target.offset + (target.end - target.offset) // 2

    class Damaging(CountingSource):
        """Flips one byte in the middle of f08's member, the first time it is sent."""

        damaged = False

        def read_range_streaming(self, offset, length, on_bytes):
            if self.damaged or not offset <= flip_at < offset + length:
                return super().read_range_streaming(offset, length, on_bytes)
            self.damaged = True

            def flipping(at, piece):
                if at <= flip_at < at + len(piece):
                    piece = bytearray(piece)
                    piece[flip_at - at] ^= 0xFF
                    piece = bytes(piece)
                on_bytes(at, piece)

            return super().read_range_streaming(offset, length, flipping)

    damaging = Damaging(source.inner)
    image.reader.source = damaging
    assert read_whole(image, emap, toc, "usr/lib/mod/f02") == files["usr/lib/mod/f02"]
    assert image.wait_idle()
    assert damaging.damaged and "usr/lib/mod/f08" not in cached(image, toc, files)
    requests = damaging.requests
    # Its bytes were kept unchecked; the read that needs them finds them wrong, fetches
    # the member again and returns the right bytes.
    assert read_whole(image, emap, toc, "usr/lib/mod/f08") == files["usr/lib/mod/f08"]
    assert image.stats.verification_failures == 1
    assert damaging.requests == requests + 1
    image.close()


def test_a_read_that_waits_for_a_guess_on_its_way_gets_it_decoded(tmp_path):
    files, blob = one_directory(tmp_path)
    image, toc, emap, source = open_image(blob, tmp_path / "img", policy=POLICY)
    first = toc.lookup("usr/lib/mod/f00").chunks[0].offset
    release = threading.Event()

    class Held(CountingSource):
        """Holds every request but the first file's until released."""

        def read_range_streaming(self, offset, length, on_bytes):
            if offset != first:
                assert release.wait(10)
            return super().read_range_streaming(offset, length, on_bytes)

    held = Held(source.inner)
    image.reader.source = held
    assert read_whole(image, emap, toc, "usr/lib/mod/f00") == files["usr/lib/mod/f00"]
    # The window's request is on its way (held); a read of one of its files waits for it.
    reader = threading.Thread(target=lambda: read_whole(image, emap, toc, "usr/lib/mod/f07"))
    reader.start()
    reader.join(0.3)
    assert reader.is_alive()
    release.set()
    reader.join(10)
    assert image.wait_idle()
    assert held.requests == 2  # the first file, its window: f07 was not asked for again
    assert "usr/lib/mod/f07" in cached(image, toc, files)  # decoded as it came
    assert image.stats.members_kept == len(files) - 2
    assert read_whole(image, emap, toc, "usr/lib/mod/f07") == files["usr/lib/mod/f07"]
    image.close()


def test_beyond_the_bound_guesses_are_decoded_as_they_come(tmp_path):
    # Room for one member of 20 kB, shared by two layers (as by the layers of a server).
    budget = KeptBudget(30_000)
    files, blob = one_directory(tmp_path)
    first, toc, emap, _ = open_image(blob, tmp_path / "a", policy=POLICY, kept=budget)
    second, _, _, _ = open_image(blob, tmp_path / "b", policy=POLICY, kept=budget)
    for image in (first, second):
        assert read_whole(image, emap, toc, "usr/lib/mod/f05") == files["usr/lib/mod/f05"]
        assert image.wait_idle()
    # The first layer's first guess filled the bound: the rest were cached at once.
    assert (first.stats.members_kept, second.stats.members_kept) == (1, 0)
    assert len(cached(first, toc, files)) == len(files) - 1
    assert cached(second, toc, files) == set(files)
    assert not budget.take(30_000)
    # Reading the one kept, or closing its layer, gives its room back.
    kept = next(n for n in files if n not in cached(first, toc, files))
    assert read_whole(first, emap, toc, kept) == files[kept]
    assert budget.take(30_000)
    budget.give_back(30_000)
    first.close()
    second.close()
