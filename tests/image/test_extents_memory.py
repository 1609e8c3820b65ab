"""The extent map is built from the TOC's columns and loaded by mapping its file: a served
layer costs the server next to no memory of its own, whatever its number of chunks."""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from blockfs.erofs import build_index
from blockfs.estargz import TOC, parse_toc
from blockfs.image import ExtentMap, ExtentMapError

FILES = 20_000


def many_files(count: int) -> TOC:
    entries: list[dict[str, Any]] = []
    offset = 100
    for i in range(count):
        digest = "sha256:" + hashlib.sha256(str(i).encode()).hexdigest()
        entries.append({"name": f"d{i // 100}/f{i}", "type": "reg", "size": 3000 + i,
                        "offset": offset, "digest": digest, "chunkDigest": digest})  # fmt: skip
        offset += 2000
    return parse_toc(json.dumps({"version": 1, "entries": entries}).encode(), payload_end=offset)


def test_a_loaded_map_is_a_view_of_its_file_and_reads_as_the_built_one(tmp_path: Path) -> None:
    toc = many_files(FILES)
    index = build_index(toc, io.BytesIO())
    built = ExtentMap.build(index, toc)
    path = tmp_path / "extents.bin"
    built.save(path)
    assert path.stat().st_size > FILES * 100
    # Measured in a fresh interpreter: threads that earlier tests left running here would
    # allocate during the measurement (and tracemalloc must not start and stop under them).
    probe = (
        "import sys, tracemalloc\n"
        "from blockfs.image._extents import ExtentMap\n"
        "tracemalloc.start()\n"
        "ExtentMap.load(sys.argv[1])\n"
        "print(tracemalloc.get_traced_memory()[1])\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe, str(path)], capture_output=True, text=True, check=True
    )
    peak = int(done.stdout)
    # The file is mapped, not read: a few objects, however many chunks.
    assert peak < 64 * 1024, f"{peak} bytes to load a map of {FILES} chunks"
    loaded = ExtentMap.load(path)
    assert (loaded.extent_count, loaded.chunk_count) == (FILES, FILES)
    for i in (0, 1, FILES // 2, FILES - 1):
        assert loaded.extent_span(i) == built.extent_span(i)
        assert loaded.extent_name(i) == built.extent_name(i) == f"d{i // 100}/f{i}"
        assert loaded.chunk(i) == built.chunk(i) == toc.lookup(f"d{i // 100}/f{i}").chunks[0]
        start, size = loaded.extent_span(i)
        assert loaded.extent_at(start) == i
        assert loaded.chunk_in_extent(i, size - 1) == i
        assert loaded.chunks_in_member(loaded.chunk(i).offset) == [i]
    # Saving a loaded map writes the same file.
    again = tmp_path / "again.bin"
    loaded.save(again)
    assert again.read_bytes() == path.read_bytes()


def test_the_map_built_from_columns_holds_each_files_chunks_as_the_toc_lists_them() -> None:
    toc = many_files(500)
    index = build_index(toc, io.BytesIO())
    built = ExtentMap.build(index, toc)
    assert built.chunk_count == 500
    for i, extent in enumerate(index.extents):
        assert built.extent_name(i) == extent.entry_name
        assert built.extent_span(i) == (extent.start_block * index.block_size, extent.size)
        chunks = [built.chunk(j) for j in built.extent_chunks(i)]
        assert chunks == list(toc.lookup(extent.entry_name).chunks)


def test_an_index_laid_out_from_another_toc_is_refused() -> None:
    index = build_index(many_files(10), io.BytesIO())
    with pytest.raises(ExtentMapError, match="not laid out from this TOC"):
        ExtentMap.build(index, many_files(10))
