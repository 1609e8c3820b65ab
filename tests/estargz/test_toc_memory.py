"""A TOC costs memory by what it describes, not by its JSON: bounded per entry, parsed in
pieces, and an oversized entry is refused before it is read whole.

The figures at a million entries are ``python -m tools.bench memory``'s; these tests run
the same code at a scale that takes a second, and fail if the cost per entry grows.
"""

from __future__ import annotations

import base64
import gc
import hashlib
import json
import tracemalloc
from collections.abc import Iterator
from typing import Any

import pytest
from estargz_blobkit import BytesSource, gzip_member, gzip_toc_member

from blockfs.estargz import (
    BlobReader,
    FormatError,
    Limits,
    TOCDigestMismatch,
    TOCError,
    TOCTooLargeError,
    parse_toc,
)
from blockfs.estargz._footer import encode_estargz_footer

MiB = 1 << 20
ENTRIES = 10_000


def _digest(i: int) -> str:
    return "sha256:" + hashlib.sha256(str(i).encode()).hexdigest()


def layer_entries(count: int) -> list[dict[str, Any]]:
    """A layer of many small files: directories of 40, files, empty files, symlinks."""
    entries: list[dict[str, Any]] = []
    offset = 100
    i = 0
    while len(entries) < count:
        d = f"usr/lib/pkg{i // 40:05d}"
        if i % 40 == 0:
            entries.append({"name": d + "/", "type": "dir", "modtime": "2023-11-14T22:13:20Z",
                            "mode": 0o755})  # fmt: skip
        name = f"{d}/file_{i:06d}.py"
        kind = i % 4
        if kind == 0:
            entries.append({"name": name, "type": "symlink", "linkName": "other.py",
                            "modtime": "2023-11-14T22:13:20Z", "mode": 0o777})  # fmt: skip
        elif kind == 1:
            entries.append({"name": name, "type": "reg", "mode": 0o644,
                            "modtime": "2023-11-14T22:13:20Z",
                            "digest": "sha256:" + hashlib.sha256(b"").hexdigest()})  # fmt: skip
        else:
            digest = _digest(i)
            entries.append({"name": name, "type": "reg", "size": 1000 + i % 3000,
                            "modtime": "2023-11-14T22:13:20Z", "mode": 0o644, "offset": offset,
                            "digest": digest, "chunkDigest": digest})  # fmt: skip
            offset += 700
        i += 1
    return entries[:count]


def toc_json(entries: list[dict[str, Any]]) -> bytes:
    # Formatted as the reference writer formats it.
    return json.dumps({"version": 1, "entries": entries}, indent="\t").encode()


@pytest.fixture(scope="module")
def large_toc() -> bytes:
    return toc_json(layer_entries(ENTRIES))


def _traced(fn: Any, *args: Any, **kwargs: Any) -> tuple[Any, int, int]:
    """``fn(*args, **kwargs)``, the memory it still holds and its peak, as tracemalloc sees."""
    gc.collect()
    tracemalloc.start()
    try:
        base, _ = tracemalloc.get_traced_memory()
        result = fn(*args, **kwargs)
        held, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return result, held - base, peak - base


def test_a_parsed_toc_holds_about_a_hundred_bytes_per_entry(large_toc: bytes) -> None:
    toc, held, peak = _traced(parse_toc, large_toc, payload_end=1 << 40)
    assert len(toc.entries) == ENTRIES
    # What the TOC keeps (its JSON is ~260 bytes per entry; the objects json.loads makes
    # of it ~800; Entry objects ~600): columns, the tree and the path index, about 150
    # bytes per entry.
    assert held < 200 * ENTRIES, f"{held / ENTRIES:.0f} bytes per entry"
    # While parsing: that, plus a piece of JSON text (1 MiB, as bytes and as str) and the
    # path index being resized; never the whole JSON decoded.
    assert peak < 4 * MiB + 250 * ENTRIES, f"peak {(peak - 4 * MiB) / ENTRIES:.0f} bytes per entry"


def test_entries_are_views_that_cost_little_to_keep(large_toc: bytes) -> None:
    toc = parse_toc(large_toc, payload_end=1 << 40)
    files, held, _ = _traced(lambda: [e for e in toc.entries if e.type == "reg"])
    assert len(files) > ENTRIES // 2
    assert held < 120 * len(files), f"{held / len(files):.0f} bytes per kept entry"
    # Views read their row: the same values as the JSON.
    e = files[1]
    assert (e.type, e.mode, e.modtime, len(e.chunks)) == ("reg", 0o644, 1_700_000_000, 1)


def test_pieces_of_any_size_parse_to_the_same_toc() -> None:
    # Numbers, strings and escapes cut anywhere by the end of a piece.
    entries = layer_entries(60)
    entries[3]["xattrs"] = {"user.k\u00e9y": base64.b64encode(b"\x00" * 40).decode()}
    entries[5]["name"] = "usr/lib/\u00e9t\u00e9/\U0001f600.txt"
    entries.append({"name": "dev/x", "type": "char", "devMajor": 123, "devMinor": 45678})
    data = toc_json(entries)
    whole = parse_toc(data, payload_end=1 << 40)
    for size in (1, 2, 3, 7, 64, 1000):
        pieces = [data[i : i + size] for i in range(0, len(data), size)]
        toc = parse_toc(iter(pieces), payload_end=1 << 40)
        assert toc.entries == whole.entries
        assert dict(toc.children) == dict(whole.children)


def test_top_level_keys_in_any_order_and_unknown_keys_are_read() -> None:
    data = b'{"x": [1, {"a": 2}], "entries": [{"name": "d", "type": "dir"}], "version": 1}'
    assert [e.name for e in parse_toc(data, payload_end=100).entries] == ["d"]


@pytest.mark.parametrize(
    "doc",
    [
        b'{"version": 1, "entries": [], "entries": []}',
        b'{"version": 1, "entries": []} x',
        b'{"version": 1, "entries": [],}',
        b'{"version": 1, "entries": [{"name": "a", "type": "dir"},]}',
        b'{"version": 1 "entries": []}',
        b'\xef\xbb\xbf{"version": 1, "entries": []}',
        b"",
    ],
)
def test_documents_the_streaming_parse_refuses(doc: bytes) -> None:
    with pytest.raises(TOCError):
        parse_toc(doc, payload_end=100)


def _xattr_toc(value_bytes: int) -> bytes:
    big = base64.b64encode(bytes(value_bytes)).decode()
    return toc_json(
        [
            {"name": "a", "type": "dir"},
            {"name": "b", "type": "dir", "xattrs": {"user.big": big}},
            {"name": "c", "type": "dir"},
        ]
    )


def test_an_oversized_entry_is_refused_before_more_than_the_limit_is_read() -> None:
    data = _xattr_toc(16 * MiB)  # 21 MiB of JSON in one entry
    read = 0

    def pieces() -> Iterator[bytes]:
        nonlocal read
        for start in range(0, len(data), 256 * 1024):
            read += 256 * 1024
            yield data[start : start + 256 * 1024]

    limit = 512 * 1024
    with pytest.raises(TOCTooLargeError, match="entry") as info:
        parse_toc(pieces(), payload_end=100, limits=Limits(max_entry_json=limit))
    assert info.value.entry == "#1"
    assert read <= limit + 2 * 256 * 1024


def test_a_blob_with_a_huge_xattr_is_refused_in_bounded_memory() -> None:
    # 21 MiB of JSON (a 16 MiB xattr) compressed into a small TOC member: refused after
    # decompressing about the entry limit (1 MiB), never holding the xattr or the JSON
    # whole.
    toc = _xattr_toc(16 * MiB)
    member = gzip_toc_member(toc)
    body = gzip_member(b"x")
    blob = body + member + encode_estargz_footer(len(body))
    del toc
    source = BytesSource(blob)
    _, _, peak = _traced(_open_refused, source)
    assert peak < len(member) + 8 * MiB, f"peak {peak / MiB:.1f} MiB"


def _open_refused(source: BytesSource) -> None:
    with pytest.raises(TOCTooLargeError):
        BlobReader.open(source)


def test_a_tampered_toc_is_a_digest_mismatch_even_if_it_does_not_parse() -> None:
    good = toc_json(layer_entries(10))
    bad = good.replace(b'"version": 1', b'"version": 7')
    body = gzip_member(b"x")
    blob = body + gzip_toc_member(bad) + encode_estargz_footer(len(body))
    digest = "sha256:" + hashlib.sha256(good).hexdigest()
    with pytest.raises(TOCDigestMismatch):
        BlobReader.open(BytesSource(blob), toc_digest=digest)
    # Without a digest to check, the TOC's own fault is what is reported.
    with pytest.raises(TOCError, match="version"):
        BlobReader.open(BytesSource(blob))


def test_a_toc_that_is_not_utf8_is_a_format_error() -> None:
    with pytest.raises(FormatError, match="UTF-8"):
        parse_toc(b'{"version": 1, "entries": [{"name": "\xff", "type": "dir"}]}', payload_end=9)
