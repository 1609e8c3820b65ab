"""Hostile TOCs and blobs are refused with specific format errors, in bounded memory."""

from __future__ import annotations

import copy
import json
import tracemalloc
import zlib
from typing import Any

import pytest
from estargz_blobkit import (
    BlobMaker,
    BytesSource,
    Kind,
    gzip_member,
    gzip_toc_member,
    sha,
    zstd_frame,
)
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from blockfs.estargz import (
    TOC,
    BlobReader,
    ChunkVerificationError,
    DecompressionError,
    EntryError,
    FooterError,
    FormatError,
    Limits,
    TOCError,
    TOCTooLargeError,
    clean_name,
    parse_toc,
)
from blockfs.estargz._footer import (
    ZSTD_SKIPPABLE_HEADER,
    ZSTD_SKIPPABLE_MAGIC,
    encode_estargz_footer,
    encode_zstd_footer,
)

D1 = "sha256:" + "1" * 64
D2 = "sha256:" + "2" * 64
END = 10_000
MiB = 1 << 20


def parse(doc: Any, *, payload_end: int = END, **kw: Any) -> TOC:
    data = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
    return parse_toc(data, payload_end=payload_end, layer="hostile", **kw)


def entries(*items: dict[str, Any]) -> dict[str, Any]:
    return {"version": 1, "entries": list(items)}


def reg(name: str = "f", size: Any = 10, offset: Any = 100, **fields: Any) -> dict[str, Any]:
    return {
        "name": name,
        "type": "reg",
        "size": size,
        "offset": offset,
        "chunkDigest": D1,
        **fields,
    }


def chunk(offset: int, chunk_offset: Any, size: int = 0, **fields: Any) -> dict[str, Any]:
    c = {"name": "f", "type": "chunk", "offset": offset, "chunkOffset": chunk_offset, **fields}
    if size:
        c["chunkSize"] = size
    c.setdefault("chunkDigest", D2)
    return c


# --------------------------------------------------------------------------------------
# The document

DOCUMENT_CASES = {
    "not JSON": b"{",
    "not UTF-8": b'{"version": 1, "entries": [{"name": "\xff\xfe"}]}',
    "deeply nested": b"[" * 100_000 + b"]" * 100_000,
    "a list": [],
    "a string": "toc",
    "no version": {"entries": []},
    "version 2": {"version": 2, "entries": []},
    "version as string": {"version": "1", "entries": []},
    "version as bool": {"version": True, "entries": []},
    "entries an object": {"version": 1, "entries": {}},
    "entries a string": {"version": 1, "entries": "abc"},
}


@pytest.mark.parametrize("doc", DOCUMENT_CASES.values(), ids=DOCUMENT_CASES.keys())
def test_malformed_toc_documents_are_refused(doc: Any) -> None:
    with pytest.raises(TOCError) as info:
        parse(doc)
    assert info.value.layer == "hostile"


def test_toc_over_the_size_limit_is_refused_before_parsing() -> None:
    with pytest.raises(TOCTooLargeError):
        parse(entries(reg()), limits=Limits(max_toc_bytes=20))


def test_toc_with_too_many_entries_is_refused() -> None:
    doc = entries(*({"name": f"d{i}", "type": "dir"} for i in range(4)))
    parse(doc, limits=Limits(max_entries=4))
    with pytest.raises(TOCTooLargeError):
        parse(doc, limits=Limits(max_entries=3))


# --------------------------------------------------------------------------------------
# Entries: every case is refused with an EntryError naming the entry

E = dict[str, Any]
ENTRY_CASES: dict[str, list[E]] = {
    # Shapes and types
    "entry not an object": [1],  # type: ignore[list-item]
    "unknown type": [{"name": "s", "type": "socket"}],
    "missing type": [{"name": "s"}],
    "name not a string": [{"name": 5, "type": "dir"}],
    "missing name": [{"type": "dir"}],
    "size as string": [reg(size="10")],
    "size negative": [reg(size=-1)],
    "size as bool": [reg(size=True)],
    "mode as float": [{"name": "d", "type": "dir", "mode": 1.5}],
    "uid negative": [{"name": "d", "type": "dir", "uid": -1}],
    "gid too large": [{"name": "d", "type": "dir", "gid": 1 << 32}],
    "uid as string": [{"name": "d", "type": "dir", "uid": "0"}],
    "userName not a string": [{"name": "d", "type": "dir", "userName": 5}],
    "modtime a number": [{"name": "d", "type": "dir", "modtime": 12345}],
    "modtime not a time": [{"name": "d", "type": "dir", "modtime": "yesterday"}],
    "modtime impossible date": [{"name": "d", "type": "dir", "modtime": "2023-02-30T00:00:00Z"}],
    "modtime without zone": [{"name": "d", "type": "dir", "modtime": "2023-02-03T00:00:00"}],
    "modtime hour 24": [{"name": "d", "type": "dir", "modtime": "2023-02-03T24:00:00Z"}],
    "xattrs a list": [{"name": "d", "type": "dir", "xattrs": ["a"]}],
    "xattr value not base64": [{"name": "d", "type": "dir", "xattrs": {"user.a": "!!"}}],
    "xattr value not ASCII": [{"name": "d", "type": "dir", "xattrs": {"user.a": "\x80"}}],
    "xattr value not a string": [{"name": "d", "type": "dir", "xattrs": {"user.a": 1}}],
    "xattr name empty": [{"name": "d", "type": "dir", "xattrs": {"": "aGk="}}],
    "xattr name too long": [{"name": "d", "type": "dir", "xattrs": {"u" * 256: "aGk="}}],
    "xattrs too large": [
        {"name": "d", "type": "dir", "xattrs": {f"user.{i}": "A" * 8000 for i in range(12)}}
    ],
    "digest malformed": [reg(digest="sha256:abc")],
    "digest uppercase": [reg(digest="sha256:" + "A" * 64)],
    "digest not sha256": [reg(digest="md5:" + "1" * 32)],
    "digest a number": [reg(digest=5)],
    "chunkDigest malformed": [reg(chunkDigest="sha256:zz")],
    "chunkDigest missing": [reg(chunkDigest="")],
    "chunkDigest a list": [reg(chunkDigest=[D1])],
    # Names
    "dot-dot name": [{"name": "../etc/passwd", "type": "dir"}],
    "dot-dot inside name": [{"name": "a/../../b", "type": "dir"}],
    "NUL in name": [{"name": "a\0b", "type": "dir"}],
    "lone surrogate in name": [{"name": "a\ud800", "type": "dir"}],
    "name too long": [{"name": "/".join(["d" * 200] * 21), "type": "dir"}],
    "component too long": [{"name": "d" * 256, "type": "dir"}],
    # Links
    "symlink without target": [{"name": "s", "type": "symlink"}],
    "symlink target with NUL": [{"name": "s", "type": "symlink", "linkName": "a\0"}],
    "symlink target too long": [{"name": "s", "type": "symlink", "linkName": "x" * 4096}],
    "linkName a number": [{"name": "s", "type": "symlink", "linkName": 7}],
    "hardlink without target": [{"name": "h", "type": "hardlink"}],
    "hardlink to missing": [{"name": "h", "type": "hardlink", "linkName": "nothing"}],
    "hardlink to itself": [{"name": "h", "type": "hardlink", "linkName": "./h"}],
    "hardlink cycle": [
        {"name": "a", "type": "hardlink", "linkName": "b"},
        {"name": "b", "type": "hardlink", "linkName": "a"},
    ],
    "hardlink to directory": [
        {"name": "d", "type": "dir"},
        {"name": "h", "type": "hardlink", "linkName": "d"},
    ],
    "hardlink to implicit directory": [
        reg("d/f"),
        {"name": "h", "type": "hardlink", "linkName": "d"},
    ],
    "hardlink to root": [{"name": "h", "type": "hardlink", "linkName": "./"}],
    "hardlink escaping": [reg("f"), {"name": "h", "type": "hardlink", "linkName": "../f"}],
    # Tree
    "directory replaced by a file": [{"name": "a/", "type": "dir"}, reg("./a")],
    "file replaced by a directory": [reg("a"), {"name": "a/", "type": "dir"}],
    "root replaced by a file": [{"name": "./", "type": "dir"}, {"name": "/", "type": "fifo"}],
    "root not a directory": [{"name": "./", "type": "reg"}],
    "child of a file": [reg("f"), {"name": "f/g", "type": "dir"}],
    "child of a symlink": [{"name": "s", "type": "symlink", "linkName": "d"}, reg("s/f")],
    "child of a hardlink": [
        {"name": "d", "type": "fifo"},
        {"name": "h", "type": "hardlink", "linkName": "d"},
        {"name": "h/x", "type": "dir"},
    ],
    "directory listed later as a file": [reg("a/b"), {"name": "a", "type": "fifo"}],
    # Devices
    "device major too large": [{"name": "c", "type": "char", "devMajor": 4096}],
    "device minor too large": [{"name": "c", "type": "block", "devMinor": 1 << 20}],
    "device number negative": [{"name": "c", "type": "char", "devMajor": -1}],
    # Pieces
    "chunk first": [chunk(100, 0, 10)],
    "chunk after a directory": [{"name": "d", "type": "dir"}, chunk(100, 0, 10)],
    "chunk after an empty file": [{"name": "e", "type": "reg"}, chunk(100, 0, 10)],
    "chunk after a complete file": [reg(size=10), chunk(200, 10, 5)],
    "offset missing": [{"name": "f", "type": "reg", "size": 10, "chunkDigest": D1}],
    "offset zero": [reg(offset=0)],
    "offset negative": [reg(offset=-5)],
    "offset as string": [reg(offset="100")],
    "offset as bool": [reg(offset=True)],
    "offset at payload end": [reg(offset=END)],
    "offset past payload end": [reg(offset=END + 100)],
    "innerOffset negative": [reg(innerOffset=-1)],
    "innerOffset absurd": [reg(innerOffset=1 << 40)],
    "two files at one offset": [reg("a"), reg("b")],
    "offsets going back": [reg("a", offset=500), reg("b", offset=400)],
    "shared member overlap": [reg("a", size=10), reg("b", innerOffset=5)],
    "pieces short of the size": [reg(size=100, chunkSize=40), chunk(200, 40, 40)],
    "pieces short, then more entries": [
        reg(size=100, chunkSize=40),
        chunk(200, 40, 40),
        {"name": "d", "type": "dir"},
    ],
    "pieces past the size": [reg(size=100, chunkSize=60), chunk(200, 60, 60)],
    "chunk offset gap": [reg(size=100, chunkSize=40), chunk(200, 50)],
    "chunk offset overlap": [reg(size=100, chunkSize=40), chunk(200, 30)],
    "chunk offset as string": [reg(size=100, chunkSize=40), chunk(200, "40")],
    "first piece not at zero": [reg(chunkOffset=5)],
    "chunkSize negative": [reg(chunkSize=-1)],
    "chunkSize larger than the file": [reg(size=10, chunkSize=20)],
    "chunk without chunkDigest": [reg(size=100, chunkSize=40), chunk(200, 40, chunkDigest="")],
    # Absurd sizes
    "file over the size limit": [reg(size=(1 << 40) + 1)],
    "piece over the chunk limit": [reg(size=65 * MiB)],
    "chunkSize over the chunk limit": [reg(size=100 * MiB, chunkSize=65 * MiB)],
}


@pytest.mark.parametrize("items", ENTRY_CASES.values(), ids=ENTRY_CASES.keys())
def test_hostile_entries_are_refused(items: list[E]) -> None:
    with pytest.raises(EntryError) as info:
        parse(entries(*items))
    assert info.value.layer == "hostile"
    assert info.value.entry is not None


def test_refusals_name_the_entry_and_offset() -> None:
    with pytest.raises(EntryError) as info:
        parse(entries(reg("ok", offset=100), reg("bad/", offset=50)))
    assert (info.value.entry, info.value.offset) == ("bad", 50)
    assert "layer hostile" in str(info.value) and "offset 50" in str(info.value)


def test_duplicate_names_keep_the_later_entry_like_the_reference_reader() -> None:
    toc = parse(entries(reg("f", offset=100), reg("./f", size=20, offset=200)))
    assert toc.lookup("f").size == 20
    assert [c.offset for e in toc.entries for c in e.chunks] == [200]
    toc = parse(entries({"name": "./", "type": "dir"}, {"name": "/", "type": "dir", "mode": 0o700}))
    assert toc.lookup("").mode == 0o700


def test_an_implicit_directory_listed_later_is_not_a_duplicate() -> None:
    toc = parse(entries(reg("a/f"), {"name": "a/", "type": "dir", "mode": 0o700}))
    assert toc.lookup("a").mode == 0o700


# --------------------------------------------------------------------------------------
# Fuzzing: whatever the JSON, parse_toc returns a sound TOC or raises a FormatError.

_names = st.one_of(
    st.sampled_from(["a", "a/b", "./a/", "/a/b/c", "b", "", "./", "..", "a/../b", "a\0", "é/ü"]),
    st.text(alphabet="ab./", max_size=8),
)
_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.integers(min_value=0, max_value=300),
    st.floats(allow_nan=True),
    st.text(max_size=6),
    st.just(D1),
    st.just("2023-11-14T22:13:21Z"),
    st.just("aGk="),
)
_values = st.one_of(
    _scalars,
    st.lists(_scalars, max_size=2),
    st.dictionaries(st.text(max_size=3), _scalars, max_size=2),
)
_fields = {
    "name": _names,
    "type": st.sampled_from(
        ["dir", "reg", "symlink", "hardlink", "char", "block", "fifo", "chunk", "x"]
    ),
    "size": st.integers(min_value=-1, max_value=300),
    "offset": st.integers(min_value=-1, max_value=320),
    "innerOffset": st.integers(min_value=-1, max_value=50),
    "chunkOffset": st.integers(min_value=-1, max_value=300),
    "chunkSize": st.integers(min_value=-1, max_value=300),
    "chunkDigest": st.sampled_from([D1, D2, "", "sha256:1"]),
    "digest": st.sampled_from([D1, "", "x"]),
    "linkName": _names,
    "mode": st.integers(min_value=-1, max_value=0o177777),
    "uid": st.integers(min_value=-1, max_value=2**33),
    "modtime": st.sampled_from(["", "2023-11-14T22:13:21Z", "2023-11-14T22:13:21.5+01:00", "bad"]),
    "xattrs": st.dictionaries(
        st.sampled_from(["user.a", "", "b"]), st.sampled_from(["aGk=", "!"]), max_size=2
    ),
    "devMajor": st.integers(min_value=-1, max_value=5000),
}
_entry = st.fixed_dictionaries(
    {"name": _names, "type": _fields["type"]},
    optional={**{k: v for k, v in _fields.items() if k not in ("name", "type")}, "junk": _values},
)


def _check_sound(toc: TOC, payload_end: int) -> None:
    texts = ("name", "type", "user_name", "group_name", "link_name", "digest")
    numbers = ("mode", "uid", "gid", "size", "dev_major", "dev_minor")
    for e in [*toc.entries, *toc.nodes.values()]:
        assert all(type(getattr(e, f)) is str for f in texts), e
        assert all(type(getattr(e, f)) is int for f in numbers), e
        assert e.modtime is None or type(e.modtime) is int
        assert all(type(k) is str and type(v) is bytes for k, v in e.xattrs.items())
    for path, node in toc.nodes.items():
        assert clean_name(path) == path
        if path:
            assert toc.nodes[path.rpartition("/")[0]].type == "dir"
        assert node.type != "hardlink"
    for e in toc.entries:
        covered = 0
        for c in e.chunks:
            assert 0 < c.offset < c.end <= payload_end
            assert c.chunk_offset == covered and c.size > 0
            covered += c.size
        assert covered == (e.size if e.chunks else 0)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(items=st.lists(_entry, max_size=8), payload_end=st.integers(min_value=0, max_value=400))
def test_fuzzed_entries_give_a_sound_toc_or_a_format_error(
    items: list[dict[str, Any]], payload_end: int
) -> None:
    for require in (True, False):
        try:
            toc = parse(entries(*items), payload_end=payload_end, require_chunk_digests=require)
        except FormatError:
            continue
        _check_sound(toc, payload_end)


def _valid_doc() -> dict[str, Any]:
    return entries(
        {"name": "./", "type": "dir"},
        {"name": "d/", "type": "dir", "mode": 493, "uid": 1, "userName": "u"},
        reg("d/f", size=100, offset=100, chunkSize=40, digest=D1),
        chunk(150, 40, 40),
        chunk(200, 80),
        reg("d/g", size=5, offset=200, innerOffset=30),
        {"name": "d/h", "type": "hardlink", "linkName": "d/f"},
        {"name": "s", "type": "symlink", "linkName": "d/g", "modtime": "2023-11-14T22:13:21Z"},
        {"name": "c", "type": "char", "devMajor": 1, "devMinor": 3},
    )


def test_the_fuzzing_seed_document_is_valid() -> None:
    _check_sound(parse(_valid_doc(), payload_end=300), 300)


@settings(max_examples=400, deadline=None)
@given(
    index=st.integers(min_value=0, max_value=8),
    key=st.sampled_from(sorted(_fields)),
    value=st.one_of(_values, *_fields.values()),
)
# Found by this test: a float first chunkOffset equal to 0 passed as 0, then broke the
# integer column it was stored in (TypeError instead of a FormatError).
@example(index=2, key="chunkOffset", value=0.0)
def test_one_mutated_field_gives_a_sound_toc_or_a_format_error(
    index: int, key: str, value: Any
) -> None:
    doc = copy.deepcopy(_valid_doc())
    doc["entries"][index][key] = value
    try:
        toc = parse(doc, payload_end=300)
    except FormatError:
        return
    _check_sound(toc, 300)


# --------------------------------------------------------------------------------------
# Blobs


def _simple_blob(kind: Kind = "estargz") -> tuple[bytes, str, int]:
    blob = BlobMaker(kind=kind).dir("d").file("d/a", b"alpha" * 100).file("d/b", b"beta").build()
    return blob.data, blob.toc_digest, blob.toc_offset


@pytest.mark.parametrize("size", [0, 10, 46, 50])
def test_blob_too_small_for_a_footer_is_refused(size: int) -> None:
    data, _, _ = _simple_blob()
    with pytest.raises(FooterError):
        BlobReader.open(BytesSource(data[-size:] if size else b""))


def test_blob_without_a_footer_is_refused() -> None:
    data, _, _ = _simple_blob()
    with pytest.raises(FooterError):
        BlobReader.open(BytesSource(data[:-1]))
    with pytest.raises(FooterError):
        BlobReader.open(BytesSource(data + b"\0" * 60))


def test_footer_pointing_past_the_blob_is_refused() -> None:
    with pytest.raises(FooterError):
        BlobReader.open(BytesSource(gzip_member(b"x") + encode_estargz_footer(1 << 40)))


def test_truncated_toc_member_is_refused() -> None:
    data, digest, toc_offset = _simple_blob()
    cut = data[: toc_offset + 30] + encode_estargz_footer(toc_offset)
    with pytest.raises(DecompressionError):
        BlobReader.open(BytesSource(cut), toc_digest=digest)


def test_blob_with_bytes_missing_before_the_toc_is_refused() -> None:
    data, digest, _ = _simple_blob()
    # The footer still points where the TOC used to start.
    shifted = data[:50] + data[60:]
    with pytest.raises((DecompressionError, TOCError)):
        BlobReader.open(BytesSource(shifted), toc_digest=digest)


def test_toc_member_that_is_not_gzip_is_refused() -> None:
    body = gzip_member(b"x" * 1000)
    data = body + b"this is no gzip member" + encode_estargz_footer(len(body))
    with pytest.raises(DecompressionError):
        BlobReader.open(BytesSource(data))


def test_toc_member_with_another_tar_entry_is_refused() -> None:
    body = gzip_member(b"x" * 1000)
    data = body + gzip_toc_member(b"{}", name="other.json") + encode_estargz_footer(len(body))
    with pytest.raises(TOCError, match=r"other\.json"):
        BlobReader.open(BytesSource(data))


def test_toc_that_is_not_json_is_refused() -> None:
    blob = BlobMaker().file("f", b"x").build(toc_json=b"\x00not json")
    with pytest.raises(TOCError, match="JSON"):
        BlobReader.open(BytesSource(blob.data), toc_digest=blob.toc_digest)


def test_hostile_toc_in_a_blob_is_refused_after_its_digest_matches() -> None:
    def escape(toc: dict[str, Any]) -> None:
        toc["entries"][0]["name"] = "../../etc/shadow"

    blob = BlobMaker().file("f", b"x").build(escape)
    with pytest.raises(EntryError, match=r"'\.\.'") as info:
        BlobReader.open(BytesSource(blob.data), toc_digest=blob.toc_digest)
    assert info.value.layer == "test-layer"


def test_gzip_toc_declaring_a_huge_size_is_refused_before_decompressing() -> None:
    toc = b'{"version": 1, "entries": []}'
    member = bytearray(zlib.decompress(gzip_toc_member(toc), 31))
    member[124:136] = b"%011o\0" % (300 * MiB)
    member[148:156] = b" " * 8
    member[148:156] = b"%06o\0 " % sum(member[:512])
    body = gzip_member(b"x" * 100)
    data = body + gzip_member(bytes(member)) + encode_estargz_footer(len(body))
    with pytest.raises(TOCTooLargeError):
        BlobReader.open(BytesSource(data))


def test_compressed_toc_over_the_limit_is_not_even_fetched() -> None:
    data, _, _ = _simple_blob()
    source = BytesSource(data)
    with pytest.raises(TOCTooLargeError):
        BlobReader.open(source, limits=Limits(max_toc_bytes=16))
    assert len(source.requests) == 1  # just the tail


def _zstd_blob(toc_json: bytes, declared: int, frame: bytes | None = None) -> bytes:
    body = zstd_frame(b"payload")
    frame = zstd_frame(toc_json) if frame is None else frame
    toc_offset = len(body) + ZSTD_SKIPPABLE_HEADER.size
    return (
        body
        + ZSTD_SKIPPABLE_HEADER.pack(ZSTD_SKIPPABLE_MAGIC, len(frame))
        + frame
        + encode_zstd_footer(toc_offset, len(frame), declared)
    )


def test_zstd_toc_declaring_an_enormous_size_is_refused_without_allocating() -> None:
    data = _zstd_blob(b'{"version": 1, "entries": []}', declared=1 << 62)
    tracemalloc.start()
    try:
        with pytest.raises(TOCTooLargeError):
            BlobReader.open(BytesSource(data))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < MiB


def test_zstd_toc_longer_or_shorter_than_declared_is_refused() -> None:
    toc = b'{"version": 1, "entries": []}'
    with pytest.raises(TOCError, match="more than"):
        BlobReader.open(BytesSource(_zstd_blob(toc, declared=len(toc) - 1)))
    with pytest.raises(DecompressionError):
        BlobReader.open(BytesSource(_zstd_blob(toc, declared=len(toc) + 1)))


def test_zstd_toc_frame_that_is_garbage_is_refused() -> None:
    with pytest.raises(DecompressionError):
        BlobReader.open(BytesSource(_zstd_blob(b"", declared=10, frame=b"\x00" * 32)))


@pytest.mark.parametrize("kind", ["estargz", "zstd"])
def test_a_chunk_decompressing_to_far_more_than_its_size_costs_only_its_size(kind: Kind) -> None:
    """A decompression bomb: f's member holds 64 MiB of zeros; the TOC says 1000 bytes."""
    maker = BlobMaker(kind=kind).file("f", bytes(1000), stored=bytes(64 * MiB)).file("g", b"after")
    blob = maker.build()
    reader = BlobReader.open(BytesSource(blob.data), toc_digest=blob.toc_digest)
    tracemalloc.start()
    try:
        assert reader.read_file("f") == bytes(1000)
        assert reader.read_file("g") == b"after"
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 * MiB


def test_a_large_inner_offset_is_skipped_in_bounded_memory() -> None:
    def skip_far(toc: dict[str, Any]) -> None:
        toc["entries"][0]["innerOffset"] = 32 * MiB

    blob = BlobMaker().file("f", b"x", stored=bytes(32 * MiB) + b"x").build(skip_far)
    reader = BlobReader.open(BytesSource(blob.data), toc_digest=blob.toc_digest)
    tracemalloc.start()
    try:
        assert reader.read_file("f") == b"x"
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 * MiB


def test_flipped_byte_in_a_member_fails_only_the_pieces_in_it() -> None:
    maker = BlobMaker(chunk_size=1000)
    files = {"a": bytes(range(200)) * 20, "b": b"bee" * 300}
    for name, data in files.items():
        maker.file(name, data)
    blob = maker.build()
    reader = BlobReader.open(BytesSource(blob.data), toc_digest=blob.toc_digest)
    piece = reader.toc.lookup("a").chunks[2]
    damaged = bytearray(blob.data)
    damaged[(piece.offset + piece.end) // 2] ^= 0xFF
    bad = BlobReader.open(BytesSource(bytes(damaged)), toc_digest=blob.toc_digest)
    with pytest.raises((ChunkVerificationError, DecompressionError)) as info:
        bad.read_chunk(bad.toc.lookup("a"), piece)
    assert (info.value.entry, info.value.offset, info.value.layer) == (
        "a",
        piece.offset,
        "test-layer",
    )
    assert bad.read_file("a", 0, 2000) == files["a"][:2000]
    assert bad.read_file("b") == files["b"]
    report = bad.verify(fail_fast=False)
    assert len(report.failures) == 1 and report.files_verified == 1


def test_flipped_byte_in_stored_data_is_caught_by_the_chunk_digest() -> None:
    blob = BlobMaker(level=0).file("a", b"A" * 5000).file("b", b"B" * 100).build()
    reader = BlobReader.open(BytesSource(blob.data), toc_digest=blob.toc_digest)
    a = reader.toc.lookup("a")
    damaged = bytearray(blob.data)
    position = blob.data.index(b"A" * 100, a.chunks[0].offset) + 50
    damaged[position] ^= 0x01
    bad = BlobReader.open(BytesSource(bytes(damaged)), toc_digest=blob.toc_digest)
    with pytest.raises(ChunkVerificationError) as info:
        bad.read_file("a")
    assert (info.value.entry, info.value.offset) == ("a", a.chunks[0].offset)
    assert bad.read_file("b") == b"B" * 100


def test_chunk_whose_digest_differs_is_refused() -> None:
    def lie(toc: dict[str, Any]) -> None:
        toc["entries"][0]["chunkDigest"] = sha(b"something else")

    blob = BlobMaker().file("f", b"the real bytes").build(lie)
    reader = BlobReader.open(BytesSource(blob.data), toc_digest=blob.toc_digest)
    with pytest.raises(ChunkVerificationError, match="digest"):
        reader.read_file("f")


def test_chunk_claiming_more_bytes_than_its_member_holds_is_refused() -> None:
    def grow(toc: dict[str, Any]) -> None:
        toc["entries"][0]["size"] = 100_000

    blob = BlobMaker().file("f", b"short").file("g", b"next").build(grow)
    reader = BlobReader.open(BytesSource(blob.data), toc_digest=blob.toc_digest)
    with pytest.raises((DecompressionError, ChunkVerificationError)):
        reader.read_file("f")


_SMALL_BLOBS = {
    kind: BlobMaker(kind=kind, chunk_size=300)
    .dir("d")
    .file("d/a", bytes(range(256)) * 3)
    .file("d/b", b"bee")
    .build()
    .data
    for kind in ("estargz", "zstd")
}


@settings(max_examples=300, deadline=None)
@given(
    kind=st.sampled_from(sorted(_SMALL_BLOBS)),
    edits=st.lists(
        st.tuples(
            st.sampled_from(["flip", "cut", "insert"]), st.floats(0, 1), st.binary(max_size=3)
        ),
        min_size=1,
        max_size=3,
    ),
)
def test_damaged_blobs_give_data_that_verifies_or_a_format_error(
    kind: str, edits: list[tuple[str, float, bytes]]
) -> None:
    data = bytearray(_SMALL_BLOBS[kind])
    for op, where, extra in edits:
        i = min(int(where * len(data)), max(len(data) - 1, 0))
        if op == "flip" and data:
            data[i] ^= 1 + extra[0] % 255 if extra else 0x40
        elif op == "cut":
            del data[i : i + 1 + len(extra)]
        else:
            data[i:i] = extra or b"\0"
    try:
        reader = BlobReader.open(BytesSource(bytes(data)))
        reader.verify()
    except FormatError:
        return


def test_a_blob_with_a_file_listed_twice_reads_the_later_one() -> None:
    # Written by some other tool: the same name twice. The reference reader keeps the
    # later entry; so do we, and the earlier one's data is simply never read.
    blob = BlobMaker().file("etc/f", b"first version\n").file("etc/f", b"second\n").build()
    reader = BlobReader.open(BytesSource(blob.data), toc_digest=blob.toc_digest)
    assert reader.read_file("etc/f") == b"second\n"
    assert [e.name for e in reader.toc.entries if e.type == "reg"] == ["etc/f"]
    assert reader.verify().ok
