"""The first read of an ELF program or library fetches the libraries it needs."""

from __future__ import annotations

import io
import random
import threading
import time

from test_layer_image import file_span, open_image

from blockfs.estargz import BuildOptions, CountingSource, build
from blockfs.image import FetchPolicy, ServerConfig
from blockfs.image._elf import LibraryFinder, LoaderNeeds, library_dirs, parse_layout
from blockfs.image._layer import LIBRARY_READERS
from tests.helpers.containerd import layer_tar
from tests.helpers.elf import elf_file
from tests.helpers.waiting import wait_for

LIB = "usr/lib/x86_64-linux-gnu"
# No neighbour comes along with a read (each is 30 kB of noise), and no directory window:
# what comes beyond the file read is what it needs.
POLICY = FetchPolicy(unit=40_000, whole_file_max=64 << 20, directory_window=0)


def layer(tmp_path, files: dict[str, bytes], prioritized=(), chunk_size=4 << 20):
    """``files`` as an eStargz blob (in name order) in ``tmp_path``; its path."""
    blob = tmp_path / "layer.esgz"
    options = BuildOptions(gzip_level=1, prioritized=prioritized, chunk_size=chunk_size)
    with open(blob, "wb") as out:
        build(io.BytesIO(layer_tar(files)), out, options)
    return blob


def program_files(code: int = 20_000) -> dict[str, bytes]:
    rng = random.Random(5)
    return {
        "usr/bin/aaa": rng.randbytes(30_000),
        "usr/bin/prog": elf_file(["libfoo.so.1", "libc.so.6"], body=rng.randbytes(code)),
        "usr/bin/zzz": rng.randbytes(30_000),
        f"{LIB}/libbar.so.2": elf_file([], body=rng.randbytes(30_000)),
        f"{LIB}/libbaz.so.1": rng.randbytes(30_000),
        f"{LIB}/libfoo.so.1.2.3": elf_file(["libbar.so.2"], body=rng.randbytes(30_000)),
        f"{LIB}/libzzz.so.1": rng.randbytes(30_000),
        "usr/share/prog/data": rng.randbytes(30_000),
    }


def read_whole(image, emap, toc, name):
    start, size = file_span(emap, toc, name)
    return image.pread(start, -(-size // 4096) * 4096)[:size]


def fetched_files(image, toc, files):
    """The files whose every chunk is at hand (cached, or kept compressed)."""
    return {n for n in files if all(image.has_chunk(c) for c in toc.lookup(n).chunks)}


def test_a_program_read_brings_the_libraries_it_needs(tmp_path):
    files = program_files()
    image, toc, emap, _ = open_image(layer(tmp_path, files), tmp_path / "img", policy=POLICY)
    assert read_whole(image, emap, toc, "usr/bin/prog") == files["usr/bin/prog"]
    wait_for(lambda: f"{LIB}/libfoo.so.1.2.3" in fetched_files(image, toc, files))
    assert image.wait_idle()
    # libfoo.so.1 (which packages ship as a symlink) found as its versioned file;
    # libc.so.6 is in no file here.
    assert fetched_files(image, toc, files) == {"usr/bin/prog", f"{LIB}/libfoo.so.1.2.3"}
    # The loader's read of libfoo's header looks at what libfoo needs in turn.
    assert read_whole(image, emap, toc, f"{LIB}/libfoo.so.1.2.3") == files[f"{LIB}/libfoo.so.1.2.3"]
    wait_for(lambda: f"{LIB}/libbar.so.2" in fetched_files(image, toc, files))
    assert image.wait_idle()
    assert f"{LIB}/libbaz.so.1" not in fetched_files(image, toc, files)
    # Every file reads back exactly.
    for name, data in files.items():
        assert read_whole(image, emap, toc, name) == data, name
    image.close()


def test_the_dynamic_section_may_lie_in_a_later_chunk(tmp_path):
    files = program_files(code=200_000)
    blob = layer(tmp_path, files, chunk_size=64 << 10)
    image, toc, emap, _ = open_image(blob, tmp_path / "img", policy=POLICY)
    assert len(toc.lookup("usr/bin/prog").chunks) > 3
    start, _ = file_span(emap, toc, "usr/bin/prog")
    assert image.pread(start, 4096) == files["usr/bin/prog"][:4096]
    wait_for(lambda: f"{LIB}/libfoo.so.1.2.3" in fetched_files(image, toc, files))
    image.close()


def test_without_libraries_nothing_is_fetched_by_name(tmp_path):
    files = program_files()
    policy = FetchPolicy(unit=40_000, whole_file_max=64 << 20, directory_window=0, libraries=False)
    image, toc, emap, source = open_image(layer(tmp_path, files), tmp_path / "img", policy=policy)
    read_whole(image, emap, toc, "usr/bin/prog")
    read_whole(image, emap, toc, f"{LIB}/libfoo.so.1.2.3")
    assert image.wait_idle()
    assert fetched_files(image, toc, files) == {"usr/bin/prog", f"{LIB}/libfoo.so.1.2.3"}
    assert source.requests == 2
    image.close()


def prioritised_program(tmp_path):
    """The program files in a layer whose prioritised file is the program: (files, image,
    toc, extent map, source)."""
    files = program_files()
    blob = layer(tmp_path, files, prioritized=("usr/bin/prog",))
    image, toc, emap, source = open_image(blob, tmp_path / "img", policy=POLICY)
    assert image.prioritized_end > 0
    return files, image, toc, emap, source


def test_a_prioritised_program_guesses_nothing(tmp_path):
    files, image, toc, emap, source = prioritised_program(tmp_path)
    read_whole(image, emap, toc, "usr/bin/prog")
    assert image.wait_idle()
    assert fetched_files(image, toc, files) == {"usr/bin/prog"}
    assert source.requests == 1
    image.close()


def test_a_program_with_hostile_headers_reads_right_and_fetches_nothing_more(tmp_path):
    files = program_files()
    bad = bytearray(files["usr/bin/prog"])
    bad[32:40] = (1 << 40).to_bytes(8, "little")  # program headers far past the end
    files["usr/bin/prog"] = bytes(bad)
    lying = bytearray(elf_file(["libbar.so.2"]))
    # A dynamic section said to lie far beyond the file's end: nothing to read there.
    lying[64 + 56 + 8 : 64 + 56 + 16] = (1 << 50).to_bytes(8, "little")
    files["usr/bin/zzz"] = bytes(lying)
    image, toc, emap, source = open_image(layer(tmp_path, files), tmp_path / "img", policy=POLICY)
    for name in ("usr/bin/prog", "usr/bin/zzz"):  # zzz came along with prog
        assert read_whole(image, emap, toc, name) == files[name]
        assert image.wait_idle()
    assert fetched_files(image, toc, files) == {"usr/bin/prog", "usr/bin/zzz"}
    assert source.requests == 1
    image.close()


def test_the_nbdkit_parameter_turns_it_off():
    params = {"root": "/r", "cache": "/c"}
    assert ServerConfig.from_params(params).fetch.libraries is True
    off = ServerConfig.from_params({**params, "libraries": "0"})
    assert off.fetch.libraries is False
    assert "libraries=0" in off.to_params()


def test_libraries_are_found_as_the_loader_would_or_not_at_all(tmp_path):
    files = {
        f"{LIB}/libfoo.so.1.2.3": b"a",  # what a symlink libfoo.so.1 would point to
        "usr/lib/libfoo.so.1": b"b",  # a later directory in the search order
        "usr/lib/libtwo.so.1.0": b"c",  # two versioned files: which one is unknown
        "usr/lib/libtwo.so.1.1": b"d",
        "usr/lib/libexact.so.2": b"e",
        "usr/lib/libexact.so.2.0.1": b"f",
        "usr/share/libelse.so.3": b"g",  # not where the loader looks
        "opt/app/lib/libapp.so.1": b"h",
    }
    image, _, emap, _ = open_image(layer(tmp_path, files), tmp_path / "img")
    image.close()
    finder = LibraryFinder(emap)
    layout = parse_layout(elf_file([]))
    assert layout is not None
    dirs = library_dirs(layout)

    def found(name):
        i = finder.find(name, dirs)
        return None if i is None else emap.extent_name(i)

    assert found("libfoo.so.1") == f"{LIB}/libfoo.so.1.2.3"
    assert found("libtwo.so.1") is None
    assert found("libexact.so.2") == "usr/lib/libexact.so.2"
    assert found("libelse.so.3") is None and found("libapp.so.1") is None
    assert found("libnone.so.1") is None


def test_programs_read_at_once_share_a_few_threads(tmp_path):
    # Programs whose dynamic sections lie past their first chunk, behind a source that is
    # slow for all but the programs' first members: their reads return at once, and each
    # program's libraries are looked for while its dynamic section is on its way.
    rng = random.Random(11)
    programs = [f"usr/bin/prog{k}" for k in range(6)]
    files = {
        p: elf_file([f"libp{k}.so.1"], body=rng.randbytes(150_000)) for k, p in enumerate(programs)
    }
    files |= {f"{LIB}/libp{k}.so.1": rng.randbytes(20_000) for k in range(len(programs))}
    blob = layer(tmp_path, files, chunk_size=64 << 10)
    image, toc, emap, source = open_image(blob, tmp_path / "img", policy=POLICY)
    heads = {toc.lookup(p).chunks[0].offset for p in programs}

    class Slow(CountingSource):
        def read_range_streaming(self, offset, length, on_bytes):
            if offset not in heads:
                time.sleep(0.3)
            return super().read_range_streaming(offset, length, on_bytes)

    image.reader.source = Slow(source.inner)
    most = 0
    for p in programs:
        start, _ = file_span(emap, toc, p)
        assert image.pread(start, 4096) == files[p][:4096]
        readers = [t for t in threading.enumerate() if t.name.startswith("libraries-")]
        most = max(most, len(readers))
    assert 1 <= most <= LIBRARY_READERS

    def all_libraries_in() -> bool:
        return all(f"{LIB}/libp{k}.so.1" in fetched_files(image, toc, files) for k in range(6))

    wait_for(all_libraries_in)
    image.close()


def test_a_program_fetched_ahead_says_what_the_loader_opens_and_fetches_only_itself(tmp_path):
    files = program_files()
    loader = "/lib64/ld-linux-x86-64.so.2"
    files["usr/bin/prog"] = elf_file(
        ["libfoo.so.1", "libc.so.6"], body=random.Random(5).randbytes(20_000), interpreter=loader
    )
    # One member per 4 KiB: the program takes many, and one request brings them all.
    blob = layer(tmp_path, files, chunk_size=4 << 10)
    image, toc, emap, source = open_image(blob, tmp_path / "img", policy=POLICY)
    chunks = toc.lookup("usr/bin/prog").chunks
    assert len(chunks) > 3
    layout = parse_layout(files["usr/bin/prog"])
    assert layout is not None
    needs = image.fetch_ahead(chunks[0].offset, around=False)
    assert needs == LoaderNeeds(loader, ("libfoo.so.1", "libc.so.6"), library_dirs(layout))
    wait_for(lambda: "usr/bin/prog" in fetched_files(image, toc, files))
    assert image.wait_idle()
    # The libraries are the caller's to find, in whichever layer holds them.
    assert fetched_files(image, toc, files) == {"usr/bin/prog"}
    assert source.requests == 1
    # The container's reads of it, its first bytes among them, fetch nothing more.
    assert read_whole(image, emap, toc, "usr/bin/prog") == files["usr/bin/prog"]
    time.sleep(0.2)
    assert not image._inflight and source.requests == 1
    image.close()


def test_a_file_fetched_ahead_brings_its_directory_if_asked_as_a_first_read_would(tmp_path):
    files = program_files()
    window = FetchPolicy(unit=40_000, whole_file_max=64 << 20, directory_window=1 << 20)
    image, toc, _, _ = open_image(layer(tmp_path, files), tmp_path / "img", policy=window)

    def ahead(name: str, *, around: bool) -> set[str]:
        image.fetch_ahead(toc.lookup(name).chunks[0].offset, around=around)
        assert image.wait_idle()
        return fetched_files(image, toc, files)

    assert ahead("usr/share/prog/data", around=True) == {"usr/share/prog/data"}  # alone there
    assert ahead(f"{LIB}/libbaz.so.1", around=False) == {
        "usr/share/prog/data",
        f"{LIB}/libbaz.so.1",
    }
    # Its neighbours in the library directory, and no other directory's files.
    assert ahead(f"{LIB}/libbar.so.2", around=True) == {"usr/share/prog/data"} | {
        n for n in files if n.startswith(LIB + "/")
    }
    image.close()


def test_a_prioritised_file_is_left_to_the_prefetch_when_fetched_ahead(tmp_path):
    files, image, toc, _, source = prioritised_program(tmp_path)
    assert image.fetch_ahead(toc.lookup("usr/bin/prog").chunks[0].offset, around=True) is None
    time.sleep(0.2)
    assert source.requests == 0 and not image._inflight
    # A file after the prioritised region is fetched ahead as any other.
    assert (
        image.fetch_ahead(toc.lookup(f"{LIB}/libzzz.so.1").chunks[0].offset, around=False) is None
    )
    wait_for(lambda: f"{LIB}/libzzz.so.1" in fetched_files(image, toc, files))
    image.close()
