"""The eStargz writer: blobs any gunzip/unzstd + tar accepts, laid out as the reference lays them."""

from __future__ import annotations

import base64
import gzip
import hashlib
import io
import json
import os
import random
import subprocess
import sys
import tarfile
import textwrap
import threading
import zlib
from pathlib import Path
from typing import Any, Literal

import attrs
import pytest
import zstandard
from writer_testkit import (
    TOC_NAME,
    clean,
    decompress_all,
    gunzip_cli,
    gzip_toc_json,
    gzip_toc_offset,
    listing,
    pieces,
    read_piece,
    tar_names,
    toc_entries,
    unzstd_cli,
    zstd_toc,
)

from blockfs.estargz import (
    BlobReader,
    BuildError,
    BuildOptions,
    BuildResult,
    FileBlobSource,
    build,
    build_file,
)
from tests.helpers.testdata import LAYER_TAR, TESTDATA

PRIORITIZED = ("bin/tool", "etc/passwd", "usr/share/doc/README")
OPTION_SETS = {
    "gzip-default": BuildOptions(),
    "gzip-64k": BuildOptions(chunk_size=65536),
    "gzip-min8k": BuildOptions(chunk_size=65536, min_chunk_size=8192),
    "gzip-prio": BuildOptions(chunk_size=262144, prioritized=PRIORITIZED),
    "zstd-64k": BuildOptions(compression="zstd", chunk_size=65536),
}
# Our builds whose TOC must equal the reference's except for compressed offsets.
REFERENCE_OF = {
    "gzip-default": "gzip-default.esgz",
    "gzip-64k": "gzip-64k.esgz",
    "gzip-prio": "gzip-prio.esgz",
    "zstd-64k": "zstd-64k.esgz",
}


@attrs.frozen
class Built:
    path: Path
    blob: bytes
    result: BuildResult
    options: BuildOptions

    @property
    def compression(self) -> Literal["gzip", "zstd"]:
        return self.options.compression

    def decompressed(self) -> bytes:
        return gunzip_cli(self.path) if self.compression == "gzip" else unzstd_cli(self.path)

    def toc(self) -> list[dict[str, Any]]:
        return toc_entries(self.blob, self.compression)


@pytest.fixture(scope="module")
def builds(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Built]:
    out = tmp_path_factory.mktemp("blobs")
    result = {}
    for name, options in OPTION_SETS.items():
        path = out / f"{name}.esgz"
        r = build_file(LAYER_TAR, path, options)
        result[name] = Built(path, path.read_bytes(), r, options)
    return result


@pytest.fixture(scope="module")
def source() -> dict[str, Any]:
    return listing(LAYER_TAR.read_bytes())


def _tar(entries: list[tuple[tarfile.TarInfo, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for info, data in entries:
            info.size = len(data) if info.isreg() else 0
            tf.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return buf.getvalue()


def _reg(name: str, data: bytes = b"", **fields: Any) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.mtime = 1_700_000_000
    for k, v in fields.items():
        setattr(info, k, v)
    return info, data


def _node(name: str, kind: bytes, **fields: Any) -> tuple[tarfile.TarInfo, bytes]:
    info, _ = _reg(name, type=kind, **fields)
    return info, b""


FAST = BuildOptions(gzip_level=1)


def _build_bytes(data: bytes, options: BuildOptions = FAST) -> bytes:
    dst = io.BytesIO()
    build(io.BytesIO(data), dst, options)
    return dst.getvalue()


# --- Accepted by readers written independently ------------------------------------------


@pytest.mark.parametrize("name", list(OPTION_SETS))
def test_blob_decompresses_to_every_source_entry_with_same_metadata_and_content(
    builds: dict[str, Built], source: dict[str, Any], name: str
) -> None:
    built = builds[name]
    got = listing(built.decompressed())
    landmark = ".prefetch.landmark" if built.options.prioritized else ".no.prefetch.landmark"
    extra = {landmark} | ({TOC_NAME} if built.compression == "gzip" else set())
    assert set(got) == set(source) | extra
    for entry_name, member in source.items():
        assert got[entry_name] == member, entry_name
    assert got[landmark].size == 1 and got[landmark].sha256 == hashlib.sha256(b"\x0f").hexdigest()


@pytest.mark.parametrize("name", [n for n in OPTION_SETS if n.startswith("gzip")])
def test_gzip_stream_ends_with_toc_entry_and_end_of_archive(
    builds: dict[str, Built], name: str
) -> None:
    raw = builds[name].decompressed()
    assert tar_names(raw)[-1] == TOC_NAME
    assert raw.endswith(bytes(1024))
    toc = json.loads(gzip_toc_json(raw))
    assert toc["version"] == 1 and toc["entries"]


def test_zstd_stream_holds_no_toc_and_no_end_of_archive(builds: dict[str, Built]) -> None:
    raw = builds["zstd-64k"].decompressed()
    assert TOC_NAME not in tar_names(raw)
    assert not raw.endswith(bytes(1024))  # the reference never closes the file tar


@pytest.mark.parametrize("name", list(OPTION_SETS))
def test_diff_id_and_sizes_match_independent_decompression(
    builds: dict[str, Built], name: str
) -> None:
    built = builds[name]
    raw = built.decompressed()
    r = built.result
    assert r.diff_id == "sha256:" + hashlib.sha256(raw).hexdigest()
    assert r.uncompressed_size == len(raw)
    assert r.blob_size == len(built.blob) == built.path.stat().st_size
    assert r.blob_digest == "sha256:" + hashlib.sha256(built.blob).hexdigest()
    assert r.annotations["io.containers.estargz.uncompressed-size"] == str(len(raw))


@pytest.mark.parametrize("name", [n for n in OPTION_SETS if n.startswith("gzip")])
def test_gzip_toc_digest_annotation_is_sha256_of_extracted_toc_json(
    builds: dict[str, Built], name: str
) -> None:
    built = builds[name]
    toc_json = gzip_toc_json(built.decompressed())
    digest = "sha256:" + hashlib.sha256(toc_json).hexdigest()
    assert built.result.toc_digest == digest
    assert built.result.annotations == {
        "containerd.io/snapshot/stargz/toc.digest": digest,
        "io.containers.estargz.uncompressed-size": str(built.result.uncompressed_size),
    }
    # The footer points at the member that holds the TOC tar entry.
    offset = gzip_toc_offset(built.blob)
    assert built.result.toc_offset == offset
    d = zlib.decompressobj(31)
    member = d.decompress(built.blob[offset:])
    assert d.eof and len(d.unused_data) == 51  # one member, then the footer
    assert member[:17] == TOC_NAME.encode() and member[512:].startswith(toc_json)
    assert member.endswith(bytes(1024))


def test_zstd_annotations_describe_the_toc_frame(builds: dict[str, Built]) -> None:
    built = builds["zstd-64k"]
    frame, toc_json, offset = zstd_toc(built.blob)
    r = built.result
    assert r.toc_digest == "sha256:" + hashlib.sha256(toc_json).hexdigest()
    assert r.annotations == {
        "containerd.io/snapshot/stargz/toc.digest": r.toc_digest,
        "io.containers.estargz.uncompressed-size": str(r.uncompressed_size),
        "io.containers.zstd-chunked.manifest-checksum": "sha256:"
        + hashlib.sha256(frame).hexdigest(),
        "io.containers.zstd-chunked.manifest-position": f"{offset}:{len(frame)}:{len(toc_json)}:1",
    }


def test_to_json_reports_digests_sizes_and_annotations(builds: dict[str, Built]) -> None:
    r = builds["gzip-default"].result
    doc = r.to_json()
    assert {k: doc[k] for k in ("tocDigest", "diffID", "blobDigest", "blobSize")} == {
        "tocDigest": r.toc_digest,
        "diffID": r.diff_id,
        "blobDigest": r.blob_digest,
        "blobSize": r.blob_size,
    }
    assert doc["annotations"] == r.annotations
    json.dumps(doc)


@pytest.mark.parametrize("name", list(OPTION_SETS))
def test_every_piece_decompresses_from_its_offset_to_its_chunk_digest(
    builds: dict[str, Built], name: str
) -> None:
    built = builds[name]
    toc = built.toc()
    src = {clean(n): m for n, m in listing(LAYER_TAR.read_bytes()).items()}
    payload_end = built.result.toc_offset - (8 if built.compression == "zstd" else 0)
    checked = 0
    for _file, e, size in pieces(toc):
        assert 0 < e["offset"] < payload_end, e
        data = read_piece(built.blob, built.compression, e["offset"], e.get("innerOffset", 0), size)
        assert len(data) == size
        assert "sha256:" + hashlib.sha256(data).hexdigest() == e["chunkDigest"], e
        checked += 1
    regs = [e for e in toc if e["type"] == "reg"]
    for e in regs:
        name_ = clean(e["name"])
        if name_ in src:
            assert e["digest"] == "sha256:" + src[name_].sha256
    assert checked == len([p for p in pieces(toc)]) > 50


# --- Round trip through blockfs's own reader ----------------------------------------------


@pytest.mark.parametrize("name", list(OPTION_SETS))
def test_reader_verifies_the_blob_and_reads_back_every_source_file(
    builds: dict[str, Built], name: str
) -> None:
    built = builds[name]
    with FileBlobSource(built.path) as source:
        reader = BlobReader.open(source, toc_digest=built.result.toc_digest)
        report = reader.verify()
        assert report.ok and report.files_verified > 50
        with tarfile.open(LAYER_TAR) as tf:
            for info in tf:
                if info.isreg():
                    f = tf.extractfile(info)
                    assert f is not None
                    assert reader.read_file(info.name) == f.read(), info.name
                elif info.islnk():
                    assert reader.read_file(info.name) == reader.read_file(info.linkname)
        want = {clean(n): m for n, m in listing(LAYER_TAR.read_bytes()).items()}
        for path, entry in reader.toc.walk():
            if path in want and want[path].type != tarfile.LNKTYPE:  # links show their target
                assert entry.mode == want[path].mode and entry.uid == want[path].uid, path
        prefetch = reader.prefetch_range()
        if built.options.prioritized:
            lm = next(e for e in built.toc() if e["name"] == ".prefetch.landmark")
            assert prefetch == (0, lm["offset"])
            # The build says where the region ends without its TOC being read.
            assert built.result.prefetch_end == lm["offset"]
        else:
            assert prefetch is None
            assert built.result.prefetch_end is None


# --- Layout rules ---------------------------------------------------------------------


@pytest.mark.parametrize(("name", "reference"), list(REFERENCE_OF.items()))
def test_toc_equals_the_reference_builders_except_compressed_offsets(
    builds: dict[str, Built], name: str, reference: str
) -> None:
    built = builds[name]
    ref_blob = (TESTDATA / reference).read_bytes()
    ref = toc_entries(ref_blob, built.compression)
    mine = built.toc()

    def strip(es: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [{k: v for k, v in e.items() if k not in ("offset", "innerOffset")} for e in es]

    assert strip(mine) == strip(ref)
    # Key order as well: the JSON is written like the reference's.
    assert [list(e) for e in strip(mine)] == [list(e) for e in strip(ref)]


def test_toc_order_matches_reference_reader_report(builds: dict[str, Built]) -> None:
    for name, reference in [("gzip-prio", "gzip-prio"), ("gzip-64k", "gzip-64k")]:
        report = json.loads((TESTDATA / f"{reference}.esgz.verify.json").read_text())
        toc = builds[name].toc()
        chunks: dict[str, int] = {}
        for e in toc:
            if (e["type"] == "reg" and e.get("size", 0)) or e["type"] == "chunk":
                chunks[clean(e["name"])] = chunks.get(clean(e["name"]), 0) + 1
        mine = [
            (clean(e["name"]), e["type"], chunks.get(clean(e["name"]), 0))
            for e in toc
            if e["type"] != "chunk"
        ]
        theirs = [(e["name"], e["type"], e["chunks"]) for e in report["entries"]]
        assert mine == theirs


def test_prioritized_files_come_first_with_parents_then_prefetch_landmark(
    builds: dict[str, Built],
) -> None:
    toc = builds["gzip-prio"].toc()
    names = [e["name"] for e in toc if e["type"] != "chunk"]
    landmark = names.index(".prefetch.landmark")
    assert names[:landmark] == [
        "bin/", "bin/tool", "etc/", "etc/passwd",
        "usr/", "usr/share/", "usr/share/doc/", "usr/share/doc/README",
    ]  # fmt: skip
    assert ".no.prefetch.landmark" not in names
    # The landmark starts its own member: its offset bounds the prefetch range.
    lm = next(e for e in toc if e["name"] == ".prefetch.landmark")
    assert "innerOffset" not in lm
    assert set(lm) == {"name", "type", "size", "offset", "digest", "chunkDigest"}
    assert all(e["offset"] < lm["offset"] for e in toc[: toc.index(lm)] if "offset" in e)


def test_without_prioritized_files_the_no_prefetch_landmark_comes_first(
    builds: dict[str, Built],
) -> None:
    toc = builds["gzip-64k"].toc()
    assert toc[0]["name"] == ".no.prefetch.landmark"
    assert [e["name"] for e in toc].count(".no.prefetch.landmark") == 1
    assert not any(e["name"] == ".prefetch.landmark" for e in toc)


def test_min_chunk_size_packs_small_payloads_behind_inner_offsets(
    builds: dict[str, Built],
) -> None:
    toc = builds["gzip-min8k"].toc()
    inner = [e for e in toc if e.get("innerOffset")]
    assert len(inner) > 10
    lm = next(e for e in toc if e["name"] == ".no.prefetch.landmark")
    assert "innerOffset" not in lm
    # Fewer members than without a minimum, same data.
    plain = builds["gzip-64k"].toc()
    starts = {e["offset"] for e in toc if "offset" in e and not e.get("innerOffset")}
    plain_starts = {e["offset"] for e in plain if "offset" in e}
    assert len(starts) < len(plain_starts)
    assert builds["gzip-min8k"].result.blob_size < builds["gzip-64k"].result.blob_size


def test_landmark_starts_its_own_member_even_when_members_are_shared() -> None:
    # A minimum chunk size larger than the layer: every payload could share one member.
    opts = BuildOptions(gzip_level=1, min_chunk_size=1 << 30, prioritized=PRIORITIZED)
    toc = toc_entries(_build_bytes(LAYER_TAR.read_bytes(), opts), "gzip")
    data = [e for e in toc if "offset" in e]
    k = next(i for i, e in enumerate(data) if e["name"] == ".prefetch.landmark")
    assert "innerOffset" not in data[k]
    assert data[k]["offset"] > data[k - 1]["offset"]
    assert data[k - 1].get("innerOffset", 0) > 0  # the prioritized files did share
    assert all(e["offset"] == data[k]["offset"] for e in data[k:])


def test_without_min_chunk_size_every_piece_starts_a_member(builds: dict[str, Built]) -> None:
    for name in ("gzip-default", "gzip-64k", "gzip-prio", "zstd-64k"):
        toc = builds[name].toc()
        offsets = [e["offset"] for e in toc if "offset" in e]
        assert len(offsets) == len(set(offsets))
        assert not any("innerOffset" in e for e in toc)


def test_chunk_size_is_set_on_whole_chunks_only() -> None:
    c = 4096
    data = random.Random(7).randbytes(2 * c + 1)
    blob = _build_bytes(_tar([_reg("f", data), _reg("g", bytes(c))]), BuildOptions(chunk_size=c))
    toc = toc_entries(blob, "gzip")
    f = [e for e in toc if e["name"] == "f"]
    assert [(e["type"], e.get("chunkOffset", 0), e.get("chunkSize", 0)) for e in f] == [
        ("reg", 0, c),
        ("chunk", c, c),
        ("chunk", 2 * c, 0),
    ]
    assert f[0]["size"] == 2 * c + 1
    g = next(e for e in toc if e["name"] == "g")
    assert g["chunkSize"] == c and g["chunkDigest"] == g["digest"]


def test_empty_file_has_a_digest_but_no_offset_or_chunk_digest() -> None:
    toc = toc_entries(_build_bytes(_tar([_reg("empty")])), "gzip")
    e = next(e for e in toc if e["name"] == "empty")
    assert e == {
        "name": "empty",
        "type": "reg",
        "modtime": "2023-11-14T22:13:20Z",
        "mode": 0o644,
        "digest": "sha256:" + hashlib.sha256(b"").hexdigest(),
    }


def test_builds_are_byte_identical(builds: dict[str, Built], tmp_path: Path) -> None:
    for name in ("gzip-64k", "zstd-64k"):
        again = tmp_path / name
        r = build_file(LAYER_TAR, again, builds[name].options)
        assert again.read_bytes() == builds[name].blob
        assert r == builds[name].result


def test_gzip_and_zstd_compressed_inputs_build_the_same_blob(
    builds: dict[str, Built], tmp_path: Path
) -> None:
    plain = LAYER_TAR.read_bytes()
    options = builds["zstd-64k"].options
    inputs = {
        "gzip": gzip.compress(plain, 1, mtime=0),
        "zstd": zstandard.ZstdCompressor(level=1).compress(plain),
        "two-gzip-members": gzip.compress(plain[:100_000], mtime=0)
        + gzip.compress(plain[100_000:], mtime=0)
        + bytes(300),
    }
    for data in inputs.values():
        dst = io.BytesIO()
        build(io.BytesIO(data), dst, options, tmpdir=str(tmp_path))
        assert dst.getvalue() == builds["zstd-64k"].blob
    assert os.listdir(tmp_path) == []  # the temporary tar is gone


def test_unseekable_input_and_output_streams_are_accepted(builds: dict[str, Built]) -> None:
    # Input from a pipe, output into a pipe drained by another thread: neither is seekable.
    received: list[bytes] = []
    with open(LAYER_TAR, "rb") as f:
        cat_in = subprocess.Popen(["cat"], stdin=f, stdout=subprocess.PIPE)
        cat_out = subprocess.Popen(["cat"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert cat_in.stdout is not None
        assert cat_out.stdin is not None and cat_out.stdout is not None
        drain = threading.Thread(target=lambda: received.append(cat_out.stdout.read()))  # type: ignore[union-attr]
        drain.start()
        build(cat_in.stdout, cat_out.stdin, builds["zstd-64k"].options)
        cat_out.stdin.close()
        drain.join(timeout=60)
        assert cat_in.wait(timeout=60) == 0 and cat_out.wait(timeout=60) == 0
    assert received == [builds["zstd-64k"].blob]


def test_duplicate_names_keep_the_last_occurrence_in_its_position() -> None:
    tar = _tar([_reg("a", b"first"), _reg("b", b"bee"), _reg("./a", b"second")])
    blob = _build_bytes(tar)
    toc = toc_entries(blob, "gzip")
    assert [e["name"] for e in toc] == [".no.prefetch.landmark", "b", "./a"]
    got = listing(decompress_all(blob, "gzip"))
    assert got["a"].sha256 == hashlib.sha256(b"second").hexdigest()


def test_landmarks_and_toc_in_the_input_are_dropped() -> None:
    tar = _tar(
        [
            _reg(".prefetch.landmark", b"\x0f"),
            _reg("./.no.prefetch.landmark", b"\x0f"),
            _reg(TOC_NAME, b"{}"),
            _reg("kept", b"x"),
        ]
    )
    toc = toc_entries(_build_bytes(tar), "gzip")
    assert [e["name"] for e in toc] == [".no.prefetch.landmark", "kept"]


def test_prioritized_hardlink_brings_its_target_and_the_targets_parent() -> None:
    tar = _tar(
        [
            _node("d/", tarfile.DIRTYPE, mode=0o755),
            _reg("d/target", b"payload"),
            _reg("other", b"o"),
            _node("link", tarfile.LNKTYPE, linkname="d/target"),
        ]
    )
    opts = BuildOptions(gzip_level=1, prioritized=("link",))
    toc = toc_entries(_build_bytes(tar, opts), "gzip")
    assert [e["name"] for e in toc] == ["d/", "d/target", "link", ".prefetch.landmark", "other"]


def test_prioritized_file_under_an_implicit_directory_moves_without_it() -> None:
    tar = _tar([_reg("a"), _reg("x/y/z", b"zz"), _node("x/", tarfile.DIRTYPE)])
    opts = BuildOptions(gzip_level=1, prioritized=("/x/y/z",))
    toc = toc_entries(_build_bytes(tar, opts), "gzip")
    assert [e["name"] for e in toc] == ["x/", "x/y/z", ".prefetch.landmark", "a"]


def test_dot_slash_names_and_root_entry_are_kept_and_the_root_moves_with_prioritized() -> None:
    tar = _tar(
        [
            _node("./", tarfile.DIRTYPE, mode=0o755),
            _reg("./a", b"a"),
            _node("./sub/", tarfile.DIRTYPE, mode=0o700),
            _reg("./sub/b", b"b"),
        ]
    )
    blob = _build_bytes(tar, BuildOptions(gzip_level=1, prioritized=("sub/b",)))
    names = [e["name"] for e in toc_entries(blob, "gzip")]
    assert names == ["./", "./sub/", "./sub/b", ".prefetch.landmark", "./a"]
    assert set(listing(decompress_all(blob, "gzip"))) == {
        "",
        "a",
        "sub",
        "sub/b",
        TOC_NAME,
        ".prefetch.landmark",
    }


def test_gnu_long_names_and_pax_global_headers_are_read() -> None:
    long = "x/" + "y" * 200
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tf:
        info, data = _reg(long, b"gnu")
        info.size = 3
        tf.addfile(info, io.BytesIO(data))
    glob = io.BytesIO()
    with tarfile.open(
        fileobj=glob, mode="w", format=tarfile.PAX_FORMAT, pax_headers={"comment": "global"}
    ) as tf:
        info, data = _reg("g", b"pax")
        info.size = 3
        tf.addfile(info, io.BytesIO(data))
    for tar, name in ((buf.getvalue(), long), (glob.getvalue(), "g")):
        blob = _build_bytes(tar)
        got = listing(decompress_all(blob, "gzip"))
        assert got[name] == listing(tar)[name]
        assert name in [e["name"] for e in toc_entries(blob, "gzip")]


def test_missing_prioritized_file_is_an_error_unless_allowed() -> None:
    tar = _tar([_reg("a", b"a")])
    with pytest.raises(BuildError, match="prioritized file 'nope'"):
        _build_bytes(tar, BuildOptions(prioritized=("a", "nope")))
    dst = io.BytesIO()
    r = build(
        io.BytesIO(tar),
        dst,
        BuildOptions(prioritized=("a", "nope"), allow_missing_prioritized=True),
    )
    assert r.missed_prioritized == ("nope",)
    assert [e["name"] for e in toc_entries(dst.getvalue(), "gzip")] == ["a", ".prefetch.landmark"]


def test_binary_xattr_values_round_trip_byte_exact() -> None:
    cap = b"\x01\x00\x00\x02\xff\xfe\x80\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00"
    info, data = _reg("f", b"data")
    info.pax_headers = {
        "SCHILY.xattr.security.capability": cap.decode("utf-8", "surrogateescape"),
        "SCHILY.xattr.user.text": "héllo",
    }
    blob = _build_bytes(_tar([(info, data)]))
    got = listing(decompress_all(blob, "gzip"))["f"]
    assert dict(got.xattrs) == {"security.capability": cap, "user.text": "héllo".encode()}
    toc = toc_entries(blob, "gzip")
    xattrs = next(e for e in toc if e["name"] == "f")["xattrs"]
    assert list(xattrs) == ["security.capability", "user.text"]
    assert base64.b64decode(xattrs["security.capability"]) == cap


def test_long_names_big_ids_owner_names_and_fractional_mtimes_survive() -> None:
    long = "d/" + "n" * 150
    info, data = _reg(long, b"x", uid=2**24, gid=7, uname="ü" * 40, gname="g")
    info.mtime = 1_700_000_000.5
    old, _ = _reg("old", b"", mtime=0)
    older, _ = _reg("older", b"", mtime=-86400)
    same_owner, _ = _reg("same", b"", uid=2**24, uname="ü" * 40, gid=7, gname="h")
    blob = _build_bytes(_tar([(info, data), (old, b""), (older, b""), (same_owner, b"")]))
    got = listing(decompress_all(blob, "gzip"))
    assert got[long].uid == 2**24 and got[long].uname == "ü" * 40
    assert got[long].mtime == 1_700_000_000.5
    toc = {e["name"]: e for e in toc_entries(blob, "gzip")}
    assert toc[long]["modtime"] == "2023-11-14T22:13:21Z"  # rounded to the second
    assert toc[long]["userName"] == "ü" * 40 and toc[long]["uid"] == 2**24
    assert "modtime" not in toc["old"]  # the epoch itself is written as no time
    assert toc["older"]["modtime"] == "1969-12-31T00:00:00Z"
    # Owner names are written only when they change for the same ID.
    assert "userName" not in toc["same"] and toc["same"]["groupName"] == "h"


def test_devices_fifos_symlinks_and_modes_are_kept() -> None:
    tar = _tar(
        [
            _node("dev/null", tarfile.CHRTYPE, devmajor=1, devminor=3, mode=0o666),
            _node("dev/sda", tarfile.BLKTYPE, devmajor=8, devminor=0, mode=0o660),
            _node("fifo", tarfile.FIFOTYPE, mode=0o600),
            _node("sym", tarfile.SYMTYPE, linkname="../elsewhere", mode=0o777),
            _reg("suid", b"#!", mode=0o4755),
            _node("tmp/", tarfile.DIRTYPE, mode=0o1777),
        ]
    )
    toc = {e["name"]: e for e in toc_entries(_build_bytes(tar), "gzip")}
    assert toc["dev/null"]["type"] == "char"
    assert (toc["dev/null"]["devMajor"], toc["dev/null"]["devMinor"]) == (1, 3)
    assert toc["dev/sda"]["type"] == "block" and "devMinor" not in toc["dev/sda"]
    assert toc["fifo"]["type"] == "fifo" and toc["fifo"]["mode"] == 0o600
    assert toc["sym"]["linkName"] == "../elsewhere"
    assert toc["suid"]["mode"] == 0o4755
    assert toc["tmp/"]["mode"] == 0o1777


def test_build_file_replaces_the_destination_only_on_success(tmp_path: Path) -> None:
    good = tmp_path / "good.tar"
    good.write_bytes(_tar([_reg("a", b"a")]))
    bad = tmp_path / "bad.tar"
    bad.write_bytes(b"not a tar at all" * 100)
    dst = tmp_path / "out" / "blob.esgz"
    dst.parent.mkdir()
    build_file(good, dst, BuildOptions(gzip_level=1))
    before = dst.read_bytes()
    with pytest.raises(BuildError):
        build_file(bad, dst)
    assert dst.read_bytes() == before
    assert os.listdir(dst.parent) == ["blob.esgz"]


# --- Bad input --------------------------------------------------------------------------


@pytest.mark.parametrize("kind", [b"V", b"Z", tarfile.GNUTYPE_SPARSE])
def test_unsupported_entry_type_is_refused(kind: bytes) -> None:
    info = tarfile.TarInfo("weird")
    info.type = kind
    tar = _tar([_reg("ok", b"x"), (info, b"")])
    with pytest.raises(BuildError, match="unsupported") as e:
        _build_bytes(tar)
    assert e.value.entry == "weird"


def _member_offsets() -> dict[str, tuple[int, int]]:
    with tarfile.open(LAYER_TAR) as tf:
        return {m.name: (m.offset, m.offset_data) for m in tf}


@pytest.mark.parametrize("where", ["inside-header", "inside-payload", "after-header"])
def test_truncated_tar_is_refused(where: str) -> None:
    header, data = _member_offsets()["usr/lib/libbig.so"]
    cut = {"inside-header": header + 100, "inside-payload": data + 1000, "after-header": data}
    with pytest.raises(BuildError, match=r"truncated|unexpected end"):
        _build_bytes(LAYER_TAR.read_bytes()[: cut[where]])


def test_corrupt_header_in_the_middle_is_refused() -> None:
    header, _ = _member_offsets()["usr/lib/libbig.so"]
    data = bytearray(LAYER_TAR.read_bytes())
    data[header : header + 512] = random.Random(1).randbytes(512)
    with pytest.raises(BuildError, match=r"corrupt|invalid|checksum"):
        _build_bytes(bytes(data))


def test_lone_zero_block_before_more_entries_is_refused() -> None:
    first = _tar([_reg("a", b"a")])
    second = _tar([_reg("b", b"b")])
    end = len(first) - len(first.rstrip(b"\0"))
    lone = first[: len(first) - end + 512 + (-(len(first) - end) % 512)] + second
    with pytest.raises(BuildError, match="lone zero block"):
        _build_bytes(lone)
    # Two zero blocks end the archive: whatever follows is not read (as GNU tar does).
    toc = toc_entries(_build_bytes(first + second), "gzip")
    assert [e["name"] for e in toc] == [".no.prefetch.landmark", "a"]


@pytest.mark.parametrize("compression", ["gzip", "zstd"])
def test_truncated_compressed_input_is_refused(compression: str) -> None:
    plain = LAYER_TAR.read_bytes()
    if compression == "gzip":
        packed = gzip.compress(plain, 1)
    else:
        packed = zstandard.ZstdCompressor(level=1).compress(plain)
    with pytest.raises(BuildError, match="truncated"):
        _build_bytes(packed[: len(packed) // 2])


@pytest.mark.parametrize(
    "data",
    [
        random.Random(2).randbytes(4096),
        b"\x1f\x8b\x08" + random.Random(3).randbytes(4096),
        b"\x28\xb5\x2f\xfd" + random.Random(4).randbytes(4096),
        b"hello world\n",
    ],
    ids=["random", "gzip-magic", "zstd-magic", "text"],
)
def test_garbage_input_is_refused(data: bytes) -> None:
    with pytest.raises(BuildError):
        _build_bytes(data)


def test_name_that_is_not_utf8_is_refused() -> None:
    info, data = _reg(b"caf\xe9".decode("utf-8", "surrogateescape"), b"x")
    tar = io.BytesIO()
    with tarfile.open(
        fileobj=tar, mode="w", format=tarfile.GNU_FORMAT, errors="surrogateescape"
    ) as tf:
        info.size = 1
        tf.addfile(info, io.BytesIO(data))
    with pytest.raises(BuildError, match="not valid UTF-8"):
        _build_bytes(tar.getvalue())


def test_empty_input_builds_a_blob_with_only_the_landmark() -> None:
    blob = _build_bytes(b"")
    assert [e["name"] for e in toc_entries(blob, "gzip")] == [".no.prefetch.landmark"]


@pytest.mark.parametrize(
    "fields",
    [
        {"chunk_size": 0},
        {"min_chunk_size": -1},
        {"gzip_level": 10},
        {"zstd_level": 0},
        {"compression": "lz4"},
    ],
)
def test_invalid_options_are_refused(fields: dict[str, Any]) -> None:
    with pytest.raises(BuildError):
        BuildOptions(**fields)


# --- Memory -----------------------------------------------------------------------------

_MEMORY_PROBE = textwrap.dedent(
    """
    import resource, sys
    from blockfs.estargz import BuildOptions, build_file
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    opts = BuildOptions(compression=sys.argv[3], zstd_level=1, gzip_level=1, workers=2)
    build_file(sys.argv[1], sys.argv[2], opts, tmpdir=sys.argv[4])
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(before, after)
    """
)


def _write_big_tar(path: Path, size: int, *, zeros: bool) -> None:
    block = bytes(1 << 20) if zeros else random.Random(5).randbytes(1 << 20)
    info = tarfile.TarInfo("big.bin")
    info.size = size
    with open(path, "wb") as f:
        f.write(info.tobuf(tarfile.PAX_FORMAT))
        for i in range(size // len(block)):
            f.write(i.to_bytes(8, "little") + block[8:])
        f.write(bytes(-size % 512 + 1024))


@pytest.mark.parametrize(
    ("compression", "input_kind"), [("zstd", "plain-random"), ("gzip", "gzip-zeros")]
)
def test_building_a_200mb_file_keeps_memory_far_below_its_size(
    tmp_path: Path, compression: str, input_kind: str
) -> None:
    size = 200 << 20
    src = tmp_path / "big.tar"
    _write_big_tar(src, size, zeros=input_kind == "gzip-zeros")
    if input_kind == "gzip-zeros":
        subprocess.run(["gzip", "-1", "-n", str(src)], check=True)
        src = tmp_path / "big.tar.gz"
    dst = tmp_path / "big.esgz"
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    proc = subprocess.run(
        [sys.executable, "-c", _MEMORY_PROBE, str(src), str(dst), compression, str(tmp_path)],
        check=True,
        capture_output=True,
        text=True,
        env=env,
    )
    before_kib, after_kib = map(int, proc.stdout.split())
    growth = (after_kib - before_kib) * 1024
    assert growth < 64 << 20, f"peak RSS grew by {growth >> 20} MiB"
    toc = toc_entries(dst.read_bytes(), compression)  # type: ignore[arg-type]
    big = [e for e in toc if e["name"] == "big.bin"]
    assert big[0]["size"] == size and len(big) == size // (4 << 20)
