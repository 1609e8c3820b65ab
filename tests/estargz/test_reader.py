"""BlobReader against the reference vectors and blobs made in the test: TOC, entries, bytes."""

from __future__ import annotations

import json
import shutil
import tarfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import attrs
import pytest
from estargz_blobkit import BlobMaker, BytesSource, sha

from blockfs.estargz import (
    BlobReader,
    Chunk,
    ChunkVerificationError,
    CountingSource,
    DecompressionError,
    Entry,
    FileBlobSource,
    FormatError,
    TOCDigestMismatch,
    _reader,
    verify_piece,
)
from blockfs.estargz._reader import TOC_TAIL_GUESS
from tests.helpers.testdata import TESTDATA as VECTORS

BLOBS = [
    "gzip-64k.esgz",
    "gzip-default.esgz",
    "gzip-prio.esgz",
    "zstd-64k.esgz",
    "legacy-64k.stargz",
]
KINDS = {"gzip": "estargz", "zstd": "zstd", "legacy": "stargz"}


def _meta(blob: str, kind: str) -> dict[str, Any]:
    result: dict[str, Any] = json.loads((VECTORS / f"{blob}.{kind}.json").read_text())
    return result


@pytest.fixture(scope="module")
def layer_files() -> dict[str, bytes]:
    """Each regular file of layer.tar (clean name -> bytes); hardlinks resolved."""
    files: dict[str, bytes] = {}
    with tarfile.open(VECTORS / "layer.tar") as tar:
        for m in tar:
            name = m.name.removeprefix("./").strip("/")
            if m.isreg():
                f = tar.extractfile(m)
                assert f is not None
                files[name] = f.read()
            elif m.islnk():
                files[name] = files[m.linkname.removeprefix("./").strip("/")]
    return files


@pytest.fixture(params=BLOBS)
def blob(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    return name


def _open(blob: str) -> tuple[BlobReader, CountingSource]:
    source = CountingSource(FileBlobSource(VECTORS / blob))
    return BlobReader.open(source, toc_digest=_meta(blob, "build")["tocDigest"]), source


def _rfc3339(seconds: int | None) -> str | None:
    if seconds is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


def _xattr_text(value: bytes) -> str:
    # verify.json writes xattr values as the raw bytes taken as text.
    return value.decode("utf-8", errors="replace")


def _as_reported(e: Entry) -> dict[str, Any]:
    """An entry in the shape of the reference reader's verify.json listing."""
    out: dict[str, Any] = {
        "name": e.name,
        "type": e.type,
        "size": e.size,
        "mode": e.mode,
        "uid": e.uid,
        "gid": e.gid,
        "linkName": e.link_name,
        "chunks": len(e.chunks),
        "digest": e.digest or None,
        "modtime": _rfc3339(e.modtime),
        "xattrs": {k: _xattr_text(v) for k, v in e.xattrs.items()} or None,
        "userName": e.user_name or None,
        "groupName": e.group_name or None,
        "devMajor": e.dev_major or None,
        "devMinor": e.dev_minor or None,
    }
    return out


def test_opens_with_the_reference_toc_digest_and_footer(blob: str) -> None:
    reader, _ = _open(blob)
    assert reader.toc_digest == _meta(blob, "build")["tocDigest"]
    assert reader.footer.kind == KINDS[blob.split("-")[0]]
    assert reader.toc_offset == _meta(blob, "verify")["tocOffset"]
    assert reader.compression == _meta(blob, "verify")["compression"]
    assert reader.name == str(VECTORS / blob)


def test_opening_fetches_footer_and_toc_with_one_request_of_the_tail(blob: str) -> None:
    reader, source = _open(blob)
    assert source.size - reader.toc_offset < TOC_TAIL_GUESS  # the TOC is in the tail
    assert source.requests == 1
    assert source.bytes_read == TOC_TAIL_GUESS


def test_a_toc_longer_than_the_tail_costs_one_more_request(
    blob: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_reader, "TOC_TAIL_GUESS", 100)
    reader, source = _open(blob)
    assert reader.toc_digest == _meta(blob, "build")["tocDigest"]
    assert source.requests == 2
    assert source.bytes_read == source.size - reader.toc_offset


def test_a_known_tail_size_is_read_exactly_in_one_request(blob: str) -> None:
    reader, source = _open(blob)
    exact = source.size - reader.toc_offset
    for hint, requests in ((exact, 1), (exact // 2, 2), (exact + 1000, 1)):
        source = CountingSource(FileBlobSource(VECTORS / blob))
        reader = BlobReader.open(source, tail_size=hint)
        assert reader.toc_digest == _meta(blob, "build")["tocDigest"], hint
        # Wrong hints cost a request or a few bytes more, never the TOC.
        assert source.requests == requests, hint
        assert source.bytes_read == max(hint, exact), hint


def test_normalised_entries_equal_the_reference_listing(blob: str) -> None:
    reader, _ = _open(blob)
    reported = _meta(blob, "verify")["entries"]
    keys = list(_as_reported(reader.toc.entries[0]))
    expected = [
        {k: r.get(k, None if k not in ("linkName",) else "") for k in keys} for r in reported
    ]
    for r in expected:
        r["digest"] = r["digest"] or None
    assert [_as_reported(e) for e in reader.toc.entries] == expected


def test_every_file_reads_as_in_the_source_tar(blob: str, layer_files: dict[str, bytes]) -> None:
    reader, _ = _open(blob)
    for name, data in layer_files.items():
        assert reader.read_file(name) == data, name
        assert b"".join(reader.iter_file(name)) == data, name


def test_ranges_cross_chunk_boundaries(layer_files: dict[str, bytes]) -> None:
    reader, _ = _open("gzip-64k.esgz")
    data = layer_files["usr/lib/libbig.so"]
    for offset, length in [
        (0, 1),
        (65535, 2),
        (65536 * 3 - 10, 65536 * 2 + 20),
        (len(data) - 5, 100),
    ]:
        assert (
            reader.read_file("usr/lib/libbig.so", offset, length) == data[offset : offset + length]
        )
    assert reader.read_file("usr/lib/libbig.so", len(data)) == b""
    assert reader.read_file("usr/lib/libbig.so", len(data) + 10, 3) == b""


def test_reading_a_range_fetches_only_the_chunks_it_overlaps() -> None:
    reader, source = _open("gzip-64k.esgz")
    before, requests = source.bytes_read, source.requests
    reader.read_file("usr/lib/libbig.so", 65536 * 10 + 100, 1000)
    assert source.requests == requests + 1
    assert source.bytes_read - before < 70_000


def test_reading_one_small_file_fetches_one_small_range(blob: str) -> None:
    reader, source = _open(blob)
    before, requests = source.bytes_read, source.requests
    assert reader.read_file("etc/passwd").startswith(b"root:")
    assert source.requests == requests + 1
    assert source.bytes_read - before < 64 * 1024


def test_verify_counts_match_the_reference(blob: str) -> None:
    reader, _ = _open(blob)
    report = reader.verify()
    reported = _meta(blob, "verify")
    assert report.ok
    assert report.chunks_verified == reported["chunksVerified"]
    assert report.files_verified == reported["filesVerified"]
    assert report.chunks_unverified == 0


def test_hardlinks_read_their_target_and_count_links(layer_files: dict[str, bytes]) -> None:
    reader, _ = _open("gzip-default.esgz")
    target = reader.toc.lookup("usr/lib/libbig.so")
    assert reader.toc.lookup("usr/lib/libbig-hard.so") is target
    assert reader.toc.nlink(target) == 2
    assert reader.read_file("usr/lib/libbig-hard.so") == layer_files["usr/lib/libbig.so"]


def test_prefetch_range_ends_at_the_prefetch_landmark() -> None:
    reader, _ = _open("gzip-prio.esgz")
    landmark = reader.toc.lookup(".prefetch.landmark")
    assert reader.prefetch_range() == (0, landmark.chunks[0].offset)
    prioritized = {"bin/tool", "etc/passwd", "usr/share/doc/README"}
    for name in prioritized:
        assert reader.toc.lookup(name).chunks[-1].end <= landmark.chunks[0].offset


def test_no_prefetch_landmark_means_no_prefetch_range() -> None:
    reader, _ = _open("gzip-64k.esgz")
    assert reader.prefetch_range() is None


def test_concurrent_reads_from_many_threads_agree(layer_files: dict[str, bytes]) -> None:
    reader, _ = _open("zstd-64k.esgz")
    names = sorted(layer_files) * 3
    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(reader.read_file, names))
    assert results == [layer_files[n] for n in names]


def test_reading_a_missing_path_or_a_directory_is_refused() -> None:
    reader, _ = _open("gzip-64k.esgz")
    with pytest.raises(FileNotFoundError):
        reader.read_file("etc/nothing")
    with pytest.raises(ValueError, match="dir"):
        reader.read_file("etc")
    with pytest.raises(ValueError):
        reader.read_file("etc/passwd", -1)


def _copy_with_flip(tmp_path: Path, blob: str, position: int) -> Path:
    path = tmp_path / blob
    shutil.copyfile(VECTORS / blob, path)
    with path.open("r+b") as f:
        f.seek(position)
        byte = f.read(1)
        f.seek(position)
        f.write(bytes([byte[0] ^ 0x55]))
    return path


@pytest.mark.parametrize("blob", ["gzip-64k.esgz", "zstd-64k.esgz"])
def test_flipped_chunk_byte_fails_that_file_only(
    tmp_path: Path, blob: str, layer_files: dict[str, bytes]
) -> None:
    clean, _ = _open(blob)
    chunk = clean.toc.lookup("usr/lib/libbig.so").chunks[10]
    path = _copy_with_flip(tmp_path, blob, (chunk.offset + chunk.end) // 2)
    reader = BlobReader.open(FileBlobSource(path), toc_digest=clean.toc_digest)
    with pytest.raises((ChunkVerificationError, DecompressionError)) as info:
        reader.read_file("usr/lib/libbig.so")
    assert isinstance(info.value, FormatError)
    assert info.value.entry == "usr/lib/libbig.so"
    assert info.value.layer == str(path)
    assert info.value.offset == chunk.offset
    # The pieces before the damage and every other file still read.
    assert (
        reader.read_file("usr/lib/libbig.so", 0, 65536 * 10)
        == layer_files["usr/lib/libbig.so"][: 65536 * 10]
    )
    assert reader.read_file("etc/passwd") == layer_files["etc/passwd"]
    with pytest.raises(FormatError):
        reader.verify()
    report = reader.verify(fail_fast=False)
    assert not report.ok
    assert [f.entry for f in report.failures] == ["usr/lib/libbig.so"]
    assert report.files_verified == 52


@pytest.mark.parametrize("blob", ["gzip-64k.esgz", "zstd-64k.esgz"])
def test_flipped_toc_byte_is_refused_on_open(tmp_path: Path, blob: str) -> None:
    clean, _ = _open(blob)
    # A byte well inside the compressed TOC (past any header).
    path = _copy_with_flip(tmp_path, blob, clean.toc_offset + 2000)
    with pytest.raises((TOCDigestMismatch, DecompressionError)) as info:
        BlobReader.open(FileBlobSource(path), toc_digest=clean.toc_digest)
    assert info.value.layer == str(path)


def test_toc_digest_mismatch_names_both_digests() -> None:
    wrong = "sha256:" + "0" * 64
    with pytest.raises(TOCDigestMismatch, match=wrong) as info:
        BlobReader.open(FileBlobSource(VECTORS / "gzip-64k.esgz"), toc_digest=wrong)
    assert info.value.layer == str(VECTORS / "gzip-64k.esgz")


def test_open_without_a_digest_still_reports_the_toc_digest() -> None:
    reader = BlobReader.open(FileBlobSource(VECTORS / "gzip-64k.esgz"))
    assert reader.toc_digest == _meta("gzip-64k.esgz", "build")["tocDigest"]


# Blobs made here: shared members, legacy TOCs without chunk digests.


def _shared_member_blob() -> tuple[BlobMaker, dict[str, bytes]]:
    files = {f"d/f{i}": bytes([i]) * (100 + i) for i in range(5)}
    files["d/big"] = bytes(range(256)) * 40
    maker = BlobMaker(chunk_size=4096, share_members=True)
    maker.dir("d")
    for name, data in files.items():
        maker.file(name, data)
    return maker, files


def test_pieces_sharing_a_member_read_with_inner_offsets() -> None:
    maker, files = _shared_member_blob()
    blob = maker.build()
    reader = BlobReader.open(BytesSource(blob.data), toc_digest=blob.toc_digest)
    offsets = {c.offset for e in reader.toc.regular_files() for c in e.chunks}
    assert len(offsets) == 1  # everything shares one member
    assert any(c.inner_offset for e in reader.toc.regular_files() for c in e.chunks)
    for name, data in files.items():
        assert reader.read_file(name) == data
    assert reader.verify().files_verified == len(files)


def test_read_member_returns_every_piece_of_the_run_from_one_fetch() -> None:
    maker, files = _shared_member_blob()
    blob = maker.build()
    source = BytesSource(blob.data)
    reader = BlobReader.open(source, toc_digest=blob.toc_digest)
    entry = reader.toc.lookup("d/f3")
    before = len(source.requests)
    pieces = reader.read_member(entry, entry.chunks[0])
    assert len(source.requests) == before + 1
    assert [e.name for e, _, _ in pieces] == ["d/f0", "d/f1", "d/f2", "d/f3", "d/f4"] + [
        "d/big"
    ] * 3
    assert b"".join(d for e, _, d in pieces if e.name == "d/big") == files["d/big"]
    for _, c, data in pieces:
        assert sha(data) == c.digest


def test_read_member_of_a_lone_piece_is_that_piece() -> None:
    reader, _ = _open("gzip-default.esgz")
    entry = reader.toc.lookup("etc/passwd")
    ((e, c, data),) = reader.read_member(entry, entry.chunks[0])
    assert e is entry and c == entry.chunks[0]
    assert data == reader.read_chunk(entry, entry.chunks[0])


def test_read_member_refuses_a_piece_not_in_the_layer() -> None:
    reader, _ = _open("gzip-default.esgz")
    entry = reader.toc.lookup("etc/passwd")
    other = reader.toc.lookup("etc/hostname")
    with pytest.raises(ValueError):
        reader.read_member(other, entry.chunks[0])


def _legacy_blob_without_chunk_digests() -> tuple[bytes, dict[str, bytes]]:
    files = {"a": b"alpha" * 10, "big": bytes(range(256)) * 64}

    def drop_chunk_digests(toc: dict[str, Any]) -> None:
        for e in toc["entries"]:
            e.pop("chunkDigest", None)

    maker = BlobMaker(kind="stargz", chunk_size=4096)
    for name, data in files.items():
        maker.file(name, data)
    return maker.build(drop_chunk_digests).data, files


def test_legacy_single_piece_files_are_checked_against_the_file_digest() -> None:
    data, files = _legacy_blob_without_chunk_digests()
    reader = BlobReader.open(BytesSource(data))
    assert reader.footer.kind == "stargz"
    assert reader.toc.lookup("a").chunks[0].digest == sha(files["a"])
    assert reader.read_file("a") == files["a"]


def test_legacy_pieces_without_any_digest_are_refused_unless_allowed() -> None:
    data, files = _legacy_blob_without_chunk_digests()
    reader = BlobReader.open(BytesSource(data))
    with pytest.raises(ChunkVerificationError, match="no digest"):
        reader.read_file("big")
    lenient = BlobReader.open(BytesSource(data), allow_unverified=True)
    assert lenient.read_file("big") == files["big"]
    report = lenient.verify()
    assert report.chunks_unverified == 4
    assert report.chunks_verified == 1
    # The whole-file digest still checks the unverified pieces together.
    assert report.files_verified == 2


def test_a_reader_from_a_kept_toc_fetches_nothing_until_it_reads() -> None:
    blob = BlobMaker(kind="zstd").file("f", b"kept").build()
    first = BlobReader.open(BytesSource(blob.data), toc_digest=blob.toc_digest)
    source = BytesSource(blob.data)
    again = BlobReader.from_toc_json(
        source, blob.toc_json, footer=first.footer, toc_digest=blob.toc_digest
    )
    assert source.requests == []
    assert again.toc_digest == first.toc_digest
    assert again.read_file("f") == b"kept"
    with pytest.raises(TOCDigestMismatch):
        BlobReader.from_toc_json(
            source, blob.toc_json + b" ", footer=first.footer, toc_digest=blob.toc_digest
        )


def test_verify_piece_checks_size_and_digest() -> None:
    piece = Chunk(offset=10, end=20, inner_offset=0, chunk_offset=0, size=3, digest=sha(b"abc"))
    assert verify_piece(b"abc", piece) is True
    with pytest.raises(ChunkVerificationError, match="2 bytes") as info:
        verify_piece(b"ab", piece, layer="L", entry="f")
    assert (info.value.layer, info.value.entry, info.value.offset) == ("L", "f", 10)
    with pytest.raises(ChunkVerificationError, match="digest"):
        verify_piece(b"abd", piece)
    bare = attrs.evolve(piece, digest="")
    with pytest.raises(ChunkVerificationError, match="no digest"):
        verify_piece(b"abc", bare)
    assert verify_piece(b"abc", bare, allow_unverified=True) is False


def test_a_streamed_read_is_counted_before_its_bytes_are_handed_on(tmp_path: Path) -> None:
    # Whoever those bytes wake (a read waiting for a member) may look at the counts at
    # once: the request and the bytes handed on must be in them already.
    blob = tmp_path / "blob"
    blob.write_bytes(bytes(range(256)) * 64)
    source = CountingSource(FileBlobSource(blob))
    seen: list[tuple[int, int]] = []

    def on_bytes(offset: int, data: bytes) -> None:
        seen.append((source.requests, source.bytes_read))

    assert source.read_range_streaming(100, 5000, on_bytes) == blob.read_bytes()[100:5100]
    assert seen == [(1, 5000)]
    assert (source.requests, source.bytes_read) == (1, 5000)
