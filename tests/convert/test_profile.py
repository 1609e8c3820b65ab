"""Profiles without mounts: the server's read trace (data reads only, first reads only, in
order), the profile file, and rewriting an image from a profile (each layer's files first,
then the right landmark; the same source and profile give the same bytes)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from blockfs.cache import ChunkCache
from blockfs.convert import (
    ConvertOptions,
    LayerProfile,
    LayoutLocation,
    Profile,
    ProfileError,
    convert_image,
    profile_from_traces,
    read_trace,
    rewrite_with_profile,
)
from blockfs.estargz import (
    NO_PREFETCH_LANDMARK,
    PREFETCH_LANDMARK,
    BlobReader,
    CountingSource,
    FileBlobSource,
)
from blockfs.image import (
    EXTENTS_FILE,
    INDEX_FILE,
    BlobChunkReader,
    ExportTable,
    ExtentMap,
    FetchPolicy,
    LayerImage,
    ServerConfig,
    index_layer,
)
from blockfs.oci import ImageConfig, ImageLayout, Manifest
from blockfs.oci import annotations as ann
from tests.helpers.cli import blockfs
from tests.helpers.images import gunzipped_digest, make_layout
from tests.helpers.testdata import TESTDATA

BLOB = TESTDATA / "gzip-64k.esgz"


def index(tmp_path: Path, name: str = "l") -> Path:
    reader = BlobReader.open(FileBlobSource(BLOB))
    layer_dir = tmp_path / "layers" / name
    index_layer(
        reader, layer_dir, name=name, source={"type": "file", "path": str(BLOB)}, bytes_fetched=0
    )
    return layer_dir


def traced_image(tmp_path: Path) -> tuple[LayerImage, ExtentMap, list[str]]:
    layer_dir = index(tmp_path)
    emap = ExtentMap.load(layer_dir / EXTENTS_FILE)
    reader = BlobChunkReader(CountingSource(FileBlobSource(BLOB)), "gzip")
    cache = ChunkCache(tmp_path / "cache", max_bytes=1 << 30, memory_bytes=0)
    seen: list[str] = []
    image = LayerImage(
        "l", layer_dir / INDEX_FILE, emap, reader, cache,
        policy=FetchPolicy.exact(), trace=seen.append,
    )  # fmt: skip
    return image, emap, seen


def extent_of(emap: ExtentMap, name: str) -> int:
    return next(i for i in range(emap.extent_count) if emap.extent_name(i) == name)


def test_trace_names_each_file_once_at_its_first_data_read_in_read_order(tmp_path):
    image, emap, seen = traced_image(tmp_path)
    image.pread(0, emap.meta_size)  # superblock, inodes, directories: no file data
    assert seen == []
    second, first = extent_of(emap, "usr/lib/libbig.so"), extent_of(emap, "etc/passwd")
    image.pread(emap.extent_span(second)[0] + 4096, 4096)
    image.pread(emap.extent_span(first)[0], 4096)
    image.pread(emap.extent_span(second)[0], 8192)  # again: not traced again
    assert seen == ["usr/lib/libbig.so", "etc/passwd"]


def test_a_read_across_extents_traces_each_file_in_offset_order(tmp_path):
    image, emap, seen = traced_image(tmp_path)
    start = emap.extent_span(0)[0]
    end_of_second = emap.extent_span(1)[0] + emap.extent_span(1)[1]
    image.pread(start, end_of_second - start)
    assert seen == [emap.extent_name(0), emap.extent_name(1)]


def test_block_padding_past_a_file_end_is_not_a_read_of_it(tmp_path):
    image, emap, seen = traced_image(tmp_path)
    i = next(i for i in range(emap.extent_count) if emap.extent_span(i)[1] % 4096)
    start, size = emap.extent_span(i)
    image.pread(start + size, 4096 - size % 4096)
    assert seen == []


def test_export_table_appends_the_trace_of_each_export_to_its_file(tmp_path):
    index(tmp_path, "000-abc")
    trace = tmp_path / "trace"
    trace.mkdir()
    cache = ChunkCache(tmp_path / "cache", max_bytes=1 << 30, memory_bytes=0)
    table = ExportTable(tmp_path / "layers", cache, trace=trace)
    try:
        image = table.open("000-abc")
        emap = image.extents
        for name in ("etc/passwd", "usr/lib/libbig.so", "etc/passwd"):
            image.pread(emap.extent_span(extent_of(emap, name))[0], 4096)
    finally:
        table.close()
    assert read_trace(trace / "000-abc") == ("etc/passwd", "usr/lib/libbig.so")
    assert read_trace(trace / "no-such-export") == ()


def test_server_config_carries_the_trace_directory(tmp_path):
    params = {"root": str(tmp_path / "r"), "cache": str(tmp_path / "c")}
    assert ServerConfig.from_params(params).trace is None
    config = ServerConfig.from_params({**params, "trace": str(tmp_path / "t")})
    assert config.trace == tmp_path / "t"
    again = dict(p.split("=", 1) for p in config.to_params())
    assert ServerConfig.from_params(again) == config


def test_trace_lines_are_json_so_any_name_survives(tmp_path):
    path = tmp_path / "t"
    names = ["a\nb", "caf\u00e9", "bad\udcff", "./dup", "dup", "/abs/x"]
    path.write_text("".join(json.dumps(n) + "\n" for n in names), encoding="ascii")
    assert read_trace(path) == ("a\nb", "caf\u00e9", "bad\udcff", "dup", "abs/x")


def test_profile_round_trips_and_rejects_what_it_cannot_use(tmp_path):
    digest = "sha256:" + "a" * 64
    profile = Profile([LayerProfile(digest, ["x", "/y", "x"])], {"exit_code": 3})
    profile.save(tmp_path / "p.json")
    loaded = Profile.load(tmp_path / "p.json")
    assert loaded == profile
    assert loaded.files_of(digest) == ("x", "y")
    assert loaded.files_of("sha256:" + "b" * 64) == ()
    bad: object
    for bad in (
        [],
        {"version": 2, "layers": []},
        {"version": 1, "layers": [{"diff_id": "nope", "files": []}]},
        {"version": 1, "layers": [{"diff_id": digest, "files": "x"}]},
    ):
        (tmp_path / "bad.json").write_text(json.dumps(bad))
        with pytest.raises(ProfileError):
            Profile.load(tmp_path / "bad.json")
    with pytest.raises(ProfileError, match="cannot read"):
        Profile.load(tmp_path / "missing.json")


def test_profile_from_traces_keeps_layer_order_and_untraced_layers_empty(tmp_path):
    (tmp_path / "t0").write_text('"b"\n"a"\n')
    ids = ["sha256:" + c * 64 for c in "12"]
    profile = profile_from_traces(ids, [tmp_path / "t0", None], command=["sh"])
    assert [lp.files for lp in profile.layers] == [("b", "a"), ()]
    assert profile.workload == {"command": ["sh"]}


# -- rewriting an image from a profile ---------------------------------------------------


def lower(tree: Path) -> None:
    for d in ("a", "c"):
        (tree / d).mkdir()
        for i in range(20):
            (tree / d / f"f{i:02d}").write_bytes(f"{d}{i}".encode() * (100 + i))


def upper(tree: Path) -> None:
    (tree / "b").mkdir()
    for i in range(10):
        (tree / "b" / f"g{i}").write_bytes(f"g{i}".encode() * 300)


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("profile-src") / "layout"
    make_layout(root, [lower, upper])
    return root


def layers_of(root: Path, tag: str) -> tuple[list[Path], Manifest, ImageConfig]:
    layout = ImageLayout(root)
    manifest = layout.read_document(layout.resolve(tag))
    assert isinstance(manifest, Manifest)
    config = ImageConfig.from_bytes(layout.read_blob(manifest.config.digest))
    return [layout.blob_path(d.digest) for d in manifest.layers], manifest, config


def blob_order(blob: Path) -> list[str]:
    reader = BlobReader.open(FileBlobSource(blob))
    return [e.name for e in reader.toc.entries if e.type == "reg"]


def layout(root: Path, *, create: bool = False) -> LayoutLocation:
    if create:
        root.mkdir(parents=True, exist_ok=True)
        return LayoutLocation(ImageLayout.create(root), "v1")
    return LayoutLocation(ImageLayout(root), "v1")


def rewrite(src: Path, dst: Path, profile: Profile, **options: object) -> None:
    rewrite_with_profile(
        layout(src),
        layout(dst, create=True),
        profile,
        ConvertOptions(**options),  # type: ignore[arg-type]
    )


def test_rewrite_puts_each_layers_files_first_in_profile_order(source, tmp_path):
    _, _, config = layers_of(source, "v1")
    low, up = config.diff_ids
    profile = Profile(
        [
            LayerProfile(low, ["c/f03", "a/f10", "b/g1"]),  # b/g1 is not in this layer
            LayerProfile(up, ["gone/file"]),  # a stale name: nothing of it is here
        ]
    )
    rewrite(source, tmp_path / "out", profile)
    blobs, manifest, new_config = layers_of(tmp_path / "out", "v1")
    first, second = (blob_order(b) for b in blobs)
    assert first[:3] == ["c/f03", "a/f10", PREFETCH_LANDMARK]
    everything = {f"{d}/f{i:02d}" for d in "ac" for i in range(20)}
    assert sorted(first[3:]) == sorted(everything - {"c/f03", "a/f10"})
    assert second[0] == NO_PREFETCH_LANDMARK
    for blob, layer, diff_id in zip(blobs, manifest.layers, new_config.diff_ids, strict=True):
        assert gunzipped_digest(blob) == diff_id
        reader = BlobReader.open(
            FileBlobSource(blob), toc_digest=layer.annotations[ann.ESTARGZ_TOC_DIGEST]
        )
        reader.verify()


@pytest.mark.parametrize("compression", ["gzip", "zstd"])
def test_the_same_source_and_profile_give_byte_identical_layers(source, tmp_path, compression):
    _, _, config = layers_of(source, "v1")
    profile = Profile([LayerProfile(config.diff_ids[0], ["a/f07", "c/f19"])])
    for out in ("one", "two"):
        rewrite(source, tmp_path / out, profile, compression=compression)
    one, manifest_one, _ = layers_of(tmp_path / "one", "v1")
    two, manifest_two, _ = layers_of(tmp_path / "two", "v1")
    assert manifest_one == manifest_two
    assert [b.read_bytes() for b in one] == [b.read_bytes() for b in two]


def test_an_estargz_source_is_rewritten_too(source, tmp_path):
    convert_image(layout(source), layout(tmp_path / "esgz", create=True))
    _, _, config = layers_of(tmp_path / "esgz", "v1")
    profile = Profile([LayerProfile(config.diff_ids[1], ["b/g7"])])
    rewrite(tmp_path / "esgz", tmp_path / "out", profile)
    blobs, _, _ = layers_of(tmp_path / "out", "v1")
    assert blob_order(blobs[1])[:2] == ["b/g7", PREFETCH_LANDMARK]
    assert blob_order(blobs[0])[0] == NO_PREFETCH_LANDMARK


def test_record_in_refuses_a_profile_of_another_image_and_warns_of_foreign_layers(source, tmp_path):
    _, _, config = layers_of(source, "v1")
    foreign = LayerProfile("sha256:" + "f" * 64, ["a/f01"])
    Profile([foreign]).save(tmp_path / "other.json")
    out = blockfs(
        "image", "optimize", f"oci:{source}:v1", f"oci:{tmp_path / 'o1'}:v1",
        "--record-in", str(tmp_path / "other.json"), check=False,
    )  # fmt: skip
    assert out.returncode == 1
    assert "names no layer of" in out.stderr and "no diff_id matches" in out.stderr
    Profile([foreign, LayerProfile(config.diff_ids[1], ["b/g2"])]).save(tmp_path / "mixed.json")
    out = blockfs(
        "image", "optimize", f"oci:{source}:v1", f"oci:{tmp_path / 'o2'}:v1",
        "--record-in", str(tmp_path / "mixed.json"),
    )  # fmt: skip
    assert f"blockfs: warning: the profile's layer {foreign.diff_id} (1 files)" in out.stderr
    assert "layer 2: " in out.stdout and "(1 file(s) first)\n  b/g2\n" in out.stdout
    assert "(nothing run)" in out.stdout
