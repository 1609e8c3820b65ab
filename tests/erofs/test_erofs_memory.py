"""build_index keeps a few dozen bytes per inode and writes the metadata region in pieces:
its memory grows with the tree, not with the image it writes.

The figures at a million entries are ``python -m tools.bench memory``'s; these run the
same code at a scale that takes a second or two, and fail if the cost per inode grows.
"""

from __future__ import annotations

import gc
import hashlib
import io
import json
import tracemalloc
from typing import Any

from blockfs.erofs import BLOCK_SIZE, build_index
from blockfs.estargz import TOC, parse_toc

ENTRIES = 20_000
MiB = 1 << 20


def large_toc(count: int) -> TOC:
    """Directories of 50 entries: files with data, empty files, symlinks, a few xattrs."""
    entries: list[dict[str, Any]] = []
    offset = 100
    for i in range(count):
        d = f"usr/share/pkg{i // 50:04d}"
        name = f"{d}/file-{i:06d}.txt"
        if i % 50 == 0:
            entries.append({"name": d + "/", "type": "dir", "mode": 0o755})
        elif i % 3 == 0:
            entries.append({"name": name, "type": "symlink", "linkName": "file-000001.txt"})
        elif i % 3 == 1:
            entries.append({"name": name, "type": "reg", "mode": 0o644})
        else:
            digest = "sha256:" + hashlib.sha256(name.encode()).hexdigest()
            entry = {"name": name, "type": "reg", "size": 5000, "offset": offset,
                     "digest": digest, "chunkDigest": digest}  # fmt: skip
            if i % 101 == 0:
                entry["xattrs"] = {"user.k": "dmFsdWU="}
            entries.append(entry)
            offset += 3000
    data = json.dumps({"version": 1, "entries": entries}).encode()
    return parse_toc(data, payload_end=offset + 1)


class _Pieces(io.RawIOBase):
    """An output that keeps only the sizes and a digest of what is written to it."""

    def __init__(self) -> None:
        self.sizes: list[int] = []
        self.sha = hashlib.sha256()

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        self.sizes.append(len(data))
        self.sha.update(data)
        return len(data)


def test_the_layout_costs_a_few_dozen_bytes_per_inode_and_writes_in_pieces() -> None:
    toc = large_toc(ENTRIES)
    out = _Pieces()
    gc.collect()
    tracemalloc.start()
    try:
        index = build_index(toc, out)  # type: ignore[arg-type]
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert index.inodes == ENTRIES + 3  # and the root, usr/ and usr/share/ implied
    meta = index.meta_size
    assert sum(out.sizes) == meta
    assert meta > 2 * MiB
    # Written as it is made, in pieces of about a MiB of whole blocks: never held whole.
    assert len(out.sizes) > 1 and max(out.sizes) <= 2 * MiB
    assert all(size % BLOCK_SIZE == 0 for size in out.sizes)
    # Arrays per inode and per directory entry, and a piece of the region being written.
    assert peak < 3 * MiB + 100 * ENTRIES, f"{(peak - 3 * MiB) / ENTRIES:.0f} bytes per inode"


def test_pieces_make_the_same_region_as_one_write() -> None:
    toc = large_toc(3_000)
    whole = io.BytesIO()
    pieces = _Pieces()
    assert build_index(toc, whole) == build_index(toc, pieces)  # type: ignore[arg-type]
    assert hashlib.sha256(whole.getvalue()).digest() == pieces.sha.digest()
